/**
 * Filters driven through real clients (nbdcopy, nbdinfo, qemu-io, nbdsh)
 * against `nbd serve`, with byte-exact checks.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { NBDSH_ENV, peers, randomBytes, run, runOk, startNbdServe, tempDir } from "./helpers.ts";

const MiB = 1024 * 1024;

/** A disk image with text (compressible) and random (incompressible) parts. */
function mixedImage(size: number): Uint8Array {
  const out = new Uint8Array(size);
  const text = new TextEncoder().encode(
    "the quick brown fox jumps over the lazy dog\n".repeat(4096),
  );
  for (let at = 0; at < size; at += text.length * 2) {
    out.set(text.subarray(0, Math.min(text.length, size - at)), at);
  }
  out.set(randomBytes(size / 4, 3), size / 2);
  return out;
}

async function copyOut(uri: string, path: string): Promise<Uint8Array> {
  await runOk("nbdcopy", [uri, path]);
  return await Deno.readFile(path);
}

Deno.test({
  name: "xz filter: nbdcopy reads a multi-block .xz back to the uncompressed original",
  ...peers("nbdcopy", "xz"),
  async fn() {
    await using dir = await tempDir();
    const original = mixedImage(4 * MiB);
    await Deno.writeFile(`${dir.path}/disk.img`, original);
    await runOk("xz", ["-k", "-0", "--block-size=256KiB", `${dir.path}/disk.img`]);
    await using server = await startNbdServe(["--filter=xz", "file", `${dir.path}/disk.img.xz`]);
    assertBytes(await copyOut(server.uri, `${dir.path}/out.img`), original);
  },
});

Deno.test({
  name: "gzip filter: nbdcopy reads the decompressed image",
  ...peers("nbdcopy", "gzip"),
  async fn() {
    await using dir = await tempDir();
    const original = mixedImage(2 * MiB);
    await Deno.writeFile(`${dir.path}/disk.img`, original);
    await runOk("gzip", ["-k", `${dir.path}/disk.img`]);
    await using server = await startNbdServe(["--filter=gzip", "file", `${dir.path}/disk.img.gz`]);
    assertBytes(await copyOut(server.uri, `${dir.path}/out.img`), original);
  },
});

Deno.test({
  name: "error filter: error-rate=100% with error-file fails reads only while the file exists",
  ...peers("qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const trigger = `${dir.path}/inject`;
    await using server = await startNbdServe([
      "--filter=error",
      "memory",
      "1M",
      "error-rate=100%",
      `error-file=${trigger}`,
    ]);
    const readOnce = () => run("qemu-io", ["-r", "-f", "raw", "-c", "read 0 4096", server.uri]);
    const before = await readOnce();
    assertOk(before.code === 0 && !/error/i.test(before.stderr + before.stdout), before.stderr);
    await Deno.writeTextFile(trigger, "");
    const during = await readOnce();
    assertIncludes(during.stdout + during.stderr, "Input/output error");
    await Deno.remove(trigger);
    const after = await readOnce();
    assertOk(!/error/i.test(after.stderr + after.stdout), after.stderr + after.stdout);
  },
});

/** Log lines without their timestamps, and the timestamps in ms. */
function parseLog(text: string): { body: string[]; times: number[]; elapsed: number[] } {
  const lines = text.trimEnd().split("\n");
  return {
    // Connection numbers depend on how many probes connected first: normalise them.
    body: lines.map((l) =>
      l.slice(28).replace(/ elapsed=[\d.]+/, "").replace(/^connection=\d+/, "connection=N")
    ),
    times: lines.map((l) => Date.parse(l.slice(0, 23) + "Z") + Number(l.slice(23, 26)) / 1000),
    elapsed: lines.map((l) => Number(/elapsed=([\d.]+)/.exec(l)?.[1] ?? 0)),
  };
}

const NBDSH_SEQUENCE = [
  'h.pwrite(b"\\x01" * 4096, 0)',
  "h.pread(4096, 0)",
  "h.flush()",
  "h.zero(8192, 65536)",
].join("\n");

Deno.test({
  name: "delay then log: lines in request order, the delay before each request, outside the log",
  ...peers("nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const logfile = `${dir.path}/log`;
    {
      await using server = await startNbdServe([
        "--filter=delay",
        "--filter=log",
        "memory",
        "1M",
        "rdelay=300ms",
        "wdelay=300ms",
        `logfile=${logfile}`,
      ]);
      await runOk("nbdsh", ["-u", server.uri, "-c", NBDSH_SEQUENCE], { env: NBDSH_ENV });
    }
    const log = parseLog(await Deno.readTextFile(logfile));
    const requests = log.body.filter((l) => !/ (Open|Close) /.test(l));
    assertEquals(requests, [
      "connection=N Write id=1 offset=0 count=4096 fua=0 return=0",
      "connection=N Read id=2 offset=0 count=4096 return=0",
      "connection=N Flush id=3 return=0",
      "connection=N Zero id=4 offset=65536 count=8192 trim=1 fua=0 fast=0 return=0",
    ]);
    assertOk(/^connection=N Open /.test(log.body[0]!), log.body[0]);
    assertOk(/^connection=N Close transactions=4$/.test(log.body.at(-1)!), log.body.at(-1));
    // The delay sits outside the log: each request takes little time in the log's view,
    // but the write and read only arrive 300 ms after the client sent them.
    const gaps = log.times.slice(1).map((t, i) => t - log.times[i]!);
    assertOk(gaps[0]! >= 290 && gaps[1]! >= 290, `gaps ${gaps}`);
    assertOk(log.elapsed.every((e) => e < 0.25), `elapsed ${log.elapsed}`);
  },
});

Deno.test({
  name: "filter order matters: log then delay sees the delay inside each request",
  ...peers("nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const logfile = `${dir.path}/log`;
    {
      await using server = await startNbdServe([
        "--filter=log",
        "--filter=delay",
        "memory",
        "1M",
        "rdelay=300ms",
        "wdelay=300ms",
        `logfile=${logfile}`,
      ]);
      await runOk("nbdsh", ["-u", server.uri, "-c", NBDSH_SEQUENCE], { env: NBDSH_ENV });
    }
    const log = parseLog(await Deno.readTextFile(logfile));
    const write = log.body.findIndex((l) => / Write /.test(l));
    const read = log.body.findIndex((l) => / Read /.test(l));
    const flush = log.body.findIndex((l) => / Flush /.test(l));
    assertOk(log.elapsed[write]! >= 0.29 && log.elapsed[read]! >= 0.29, `${log.elapsed}`);
    assertOk(log.elapsed[flush]! < 0.25, `flush has no delay: ${log.elapsed[flush]}`);
  },
});

Deno.test({
  name: "filter order matters: truncate over offset differs from offset over truncate",
  ...peers("nbdinfo"),
  async fn() {
    const sizeOf = async (filters: string[]) => {
      await using server = await startNbdServe([
        ...filters,
        "pattern",
        "1M",
        "offset=256K",
        "truncate=512K",
      ]);
      return Number((await runOk("nbdinfo", ["--size", server.uri])).stdout.trim());
    };
    // truncate outermost: the 768K window is cut to 512K.
    assertEquals(await sizeOf(["--filter=truncate", "--filter=offset"]), 512 * 1024);
    // offset outermost: the disk is cut to 512K first, leaving a 256K window.
    assertEquals(await sizeOf(["--filter=offset", "--filter=truncate"]), 256 * 1024);
  },
});

/**
 * Four nbdsh processes (each one connection) write their own 1000-byte
 * stripes concurrently with many requests in flight, so they share every
 * block; then the disk is copied out and compared.
 */
async function concurrentWriters(uri: string, dir: string, size: number): Promise<Uint8Array> {
  const writers = 4;
  const stripe = 1000;
  const expected = new Uint8Array(size);
  await runOk("nbdcopy", [uri, `${dir}/before.img`]);
  expected.set(await Deno.readFile(`${dir}/before.img`));
  const jobs = [];
  for (let w = 0; w < writers; w++) {
    const data = randomBytes(size, 100 + w);
    await Deno.writeFile(`${dir}/data${w}`, data);
    for (let s = w; s * stripe < size; s += writers) {
      const start = s * stripe;
      expected.set(data.subarray(start, Math.min(start + stripe, size)), start);
    }
    const script = `
data = open(${JSON.stringify(`${dir}/data${w}`)}, "rb").read()
cookies = []
for s in range(${w}, (${size} + ${stripe} - 1) // ${stripe}, ${writers}):
    start = s * ${stripe}
    buf = nbd.Buffer.from_bytearray(bytearray(data[start:min(start + ${stripe}, ${size})]))
    cookies.append(h.aio_pwrite(buf, start))
    while h.aio_in_flight() >= 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
`;
    jobs.push(runOk("nbdsh", ["-u", uri, "-c", script], { env: NBDSH_ENV }));
  }
  await Promise.all(jobs);
  return expected;
}

Deno.test({
  name: "cow filter: concurrent writers on four connections, read back byte-exact",
  ...peers("nbdsh", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    await using server = await startNbdServe([
      "--filter=cow",
      "pattern",
      "2M",
      "cow-block-size=4K",
    ]);
    const expected = await concurrentWriters(server.uri, dir.path, 2 * MiB);
    assertBytes(await copyOut(server.uri, `${dir.path}/after.img`), expected);
  },
});

Deno.test({
  name: "cache filter: concurrent writers on four connections with evictions, byte-exact below too",
  ...peers("nbdsh", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const disk = `${dir.path}/disk.img`;
    await Deno.writeFile(disk, randomBytes(2 * MiB, 9));
    let expected: Uint8Array;
    {
      await using server = await startNbdServe([
        "--filter=cache",
        "file",
        disk,
        "cache-max-size=256K",
        "cache-min-block-size=4K",
        "cache-on-read=true",
      ]);
      expected = await concurrentWriters(server.uri, dir.path, 2 * MiB);
      assertBytes(await copyOut(server.uri, `${dir.path}/after.img`), expected);
    }
    // Every writer flushed: the file below holds the same bytes.
    assertBytes(await Deno.readFile(disk), expected);
  },
});

Deno.test({
  name:
    "partition filter serves MBR logical and GPT partitions made by nbdkit's partitioning plugin",
  ...peers("nbdkit", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const parts: Uint8Array[] = [];
    for (let i = 0; i < 5; i++) {
      parts.push(randomBytes((i + 1) * 64 * 1024, 20 + i));
      await Deno.writeFile(`${dir.path}/p${i}`, parts[i]!);
    }
    for (const type of ["mbr", "gpt"]) {
      const image = `${dir.path}/${type}.img`;
      await runOk("nbdkit", [
        "-U",
        "-",
        "partitioning",
        ...parts.map((_, i) => `${dir.path}/p${i}`),
        `partition-type=${type}`,
        "--run",
        `nbdcopy "$uri" ${image}`,
      ]);
      // MBR: files 1-3 are primary partitions, 4 is the extended one, files 4 and 5 are logical 5 and 6.
      const numbering = type === "mbr" ? [[1, 0], [5, 3], [6, 4]] : [[1, 0], [5, 4]];
      for (const [n, file] of numbering) {
        await using server = await startNbdServe([
          "--filter=partition",
          "file",
          image,
          `partition=${n}`,
        ]);
        const got = await copyOut(server.uri, `${dir.path}/out-${type}-${n}`);
        assertBytes(got, parts[file!]!, `${type} partition ${n}`);
      }
    }
  },
});

Deno.test({
  name: "blocksize filter: qemu-io unaligned writes over a 4K-aligned layer",
  ...peers("qemu-io"),
  async fn() {
    await using server = await startNbdServe([
      "--filter=blocksize",
      "--filter=log",
      "memory",
      "1M",
      "minblock=4K",
      "maxdata=64K",
      "logfile=/dev/null",
    ]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xab 4001 300000", server.uri]);
    const check = await runOk("qemu-io", [
      "-r",
      "-f",
      "raw",
      "-c",
      "read -P 0xab 4001 300000",
      "-c",
      "read -P 0 0 4001",
      "-c",
      "read -P 0 304001 4000",
      server.uri,
    ]);
    assertOk(!/Pattern verification failed/.test(check.stdout), check.stdout);
  },
});

Deno.test({
  name: "readonly filter: qemu-io writes fail, reads work; stats counts them at exit",
  ...peers("qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const statsfile = `${dir.path}/stats`;
    {
      await using server = await startNbdServe([
        "--filter=stats",
        "--filter=readonly",
        "pattern",
        "1M",
        `statsfile=${statsfile}`,
      ]);
      const write = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", server.uri]);
      assertOk(
        write.code !== 0 ||
          /(Operation not permitted|read-only)/i.test(write.stdout + write.stderr),
        write.stdout,
      );
      await runOk("qemu-io", [
        "-r",
        "-f",
        "raw",
        "-c",
        "read 0 65536",
        "-c",
        "read 65536 65536",
        server.uri,
      ]);
    }
    const stats = await Deno.readTextFile(statsfile);
    assertOk(/^read: 2 ops, 0 errors, [\d.]+ s, 128\.00 KiB/m.test(stats), stats);
  },
});

Deno.test({
  name: "retry filter: qemu-io reads succeed once the failure below clears",
  ...peers("qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const trigger = `${dir.path}/broken`;
    await Deno.writeTextFile(trigger, "");
    // retry outermost, error below it: every try fails until the trigger file goes away.
    await using server = await startNbdServe([
      "--filter=retry",
      "--filter=error",
      "pattern",
      "1M",
      "retries=20",
      "retry-delay=100ms",
      "retry-exponential=no",
      "error-rate=100%",
      `error-file=${trigger}`,
    ]);
    const reading = run("qemu-io", ["-r", "-f", "raw", "-c", "read -v 8 8", server.uri]);
    await new Promise((r) => setTimeout(r, 400));
    await Deno.remove(trigger);
    const result = await reading;
    assertEquals(result.code, 0, result.stderr);
    // The pattern plugin's word at offset 8 holds 8, big-endian.
    assertIncludes(result.stdout, "00000008:  00 00 00 00 00 00 00 08");
  },
});

/** The ops of one kind of request in a stats file ("read", "extents"...), 0 when absent. */
function statsOps(stats: string, kind: string): number {
  return Number(new RegExp(`^${kind}: (\\d+) ops`, "m").exec(stats)?.[1] ?? 0);
}

Deno.test({
  name: "readahead filter: nbdcopy's sequential reads reach the plugin as fewer, larger reads",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const data = randomBytes(16 * MiB, 41);
    await Deno.writeFile(`${dir.path}/disk.img`, data);
    const statsfile = `${dir.path}/stats`;
    {
      await using server = await startNbdServe([
        "--filter=readahead",
        "--filter=stats",
        "file",
        `${dir.path}/disk.img`,
        `statsfile=${statsfile}`,
      ]);
      // One connection, 256 KiB requests: 64 reads from the client.
      await runOk("nbdcopy", ["--connections=1", server.uri, `${dir.path}/out.img`]);
    }
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
    const stats = await Deno.readTextFile(statsfile);
    assertOk(statsOps(stats, "read") <= 16, stats);
    assertOk(/^read: \d+ ops, 0 errors, [\d.]+ s, 16\.00 MiB/m.test(stats), stats);
  },
});

Deno.test({
  name: "cacheextents filter: qemu-img map's one-extent queries reach the plugin once",
  ...peers("qemu-img"),
  async fn() {
    await using dir = await tempDir();
    const path = `${dir.path}/sparse.img`;
    // 16 data runs of 64 KiB separated by 1 MiB holes.
    await Deno.writeFile(path, new Uint8Array(0));
    const file = await Deno.open(path, { write: true });
    for (let i = 0; i < 16; i++) {
      await file.seek(i * 1088 * 1024 + MiB, Deno.SeekMode.Start);
      await file.write(randomBytes(64 * 1024, 42 + i));
    }
    await file.truncate(18 * MiB);
    file.close();
    const map = async (filters: string[], statsfile: string) => {
      await using server = await startNbdServe([
        ...filters,
        "--filter=stats",
        "file",
        path,
        `statsfile=${statsfile}`,
      ]);
      return (await runOk("qemu-img", ["map", "--output=json", "-f", "raw", server.uri])).stdout;
    };
    const plain = await map([], `${dir.path}/plain`);
    const cached = await map(["--filter=cacheextents"], `${dir.path}/cached`);
    assertEquals(cached, plain);
    assertEquals((JSON.parse(plain) as unknown[]).length, 33);
    const asked = statsOps(await Deno.readTextFile(`${dir.path}/plain`), "extents");
    assertOk(asked >= 33, `${asked} block-status requests without the filter`);
    assertEquals(statsOps(await Deno.readTextFile(`${dir.path}/cached`), "extents"), 1);
  },
});
