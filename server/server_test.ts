import * as C from "../protocol/constants.ts";
import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { RawClient, replyErrno } from "../tests/raw_client.ts";
import {
  decodeInfoReply,
  decodeMetaContextReply,
  decodeServerReply,
  encodeInfoRequest,
  encodeMetaContextQuery,
  encodeOptionRequest,
  getU64,
} from "../protocol/handshake.ts";
import { decodeBlockStatusPayload } from "../protocol/transmission.ts";
import { PLUGINS } from "../plugins/mod.ts";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { Exports } from "./exports.ts";
import { listenOnDescriptors, listenUnix } from "./listener.ts";
import {
  duplicateDescriptor,
  newListeningDescriptors,
  socketDescriptors,
} from "../io/listening_fds.ts";
import { linuxPaths, randomBytes } from "../tests/helpers.ts";
import { fromDenoConn } from "../io/byte_stream.ts";
import { Params } from "../core/params.ts";
import { NbdServer, type NbdServerOptions } from "./server.ts";

interface Fixture extends AsyncDisposable {
  path: string;
  server: NbdServer;
  logs: string[];
}

async function serve(
  plugin: string | Plugin,
  words: string[],
  options: {
    readonly?: boolean;
    exportName?: string;
    description?: string;
    server?: Partial<NbdServerOptions>;
    /** Checking layers (default: NBD_DEBUG_LAYERS); off for plugins that break the contract on purpose. */
    debugLayers?: boolean;
  } = {},
): Promise<Fixture> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-server-test" });
  const path = `${dir}/sock`;
  const p = typeof plugin === "string" ? PLUGINS.get(plugin)! : plugin;
  const instance = await p.create(Params.parse(words, p.magicParam));
  const logs: string[] = [];
  const server = new NbdServer({
    exports: new Exports({
      plugin: instance,
      exportName: options.exportName,
      description: options.description,
      debugLayers: options.debugLayers,
    }),
    readonly: options.readonly,
    log: (m) => logs.push(m),
    ...options.server,
  });
  const listener = await listenUnix(server, path);
  return {
    path,
    server,
    logs,
    async [Symbol.asyncDispose]() {
      listener.close();
      await server.shutdown();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

async function client(path: string): Promise<RawClient & Disposable> {
  const c = await RawClient.connect(path);
  return Object.assign(c, { [Symbol.dispose]: () => c.close() });
}

const MiB = 1024 * 1024;

Deno.test("handshake: greeting flags, unknown options, LIST and ABORT", async () => {
  await using f = await serve("memory", ["1M"], { exportName: "disk", description: "a test disk" });
  using c = await client(f.path);
  assertEquals(await c.greeting(), C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES);
  await c.clientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);
  const unknown = await c.ask(0x7654321, new Uint8Array(4));
  assertEquals(unknown.map((r) => [r.option, r.type]), [[0x7654321, C.NBD_REP_ERR_UNSUP]]);
  assertEquals((await c.ask(C.NBD_OPT_LIST, new Uint8Array(1)))[0]!.type, C.NBD_REP_ERR_INVALID);
  const list = await c.ask(C.NBD_OPT_LIST);
  assertEquals(list.map((r) => r.type), [C.NBD_REP_SERVER, C.NBD_REP_ACK]);
  assertEquals(decodeServerReply(list[0]!.data), { name: "disk", description: "a test disk" });
  assertEquals((await c.ask(C.NBD_OPT_STARTTLS))[0]!.type, C.NBD_REP_ERR_POLICY);
  assertEquals((await c.ask(C.NBD_OPT_ABORT))[0]!.type, C.NBD_REP_ACK);
  assertOk(await c.closedByServer());
});

Deno.test("handshake: unknown client flags and bad option magic close the connection", async () => {
  await using f = await serve("memory", ["1M"]);
  {
    using c = await client(f.path);
    await c.greeting();
    await c.clientFlags(1 << 5);
    assertOk(await c.closedByServer());
  }
  {
    using c = await client(f.path);
    await c.start();
    const bad = encodeOptionRequest(C.NBD_OPT_LIST);
    bad[0] = 0;
    await c.send(bad);
    assertOk(await c.closedByServer());
  }
  {
    // An absurd option length is dropped without reading or allocating it.
    using c = await client(f.path);
    await c.start();
    const huge = encodeOptionRequest(C.NBD_OPT_LIST);
    new DataView(huge.buffer).setUint32(12, 0x7fffffff);
    await c.send(huge);
    assertOk(await c.closedByServer());
  }
  {
    // Large but bounded option data is skipped and refused; the connection goes on.
    using c = await client(f.path);
    await c.start();
    assertEquals(
      (await c.ask(C.NBD_OPT_INFO, new Uint8Array(2 * MiB)))[0]!.type,
      C.NBD_REP_ERR_TOO_BIG,
    );
    assertEquals((await c.ask(C.NBD_OPT_LIST)).at(-1)!.type, C.NBD_REP_ACK);
  }
});

Deno.test("handshake: INFO reports size, flags, name, description and block sizes", async () => {
  await using f = await serve("memory", ["64M"], { exportName: "disk", description: "scratch" });
  using c = await client(f.path);
  await c.start();
  const infos = [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE];
  const replies = await c.ask(C.NBD_OPT_INFO, encodeInfoRequest({ name: "", infos }));
  assertEquals(replies.at(-1)!.type, C.NBD_REP_ACK);
  const decoded = replies.slice(0, -1).map((r) => decodeInfoReply(r.data));
  const exp = decoded.find((d) => d.type === C.NBD_INFO_EXPORT) as { size: number; flags: number };
  assertEquals(exp.size, 64 * MiB);
  assertEquals(exp.flags & C.NBD_FLAG_READ_ONLY, 0);
  assertOk(
    exp.flags & C.NBD_FLAG_SEND_FLUSH && exp.flags & C.NBD_FLAG_SEND_TRIM &&
      exp.flags & C.NBD_FLAG_CAN_MULTI_CONN,
  );
  assertEquals(decoded.find((d) => d.type === C.NBD_INFO_NAME), {
    type: C.NBD_INFO_NAME,
    name: "disk",
  });
  assertEquals(decoded.find((d) => d.type === C.NBD_INFO_DESCRIPTION), {
    type: C.NBD_INFO_DESCRIPTION,
    description: "scratch",
  });
  assertEquals(decoded.find((d) => d.type === C.NBD_INFO_BLOCK_SIZE), {
    type: C.NBD_INFO_BLOCK_SIZE,
    blockSize: { minimum: 1, preferred: 4096, maximum: 32 * MiB },
  });
  const unknown = await c.ask(C.NBD_OPT_INFO, encodeInfoRequest({ name: "nope", infos: [] }));
  assertEquals(unknown.map((r) => r.type), [C.NBD_REP_ERR_UNKNOWN]);
  // Name length running past the option data.
  const broken = encodeInfoRequest({ name: "disk", infos: [] });
  new DataView(broken.buffer).setUint32(0, 100);
  assertEquals((await c.ask(C.NBD_OPT_GO, broken))[0]!.type, C.NBD_REP_ERR_INVALID);
  // Still usable afterwards.
  assertEquals((await c.go("disk")).size, 64 * MiB);
});

Deno.test("handshake: meta contexts need structured replies and select base:allocation", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  const query = (queries: string[]) => encodeMetaContextQuery({ exportName: "", queries });
  assertEquals(
    (await c.ask(C.NBD_OPT_SET_META_CONTEXT, query([C.BASE_ALLOCATION])))[0]!.type,
    C.NBD_REP_ERR_INVALID,
  );
  assertEquals((await c.ask(C.NBD_OPT_STRUCTURED_REPLY))[0]!.type, C.NBD_REP_ACK);
  const all = await c.ask(C.NBD_OPT_LIST_META_CONTEXT, query([]));
  assertEquals(all.map((r) => r.type), [C.NBD_REP_META_CONTEXT, C.NBD_REP_ACK]);
  assertEquals(decodeMetaContextReply(all[0]!.data).name, C.BASE_ALLOCATION);
  const set = await c.ask(
    C.NBD_OPT_SET_META_CONTEXT,
    query(["x-unknown:thing", C.BASE_ALLOCATION]),
  );
  assertEquals(set.map((r) => r.type), [C.NBD_REP_META_CONTEXT, C.NBD_REP_ACK]);
  assertEquals(decodeMetaContextReply(set[0]!.data).name, C.BASE_ALLOCATION);
  const none = await c.ask(C.NBD_OPT_SET_META_CONTEXT, query(["x-unknown:thing"]));
  assertEquals(none.map((r) => r.type), [C.NBD_REP_ACK]);
  const truncated = query([C.BASE_ALLOCATION]).subarray(0, 10);
  assertEquals(
    (await c.ask(C.NBD_OPT_LIST_META_CONTEXT, truncated))[0]!.type,
    C.NBD_REP_ERR_INVALID,
  );
});

Deno.test("EXPORT_NAME clients get size, flags and the 124 zero bytes unless NO_ZEROES", async () => {
  await using f = await serve("pattern", ["1M"]);
  for (const noZeroes of [false, true]) {
    using c = await client(f.path);
    await c.start(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0));
    await c.option(C.NBD_OPT_EXPORT_NAME, new Uint8Array());
    const reply = await c.read(noZeroes ? 10 : 134);
    const view = new DataView(reply.buffer);
    assertEquals(getU64(view, 0), MiB);
    assertOk(view.getUint16(8) & C.NBD_FLAG_READ_ONLY);
    assertOk(reply.subarray(10).every((b) => b === 0));
    await c.request(C.NBD_CMD_READ, { offset: 8, length: 8, cookie: 42 });
    const r = await c.reply(8);
    assertEquals(
      r.kind === "simple" && [r.errno, r.cookie, getU64(new DataView(r.data!.buffer), 0)],
      [0, 42, 8],
    );
  }
  // Non-fixed newstyle: only EXPORT_NAME is allowed.
  using c = await client(f.path);
  await c.start(0);
  assertEquals((await c.ask(C.NBD_OPT_LIST))[0]!.type, C.NBD_REP_ERR_INVALID);
  await c.option(C.NBD_OPT_EXPORT_NAME, new TextEncoder().encode("missing"));
  assertOk(await c.closedByServer());
});

Deno.test("transmission: errors per the spec and the connection survives them", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  await c.go("", { structured: true });
  const expect = async (
    type: number,
    options: Parameters<RawClient["request"]>[1],
    errno: number,
  ) => {
    await c.request(type, options);
    assertEquals(
      replyErrno(await c.replies()),
      errno,
      `${C.commandName(type)} ${JSON.stringify(options)}`,
    );
  };
  await expect(C.NBD_CMD_READ, { offset: MiB - 4, length: 8 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_READ, { offset: 2 ** 62, length: 8 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_WRITE, { offset: MiB - 4, payload: new Uint8Array(8) }, C.NBD_ENOSPC);
  await expect(C.NBD_CMD_WRITE_ZEROES, { offset: MiB, length: 1 }, C.NBD_ENOSPC);
  await expect(C.NBD_CMD_TRIM, { offset: MiB - 1, length: 2 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_READ, { offset: 0, length: 0 }, C.NBD_EINVAL);
  await expect(99, { offset: 0, length: 0 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_READ, { flags: 1 << 9, offset: 0, length: 8 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_FLUSH, { offset: 5, length: 0 }, C.NBD_EINVAL);
  await expect(C.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 512 }, C.NBD_EINVAL); // no context
  await expect(C.NBD_CMD_WRITE, { offset: 0, payload: Uint8Array.from([1, 2, 3]) }, 0);
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 3 });
  const read = await c.replies();
  assertEquals(read.length, 1);
  assertOk(read[0]!.kind === "chunk" && read[0]!.type === C.NBD_REPLY_TYPE_OFFSET_DATA);
  assertBytes((read[0] as { payload: Uint8Array }).payload.subarray(8), Uint8Array.from([1, 2, 3]));
});

Deno.test("transmission: oversized requests are refused, WRITE payloads drained, absurd ones dropped", async () => {
  await using f = await serve("null", ["1G"]);
  using c = await client(f.path);
  await c.start();
  await c.go();
  // 64 MiB READ/WRITE are accepted (beyond the advertised 32 MiB, as real clients send them).
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 64 * MiB, cookie: 1 });
  const big = await c.reply(64 * MiB);
  assertEquals(big.kind === "simple" && [big.errno, big.data!.length], [0, 64 * MiB]);
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 64 * MiB + 1, cookie: 2 });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(100 * MiB), cookie: 3 });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(4096), cookie: 4 });
  assertEquals(replyErrno([await c.reply()]), 0);
  await c.request(C.NBD_CMD_WRITE, { offset: 0, length: 0xffffffff, cookie: 5 });
  assertOk(await c.closedByServer());
});

Deno.test("transmission: read-only exports refuse writes with EPERM", async () => {
  await using f = await serve("memory", ["1M"], { readonly: true });
  using c = await client(f.path);
  await c.start();
  const { flags } = await c.go();
  assertOk(flags & C.NBD_FLAG_READ_ONLY);
  assertEquals(
    flags & (C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FUA),
    0,
  );
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(16) });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EPERM);
  await c.request(C.NBD_CMD_TRIM, { offset: 0, length: 16 });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EPERM);
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 16 });
  assertEquals(replyErrno([await c.reply(16)]), 0);
});

Deno.test("transmission: a bad request magic closes the connection; other clients carry on", async () => {
  await using f = await serve("memory", ["1M"]);
  using good = await client(f.path);
  await good.start();
  await good.go();
  using bad = await client(f.path);
  await bad.start();
  await bad.go();
  await bad.send(new Uint8Array(28).fill(0x41));
  assertOk(await bad.closedByServer());
  // A client that disconnects half-way through a WRITE payload.
  using half = await client(f.path);
  await half.start();
  await half.go();
  const request = new Uint8Array(28 + 100);
  const view = new DataView(request.buffer);
  view.setUint32(0, C.NBD_REQUEST_MAGIC);
  view.setUint16(6, C.NBD_CMD_WRITE);
  view.setUint32(24, 4096);
  await half.send(request);
  half.close();
  await good.request(C.NBD_CMD_WRITE, { offset: 0, payload: Uint8Array.from([7]) });
  assertEquals(replyErrno([await good.reply()]), 0);
});

Deno.test("structured READ of a sparse export sends data and hole chunks; DF sends one chunk", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  await c.go("", { structured: true });
  await c.request(C.NBD_CMD_WRITE, { offset: 65536, payload: new Uint8Array(65536).fill(5) });
  await c.reply();
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 196608 });
  const chunks = await c.replies();
  const summary = chunks.map((r) => {
    if (r.kind !== "chunk") return "simple";
    const v = new DataView(r.payload.buffer, r.payload.byteOffset);
    const offset = getU64(v, 0);
    return r.type === C.NBD_REPLY_TYPE_OFFSET_HOLE
      ? `hole ${offset}+${v.getUint32(8)}`
      : `data ${offset}+${r.payload.length - 8}`;
  });
  assertEquals(summary, ["hole 0+65536", "data 65536+65536", "hole 131072+65536"]);
  assertOk(
    chunks.at(-1)!.kind === "chunk" &&
      (chunks.at(-1) as { flags: number }).flags & C.NBD_REPLY_FLAG_DONE,
  );
  const data = (chunks[1] as { payload: Uint8Array }).payload.subarray(8);
  assertOk(data.every((b) => b === 5));
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 196608, flags: C.NBD_CMD_FLAG_DF });
  const df = await c.replies();
  assertEquals(df.length, 1);
  assertEquals((df[0] as { payload: Uint8Array }).payload.length, 8 + 196608);
});

Deno.test("BLOCK_STATUS reflects writes, trims and zeroes; REQ_ONE gives one extent", async () => {
  await using f = await serve("memory", ["1M"]);
  using c = await client(f.path);
  await c.start();
  await c.go("", { structured: true, meta: [C.BASE_ALLOCATION] });
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(4 * 65536).fill(1) });
  await c.reply();
  await c.request(C.NBD_CMD_TRIM, { offset: 65536, length: 65536 });
  await c.reply();
  await c.request(C.NBD_CMD_WRITE_ZEROES, { offset: 131072, length: 65536 });
  await c.reply();
  await c.request(C.NBD_CMD_BLOCK_STATUS, { offset: 0, length: MiB });
  const [chunk] = await c.replies();
  assertOk(chunk!.kind === "chunk" && chunk!.type === C.NBD_REPLY_TYPE_BLOCK_STATUS);
  const status = decodeBlockStatusPayload((chunk as { payload: Uint8Array }).payload, false);
  assertEquals(status.extents, [
    { length: 65536, flags: 0 },
    { length: 131072, flags: 3 },
    { length: 65536, flags: 0 },
    { length: MiB - 4 * 65536, flags: 3 },
  ]);
  await c.request(C.NBD_CMD_BLOCK_STATUS, {
    offset: 0,
    length: MiB,
    flags: C.NBD_CMD_FLAG_REQ_ONE,
  });
  const one = decodeBlockStatusPayload(
    ((await c.replies())[0] as { payload: Uint8Array }).payload,
    false,
  );
  assertEquals(one.extents, [{ length: 65536, flags: 0 }]);
});

Deno.test("extended headers: 64-bit requests, PAYLOAD_LEN writes, extended chunks", async () => {
  await using f = await serve("memory", ["8G"]);
  using c = await client(f.path);
  await c.start();
  const { flags } = await c.go("", { extended: true, meta: [C.BASE_ALLOCATION] });
  assertOk(flags & C.NBD_FLAG_BLOCK_STATUS_PAYLOAD);
  const offset = 6 * 2 ** 30;
  await c.request(C.NBD_CMD_WRITE, {
    offset,
    flags: C.NBD_CMD_FLAG_PAYLOAD_LEN,
    payload: Uint8Array.from([1, 2, 3, 4]),
  });
  const ok = await c.reply();
  assertOk(
    ok.kind === "chunk" && ok.type === C.NBD_REPLY_TYPE_NONE && ok.flags & C.NBD_REPLY_FLAG_DONE,
  );
  assertEquals(ok.kind === "chunk" && ok.offset, offset);
  await c.request(C.NBD_CMD_READ, { offset, length: 4 });
  const read = await c.replies();
  assertBytes(
    (read[0] as { payload: Uint8Array }).payload.subarray(8),
    Uint8Array.from([1, 2, 3, 4]),
  );
  // A 5 GiB zero request: effect lengths beyond 32 bits.
  await c.request(C.NBD_CMD_WRITE_ZEROES, { offset: 0, length: 5 * 2 ** 30 });
  assertEquals(replyErrno(await c.replies()), 0);
  await c.request(C.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 8 * 2 ** 30 });
  const [bs] = await c.replies();
  assertOk(bs!.kind === "chunk" && bs!.type === C.NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
  const status = decodeBlockStatusPayload((bs as { payload: Uint8Array }).payload, true);
  assertEquals(status.extents, [
    { length: offset, flags: 3 },
    { length: 65536, flags: 0 },
    { length: 2 * 2 ** 30 - 65536, flags: 3 },
  ]);
  // A compact request after extended headers breaks the protocol: the server hangs up.
  const compact = new Uint8Array(32);
  new DataView(compact.buffer).setUint32(0, C.NBD_REQUEST_MAGIC);
  await c.send(compact);
  assertOk(await c.closedByServer());
});

Deno.test("pipelined requests are all answered, matched by cookie", async () => {
  await using f = await serve("pattern", ["16M"]);
  using c = await client(f.path);
  await c.start();
  await c.go("", { structured: true });
  const count = 300;
  const batch: Promise<void>[] = [];
  for (let i = 0; i < count; i++) {
    batch.push(c.request(C.NBD_CMD_READ, { offset: i * 4096, length: 4096, cookie: i + 1 }));
  }
  await Promise.all(batch);
  const seen = new Set<number>();
  for (let i = 0; i < count; i++) {
    const [r] = await c.replies();
    assertOk(r!.kind === "chunk");
    const v = new DataView(r!.payload.buffer, r!.payload.byteOffset);
    assertEquals(getU64(v, 0), (r!.cookie - 1) * 4096);
    assertEquals(getU64(v, 8), (r!.cookie - 1) * 4096); // pattern: the first word holds its offset
    seen.add(r!.cookie);
  }
  assertEquals(seen.size, count);
});

Deno.test("shutdown lets in-flight requests finish and answers new options with ERR_SHUTDOWN", async () => {
  // A plugin whose writes wait for the test to release them.
  let writeStarted!: () => void;
  const started = new Promise<void>((r) => writeStarted = r);
  let release!: () => void;
  const released = new Promise<void>((r) => release = r);
  const written: number[] = [];
  const gated: Plugin = {
    name: "gated",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => MiB,
            pread: (buf) => Promise.resolve(buf.fill(0) && undefined),
            async pwrite(buf) {
              writeStarted();
              await released;
              written.push(buf.length);
            },
            flush: () => Promise.resolve(),
          })),
      }),
  };
  const f = await serve(gated, []);
  using busy = await client(f.path);
  await busy.start();
  await busy.go();
  using waiting = await client(f.path);
  await waiting.start();
  await busy.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(4096).fill(9) });
  await started;
  const stopping = f[Symbol.asyncDispose]();
  // The handshaking client is told the server is going away (or simply closed).
  const refused = await waiting.ask(C.NBD_OPT_LIST).catch(() => [{ type: -1 }]);
  assertOk([C.NBD_REP_ERR_SHUTDOWN, -1].includes(refused[0]!.type));
  release();
  assertEquals(replyErrno([await busy.reply()]), 0);
  assertEquals(written, [4096]);
  await stopping;
});

Deno.test("limits: connections beyond --max-connections are closed, and it is logged once", async () => {
  await using f = await serve("memory", ["1M"], { server: { maxConnections: 2 } });
  using a = await client(f.path);
  using b = await client(f.path);
  await a.greeting();
  await b.greeting();
  for (let i = 0; i < 3; i++) {
    using extra = await client(f.path);
    assertOk(await extra.closedByServer());
  }
  assertEquals(f.logs.filter((l) => l.includes("connection limit")).length, 1);
  await a.clientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE);
  assertEquals((await a.ask(C.NBD_OPT_LIST)).at(-1)!.type, C.NBD_REP_ACK);
});

Deno.test("limits: a client that never finishes the handshake is dropped", async () => {
  await using f = await serve("memory", ["1M"], { server: { handshakeTimeout: 0.3 } });
  using c = await client(f.path);
  await c.greeting();
  const started = Date.now();
  assertOk(await c.closedByServer(3000));
  assertOk(Date.now() - started >= 200);
  assertOk(f.logs.some((l) => l.includes("handshake not finished")));
  // A prompt client is not affected by the timer once in transmission: a
  // slow one connected after it is dropped, so its timer would have fired.
  using ok = await client(f.path);
  await ok.start();
  await ok.go();
  using late = await client(f.path);
  await late.greeting();
  assertOk(await late.closedByServer(3000));
  await ok.request(C.NBD_CMD_READ, { offset: 0, length: 8 });
  assertEquals(replyErrno([await ok.reply(8)]), 0);
});

Deno.test("limits: idle connections are closed after --idle-timeout", async () => {
  await using f = await serve("memory", ["1M"], { server: { idleTimeout: 0.3 } });
  using c = await client(f.path);
  await c.start();
  await c.go();
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 8 });
  assertEquals(replyErrno([await c.reply(8)]), 0);
  assertOk(await c.closedByServer(3000));
  assertOk(f.logs.some((l) => l.includes("idle for")));
});

Deno.test("limits: --max-payload is advertised and enforced exactly", async () => {
  await using f = await serve("memory", ["8M"], { server: { maxPayload: MiB } });
  using c = await client(f.path);
  await c.start();
  const replies = await c.ask(
    C.NBD_OPT_INFO,
    encodeInfoRequest({ name: "", infos: [C.NBD_INFO_BLOCK_SIZE] }),
  );
  const blockSize = replies.map((r) =>
    r.type === C.NBD_REP_INFO ? decodeInfoReply(r.data) : undefined
  )
    .find((d) => d?.type === C.NBD_INFO_BLOCK_SIZE);
  assertEquals(blockSize, {
    type: C.NBD_INFO_BLOCK_SIZE,
    blockSize: { minimum: 1, preferred: 4096, maximum: MiB },
  });
  await c.go();
  await c.request(C.NBD_CMD_READ, { offset: 0, length: MiB });
  assertEquals(replyErrno([await c.reply(MiB)]), 0);
  await c.request(C.NBD_CMD_READ, { offset: 0, length: MiB + 1 });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(MiB + 1) });
  assertEquals(replyErrno([await c.reply()]), C.NBD_EINVAL);
  // Beyond twice the limit a WRITE payload is not drained: the connection goes.
  await c.request(C.NBD_CMD_WRITE, { offset: 0, length: 3 * MiB });
  assertOk(await c.closedByServer());
});

Deno.test("counters: requests, bytes, failures and in-flight per export and connection", async () => {
  await using f = await serve("memory", ["1M"], { exportName: "disk" });
  using c = await client(f.path);
  await c.start();
  await c.go("disk");
  await c.request(C.NBD_CMD_WRITE, { offset: 0, payload: new Uint8Array(4096) });
  await c.reply();
  await c.request(C.NBD_CMD_READ, { offset: 0, length: 512 });
  await c.reply(512);
  await c.request(C.NBD_CMD_READ, { offset: MiB, length: 512 }); // past the end
  await c.reply();
  const events: string[] = [];
  f.server.state.stats.listeners.add((e) =>
    events.push(`${e.command} ${e.offset}+${e.length} ${e.ok}`)
  );
  await c.request(C.NBD_CMD_TRIM, { offset: 8192, length: 4096 });
  await c.reply();
  const exp = f.server.state.stats.exports.get("disk")!;
  assertEquals([exp.commands.WRITE.completed, exp.commands.WRITE.bytes], [1, 4096]);
  assertEquals(
    [exp.commands.READ.received, exp.commands.READ.completed, exp.commands.READ.failed],
    [2, 1, 1],
  );
  assertEquals(exp.commands.READ.bytes, 512);
  assertEquals(exp.inFlight, 0);
  assertEquals(events, ["TRIM 8192+4096 true"]);
  const [conn] = f.server.state.stats.connections.values();
  assertEquals([conn!.exportName, conn!.counters.commands.TRIM.completed], ["disk", 1]);
  assertOk(conn!.counters.lastReplyAt >= conn!.counters.lastRequestAt);
});

Deno.test("transmission: reused READ buffers are cleared unless the backend fills every byte", async () => {
  /** A plugin whose reads at offset 0 fill the buffer, and elsewhere only its first half. */
  const halfFilling = (preadFills: boolean): Plugin => ({
    name: "half",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => MiB,
            preadFills,
            pread(buf, offset) {
              buf.fill(0x55, 0, offset === 0 ? buf.length : buf.length / 2);
              return Promise.resolve();
            },
          })),
      }),
  });
  const expected = new Uint8Array(4096).fill(0x55, 0, 2048);
  for (const fills of [false, true]) {
    // The plugin leaves bytes unfilled on purpose: the checking layer would refuse it.
    await using f = await serve(halfFilling(fills), [], { debugLayers: false });
    using c = await client(f.path);
    await c.start();
    await c.go();
    const read = async (offset: number) => {
      await c.request(C.NBD_CMD_READ, { offset, length: 4096 });
      const reply = await c.reply(4096);
      assertOk(reply.kind === "simple" && reply.data, "a simple reply with data");
      return reply.data;
    };
    assertBytes(await read(0), new Uint8Array(4096).fill(0x55));
    const second = await read(4096);
    if (!fills) assertBytes(second, expected, "an earlier reply's bytes were sent");
    // The plugin broke its word: the buffer of the first reply went out uncleared, which
    // shows that the server trusts the declaration and skips the clearing.
    else assertBytes(second, new Uint8Array(4096).fill(0x55));
  }
});

Deno.test("transmission: replies to requests received together go out in one write", async () => {
  const instance = await PLUGINS.get("memory")!.create(Params.parse(["1M"], "size"));
  const server = new NbdServer({ exports: new Exports({ plugin: instance }), log: () => {} });
  const dir = await Deno.makeTempDir({ prefix: "nbd-server-test" });
  const path = `${dir}/sock`;
  const listener = Deno.listen({ transport: "unix", path });
  let writes = 0;
  const served = (async () => {
    const conn = await listener.accept();
    const stream = fromDenoConn(conn);
    await server.serve({
      ...stream,
      write(buf) {
        writes++;
        return stream.write(buf);
      },
    }, "test");
  })();
  try {
    using c = await client(path);
    await c.start();
    await c.go();
    // 64 READs and 64 WRITEs of 4 KiB, sent in one write.
    const count = 64;
    const requests: Uint8Array[] = [];
    for (let i = 0; i < count; i++) {
      const header = new Uint8Array(28);
      const view = new DataView(header.buffer);
      view.setUint32(0, C.NBD_REQUEST_MAGIC);
      view.setUint16(6, i % 2 ? C.NBD_CMD_READ : C.NBD_CMD_WRITE);
      view.setUint32(12, i + 1);
      view.setUint32(20, i * 4096);
      view.setUint32(24, 4096);
      requests.push(header);
      if (i % 2 === 0) requests.push(new Uint8Array(4096).fill(i));
    }
    const batch = new Uint8Array(requests.reduce((n, r) => n + r.length, 0));
    requests.reduce((at, r) => (batch.set(r, at), at + r.length), 0);
    const before = writes;
    await c.send(batch);
    const cookies = new Set<number>();
    for (let i = 0; i < count; i++) {
      // Replies come in completion order: a READ's data follows its header.
      const reply = await c.reply(0);
      assertOk(reply.kind === "simple" && reply.errno === 0, "a simple reply, no error");
      if (reply.cookie % 2 === 0) assertBytes(await c.read(4096), new Uint8Array(4096));
      cookies.add(reply.cookie);
    }
    assertEquals(cookies.size, count);
    await c.request(C.NBD_CMD_READ, { offset: 2 * 4096, length: 4096 });
    const written = await c.reply(4096);
    assertOk(written.kind === "simple" && written.data, "a simple reply with data");
    assertBytes(written.data, new Uint8Array(4096).fill(2));
    // Without corking each reply is a write of its own (64); a batch split by
    // the kernel may take a few.
    assertOk(writes - before <= 4, `${writes - before} writes for ${count} replies`);
  } finally {
    listener.close();
    await server.shutdown();
    await served.catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test(
  "listenOnDescriptors: an inherited socket is adopted as a runtime listener, and serves",
  linuxPaths("adopting listening sockets"),
  async () => {
    const instance = await PLUGINS.get("memory")!.create(Params.parse(["1M"], "size"));
    const server = new NbdServer({ exports: new Exports({ plugin: instance }), log: () => {} });
    const before = socketDescriptors();
    const original = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (original.addr as Deno.NetAddr).port;
    const fd = duplicateDescriptor(newListeningDescriptors(before)![0]!)!;
    original.close();
    const listener = listenOnDescriptors(server, [fd], { transport: "activation", fds: 1 });
    try {
      // node:net would keep serving on the descriptor itself; adoption moves the socket off it.
      const target = await Deno.readLink(`/proc/self/fd/${fd}`).catch(() => "closed");
      assertOk(!target.startsWith("socket:"), `descriptor ${fd}: ${target}`);
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      const greeting = new Uint8Array(8);
      let n = 0;
      while (n < 8) n += (await conn.read(greeting.subarray(n)))!;
      assertEquals(new TextDecoder().decode(greeting), "NBDMAGIC");
      conn.close();
    } finally {
      listener.close();
      await listener.done;
      await server.shutdown();
    }
  },
);

Deno.test("transmission: WRITE payloads land in place where the plugin offers views", async () => {
  const disk = new Uint8Array(4 * 65536);
  let pwrites = 0;
  let offerViews = true;
  const plugin: Plugin = {
    name: "inplace",
    summary: "test",
    params: [],
    create: () =>
      Promise.resolve({
        open: () =>
          Promise.resolve(completeBackend({
            size: () => disk.length,
            capabilities: () => ({ fua: "native" }),
            pread: (buf, offset) =>
              Promise.resolve(buf.set(disk.subarray(offset, offset + buf.length))),
            // Two views per range, split in the middle, to check the order of filling.
            writeView: (offset, length) => {
              if (!offerViews) return undefined;
              const half = offset + Math.floor(length / 2);
              return [disk.subarray(offset, half), disk.subarray(half, offset + length)];
            },
            pwrite: (buf, offset) => {
              pwrites++;
              disk.set(buf, offset);
              return Promise.resolve();
            },
          })),
      }),
  };
  await using f = await serve(plugin, []);
  using c = await client(f.path);
  await c.start();
  await c.go("");
  const data = randomBytes(3 * 65536 + 7, 5);
  await c.request(C.NBD_CMD_WRITE, { offset: 5, payload: data, cookie: 1 });
  await c.request(C.NBD_CMD_WRITE, {
    flags: C.NBD_CMD_FLAG_FUA,
    offset: 0,
    payload: data.subarray(0, 3),
    cookie: 2,
  });
  assertEquals(replyErrno([await c.reply()]), 0);
  assertEquals(replyErrno([await c.reply()]), 0);
  assertEquals(pwrites, 0, "no pwrite: the payloads were received in place");
  const expected = new Uint8Array(disk.length);
  expected.set(data, 5);
  expected.set(data.subarray(0, 3), 0);
  assertBytes(disk, expected);
  // Without views, pwrite as before.
  offerViews = false;
  await c.request(C.NBD_CMD_WRITE, { offset: 100, payload: Uint8Array.from([1, 2]), cookie: 3 });
  assertEquals(replyErrno([await c.reply()]), 0);
  assertEquals(pwrites, 1);
  assertBytes(disk.subarray(100, 102), Uint8Array.from([1, 2]));
});
