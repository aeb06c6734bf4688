/**
 * The client library against real servers: nbdkit in its many modes,
 * qemu-nbd serving a qcow2 image with holes, nbd-server with a config file,
 * and our own server for extended headers.
 */

import { assertEquals, assertMatch, assertOk, assertRejects } from "./assert.ts";
import { NbdClient, WRITE_HEADROOM } from "../client/client.ts";
import { NbdOptionError, NbdRequestError } from "../client/errors.ts";
import { NbdHandshake } from "../client/handshake.ts";
import { NbdClientPool } from "../client/pool.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  firstDifference,
  peers,
  randomBytes,
  runOk,
  type ServerProcess,
  startNbdServe,
  startServer,
  tempDir,
} from "./helpers.ts";
import { startNbdServer } from "./peer_servers.ts";

const MiB = 1024 * 1024;

function nbdkit(args: string[], options: { exportName?: string } = {}): Promise<ServerProcess> {
  return startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args], options);
}

/** Expected bytes of nbdkit's pattern plugin: each 8-byte word holds its own offset. */
function pattern(offset: number, length: number): Uint8Array {
  const first = Math.floor(offset / 8) * 8;
  const words = new Uint8Array(Math.ceil((offset + length - first) / 8) * 8);
  const view = new DataView(words.buffer);
  for (let i = 0; i < words.length; i += 8) view.setBigUint64(i, BigInt(first + i));
  return words.slice(offset - first, offset - first + length);
}

Deno.test({
  name: "client writes and reads back through nbdkit memory with many requests in flight",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit(["memory", "64M"]);
    await using client = await NbdClient.connect(server.uri);
    assertEquals(client.size(), 64 * MiB);
    assertEquals(client.protocol, "newstyle-fixed");
    assertEquals(client.structuredReplies, true);
    assertEquals(client.metaContexts, ["base:allocation"]);
    const data = randomBytes(16 * MiB, 7);
    // 256 writes of 64 KiB, all in flight at once, scattered over the export.
    const writes = [];
    for (let i = 0; i < 256; i++) {
      const offset = ((i * 37) % 256) * 64 * 1024;
      writes.push(client.pwrite(data.subarray(offset, offset + 64 * 1024), 8 * MiB + offset));
    }
    await Promise.all(writes);
    await client.flush();
    const back = new Uint8Array(16 * MiB);
    const reads = [];
    for (let offset = 0; offset < back.length; offset += 256 * 1024) {
      reads.push(client.pread(back.subarray(offset, offset + 256 * 1024), 8 * MiB + offset));
    }
    await Promise.all(reads);
    assertEquals(firstDifference(back, data), -1);

    await client.pwrite(data.subarray(0, 4096), 0, { fua: true });
    await client.zero(4096, 8 * MiB - 4096);
    await client.trim(8 * MiB + 12 * MiB, 4 * MiB);
    await client.cache(0, MiB);
    const extents = [];
    for await (const e of client.iterateExtents(0, client.size())) extents.push(e);
    assertEquals(extents.reduce((n, e) => n + e.length, 0), client.size());
    assertEquals(extents[0]!.flags & NBD_STATE_HOLE, 0, "written data is allocated");
    // (nbdkit tracks allocation in pages, so look well inside the zeroed range.)
    const zeroed = extents.find((e) => e.offset <= MiB && e.offset + e.length > MiB)!;
    assertOk(zeroed.flags & NBD_STATE_ZERO, "zeroed range reads as zero");
    const sample = new Uint8Array(8192);
    await client.pread(sample, 0, { df: true });
    assertEquals(sample.subarray(0, 4096), data.subarray(0, 4096));
    assertEquals(sample.subarray(4096), new Uint8Array(4096));
  },
});

Deno.test({
  name: "client reads nbdkit pattern at unaligned offsets and sizes",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit(["-r", "pattern", "1G"]);
    await using client = await NbdClient.connect(server.uri);
    assertEquals(client.readOnly, true);
    for (const [offset, length] of [[0, 64], [3, 13], [900 * MiB + 5, 40 * MiB + 3]]) {
      const buf = new Uint8Array(length!);
      await client.pread(buf, offset!);
      assertEquals(firstDifference(buf, pattern(offset!, length!)), -1, `at ${offset}`);
    }
    const error = await client.pwrite(new Uint8Array(1), 0).catch((e) => e);
    assertOk(error instanceof NbdRequestError && error.errno === "EPERM" && error.local);
  },
});

Deno.test({
  name: "client reads nbdkit sparse-random exactly as nbdcopy does, holes included",
  ...peers("nbdkit", "nbdcopy"),
  async fn() {
    await using server = await nbdkit(["sparse-random", "16M", "seed=42", "runlength=262144"]);
    await using dir = await tempDir();
    await runOk("nbdcopy", [server.uri, `${dir.path}/copy`]);
    const expected = await Deno.readFile(`${dir.path}/copy`);
    await using client = await NbdClient.connect(server.uri);
    const buf = new Uint8Array(client.size()).fill(0xee);
    await client.pread(buf, 0);
    assertEquals(firstDifference(buf, expected), -1);
    let holes = 0;
    for await (const e of client.iterateExtents(0, client.size())) {
      if (e.flags & NBD_STATE_HOLE) holes += e.length;
    }
    assertOk(holes > 0 && holes < client.size(), `holes: ${holes}`);
  },
});

Deno.test({
  name: "client lists and opens nbdkit's named exports in option mode",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit([
      "--filter=exportname",
      "memory",
      "1M",
      "exportname=a",
      "exportname=b",
      "exportname-list=explicit",
      "exportdesc=fixed:hello",
      "exportname-strict=true",
    ]);
    const session = await NbdHandshake.open(server.uri);
    assertEquals(await session.list(), [
      { name: "a", description: "hello" },
      { name: "b", description: "hello" },
    ]);
    const info = await session.info("b");
    assertEquals(info.size, MiB);
    assertEquals(info.description, "hello");
    assertEquals(await session.listMetaContexts("b"), ["base:allocation"]);
    await assertRejects(
      session.info("zzz"),
      (e) => e instanceof NbdOptionError && /no export named "zzz"/.test(e.message),
    );
    const client = await NbdClient.fromHandshake(session, { exportName: "a" });
    assertEquals(client.exportName, "a");
    await client.pwrite(new Uint8Array([1, 2, 3]), 0);
    await client.close();
  },
});

Deno.test({
  name: "client copes with nbdkit's older handshakes: --no-sr, oldstyle, non-fixed newstyle",
  ...peers("nbdkit"),
  async fn() {
    for (
      const [flag, protocol, structured] of [
        ["--no-sr", "newstyle-fixed", false],
        ["-o", "oldstyle", false],
        ["--mask-handshake=0", "newstyle", false],
        ["--mask-handshake=1", "newstyle-fixed", true],
      ] as const
    ) {
      await using server = await nbdkit([flag, "memory", "4M"]);
      await using client = await NbdClient.connect(server.uri);
      assertEquals(client.protocol, protocol, flag);
      assertEquals(client.structuredReplies, structured, flag);
      const data = randomBytes(MiB + 17, 3);
      await client.pwrite(data, 1000);
      const back = new Uint8Array(data.length);
      await client.pread(back, 1000);
      assertEquals(firstDifference(back, data), -1, flag);
      // Without block status everything is reported as allocated data.
      const extents = await client.extents(0, client.size());
      if (!structured) assertEquals(extents, [{ length: client.size(), flags: 0 }]);
    }
  },
});

Deno.test({
  name: "client obeys nbdkit's block-size constraints",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit([
      "--filter=blocksize-policy",
      "memory",
      "8M",
      "blocksize-minimum=512",
      "blocksize-preferred=4096",
      "blocksize-maximum=64K",
      "blocksize-error-policy=error",
    ]);
    await using client = await NbdClient.connect(server.uri);
    assertEquals(client.advertisedBlockSize, {
      minimum: 512,
      preferred: 4096,
      maximum: 65536,
    });
    // 3 MiB in one call: split into 64 KiB requests the server accepts.
    const data = randomBytes(3 * MiB, 9);
    await client.pwrite(data, MiB);
    const back = new Uint8Array(3 * MiB);
    await client.pread(back, MiB);
    assertEquals(firstDifference(back, data), -1);
    const error = await client.pread(new Uint8Array(100), 512).catch((e) => e);
    assertOk(error instanceof NbdRequestError && error.local, String(error));
    assertMatch(error.message, /512-byte minimum block size/);
  },
});

Deno.test({
  name: "client surfaces nbdkit's injected errors with errno and request",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit([
      "--filter=error",
      "memory",
      "4M",
      "error-pread=EIO",
      "error-pread-rate=100%",
      "error-zero=ENOSPC",
      "error-zero-rate=100%",
    ]);
    await using client = await NbdClient.connect(server.uri);
    const error = await client.pread(new Uint8Array(4096), 8192).catch((e) => e);
    assertOk(error instanceof NbdRequestError, String(error));
    assertEquals(error.errno, "EIO");
    assertEquals(error.command, "READ");
    assertEquals(error.offset, 8192);
    assertEquals(error.length, 4096);
    assertEquals(error.local, false);
    await assertRejects(
      client.zero(0, 4096),
      (e) => e instanceof NbdRequestError && e.errno === "ENOSPC" && e.command === "WRITE_ZEROES",
    );
    await client.pwrite(new Uint8Array(4096).fill(1), 0); // other commands still work
  },
});

Deno.test({
  name: "client maps a qcow2 image with holes served by qemu-nbd, with qemu:allocation-depth",
  ...peers("qemu-nbd", "qemu-img", "qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.qcow2`;
    await runOk("qemu-img", ["create", "-f", "qcow2", image, "4M"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0xab 1M 64k", image]);
    await using server = await startServer(
      "qemu-nbd",
      ["-f", "qcow2", "-x", "disk", "-k", "$SOCKET", "-t", "-A", image],
      { exportName: "disk" },
    );
    await using client = await NbdClient.connect(server.uri, {
      metaContexts: ["base:allocation", "qemu:allocation-depth"],
    });
    assertEquals(client.size(), 4 * MiB);
    assertEquals(client.canMultiConn, false);
    assertEquals(client.metaContexts.sort(), ["base:allocation", "qemu:allocation-depth"]);
    const map = [];
    for await (const e of client.iterateExtents(0, client.size())) map.push(e);
    assertEquals(map, [
      { offset: 0, length: MiB, flags: 3 },
      { offset: MiB, length: 65536, flags: 0 },
      { offset: MiB + 65536, length: 3 * MiB - 65536, flags: 3 },
    ]);
    const depth = [];
    for await (const e of client.iterateExtents(0, client.size(), "qemu:allocation-depth")) {
      depth.push([e.length, e.flags]);
    }
    assertEquals(depth, [[MiB, 0], [65536, 1], [3 * MiB - 65536, 0]]);
    const buf = new Uint8Array(2 * MiB).fill(0x55);
    await client.pread(buf, 0);
    assertEquals(buf.subarray(0, MiB), new Uint8Array(MiB));
    assertEquals(buf.subarray(MiB, MiB + 65536), new Uint8Array(65536).fill(0xab));
    assertEquals(buf.subarray(MiB + 65536), new Uint8Array(MiB - 65536));
    // qemu-nbd allows one client at a time by default: the pool stays at one.
    await client.close();
    await using pool = await NbdClientPool.connect(server.uri, { connections: 4 });
    assertEquals(pool.clients.length, 1);
  },
});

Deno.test({
  name: "client works with nbd-server: simple replies, size 0 in INFO, ABORT without ACK",
  ...peers("nbd-server"),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const content = randomBytes(2 * MiB, 5);
    await Deno.writeFile(image, content);
    await using server = await startNbdServer(image);
    const session = await NbdHandshake.open(server.uri);
    assertEquals(session.structuredReplies, false);
    assertEquals(await session.list(), [{ name: "disk", description: "" }]);
    const info = await session.info("disk");
    assertEquals(info.size, 0, "nbd-server's INFO quirk (if this fails, the quirk is gone)");
    await session.abort(); // nbd-server closes instead of acknowledging
    await using client = await NbdClient.connect(server.uri);
    assertEquals(client.size(), 2 * MiB, "GO reports the real size");
    const back = new Uint8Array(2 * MiB);
    await client.pread(back, 0);
    assertEquals(firstDifference(back, content), -1);
    await client.pwrite(new Uint8Array(512).fill(7), 512, { fua: true });
    await client.flush();
    await client.close();
    const after = await Deno.readFile(image);
    assertEquals(after.subarray(512, 1024), new Uint8Array(512).fill(7));
  },
});

Deno.test({
  name: "client pool opens several connections only when the server allows multi-conn",
  ...peers("nbdkit"),
  async fn() {
    await using server = await nbdkit(["memory", "16M"]);
    await using pool = await NbdClientPool.connect(server.uri, { connections: 4 });
    assertEquals(pool.clients.length, 4);
    const data = randomBytes(8 * MiB, 11);
    await Promise.all(
      Array.from({ length: 32 }, (_, i) => {
        const offset = i * 256 * 1024;
        return pool.pwrite(data.subarray(offset, offset + 256 * 1024), offset);
      }),
    );
    assertOk(pool.clients.every((c) => c.inFlight === 0));
    await pool.flush();
    const back = new Uint8Array(8 * MiB);
    await Promise.all(
      Array.from(
        { length: 8 },
        (_, i) => pool.pread(back.subarray(i * MiB, (i + 1) * MiB), i * MiB),
      ),
    );
    assertEquals(firstDifference(back, data), -1);

    await using single = await nbdkit([
      "--filter=multi-conn",
      "memory",
      "1M",
      "multi-conn-mode=disable",
    ]);
    await using one = await NbdClientPool.connect(single.uri, { connections: 4 });
    assertEquals(one.clients.length, 1);
  },
});

Deno.test("client negotiates extended headers with our own server", async () => {
  await using server = await startNbdServe(["memory", "64M"]);
  await using client = await NbdClient.connect(server.uri);
  assertEquals(client.extendedHeaders, true);
  assertEquals(client.structuredReplies, true);
  const data = randomBytes(5 * MiB, 13);
  await client.pwrite(data, 3 * MiB + 1);
  const back = new Uint8Array(data.length);
  await client.pread(back, 3 * MiB + 1);
  assertEquals(firstDifference(back, data), -1);
  await client.zero(0, 64 * MiB - 1);
  const extents = await client.extents(0, 64 * MiB);
  assertOk(extents.length >= 1 && extents[0]!.flags & NBD_STATE_ZERO);
  await assertRejects(
    client.pread(new Uint8Array(10), 64 * MiB - 5),
    (e) => e instanceof NbdRequestError && e.local,
  );

  await using compact = await NbdClient.connect(server.uri, { extendedHeaders: false });
  assertEquals(compact.extendedHeaders, false);
  assertEquals(compact.structuredReplies, true);
  const small = new Uint8Array(100);
  await compact.pread(small, 3 * MiB + 1);
  assertEquals(small, new Uint8Array(100));
});

Deno.test({
  name: "pwrite with headroom: sent() comes once the data is handed over, before the reply",
  ...peers("nbdkit"),
  async fn() {
    await using nbdkit = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", "8M"]);
    await using client = await NbdClient.connect(nbdkit.uri);
    const data = randomBytes(256 * 1024, 9);
    const buffer = new Uint8Array(WRITE_HEADROOM + data.length);
    buffer.set(data, WRITE_HEADROOM);
    const view = buffer.subarray(WRITE_HEADROOM);
    const events: string[] = [];
    const write = client.pwrite(view, 65536, {
      headroom: true,
      sent: () => {
        events.push("sent");
        // The buffer is ours again: what the server gets was taken before this.
        buffer.fill(0xee);
      },
    });
    await write.then(() => events.push("replied"));
    assertEquals(events, ["sent", "replied"]);
    const back = new Uint8Array(data.length);
    await client.pread(back, 65536);
    assertEquals(firstDifference(back, data), -1);
    // Without headroom nothing is promised: sent() is not called.
    let called = false;
    await client.pwrite(data, 0, { sent: () => called = true });
    assertEquals(called, false);
  },
});

Deno.test({
  name: "pwrite with headroom: header and data in one piece, only the headroom overwritten",
  ...peers("nbdkit"),
  async fn() {
    // nbdkit negotiates compact 28-byte headers, our server extended 32-byte ones.
    await using nbdkit = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", "8M"]);
    await using ours = await startNbdServe(["memory", "8M"]);
    for (const uri of [nbdkit.uri, ours.uri]) {
      await using client = await NbdClient.connect(uri);
      const guard = 64;
      const data = randomBytes(256 * 1024 + 4096, 7);
      const buffer = new Uint8Array(guard + WRITE_HEADROOM + data.length).fill(0xaa);
      buffer.set(data, guard + WRITE_HEADROOM);
      const view = buffer.subarray(guard + WRITE_HEADROOM);
      await client.pwrite(view, 4096, { headroom: true });
      assertOk(buffer.subarray(0, guard).every((b) => b === 0xaa), `${uri}: guard bytes kept`);
      assertEquals(view, data, `${uri}: the data is untouched`);
      // As the copy does after a zero run: the next write's header goes over data already sent.
      const tail = 100 * 1024;
      await client.pwrite(view.subarray(tail), 2 * 1024 * 1024, { headroom: true });
      for (
        const [offset, expected] of [[4096, data], [2 * 1024 * 1024, data.subarray(tail)]] as const
      ) {
        const back = new Uint8Array(expected.length);
        await client.pread(back, offset);
        assertEquals(firstDifference(back, expected), -1, `${uri} at ${offset}`);
      }
    }
  },
});
