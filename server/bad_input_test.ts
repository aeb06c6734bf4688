// Hostile and malformed input, one test per class, each asserting the exact
// reply or the close the protocol prescribes. The classes server_test.ts
// already covers (bad magics, unknown flags and commands, past-the-end
// requests, oversize payloads, connection and time limits) are not repeated.

import * as C from "../protocol/constants.ts";
import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";
import { RawClient, replyErrno } from "../tests/raw_client.ts";
import {
  encodeInfoRequest,
  encodeMetaContextQuery,
  encodeOptionRequest,
} from "../protocol/handshake.ts";
import { PLUGINS } from "../plugins/mod.ts";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { Exports } from "./exports.ts";
import { listenUnix } from "./listener.ts";
import { Params } from "../core/params.ts";
import { NbdServer, type NbdServerOptions } from "./server.ts";
import { MAX_IN_FLIGHT_BYTES } from "./transmission.ts";

const MiB = 1024 * 1024;

interface Fixture extends AsyncDisposable {
  path: string;
  logs: string[];
}

async function serve(
  plugin: string | Plugin,
  words: string[],
  options: Partial<NbdServerOptions> = {},
): Promise<Fixture> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-bad-input" });
  const path = `${dir}/sock`;
  const p = typeof plugin === "string" ? PLUGINS.get(plugin)! : plugin;
  const instance = await p.create(Params.parse(words, p.magicParam));
  const logs: string[] = [];
  const server = new NbdServer({
    exports: new Exports({ plugin: instance }),
    log: (m) => logs.push(m),
    ...options,
  });
  const listener = await listenUnix(server, path);
  return {
    path,
    logs,
    async [Symbol.asyncDispose]() {
      listener.close();
      await server.shutdown();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** Waits (up to 10 s) for a log line containing `text`. */
async function logged(f: Fixture, text: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!f.logs.some((line) => line.includes(text))) {
    assertOk(Date.now() < deadline, `no log line "${text}" in: ${f.logs.join(" | ")}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function client(path: string): Promise<RawClient & Disposable> {
  const c = await RawClient.connect(path);
  return Object.assign(c, { [Symbol.dispose]: () => c.close() });
}

/** A compact or extended request header with exact 64-bit fields. */
function requestBytes(
  extended: boolean,
  type: number,
  fields: { flags?: number; cookie?: number; offset?: bigint; length?: bigint },
): Uint8Array {
  const out = new Uint8Array(extended ? 32 : 28);
  const v = new DataView(out.buffer);
  v.setUint32(0, extended ? C.NBD_EXTENDED_REQUEST_MAGIC : C.NBD_REQUEST_MAGIC);
  v.setUint16(4, fields.flags ?? 0);
  v.setUint16(6, type);
  v.setBigUint64(8, BigInt(fields.cookie ?? 1));
  v.setBigUint64(16, fields.offset ?? 0n);
  if (extended) v.setBigUint64(24, fields.length ?? 0n);
  else v.setUint32(24, Number(fields.length ?? 0n));
  return out;
}

/** A plugin whose writes wait until the test releases them; counts writes started. */
function gatedPlugin(): { plugin: Plugin; started: () => number; release: () => void } {
  let count = 0;
  let release!: () => void;
  const released = new Promise<void>((r) => release = r);
  const plugin: Plugin = {
    name: "gated",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => MiB,
            pread: (buf) => Promise.resolve(buf.fill(0) && undefined),
            async pwrite() {
              count++;
              await released;
            },
            flush: () => Promise.resolve(),
          })),
      }),
  };
  return { plugin, started: () => count, release };
}

Deno.test("extended replies echo a 64-bit request offset exactly, even beyond 2^53", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  await c.go("", { extended: true });
  for (const offset of [(1n << 64n) - 512n, (1n << 53n) + 1n, 1n << 63n]) {
    await c.send(requestBytes(true, C.NBD_CMD_READ, { offset, length: 512n, cookie: 9 }));
    const header = new DataView((await c.read(32)).buffer);
    assertEquals(header.getUint32(0), C.NBD_EXTENDED_REPLY_MAGIC);
    assertEquals(header.getUint16(6), C.NBD_REPLY_TYPE_ERROR);
    assertEquals(header.getBigUint64(16), offset);
    const payload = await c.read(Number(header.getBigUint64(24)));
    assertEquals(new DataView(payload.buffer).getUint32(0), C.NBD_EINVAL);
  }
});

Deno.test("limits: no more than --max-in-flight requests reach the backend at once", async () => {
  const gate = gatedPlugin();
  await using f = await serve(gate.plugin, [], { maxInFlight: 2, verbose: true });
  using c = await client(f.path);
  await c.start();
  await c.go();
  for (let i = 1; i <= 5; i++) {
    await c.request(C.NBD_CMD_WRITE, { offset: i * 512, payload: new Uint8Array(512), cookie: i });
  }
  // The server says when it stops reading; only then is the count final.
  await logged(f, "2 requests in flight: reading no more yet");
  assertEquals(gate.started(), 2);
  gate.release();
  const cookies = [];
  for (let i = 0; i < 5; i++) {
    const r = await c.reply();
    assertEquals(replyErrno([r]), 0);
    cookies.push(r.cookie);
  }
  assertEquals(cookies.sort(), [1, 2, 3, 4, 5]);
  assertEquals(gate.started(), 5);
});

Deno.test("limits: READ replies count against the in-flight byte budget (a client that never reads them)", async () => {
  // Reads wait until released, so every buffer the server allocates stays allocated.
  let started = 0;
  let release!: () => void;
  const released = new Promise<void>((r) => release = r);
  const slow: Plugin = {
    name: "slow",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => 1024 * MiB,
            async pread(buf) {
              started++;
              await released;
              buf.fill(0);
            },
          })),
      }),
  };
  await using f = await serve(slow, [], { verbose: true });
  using c = await client(f.path);
  await c.start();
  await c.go();
  const size = 16 * MiB;
  for (let i = 0; i < 64; i++) {
    await c.request(C.NBD_CMD_READ, { offset: i * size, length: size, cookie: i + 1 });
  }
  await logged(f, "bytes of requests in flight: reading no more yet");
  const before = started;
  release();
  assertEquals(before, MAX_IN_FLIGHT_BYTES / size);
  for (let i = 0; i < 64; i++) assertEquals(replyErrno([await c.reply(size)]), 0);
  assertEquals(started, 64);
});

Deno.test("DISC with requests in flight: they finish and are answered before the close", async () => {
  const gate = gatedPlugin();
  await using f = await serve(gate.plugin, []);
  using c = await client(f.path);
  await c.start();
  await c.go();
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(512), cookie: 7 });
  await c.send(requestBytes(false, C.NBD_CMD_DISC, {}));
  while (gate.started() === 0) await new Promise((r) => setTimeout(r, 10));
  gate.release();
  const r = await c.reply();
  assertEquals([r.kind, replyErrno([r]), r.cookie], ["simple", 0, 7]);
  assertOk(await c.closedByServer());
});

Deno.test("many meta contexts in one query: one reply for base:allocation, the rest ignored", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  await c.ask(C.NBD_OPT_STRUCTURED_REPLY);
  const queries = Array.from({ length: 5000 }, (_, i) => `x-fuzz:context-${i}`);
  assertEquals(
    (await c.ask(
      C.NBD_OPT_LIST_META_CONTEXT,
      encodeMetaContextQuery({ exportName: "", queries }),
    )).map((r) => r.type),
    [C.NBD_REP_ACK],
  );
  queries.splice(2500, 0, C.BASE_ALLOCATION);
  const set = await c.ask(
    C.NBD_OPT_SET_META_CONTEXT,
    encodeMetaContextQuery({ exportName: "", queries }),
  );
  assertEquals(set.map((r) => r.type), [C.NBD_REP_META_CONTEXT, C.NBD_REP_ACK]);
  // A count promising more queries than the data holds is refused before any allocation.
  const lying = encodeMetaContextQuery({ exportName: "", queries: [C.BASE_ALLOCATION] });
  new DataView(lying.buffer).setUint32(4, 0x7fffffff);
  assertEquals(
    (await c.ask(C.NBD_OPT_SET_META_CONTEXT, lying)).map((r) => r.type),
    [C.NBD_REP_ERR_INVALID],
  );
  // The selection made before still stands for GO.
  const { flags } = await c.go();
  assertOk(flags & C.NBD_FLAG_SEND_DF);
  await c.request(C.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 });
  assertEquals(replyErrno(await c.replies()), 0);
});

Deno.test("huge export names and context names are refused; EXPORT_NAME with one closes", async () => {
  await using f = await serve("memory", ["1M"]);
  const huge = "n".repeat(4097);
  {
    using c = await client(f.path);
    await c.start();
    for (const option of [C.NBD_OPT_INFO, C.NBD_OPT_GO]) {
      assertEquals(
        (await c.ask(option, encodeInfoRequest({ name: huge, infos: [] }))).map((r) => r.type),
        [C.NBD_REP_ERR_INVALID],
      );
    }
    assertEquals(
      (await c.ask(C.NBD_OPT_INFO, encodeInfoRequest({ name: "n".repeat(65536), infos: [] })))
        .map((r) => r.type),
      [C.NBD_REP_ERR_INVALID],
    );
    await c.ask(C.NBD_OPT_STRUCTURED_REPLY);
    for (const query of [{ exportName: huge, queries: [] }, { exportName: "", queries: [huge] }]) {
      assertEquals(
        (await c.ask(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextQuery(query))).map((r) => r.type),
        [C.NBD_REP_ERR_INVALID],
      );
    }
    // Still negotiating normally.
    assertEquals((await c.go()).size, MiB);
  }
  {
    using c = await client(f.path);
    await c.start();
    await c.option(C.NBD_OPT_EXPORT_NAME, new TextEncoder().encode(huge));
    assertOk(await c.closedByServer());
  }
});

Deno.test("options that take no data refuse it with ERR_INVALID and the session goes on", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  for (
    const option of [C.NBD_OPT_STRUCTURED_REPLY, C.NBD_OPT_EXTENDED_HEADERS, C.NBD_OPT_STARTTLS]
  ) {
    assertEquals(
      (await c.ask(option, new Uint8Array(3))).map((r) => [r.option, r.type]),
      [[option, C.NBD_REP_ERR_INVALID]],
    );
  }
  // The refused options changed nothing: replies are still simple.
  await c.go();
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 8, cookie: 3 });
  const r = await c.reply(8);
  assertEquals([r.kind, replyErrno([r])], ["simple", 0]);
});

Deno.test("requests before the handshake ends close the connection", async () => {
  await using f = await serve("memory", ["1M"]);
  {
    // In place of the client flags: the request magic has unknown flag bits set.
    using c = await client(f.path);
    await c.greeting();
    await c.send(requestBytes(false, C.NBD_CMD_READ, { length: 512n }));
    assertOk(await c.closedByServer());
  }
  {
    // In place of an option: not IHAVEOPT.
    using c = await client(f.path);
    await c.start();
    await c.send(requestBytes(false, C.NBD_CMD_READ, { length: 512n }));
    assertOk(await c.closedByServer());
  }
  {
    // Requests pipelined right behind GO are served once GO succeeds.
    using c = await client(f.path);
    await c.start();
    const go = encodeOptionRequest(
      C.NBD_OPT_GO,
      encodeInfoRequest({ name: "", infos: [] }),
    );
    const read = requestBytes(false, C.NBD_CMD_READ, { length: 16n, cookie: 5 });
    const both = new Uint8Array(go.length + read.length);
    both.set(go);
    both.set(read, go.length);
    await c.send(both);
    let reply;
    do reply = await c.optionReply(); while (reply.type !== C.NBD_REP_ACK);
    const r = await c.reply(16);
    assertEquals([replyErrno([r]), r.cookie], [0, 5]);
  }
});

Deno.test("extended-header mismatches: wrong magic or missing PAYLOAD_LEN close; a stray payload is drained", async () => {
  await using f = await serve("memory", ["1M"]);
  {
    using c = await client(f.path);
    await c.start();
    await c.go();
    await c.send(requestBytes(true, C.NBD_CMD_READ, { length: 512n }));
    assertOk(await c.closedByServer());
  }
  {
    // EXPORT_NAME is forbidden once extended headers are on.
    using c = await client(f.path);
    await c.start();
    await c.ask(C.NBD_OPT_EXTENDED_HEADERS);
    await c.option(C.NBD_OPT_EXPORT_NAME);
    assertOk(await c.closedByServer());
  }
  {
    using c = await client(f.path);
    await c.start();
    await c.go("", { extended: true });
    await c.send(requestBytes(true, C.NBD_CMD_WRITE, { length: 512n }));
    assertOk(await c.closedByServer());
  }
  {
    using c = await client(f.path);
    await c.start();
    await c.go("", { extended: true, meta: [C.BASE_ALLOCATION] });
    // PAYLOAD_LEN on commands that take no payload: EINVAL, payload skipped.
    for (const type of [C.NBD_CMD_READ, C.NBD_CMD_TRIM, 77]) {
      await c.request(type, {
        flags: C.NBD_CMD_FLAG_PAYLOAD_LEN,
        payload: new Uint8Array(300).fill(0x25),
      });
      assertEquals(replyErrno(await c.replies()), C.NBD_EINVAL);
    }
    // BLOCK_STATUS payloads: wrong size, unknown id, repeated id; then a good one.
    const status = (ids: number[], extra = 0) => {
      const p = new Uint8Array(8 + 4 * ids.length + extra);
      const v = new DataView(p.buffer);
      v.setBigUint64(0, 4096n);
      ids.forEach((id, i) => v.setUint32(8 + 4 * i, id));
      return p;
    };
    for (
      const payload of [status([1], 2), status([99]), status([1, 1]), new Uint8Array(4)]
    ) {
      await c.request(C.NBD_CMD_BLOCK_STATUS, { flags: C.NBD_CMD_FLAG_PAYLOAD_LEN, payload });
      assertEquals(replyErrno(await c.replies()), C.NBD_EINVAL);
    }
    // PAYLOAD_LEN with no payload at all: the effect length is missing, so EINVAL too.
    await c.send(requestBytes(true, C.NBD_CMD_BLOCK_STATUS, {
      flags: C.NBD_CMD_FLAG_PAYLOAD_LEN,
      length: 0n,
    }));
    assertEquals(replyErrno(await c.replies()), C.NBD_EINVAL);
    await c.request(C.NBD_CMD_BLOCK_STATUS, {
      flags: C.NBD_CMD_FLAG_PAYLOAD_LEN,
      payload: status([1]),
    });
    const [chunk] = await c.replies();
    assertOk(chunk!.kind === "chunk" && chunk!.type === C.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
  }
});

Deno.test("offset+length overflow: EINVAL for reads and trims, ENOSPC for writes, payload drained", async () => {
  await using f = await serve("memory", ["1M"]);
  const max = (1n << 64n) - 1n;
  {
    using c = await client(f.path);
    await c.start();
    await c.go();
    await c.send(requestBytes(false, C.NBD_CMD_READ, { offset: max, length: 2n }));
    assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
    await c.send(requestBytes(false, C.NBD_CMD_TRIM, { offset: max - 1n, length: 0xffffffffn }));
    assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
    const write = requestBytes(false, C.NBD_CMD_WRITE, { offset: max - 511n, length: 1024n });
    await c.send(write);
    await c.send(new Uint8Array(1024).fill(0x67)); // would look like a reply magic if misread
    assertEquals(replyErrno([await c.reply()]), C.NBD_ENOSPC);
    await c.request(C.NBD_CMD_READ, { offset: 0, length: 8, cookie: 4 });
    assertEquals(replyErrno([await c.reply(8)]), 0);
  }
  {
    using c = await client(f.path);
    await c.start();
    await c.go("", { extended: true });
    for (
      const [type, offset, length] of [
        [C.NBD_CMD_READ, 0n, max],
        [C.NBD_CMD_TRIM, 1n, max],
        [C.NBD_CMD_CACHE, max, max],
        [C.NBD_CMD_WRITE_ZEROES, 1n << 63n, 1n << 63n],
      ] as const
    ) {
      await c.send(requestBytes(true, type, { offset, length }));
      const errno = type === C.NBD_CMD_WRITE_ZEROES ? C.NBD_ENOSPC : C.NBD_EINVAL;
      assertEquals(replyErrno(await c.replies()), errno, C.commandName(type));
    }
  }
});

Deno.test("a client cut off mid-option or mid-payload does not disturb the next one", async () => {
  await using f = await serve("memory", ["1M"]);
  {
    using c = await client(f.path);
    await c.start();
    const option = encodeOptionRequest(C.NBD_OPT_INFO, new Uint8Array(500));
    await c.send(option.subarray(0, 200));
  }
  {
    using c = await client(f.path);
    await c.start();
    await c.go("", { extended: true });
    const header = requestBytes(true, C.NBD_CMD_WRITE, {
      flags: C.NBD_CMD_FLAG_PAYLOAD_LEN,
      offset: 4096n,
      length: 65536n,
    });
    await c.send(header);
    await c.send(new Uint8Array(1000).fill(1));
  }
  using c = await client(f.path);
  await c.start();
  await c.go();
  await c.request(C.NBD_CMD_READ, { offset: 4096, length: 4096 });
  const r = await c.reply(4096);
  // The cut-off WRITE never happened: the range still reads as zeroes.
  assertEquals(replyErrno([r]), 0);
  assertOk(r.kind === "simple" && r.data!.every((b) => b === 0));
});

/** Pipes this process holds open (the splice path keeps one per connection). */
function pipes(): number {
  let n = 0;
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    try {
      if (Deno.readLinkSync(`/proc/self/fd/${entry.name}`).startsWith("pipe:")) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

for (const spliced of [true, false]) {
  Deno.test({
    name: `file WRITEs ${
      spliced ? "spliced from the socket" : "with NBD_NO_SPLICE"
    } land byte for byte; a payload cut off does not disturb the next client`,
    ignore: Deno.build.os !== "linux" || Deno.env.get("NBD_PORTABLE") === "1",
    async fn() {
      const dir = await Deno.makeTempDir({ prefix: "nbd-splice" });
      const image = `${dir}/disk.img`;
      const size = 4 * MiB;
      await Deno.writeFile(image, new Uint8Array(size));
      const saved = Deno.env.get("NBD_NO_SPLICE");
      if (spliced) Deno.env.delete("NBD_NO_SPLICE");
      else Deno.env.set("NBD_NO_SPLICE", "1");
      try {
        await using f = await serve("file", [image]);
        const expected = new Uint8Array(size);
        const before = pipes();
        {
          using c = await client(f.path);
          await c.start();
          await c.go();
          // Large and small, aligned and odd, FUA or not, all in flight at once.
          const writes: Array<[number, number, number]> = [
            [0, 256 * 1024, 0],
            [300001, 65536, 0],
            [1 << 20, 1 << 20, C.NBD_CMD_FLAG_FUA],
            [2200000, 100000, 0],
            [3 << 20, 4096, 0],
          ];
          let cookie = 1;
          for (const [offset, length, flags] of writes) {
            const payload = randomBytes(length, cookie);
            expected.set(payload, offset);
            await c.request(C.NBD_CMD_WRITE, { offset, payload, flags, cookie: cookie++ });
          }
          await c.request(C.NBD_CMD_FLUSH, { cookie: cookie++ });
          for (let i = 0; i < writes.length + 1; i++) {
            assertEquals(replyErrno([await c.reply()]), 0);
          }
          // The splice path keeps a pipe while the connection lasts.
          assertEquals(pipes() > before, spliced);
        }
        assertBytes(await Deno.readFile(image), expected);
        {
          using c = await client(f.path);
          await c.start();
          await c.go();
          await c.send(requestBytes(false, C.NBD_CMD_WRITE, { offset: 0n, length: 262144n }));
          await c.send(new Uint8Array(100000).fill(9));
        }
        await logged(f, "while reading a request payload");
        using c = await client(f.path);
        await c.start();
        await c.go();
        const payload = randomBytes(131072, 99);
        await c.request(C.NBD_CMD_WRITE, { offset: 1 << 20, payload });
        assertEquals(replyErrno([await c.reply()]), 0);
        await c.request(C.NBD_CMD_READ, { offset: 1 << 20, length: payload.length });
        const r = await c.reply(payload.length);
        assertEquals(replyErrno([r]), 0);
        assertOk(r.kind === "simple");
        assertBytes(r.data!, payload);
      } finally {
        if (saved === undefined) Deno.env.delete("NBD_NO_SPLICE");
        else Deno.env.set("NBD_NO_SPLICE", saved);
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}
