import { assertEquals, assertMatch, assertOk, assertRejects } from "../tests/assert.ts";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EIO,
  NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_TYPE_ERROR_BIT,
} from "../protocol/constants.ts";
import { ProtocolError } from "../protocol/errors.ts";
import { encodeErrorPayload } from "../protocol/transmission.ts";
import { NbdClient } from "./client.ts";
import { NbdConnectionError, NbdRequestError } from "./errors.ts";
import { type ExportScript, scriptedServer } from "./_test_utils.ts";

const ALL_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_DF | NBD_FLAG_CAN_MULTI_CONN |
  NBD_FLAG_SEND_CACHE | NBD_FLAG_SEND_FAST_ZERO;

const EXPORT: ExportScript = { flags: ALL_FLAGS, size: 1 << 20 };

function filled(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

Deno.test("NbdClient assembles out-of-order data and hole chunks into the caller's buffer", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const read = await peer.request();
    assertEquals(read.type, NBD_CMD_READ);
    assertEquals(read.offset, 4096);
    assertEquals(read.length, 3 * 4096);
    await peer.data(read, 4096 + 8192, filled(4096, 0xcc));
    await peer.hole(read, 4096, 4096);
    await peer.data(read, 4096 + 4096, filled(4096, 0xdd), true);
    await peer.request(); // DISC
  });
  const client = await NbdClient.connect(server.uri);
  const buf = filled(3 * 4096, 0xff); // stale bytes the hole must overwrite
  await client.pread(buf, 4096);
  assertEquals(buf.subarray(0, 4096), filled(4096, 0));
  assertEquals(buf.subarray(4096, 8192), filled(4096, 0xdd));
  assertEquals(buf.subarray(8192), filled(4096, 0xcc));
  await client.close();
  await server.done;
});

Deno.test("NbdClient keeps many requests in flight and matches replies by cookie", async () => {
  const count = 40;
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    // All requests arrive before any reply is sent: they were pipelined.
    const requests = [];
    for (let i = 0; i < count; i++) requests.push(await peer.request());
    assertEquals(new Set(requests.map((r) => r.cookieLo)).size, count, "cookies are unique");
    for (const r of requests.reverse()) {
      await peer.data(r, r.offset, filled(r.length, r.offset / 512), true);
    }
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  const buffers = Array.from({ length: count }, () => new Uint8Array(512));
  const reads = buffers.map((b, i) => client.pread(b, i * 512));
  assertEquals(client.inFlight, count);
  await Promise.all(reads);
  buffers.forEach((b, i) => assertEquals(b, filled(512, i)));
  await client.close();
  await server.done;
});

Deno.test("NbdClient reports an error chunk with errno, request and server message", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const bad = await peer.request();
    const good = await peer.request();
    await peer.error(bad, NBD_EIO, "disk on fire");
    await peer.data(good, good.offset, filled(good.length, 7), true);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  const failing = client.pread(new Uint8Array(1024), 2048);
  const ok = new Uint8Array(512);
  const working = client.pread(ok, 0);
  const error = await failing.then(() => undefined, (e) => e);
  assertOk(error instanceof NbdRequestError, String(error));
  assertEquals(error.errno, "EIO");
  assertEquals(error.command, "READ");
  assertEquals(error.offset, 2048);
  assertEquals(error.length, 1024);
  assertEquals(error.serverMessage, "disk on fire");
  assertEquals(error.local, false);
  assertMatch(error.message, /READ of 1024 bytes at offset 2048 failed: EIO: disk on fire/);
  await working; // the connection survives an error reply
  assertEquals(ok, filled(512, 7));
  await client.close();
  await server.done;
});

Deno.test("NbdClient accepts error chunks for commands that could have had simple replies", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const flush = await peer.request();
    assertEquals(flush.type, NBD_CMD_FLUSH);
    assertEquals(flush.offset, 0);
    assertEquals(flush.length, 0);
    await peer.error(flush, 22, "no flushing today");
    const trim = await peer.request();
    assertEquals(trim.type, NBD_CMD_TRIM);
    await peer.none(trim);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  await assertRejects(client.flush(), (e) => e instanceof NbdRequestError && e.errno === "EINVAL");
  await client.trim(0, 4096);
  await client.close();
  await server.done;
});

Deno.test("NbdClient handles simple replies when structured replies are refused", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({ ...EXPORT, structured: false });
    const read = await peer.request();
    await peer.simple(read, 0, filled(read.length, 9));
    const write = await peer.request();
    assertEquals(write.payload, filled(100, 3));
    await peer.simple(write, NBD_EPERM);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  assertEquals(client.structuredReplies, false);
  assertEquals(client.metaContexts, []);
  const buf = new Uint8Array(300);
  await client.pread(buf, 10);
  assertEquals(buf, filled(300, 9));
  await assertRejects(
    client.pwrite(filled(100, 3), 0),
    (e) => e instanceof NbdRequestError && e.errno === "EPERM" && e.command === "WRITE",
  );
  await client.close();
  await server.done;
});

Deno.test("NbdClient sends the flags asked for", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const expected: Array<[number, number]> = [
      [NBD_CMD_WRITE, NBD_CMD_FLAG_FUA],
      [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO],
      [NBD_CMD_WRITE_ZEROES, 0],
      [NBD_CMD_TRIM, NBD_CMD_FLAG_FUA],
      [NBD_CMD_READ, NBD_CMD_FLAG_DF],
      [NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE],
    ];
    for (const [type, flags] of expected) {
      const r = await peer.request();
      assertEquals(r.type, type);
      assertEquals(r.flags, flags, `flags of command ${type}`);
      if (type === NBD_CMD_READ) await peer.data(r, r.offset, new Uint8Array(r.length), true);
      else if (type === NBD_CMD_BLOCK_STATUS) await peer.status(r, 7, [{ length: 512, flags: 3 }]);
      else await peer.simple(r);
    }
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  await client.pwrite(new Uint8Array(512), 0, { fua: true });
  await client.zero(0, 4096, { mayTrim: false, fast: true });
  await client.zero(0, 4096);
  await client.trim(0, 4096, { fua: true });
  await client.pread(new Uint8Array(512), 0, { df: true });
  assertEquals(await client.extents(0, 4096, { reqOne: true }), [{ length: 512, flags: 3 }]);
  await client.close();
  await server.done;
});

Deno.test("NbdClient splits large requests at the server's maximum and refuses misaligned ones", async () => {
  const maximum = 64 * 1024;
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({
      ...EXPORT,
      blockSize: { minimum: 512, preferred: 4096, maximum },
    });
    const seen: Array<[number, number]> = [];
    for (let i = 0; i < 4; i++) {
      const r = await peer.request();
      seen.push([r.offset, r.length]);
      await peer.data(r, r.offset, filled(r.length, i + 1), true);
    }
    assertEquals(seen, [[0, maximum], [maximum, maximum], [2 * maximum, maximum], [
      3 * maximum,
      8192,
    ]]);
    const write = await peer.request();
    assertEquals(write.length, 512);
    await peer.simple(write);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  assertEquals(client.blockSize, { minimum: 512, preferred: 4096, maximum });
  const buf = new Uint8Array(3 * maximum + 8192);
  await client.pread(buf, 0);
  assertEquals(buf[0], 1);
  assertEquals(buf[buf.length - 1], 4);
  for (const [offset, length] of [[100, 512], [0, 100]]) {
    const error = await client.pread(new Uint8Array(length), offset).catch((e) => e);
    assertOk(error instanceof NbdRequestError && error.local, String(error));
    assertEquals(error.errno, "EINVAL");
    assertMatch(error.message, /512-byte minimum block size/);
  }
  await client.pwrite(new Uint8Array(512), 512); // aligned: sent
  await client.close();
  await server.done;
});

Deno.test("NbdClient refuses requests the export cannot take without sending them", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({
      size: 4096,
      flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY,
      contexts: [],
    });
    const next = await peer.request(); // only DISC may arrive
    assertEquals(next.type, 2);
  });
  const client = await NbdClient.connect(server.uri);
  const attempts: Array<[Promise<void>, string]> = [
    [client.pread(new Uint8Array(10), 4090), "EINVAL"],
    [client.pwrite(new Uint8Array(10), 0), "EPERM"],
    [client.flush(), "EINVAL"],
    [client.trim(0, 512), "EINVAL"],
    [client.zero(0, 512), "EINVAL"],
    [client.cache(0, 512), "EINVAL"],
    [client.pread(new Uint8Array(10), 0, { df: true }), "EINVAL"],
    [client.pread(new Uint8Array(1), -1), "EINVAL"],
  ];
  for (const [attempt, errno] of attempts) {
    const error = await attempt.then(() => undefined, (e) => e);
    assertOk(error instanceof NbdRequestError, String(error));
    assertEquals(error.local, true);
    assertEquals(error.errno, errno, error.message);
  }
  await assertRejects(client.blockStatus(0, 512), NbdRequestError);
  await client.pread(new Uint8Array(0), 4096); // empty: nothing to send
  await client.close();
  await server.done;
});

Deno.test("NbdClient treats a reply with an unknown cookie as fatal for the connection", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const r = await peer.request();
    await peer.simple({ ...r, cookieLo: r.cookieLo + 1000 });
    await peer.reader.ensure(1).catch(() => {});
  });
  const client = await NbdClient.connect(server.uri);
  const error = await client.pread(new Uint8Array(512), 0).catch((e) => e);
  assertOk(error instanceof NbdConnectionError, String(error));
  assertMatch(error.message, /not in flight/);
  await assertRejects(client.pread(new Uint8Array(512), 0), NbdConnectionError);
  await client.close();
  await server.done;
});

Deno.test("NbdClient fails requests in flight when the server hangs up mid-reply", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const a = await peer.request();
    await peer.request();
    await peer.data(a, a.offset, filled(100, 1)); // partial, then gone
    peer.close();
  });
  const client = await NbdClient.connect(server.uri);
  const results = await Promise.allSettled([
    client.pread(new Uint8Array(4096), 0),
    client.pread(new Uint8Array(4096), 4096),
  ]);
  for (const result of results) {
    assertEquals(result.status, "rejected");
    assertOk((result as PromiseRejectedResult).reason instanceof NbdConnectionError);
  }
  await client.close();
  await server.done;
});

Deno.test("NbdClient rejects a READ reply that leaves part of the buffer uncovered", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const r = await peer.request();
    await peer.data(r, r.offset, filled(1024, 1), true);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  await assertRejects(client.pread(new Uint8Array(2048), 0), ProtocolError);
  await client.close();
  await server.done;
});

Deno.test("NbdClient fails the request on an unknown error chunk but drops the connection on an unknown chunk", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions(EXPORT);
    const r1 = await peer.request();
    await peer.chunk(r1, NBD_REPLY_TYPE_ERROR_BIT | 77, encodeErrorPayload(5, "odd"), true);
    const r2 = await peer.request();
    await peer.chunk(r2, 42, new Uint8Array(4), true);
    await peer.reader.ensure(1).catch(() => {});
  });
  const client = await NbdClient.connect(server.uri);
  await assertRejects(
    client.flush(),
    (e) => e instanceof NbdRequestError && e.errno === "EIO" && e.serverMessage === "odd",
  );
  await assertRejects(client.flush(), (e) => e instanceof ProtocolError || e instanceof Error);
  await assertRejects(client.flush(), NbdConnectionError);
  await client.close();
  await server.done;
});

Deno.test("NbdClient uses extended headers when the server accepts them", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({ ...EXPORT, extended: true, size: 2 ** 40 });
    const write = await peer.request();
    assertEquals(write.type, NBD_CMD_WRITE);
    assertEquals(write.flags, NBD_CMD_FLAG_PAYLOAD_LEN);
    assertEquals(write.offset, 2 ** 33);
    assertEquals(write.payload, filled(600, 5));
    await peer.none(write);
    const zero = await peer.request();
    assertEquals(zero.length, 2 ** 33, "64-bit effect length in one request");
    await peer.none(zero);
    const status = await peer.request();
    assertEquals(status.length, 2 ** 40 - 4096);
    await peer.status(status, 7, [{ length: 2 ** 34, flags: 3 }, { length: 512, flags: 0 }]);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  assertEquals(client.extendedHeaders, true);
  assertEquals(client.structuredReplies, true);
  await client.pwrite(filled(600, 5), 2 ** 33);
  await client.zero(0, 2 ** 33);
  const statuses = await client.blockStatus(4096, 2 ** 40 - 4096);
  assertEquals(statuses.get("base:allocation"), [
    { length: 2 ** 34, flags: 3 },
    { length: 512, flags: 0 },
  ]);
  await client.close();
  await server.done;
});

Deno.test("NbdClient iterateExtents asks again where the server stopped and clips to the range", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({ ...EXPORT, contexts: [[3, "qemu:allocation-depth"]] });
    const first = await peer.request();
    assertEquals([first.offset, first.length], [1000, 9000]);
    await peer.status(first, 3, [{ length: 3000, flags: 1 }]);
    const second = await peer.request();
    assertEquals([second.offset, second.length], [4000, 6000]);
    await peer.status(second, 3, [{ length: 1000, flags: 0 }, { length: 90000, flags: 2 }]);
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri, { metaContexts: ["qemu:allocation-depth"] });
  assertEquals(client.metaContexts, ["qemu:allocation-depth"]);
  assertEquals(client.capabilities().extents, false, "no base:allocation");
  const seen = [];
  for await (const e of client.iterateExtents(1000, 9000, "qemu:allocation-depth")) seen.push(e);
  assertEquals(seen, [
    { offset: 1000, length: 3000, flags: 1 },
    { offset: 4000, length: 1000, flags: 0 },
    { offset: 5000, length: 5000, flags: 2 },
  ]);
  await client.close();
  await server.done;
});

Deno.test("NbdClient capabilities follow the transmission flags", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.serveOptions({
      size: 8192,
      flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES,
    });
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri);
  assertEquals(client.capabilities(), {
    writable: true,
    flush: true,
    trim: false,
    zero: true,
    fastZero: false,
    fua: "none",
    cache: "none",
    extents: true,
    multiConn: false,
    rotational: false,
    blockSize: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
  });
  await assertRejects(
    client.zero(0, 512, { fast: true }),
    (e) => e instanceof NbdRequestError && e.errno === "ENOTSUP" && e.local,
  );
  await assertRejects(client.pwrite(new Uint8Array(1), 0, { fua: true }), NbdRequestError);
  await client.close();
  await server.done;
});
