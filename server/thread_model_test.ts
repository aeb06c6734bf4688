/**
 * The thread model is enforced centrally: a plugin or filter that
 * declares serialize_requests never sees two calls of one connection
 * overlap, serialize_all_requests never two calls at all, and
 * serialize_connections never two connections' calls (the second client
 * waits to open). parallel is checked to overlap, so the probes can fail.
 */

import { assertEquals, assertOk } from "../tests/assert.ts";
import { definePlugin } from "../core/authoring.ts";
import { defineFilter } from "../core/authoring.ts";
import type { Filter, Plugin, ThreadModel } from "../core/backend.ts";
import { Params } from "../core/params.ts";
import { NbdClient } from "../client/client.ts";
import { Exports } from "./exports.ts";
import { listenUnix } from "./listener.ts";
import { NbdServer } from "./server.ts";
import { startLayers } from "./stack.ts";

/** Records how many calls (and of which connections) run at once. */
class Probe {
  active = 0;
  maxActive = 0;
  maxActivePerConnection = 0;
  readonly perConnection = new Map<number, number>();
  readonly connectionsAtOnce = new Set<number>();
  maxConnectionsAtOnce = 0;

  async call(connection: number): Promise<void> {
    this.active++;
    const mine = (this.perConnection.get(connection) ?? 0) + 1;
    this.perConnection.set(connection, mine);
    this.connectionsAtOnce.add(connection);
    this.maxActive = Math.max(this.maxActive, this.active);
    this.maxActivePerConnection = Math.max(this.maxActivePerConnection, mine);
    this.maxConnectionsAtOnce = Math.max(this.maxConnectionsAtOnce, this.connectionsAtOnce.size);
    await new Promise((r) => setTimeout(r, 2));
    this.active--;
    const left = this.perConnection.get(connection)! - 1;
    this.perConnection.set(connection, left);
    if (left === 0) this.connectionsAtOnce.delete(connection);
  }
}

function probePlugin(probe: Probe, threadModel?: ThreadModel): Plugin {
  return definePlugin({
    name: "probe",
    threadModel,
    create: () => ({
      open: (context) => ({
        size: () => 1 << 20,
        async pread(buf) {
          await probe.call(context.connectionId);
          buf.fill(1);
        },
      }),
    }),
  });
}

/** A filter that declares a model and changes nothing. */
function modelFilter(threadModel: ThreadModel): Filter {
  return defineFilter({ name: "model", threadModel });
}

async function serve(plugin: Plugin, filters: Filter[] = []) {
  const dir = await Deno.makeTempDir({ prefix: "nbd-thread-model" });
  const layers = await startLayers(filters, plugin, new Params());
  const server = new NbdServer({
    exports: new Exports({ plugin: layers.plugin, filters: layers.filters }),
    log: () => {},
  });
  const listener = await listenUnix(server, `${dir}/sock`);
  return {
    uri: `nbd+unix:///?socket=${dir}/sock`,
    async [Symbol.asyncDispose]() {
      listener.close();
      await server.shutdown();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Many reads at once on each client. */
async function burst(clients: NbdClient[], n = 16): Promise<void> {
  await Promise.all(clients.flatMap((c) =>
    Array.from({ length: n }, async (_, i) => {
      const buf = new Uint8Array(4096);
      await c.pread(buf, i * 4096);
      assertEquals(buf[0], 1);
    })
  ));
}

Deno.test("thread model: parallel calls overlap, within and across connections", async () => {
  const probe = new Probe();
  await using server = await serve(probePlugin(probe));
  await using a = await NbdClient.connect(server.uri);
  await using b = await NbdClient.connect(server.uri);
  await burst([a, b]);
  assertOk(probe.maxActivePerConnection > 1, `${probe.maxActivePerConnection}`);
  assertOk(probe.maxConnectionsAtOnce > 1, `${probe.maxConnectionsAtOnce}`);
});

Deno.test("thread model: serialize_requests never overlaps two calls of a connection", async () => {
  const probe = new Probe();
  await using server = await serve(probePlugin(probe, "serialize_requests"));
  await using a = await NbdClient.connect(server.uri);
  await using b = await NbdClient.connect(server.uri);
  await burst([a, b]);
  assertEquals(probe.maxActivePerConnection, 1);
  // Only per connection: two connections still overlap.
  assertOk(probe.maxConnectionsAtOnce > 1, `${probe.maxConnectionsAtOnce}`);
});

Deno.test("thread model: a filter's serialize_all_requests serializes a parallel plugin", async () => {
  const probe = new Probe();
  await using server = await serve(probePlugin(probe), [modelFilter("serialize_all_requests")]);
  await using a = await NbdClient.connect(server.uri);
  await using b = await NbdClient.connect(server.uri);
  await burst([a, b]);
  assertEquals(probe.maxActive, 1);
});

Deno.test("thread model: serialize_connections never overlaps two connections' calls", async () => {
  const probe = new Probe();
  await using server = await serve(probePlugin(probe, "serialize_connections"));
  const a = await NbdClient.connect(server.uri);
  let bConnected = false;
  const bPromise = NbdClient.connect(server.uri).then((b) => {
    bConnected = true;
    return b;
  });
  await burst([a]);
  await new Promise((r) => setTimeout(r, 50));
  assertOk(!bConnected, "the second client opened while the first was connected");
  await a.close();
  const b = await bPromise;
  await burst([b]);
  await b.close();
  assertEquals(probe.maxConnectionsAtOnce, 1);
  assertEquals(probe.maxActive, 1);
});
