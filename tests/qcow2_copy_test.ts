/**
 * `nbd copy` with qcow2 on either side, judged by qemu: images qemu made
 * read back equal to `qemu-img convert -O raw` from a file, an NBD export
 * and an http URL; images we write pass `qemu-img check` with no errors
 * and no leaks, `qemu-img compare` finds them equal to the source, `qemu-img
 * info` shows the requested cluster size, compression type and backing
 * file, and qemu-nbd serves them back equal.
 */

import { assertBytes, assertEquals, assertMatch, assertOk } from "./assert.ts";
import {
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  startServer,
  tempDir,
} from "./helpers.ts";

import { copyCommand } from "../commands/copy.ts";

const PEERS = peers("qemu-img", "qemu-io", "qemu-nbd");
const MiB = 1024 * 1024;

function nbd(args: string[]) {
  return run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args]);
}

/** Runs `nbd copy` in this process (quicker than starting one); fails unless it succeeds. */
async function nbdOk(args: string[]): Promise<void> {
  const [command, ...rest] = args;
  assertEquals(command, "copy");
  const code = await copyCommand.run(rest);
  if (code !== 0) throw new Error(`nbd ${args.join(" ")} exited ${code}`);
}

/** `qemu-img check` must find no errors and no leaks (exit 0, which leaks would make 3). */
async function assertClean(path: string): Promise<void> {
  const result = await run("qemu-img", ["check", path]);
  assertEquals(result.code, 0, `qemu-img check ${path}:\n${result.stdout}${result.stderr}`);
  assertOk(!/leaked/i.test(result.stdout), result.stdout);
}

async function assertSame(image: string, raw: string, format = "qcow2"): Promise<void> {
  const result = await run("qemu-img", ["compare", "-f", format, "-F", "raw", image, raw]);
  assertEquals(result.code, 0, `qemu-img compare ${image} ${raw}:\n${result.stdout}`);
}

async function qemuInfo(path: string): Promise<Record<string, unknown>> {
  return JSON.parse((await runOk("qemu-img", ["info", "--output=json", path])).stdout);
}

/** A raw image with data, zero runs, holes and an odd tail. */
async function makeRaw(path: string, size: number): Promise<Uint8Array> {
  const data = new Uint8Array(size);
  data.set(randomBytes(3 * MiB, 7), 0);
  data.fill(0x5a, 4 * MiB, 4 * MiB + 300_000); // compresses well
  data.set(randomBytes(70_000, 8), 6 * MiB + 512);
  data.set(randomBytes(1000, 9), size - 1000);
  await Deno.writeFile(path, data);
  return data;
}

Deno.test({
  name: "nbd copy -f qcow2 reads qemu's images as qemu-img convert does, from file and NBD",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcopy");
    const d = dir.path;
    const writes = [
      "write -P 0x11 0 100k",
      "write -P 0x22 1000000 70000",
      "write -z 128k 256k",
      "write -c -P 0x33 2M 64k",
      "discard 2M 8k",
    ];
    const cases: [string, string[], string][] = [
      ["v2", ["-o", "compat=0.10"], "4M"],
      ["c512-rc1", ["-o", "cluster_size=512,refcount_bits=1"], "4M"],
      ["c2m-odd", ["-o", "cluster_size=2M,refcount_bits=64"], "5243392"],
      ["extl2", ["-o", "extended_l2=on"], "4M"],
      ["zstd", ["-o", "compression_type=zstd"], "4M"],
    ];
    for (const [name, options, size] of cases) {
      const image = `${d}/${name}.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...options, image, size]);
      // qemu compresses only whole clusters.
      const io = name.startsWith("c2m") ? writes.map((w) => w.replace("-c ", "")) : writes;
      await runOk("qemu-io", ["-f", "qcow2", ...io.flatMap((w) => ["-c", w]), image]);
      await runOk("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, `${d}/want.raw`]);
      const want = await Deno.readFile(`${d}/want.raw`);
      const format = name === "v2" ? "auto" : "qcow2";
      await nbdOk(["copy", `--source-format=${format}`, image, `${d}/got.raw`]);
      assertBytes(await Deno.readFile(`${d}/got.raw`), want, name);
    }
    // The same image's bytes served raw by an NBD server: read through the export.
    await using server = await startNbdServe(["-r", "file", `${d}/extl2.qcow2`]);
    await runOk("qemu-img", [
      "convert",
      "-f",
      "qcow2",
      "-O",
      "raw",
      `${d}/extl2.qcow2`,
      `${d}/want.raw`,
    ]);
    await nbdOk(["copy", "-f", "qcow2", server.uri, `${d}/got.raw`]);
    assertBytes(await Deno.readFile(`${d}/got.raw`), await Deno.readFile(`${d}/want.raw`), "nbd");
  },
});

Deno.test({
  name: "nbd copy -f qcow2 from an http URL reads only what it needs",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcopy");
    const d = dir.path;
    const image = `${d}/web.qcow2`;
    // A large virtual disk with little data: the file is small, and it is all we may read.
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", image, "1G"]);
    await runOk("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -P 0x61 0 1M",
      "-c",
      "write -P 0x62 700M 2M",
      image,
    ]);
    const bytes = await Deno.readFile(image);
    let served = 0;
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
      if (req.method === "HEAD") {
        return new Response(null, { headers: { "Content-Length": String(bytes.length) } });
      }
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
      if (!range) return new Response("ranges only", { status: 400 });
      const start = Number(range[1]);
      const end = Math.min(Number(range[2]), bytes.length - 1);
      served += end + 1 - start;
      return new Response(bytes.slice(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${bytes.length}` },
      });
    });
    try {
      const url = `http://127.0.0.1:${server.addr.port}/web.qcow2`;
      await nbdOk(["copy", "--source-format=qcow2", url, `${d}/web.raw`]);
    } finally {
      await server.shutdown();
    }
    await assertSame(image, `${d}/web.raw`);
    assertEquals((await Deno.stat(`${d}/web.raw`)).size, 1024 * MiB);
    assertOk(served <= bytes.length + 2 * MiB, `served ${served} of a ${bytes.length}-byte file`);
  },
});

Deno.test({
  name: "nbd copy -O qcow2 writes images qemu checks clean and finds equal",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcopy");
    const d = dir.path;
    const raw = `${d}/src.raw`;
    const size = 8 * MiB + 4096 + 1000; // not a whole number of clusters, nor of sectors
    await makeRaw(raw, size);
    const cases: [string, string[], number, string][] = [
      ["plain", [], 65536, "zlib"],
      ["c512", ["--cluster-size=512"], 512, "zlib"],
      ["zlib-4k", ["--compress", "--cluster-size=4K"], 4096, "zlib"],
      ["zstd-2m", ["-c", "--compression-type=zstd", "--cluster-size=2M"], 2 * MiB, "zstd"],
      ["zstd-type-only", ["--compression-type=zstd"], 65536, "zstd"],
    ];
    for (const [name, options, clusterSize, type] of cases) {
      const out = `${d}/${name}.qcow2`;
      await nbdOk(["copy", "-O", "qcow2", ...options, raw, out]);
      await assertClean(out);
      await assertSame(out, raw);
      const info = await qemuInfo(out);
      assertEquals(info["cluster-size"], clusterSize, name);
      const data = (info["format-specific"] as { data: Record<string, unknown> }).data;
      assertEquals(data["compression-type"], type, name);
      if (options.includes("-c") || options.includes("--compress")) {
        const check = (await runOk("qemu-img", ["check", out])).stdout;
        assertMatch(check, /[1-9][0-9.]*% compressed clusters/, name);
      }
    }
    // Holes and zeroes are not stored.
    const plain = (await Deno.stat(`${d}/plain.qcow2`)).size;
    assertOk(plain < 5 * MiB, `plain image is ${plain} bytes`);
    assertOk((await Deno.stat(`${d}/zlib-4k.qcow2`)).size < plain, "compression saves space");
    // qemu-nbd serves our image; our client reads it back equal.
    await using server = await startServer("qemu-nbd", [
      "-r",
      "-f",
      "qcow2",
      "-k",
      "$SOCKET",
      `${d}/zstd-2m.qcow2`,
    ]);
    await nbdOk(["copy", server.uri, `${d}/back.raw`]);
    const back = await Deno.readFile(`${d}/back.raw`);
    const want = await Deno.readFile(raw);
    assertBytes(back.subarray(0, size), want, "qemu-nbd read-back");
    assertOk(back.subarray(size).every((b) => b === 0), "the sector tail reads as zeroes");
    // And our own reader agrees (a qcow2 source to a qcow2 destination).
    await nbdOk(["copy", "-f", "qcow2", "-O", "qcow2", `${d}/zlib-4k.qcow2`, `${d}/again.qcow2`]);
    await assertClean(`${d}/again.qcow2`);
    await assertSame(`${d}/again.qcow2`, raw);
  },
});

Deno.test({
  name: "nbd copy -O qcow2 --backing writes an overlay with only what differs",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcopy");
    const d = dir.path;
    const size = 8 * MiB;
    const base = await makeRaw(`${d}/base.raw`, size);
    await runOk("qemu-img", [
      "convert",
      "-f",
      "raw",
      "-O",
      "qcow2",
      `${d}/base.raw`,
      `${d}/base.qcow2`,
    ]);
    const changed = base.slice();
    changed.set(randomBytes(10_000, 11), 5 * MiB + 100); // one cluster differs
    changed.fill(0, 65536, 3 * 65536); // zeroes over data: zero clusters
    await Deno.writeFile(`${d}/new.raw`, changed);
    await Deno.mkdir(`${d}/sub`);
    for (const [backing, out] of [["base.qcow2", "ov.qcow2"], ["../base.raw", "sub/ov.qcow2"]]) {
      const path = `${d}/${out}`;
      await nbdOk(["copy", "-O", "qcow2", `--backing=${backing}`, `${d}/new.raw`, path]);
      await assertClean(path);
      await assertSame(path, `${d}/new.raw`);
      const info = await qemuInfo(path);
      assertEquals(info["backing-filename"], backing);
      assertEquals(info["backing-filename-format"], backing.endsWith(".raw") ? "raw" : "qcow2");
      // Only the changed clusters are in the overlay.
      const map = JSON.parse((await runOk("qemu-img", ["map", "--output=json", path])).stdout) as {
        start: number;
        length: number;
        depth: number;
        zero: boolean;
      }[];
      const own = map.filter((m) => m.depth === 0);
      const data = own.filter((m) => !m.zero).reduce((n, m) => n + m.length, 0);
      const zero = own.filter((m) => m.zero).reduce((n, m) => n + m.length, 0);
      assertEquals(data, 65536, `${out}: data clusters`);
      assertEquals(zero, 2 * 65536, `${out}: zero clusters`);
    }
  },
});

Deno.test({
  name: "nbd copy -O qcow2 into an NBD export; bad formats get one-line errors",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcopy");
    const d = dir.path;
    const raw = `${d}/src.raw`;
    await makeRaw(raw, 8 * MiB);
    await using server = await startNbdServe(["memory", "16M"]);
    await nbdOk(["copy", "-O", "qcow2", "--compress", raw, server.uri]);
    await nbdOk(["copy", server.uri, `${d}/export.qcow2`]);
    await assertClean(`${d}/export.qcow2`);
    await assertSame(`${d}/export.qcow2`, raw);
    // Read back through the export with our reader.
    await nbdOk(["copy", "-f", "qcow2", server.uri, `${d}/back.raw`]);
    assertBytes(await Deno.readFile(`${d}/back.raw`), await Deno.readFile(raw), "read back");
    // Too small an export.
    await using small = await startNbdServe(["memory", "1M"]);
    const tooSmall = await nbd(["copy", "-O", "qcow2", raw, small.uri]);
    assertEquals(tooSmall.code, 1);
    assertMatch(tooSmall.stderr, /^nbd: .*does not fit in the destination.*\n$/);

    const notQcow2 = await nbd(["copy", "-f", "qcow2", raw, `${d}/x.raw`]);
    assertEquals(notQcow2.code, 1);
    assertMatch(notQcow2.stderr, /^nbd: source: not a qcow2 image \(bad magic\)\n$/);
    await runOk("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      "src.raw",
      "-F",
      "raw",
      `${d}/top.qcow2`,
    ]);
    const backed = await nbd(["copy", "-f", "auto", `${d}/top.qcow2`, `${d}/x.raw`]);
    assertEquals(backed.code, 1);
    assertMatch(backed.stderr, /^nbd: source: .* has a backing file "src\.raw", which nbd copy/);
    assertOk(!backed.stderr.trim().includes("\n"), backed.stderr);
    const toStdout = await nbd(["copy", "-O", "qcow2", raw, "-"]);
    assertEquals(toStdout.code, 2);
    const usage = await nbd(["copy", "--compress", raw, `${d}/x.raw`]);
    assertEquals(usage.code, 2);
    assertMatch(usage.stderr, /need --destination-format=qcow2/);
    const badType = await nbd(["copy", "-O", "qcow2", "--compression-type=lzo", raw, `${d}/x`]);
    assertEquals(badType.code, 2);
    for (const name of await Array.fromAsync(Deno.readDir(d))) {
      assertOk(!name.name.startsWith("."), `a temporary file was left: ${name.name}`);
    }
  },
});

/** Runs `nbd copy ARGS` under strace: the fsync and fdatasync calls it made. */
async function tracedFlushes(trace: string, args: string[]): Promise<string[]> {
  await runOk("strace", [
    "-f",
    "-e",
    "trace=fsync,fdatasync",
    "-o",
    trace,
    Deno.execPath(),
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "copy",
    ...args,
  ]);
  return (await Deno.readTextFile(trace)).split("\n")
    .filter((line) => /\b(fsync|fdatasync)\(/.test(line) && !/resumed/.test(line));
}

Deno.test({
  name: "nbd copy into a new qcow2 file waits for no disk flush unless --flush asks",
  ...peers("qemu-img", "strace"),
  async fn() {
    await using dir = await tempDir();
    const raw = `${dir.path}/disk.raw`;
    await Deno.writeFile(raw, randomBytes(6 * MiB + 4096, 31));
    const trace = `${dir.path}/trace`;
    // A new file is written under a temporary name and renamed into place: no crash can
    // leave it looking like the image, so the writer's ordering flushes are not needed.
    const out = `${dir.path}/new.qcow2`;
    assertEquals(await tracedFlushes(trace, ["--destination-format=qcow2", raw, out]), []);
    await assertClean(out);
    await runOk("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, out]);
    // --flush asks for durability: the data, then the metadata and the header written at
    // the end, each flushed (three at least).
    const durable = `${dir.path}/durable.qcow2`;
    const flushes = await tracedFlushes(trace, [
      "--flush",
      "--destination-format=qcow2",
      raw,
      durable,
    ]);
    assertOk(flushes.length >= 3, `flushes with --flush: ${flushes.join("\n")}`);
    await assertClean(durable);
  },
});
