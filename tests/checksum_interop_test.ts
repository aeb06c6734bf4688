/**
 * `nbd checksum` and `nbd copy --checksum` end to end, as subprocesses:
 * the sha256 equals sha256sum's for random and sparse images read from a
 * file, stdin, nbdkit (running, and started by socket activation) and an
 * http server; blkhash equals an independent implementation of the
 * published construction in Python (and nbdcopy --blkhash where this
 * libnbd has it); failures are one line with the documented status.
 *
 * @module
 */

import { assertEquals, assertMatch, assertOk } from "./assert.ts";
import { BLKHASH_VECTORS } from "./blkhash_vectors.ts";
import {
  INTEROP_REQUIRED,
  LINUX_PATHS,
  nbdExecutable,
  peers,
  randomBytes,
  run,
  runOk,
  type RunResult,
  startServer,
  tempDir,
} from "./helpers.ts";

const MiB = 1 << 20;

async function nbd(args: string[], stdin?: Uint8Array): Promise<RunResult> {
  return await run(await nbdExecutable(), args, { stdin });
}

async function nbdOk(args: string[], stdin?: Uint8Array): Promise<string> {
  const result = await nbd(args, stdin);
  if (result.code !== 0) throw new Error(`nbd ${args.join(" ")}: ${result.stderr}`);
  return result.stdout;
}

async function sha256sum(path: string): Promise<string> {
  return (await runOk("sha256sum", [path])).stdout.split(" ")[0]!;
}

/** blkhash computed by a separate Python implementation of the published construction. */
async function pythonBlkhash(path: string): Promise<string> {
  const script = `
import hashlib, struct, sys
outer = hashlib.sha256()
total = 0
with open(sys.argv[1], "rb") as f:
    while True:
        block = f.read(65536)
        if not block:
            break
        outer.update(hashlib.sha256(block).digest())
        total += len(block)
outer.update(struct.pack("<Q", total))
print(outer.hexdigest())
`;
  return (await runOk("/usr/bin/python3", ["-c", script, path])).stdout.trim();
}

/** A sparse image: data islands (one not block-aligned) in holes, with an odd size. */
async function sparseImage(path: string): Promise<void> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(24 * MiB + 4321);
  for (const [offset, length, seed] of [[3 * MiB, MiB, 1], [20 * MiB + 517, 70000, 2]]) {
    await file.seek(offset!, Deno.SeekMode.Start);
    await file.write(randomBytes(length!, seed));
  }
  await file.seek(24 * MiB + 4000, Deno.SeekMode.Start);
  await file.write(randomBytes(321, 3));
  file.close();
}

/** An http server in this process serving `data` with Range support. */
function httpServer(data: Uint8Array) {
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    if (req.method === "HEAD") {
      return new Response(null, { headers: { "Content-Length": String(data.length) } });
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
    if (!range) return new Response(data.slice());
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), data.length - 1);
    return new Response(data.slice(start, end + 1), {
      status: 206,
      headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
    });
  });
  return { url: `http://127.0.0.1:${server.addr.port}/disk.img`, close: () => server.shutdown() };
}

Deno.test({
  name: "checksum sha256 equals sha256sum: file, stdin, nbdkit, [ CMD ], http",
  ...peers("sha256sum", "nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const random = `${dir.path}/random.img`;
    await Deno.writeFile(random, randomBytes(5 * MiB + 333, 7));
    const sparse = `${dir.path}/sparse.img`;
    await sparseImage(sparse);
    for (const path of [random, sparse]) {
      const expected = await sha256sum(path);
      assertEquals(await nbdOk(["checksum", path]), `${expected}  ${path}\n`);
      assertEquals(await nbdOk(["checksum", "-"], await Deno.readFile(path)), `${expected}  -\n`);
      assertEquals(
        await nbdOk(["checksum", "--no-extents", "-a", "sha256", path]),
        `${expected}  ${path}\n`,
      );
      await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "-r", "file", path]);
      assertEquals(await nbdOk(["checksum", server.uri]), `${expected}  ${server.uri}\n`);
      // [ CMD ] needs the Linux fast paths (socket activation).
      if (LINUX_PATHS) {
        const activated = await nbdOk(["checksum", "[", "nbdkit", "-r", "file", path, "]"]);
        assertEquals(activated.split("  ")[0], expected);
      }
      const http = httpServer(await Deno.readFile(path));
      try {
        assertEquals(await nbdOk(["checksum", http.url]), `${expected}  ${http.url}\n`);
      } finally {
        await http.close();
      }
    }
  },
});

Deno.test({
  name: "checksum blkhash equals the published construction (Python) on random and sparse images",
  ...peers("/usr/bin/python3", "nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const random = `${dir.path}/random.img`;
    await Deno.writeFile(random, randomBytes(3 * MiB + 1000, 8));
    const sparse = `${dir.path}/sparse.img`;
    await sparseImage(sparse);
    for (const path of [random, sparse]) {
      const expected = await pythonBlkhash(path);
      assertEquals(await nbdOk(["checksum", "-a", "blkhash", path]), `${expected}  ${path}\n`);
      await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "-r", "file", path]);
      const fromNbd = await nbdOk(["checksum", "--algorithm=blkhash", server.uri]);
      assertEquals(fromNbd.split("  ")[0], expected);
    }
  },
});

Deno.test({
  name: "checksum blkhash on several threads equals Python's: file, stdin and NBD",
  ...peers("/usr/bin/python3", "nbdkit"),
  async fn() {
    // Large enough for threads to share (two parts of 32 MiB or more), with data
    // islands cut across blocks, holes and an odd size.
    await using dir = await tempDir();
    const path = `${dir.path}/large.img`;
    const file = await Deno.open(path, { write: true, create: true, truncate: true });
    await file.truncate(100 * MiB + 777);
    for (let i = 0; i < 12; i++) {
      await file.seek(i * 8 * MiB + i * 4099, Deno.SeekMode.Start);
      await file.write(randomBytes(MiB / 2 + i * 1000, 20 + i));
    }
    await file.seek(100 * MiB, Deno.SeekMode.Start);
    await file.write(randomBytes(777, 40));
    file.close();
    const expected = await pythonBlkhash(path);
    for (const threads of ["1", "2", "3"]) {
      for (const extents of [[], ["--no-extents"]]) {
        const out = await nbdOk(["checksum", "-a", "blkhash", "-T", threads, ...extents, path]);
        assertEquals(out, `${expected}  ${path}\n`, `-T ${threads} ${extents.join(" ")}`);
      }
    }
    // stdin cannot be shared: one thread reads, two workers hash.
    assertEquals(
      await nbdOk(["checksum", "-a", "blkhash", "-T", "3", "-"], await Deno.readFile(path)),
      `${expected}  -\n`,
      "stdin, -T 3",
    );
    // Over NBD each thread opens its own connection: nbdkit's log filter counts them.
    // (Threads start once the first has read 16 MiB, so the holes are read too.)
    const log = `${dir.path}/connections.log`;
    {
      await using server = await startServer("nbdkit", [
        "-f",
        "-U",
        "$SOCKET",
        "-r",
        "--filter=log",
        "file",
        path,
        `logfile=${log}`,
      ]);
      const out = await nbdOk([
        "checksum",
        "-a",
        "blkhash",
        "-T",
        "3",
        "--no-extents",
        server.uri,
      ]);
      assertEquals(out.split("  ")[0], expected);
    }
    const connections = (await Deno.readTextFile(log)).match(/ Connect /g)?.length ?? 0;
    assertEquals(connections, 3, "connections with -T 3");
  },
});

/** A file from a vector's runs: "-" runs are left as holes, the rest written. */
async function vectorImage(path: string, runs: Array<[string, number]>): Promise<void> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  let at = 0;
  for (const [byte, length] of runs) {
    if (byte !== "-") {
      await file.seek(at, Deno.SeekMode.Start);
      await file.write(new Uint8Array(length).fill(byte === "\0" ? 0 : byte.charCodeAt(0)));
    }
    at += length;
  }
  await file.truncate(at);
  file.close();
}

Deno.test({
  name: "checksum blkhash of the published vectors: files with holes, 1 and 3 workers, over NBD",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    for (const [name, runs, digest] of BLKHASH_VECTORS) {
      const path = `${dir.path}/${name}.img`;
      await vectorImage(path, runs);
      for (const threads of ["1", "3"]) {
        const out = await nbdOk(["checksum", "-a", "blkhash", "-T", threads, path]);
        assertEquals(out, `${digest}  ${path}\n`, `${name} -T ${threads}`);
      }
    }
    // Over NBD, holes come from block status and are never read: nbdkit's stats filter
    // counts what was read of the 1 GiB hole and of the mixed vector.
    for (const name of ["sparse_large", "mix_unaligned"]) {
      const [, runs, digest] = BLKHASH_VECTORS.find(([n]) => n === name)!;
      const path = `${dir.path}/${name}.img`;
      const stats = `${dir.path}/${name}.stats`;
      {
        await using server = await startServer("nbdkit", [
          "-f",
          "-U",
          "$SOCKET",
          "-r",
          "--filter=stats",
          "file",
          path,
          `statsfile=${stats}`,
        ]);
        const out = await nbdOk(["checksum", "-a", "blkhash", server.uri]);
        assertEquals(out.split("  ")[0], digest, name);
      }
      const report = await Deno.readTextFile(stats);
      const read = /^read: \d+ ops, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB|GiB)/m.exec(report);
      const scale: Record<string, number> = { bytes: 1, KiB: 1024, MiB: 1 << 20, GiB: 1 << 30 };
      const bytesRead = read ? Number(read[1]) * scale[read[2]!]! : 0;
      const data = runs.filter(([byte]) => byte !== "-").reduce((n, [, length]) => n + length, 0);
      assertOk(bytesRead <= data, `${name}: read ${bytesRead} bytes, data is ${data}\n${report}`);
    }
  },
});

Deno.test({
  name: "checksum blkhash equals nbdcopy --blkhash",
  ...peers("nbdcopy", "nbdkit"),
  async fn() {
    const help = await run("nbdcopy", ["--help"]);
    if (!/--blkhash/.test(help.stdout + help.stderr)) {
      const message = "nbdcopy here has no --blkhash (libnbd < 1.22): comparison skipped";
      if (INTEROP_REQUIRED && Deno.env.get("NBD_REQUIRE_BLKHASH")) throw new Error(message);
      console.error(`\n*** SKIPPING: ${message} ***\n`);
      return;
    }
    await using dir = await tempDir();
    const sparse = `${dir.path}/sparse.img`;
    await sparseImage(sparse);
    const theirs = await runOk("nbdcopy", ["--blkhash", sparse, "null:"]);
    const ours = await nbdOk(["checksum", "-a", "blkhash", sparse]);
    assertMatch(theirs.stdout, new RegExp(ours.split("  ")[0]!));
  },
});

Deno.test({
  name: "checksum --verify, --checksum-file, and one-line errors",
  ...peers("sha256sum"),
  async fn() {
    await using dir = await tempDir();
    const path = `${dir.path}/disk.img`;
    await Deno.writeFile(path, randomBytes(MiB, 9));
    const digest = await sha256sum(path);
    assertEquals(
      await nbdOk(["checksum", `--verify=${digest.toUpperCase()}`, path]),
      `${digest}  ${path}\n`,
    );
    const other = "0".repeat(64);
    const mismatch = await nbd(["checksum", "--verify", other, path]);
    assertEquals(mismatch.code, 1);
    assertEquals(
      mismatch.stderr,
      `nbd: checksum mismatch: ${path} has ${digest}, expected ${other}\n`,
    );
    const file = `${dir.path}/sum.txt`;
    assertEquals(await nbdOk(["checksum", "--checksum-file", file, path]), "");
    assertEquals(await Deno.readTextFile(file), `${digest}  ${path}\n`);
    // The file is what sha256sum -c reads.
    await runOk("sha256sum", ["-c", file]);
    const unknown = await nbd(["checksum", "-a", "md5", path]);
    assertEquals([unknown.code, unknown.stderr], [
      2,
      'nbd: --algorithm: unknown algorithm "md5" (known: sha256, blkhash)\n',
    ]);
    const missing = await nbd(["checksum", `${dir.path}/nothing.img`]);
    assertEquals(missing.code, 1);
    assertEquals(missing.stderr.split("\n").length, 2, missing.stderr);
    assertMatch(missing.stderr, /^nbd: .*nothing\.img.*no such file/);
    const noSource = await nbd(["checksum"]);
    assertEquals(noSource.code, 2);
  },
});

Deno.test({
  name: "copy --checksum prints the checksum of what it copied",
  ...peers("sha256sum", "nbdkit", "/usr/bin/python3"),
  async fn() {
    await using dir = await tempDir();
    const sparse = `${dir.path}/sparse.img`;
    await sparseImage(sparse);
    const digest = await sha256sum(sparse);
    const out = `${dir.path}/out.img`;
    assertEquals(await nbdOk(["copy", "--checksum", sparse, out]), `${digest}  ${sparse}\n`);
    assertEquals(await sha256sum(out), digest);
    // From NBD (64 reads in flight, out of order) into a file and into null:.
    await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "-r", "file", sparse]);
    await Deno.remove(out);
    assertEquals(
      await nbdOk(["copy", "--checksum", server.uri, out]),
      `${digest}  ${server.uri}\n`,
    );
    assertEquals(await sha256sum(out), digest);
    const blk = await pythonBlkhash(sparse);
    assertEquals(
      await nbdOk(["copy", "--checksum=blkhash", server.uri, "null:"]),
      `${blk}  ${server.uri}\n`,
    );
    // Into stdout the line goes to the checksum file.
    const file = `${dir.path}/sum.txt`;
    const piped = await run(await nbdExecutable(), [
      "copy",
      `--checksum-file=${file}`,
      sparse,
      "-",
    ]);
    assertEquals(piped.code, 0);
    assertEquals(await Deno.readTextFile(file), `${digest}  ${sparse}\n`);
    const bad = await nbd(["copy", "--checksum=crc", sparse, "null:"]);
    assertEquals([bad.code, bad.stderr], [
      2,
      'nbd: --checksum: unknown algorithm "crc" (known: sha256, blkhash)\n',
    ]);
  },
});
