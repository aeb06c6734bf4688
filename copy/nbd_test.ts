import { listenUnix } from "../server/listener.ts";
import { Exports } from "../server/exports.ts";
import { NbdServer } from "../server/server.ts";
import { Params } from "../core/params.ts";
import type { PluginInstance } from "../core/backend.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { randomBytes, tempDir } from "../tests/helpers.ts";
import { defaultConnections, NbdEndpoint, onThisMachine } from "./nbd.ts";

/** Our server on a Unix socket, in this process: a memory export, optionally filtered. */
async function serve(
  dir: string,
  options: { size?: string; readonly?: boolean } = {},
) {
  const plugin: PluginInstance = await memoryPlugin.create(
    Params.parse([options.size ?? "4M"], "size"),
  );
  const server = new NbdServer({
    exports: new Exports({ plugin }),
    readonly: options.readonly ?? false,
  });
  const socket = `${dir}/sock`;
  const listener = await listenUnix(server, socket);
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    async [Symbol.asyncDispose]() {
      listener.close();
      await server.shutdown();
    },
  };
}

Deno.test("onThisMachine(): Unix sockets, loopback and local addresses; other hosts are remote", () => {
  for (
    const uri of [
      "nbd+unix:///?socket=/tmp/s",
      "nbd://localhost/",
      "nbd://LOCALHOST:10809/disk",
      "nbd://127.0.0.1/",
      "nbd://127.1.2.3:10809/",
      "nbds://[::1]:10809/",
      "nbd://", // no host: localhost
    ]
  ) assertEquals(onThisMachine(uri), true, uri);
  for (const uri of ["nbd://example.com/disk", "nbd://192.0.2.1/", "nbd://[2001:db8::1]/"]) {
    assertEquals(onThisMachine(uri), false, uri);
  }
  const own = Deno.networkInterfaces().find((entry) => !entry.address.startsWith("127."));
  if (own) {
    const host = own.family === "IPv6" ? `[${own.address}]` : own.address;
    assertEquals(onThisMachine(`nbd://${host}:10809/`), true, own.address);
  }
});

Deno.test("defaultConnections() is 4, and 1 for a server on this machine", () => {
  assertEquals(defaultConnections("nbd://example.com/disk"), 4);
  assertEquals(defaultConnections("nbd+unix:///?socket=/tmp/s"), 1);
  assertEquals(defaultConnections("nbd://localhost:10809/"), 1);
  assertEquals(defaultConnections("nbd://127.0.0.1/disk"), 1);
});

Deno.test("NbdEndpoint reads, writes, zeroes and reports holes as zero runs", async () => {
  await using dir = await tempDir();
  await using server = await serve(dir.path);
  const endpoint = await NbdEndpoint.open(server.uri, server.uri, "destination", {
    connections: 2,
  });
  assertEquals([endpoint.size, endpoint.canExtents, endpoint.isZero], [4 << 20, true, false]);
  const data = randomBytes(1 << 20, 7);
  await endpoint.write(data, 1 << 20);
  await endpoint.zero((1 << 20) + 4096, 8192, false);
  await endpoint.flush();
  const back = new Uint8Array(1 << 20);
  assertEquals(await endpoint.read(back, 1 << 20), 1 << 20);
  data.fill(0, 4096, 4096 + 8192);
  assertBytes(back, data);
  const extents = await endpoint.extents(0, 4 << 20);
  assertEquals(extents[0], { offset: 0, length: 1 << 20, zero: true });
  assertOk(extents.some((e) => !e.zero && e.offset === 1 << 20));
  let at = 0;
  for (const e of extents) {
    assertEquals(e.offset, at);
    at += e.length;
  }
  await endpoint.close();
});

Deno.test("NbdEndpoint refuses a read-only export as destination", async () => {
  await using dir = await tempDir();
  await using server = await serve(dir.path, { readonly: true });
  await assertRejects(
    () => NbdEndpoint.open("ro", server.uri, "destination", {}),
    Error,
    "Cannot write to ro: the export is read-only",
  );
  const source = await NbdEndpoint.open("ro", server.uri, "source", {});
  await source.close();
});
