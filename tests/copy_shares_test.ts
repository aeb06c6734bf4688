/**
 * `nbd copy` shared between threads (copy/shares.ts): each thread opens
 * its own connection, so the server's log counts them; results are
 * compared byte for byte, sparse results by allocated size, and a failure
 * in any thread must end the copy with the usual one-line message.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { assertBytes, assertEquals, assertOk } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import {
  assertCopyFailedFull,
  nbdExecutable,
  peers,
  randomBytes,
  readExport,
  run,
  type RunResult,
  type ServerProcess,
  startServer,
  tempDir,
  watchStderr,
  withTmpfs,
} from "./helpers.ts";

const MiB = 1 << 20;

async function nbdCopy(args: string[]): Promise<RunResult> {
  return await run(await nbdExecutable(), ["copy", ...args]);
}

function nbdkit(...args: string[]): Promise<ServerProcess> {
  return startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args]);
}

/** Connections nbdkit's log filter recorded. */
async function connections(log: string): Promise<number> {
  return (await Deno.readTextFile(log)).split("\n").filter((line) => / Connect /.test(line))
    .length;
}

/** An image of `size` bytes: random data in a few places, holes elsewhere. */
function sparseImage(size: number): { image: Uint8Array; data: number } {
  const image = new Uint8Array(size);
  let data = 0;
  for (const [offset, length] of [[0, 24 * MiB], [70 * MiB, 9 * MiB], [size - MiB, MiB]]) {
    image.set(randomBytes(length!, offset! + 1), offset!);
    data += length!;
  }
  return { image, data };
}

Deno.test({
  name: "shared copy: nbdkit memory → a new file over 4 threads, 4 connections, exact and sparse",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const size = 160 * MiB;
    const { image, data } = sparseImage(size);
    const log = `${dir.path}/nbdkit.log`;
    await using server = await nbdkit("--filter=log", "memory", String(size), `logfile=${log}`);
    {
      await using client = await NbdClient.connect(server.uri);
      for (let offset = 0; offset < size; offset += 8 * MiB) {
        const piece = image.subarray(offset, offset + 8 * MiB);
        if (piece.some((b) => b !== 0)) await client.pwrite(piece, offset);
      }
    }
    const before = await connections(log);
    const out = `${dir.path}/out.img`;
    const result = await nbdCopy(["-C", "4", server.uri, out]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(log) - before, 4, "one connection per thread");
    assertBytes(await Deno.readFile(out), image);
    const used = (await Deno.stat(out)).blocks! * 512;
    assertOk(used <= data + MiB, `${used} bytes allocated for ${data} bytes of data`);
  },
});

Deno.test({
  name: "shared copy: a file → nbdkit memory over 3 threads, exact; zeroes become holes",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const size = 130 * MiB;
    const { image } = sparseImage(size);
    const input = `${dir.path}/in.img`;
    await Deno.writeFile(input, image);
    const log = `${dir.path}/nbdkit.log`;
    await using server = await nbdkit("--filter=log", "memory", String(size), `logfile=${log}`);
    const result = await nbdCopy(["-C", "3", "--flush", input, server.uri]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(log), 3);
    assertBytes(await readExport(server.uri), image);
    const map = await run("nbdinfo", ["--map", "--totals", server.uri]);
    // Data is allocated; the all-zero stretches of the file did not become writes.
    assertOk(/^\s*\d+\s+[\d.]+%\s+0\s+data/m.test(map.stdout), map.stdout);
    assertOk(/^\s*\d+\s+[\d.]+%\s+3\s+hole,zero/m.test(map.stdout), map.stdout);
  },
});

Deno.test({
  name: "shared copy: a server without multi-conn gets a single connection",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const log = `${dir.path}/nbdkit.log`;
    await using server = await nbdkit(
      "--filter=log",
      "--filter=multi-conn",
      "pattern",
      String(200 * MiB),
      `logfile=${log}`,
      "multi-conn-mode=disable",
    );
    const out = `${dir.path}/out.img`;
    const result = await nbdCopy(["-C", "4", server.uri, out]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(log), 1);
    assertEquals((await Deno.stat(out)).size, 200 * MiB);
  },
});

Deno.test({
  name: "shared copy: a read error in any thread stops every thread with one line; no file is left",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const size = 256 * MiB;
    const failAt = 200 * MiB;
    // Reads at or beyond failAt fail with EIO; everything else reads as zeroes.
    const script = `
case "$1" in
  get_size) echo ${size} ;;
  can_multi_conn) exit 0 ;;
  pread)
    if [ "$4" -ge ${failAt} ]; then echo "EIO injected failure" >&2; exit 1; fi
    head -c "$3" /dev/zero ;;
  *) exit 2 ;;
esac`;
    const plugin = `${dir.path}/plugin.sh`;
    await Deno.writeTextFile(plugin, `#!/bin/sh${script}`);
    await Deno.chmod(plugin, 0o755);
    await using server = await nbdkit("sh", plugin);
    const out = `${dir.path}/out.img`;
    const result = await nbdCopy(["-C", "4", "--no-extents", "--sparse=0", server.uri, out]);
    assertEquals(result.code, 1, result.stderr);
    const lines = result.stderr.trim().split("\n");
    assertEquals(lines.length, 1, result.stderr);
    const match =
      /^nbd: copy failed: source (.+): read at offset (\d+) failed: EIO; (.+) was not created$/
        .exec(lines[0]!);
    assertOk(match, lines[0]);
    assertEquals(match[1], server.uri);
    assertOk(Number(match[2]) >= failAt, lines[0]);
    assertEquals(match[3], out);
    assertEquals(
      [...Deno.readDirSync(dir.path)].map((entry) => entry.name),
      ["plugin.sh"],
      "no output, not even a temporary file",
    );
  },
});

Deno.test({
  name: "shared copy: when one side lacks multi-conn, the other still gets its connections",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const size = 100 * MiB;
    const sourceLog = `${dir.path}/source.log`;
    const destinationLog = `${dir.path}/destination.log`;
    await using source = await nbdkit(
      "--filter=log",
      "pattern",
      String(size),
      `logfile=${sourceLog}`,
    );
    await using destination = await nbdkit(
      "--filter=log",
      "--filter=multi-conn",
      "memory",
      String(size),
      `logfile=${destinationLog}`,
      "multi-conn-mode=disable",
    );
    const result = await nbdCopy(["-C", "3", source.uri, destination.uri]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(sourceLog), 3);
    assertEquals(await connections(destinationLog), 1);
    const expected = new Uint8Array(size);
    const view = new DataView(expected.buffer);
    for (let offset = 0; offset < size; offset += 8) view.setBigUint64(offset, BigInt(offset));
    assertBytes(await readExport(destination.uri), expected);
  },
});

Deno.test({
  name: "shared copy over TLS: every thread makes its own TLS connection, both ways exact",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    const size = 100 * MiB;
    const log = `${dir.path}/nbdkit.log`;
    await using server = await nbdkit(
      "--tls=require",
      `--tls-certificates=${dir.path}`,
      "--filter=log",
      "memory",
      String(size),
      `logfile=${log}`,
    );
    const uri = `nbds+unix:///?socket=${server.socket}&tls-certificates=${dir.path}`;
    const input = randomBytes(size, 5);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    let result = await nbdCopy(["-C", "3", `${dir.path}/in.img`, uri]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(log), 3);
    result = await nbdCopy(["-C", "3", uri, `${dir.path}/out.img`]);
    assertEquals(result.code, 0, result.stderr);
    assertEquals(await connections(log), 6);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), input);
  },
});

Deno.test({
  name: "shared copy: a full filesystem (ENOSPC) in any thread stops the copy; no file is left",
  ...peers("mount", "umount"),
  async fn(t) {
    await using dir = await tempDir();
    await withTmpfs(t, dir.path, "40M", async (small) => {
      const input = `${dir.path}/in.img`;
      await Deno.writeFile(input, randomBytes(100 * MiB, 3));
      const out = `${small}/out.img`;
      assertCopyFailedFull(await nbdCopy(["-C", "3", input, out]), out, small);
    });
  },
});

Deno.test({
  name: "shared copy: Ctrl-C while every thread is copying stops them all; no file is left",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const out = `${dir.path}/out.img`;
    // About 10 s of copying at 200 MB/s: long enough to be interrupted mid-way.
    await using server = await nbdkit("--filter=rate", "pattern", "2G", "rate=1600M");
    const child = new Deno.Command(await nbdExecutable(), {
      args: ["copy", "-C", "3", "--progress-json", server.uri, out],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const watch = watchStderr(child);
    // Past 64 MiB the copy has read far beyond what starts the workers.
    const copied = (text: string) =>
      Math.max(0, ...[...text.matchAll(/"bytes":(\d+)/g)].map((m) => Number(m[1])));
    await watch.until((text) => copied(text) >= 64 * MiB);
    const stopped = performance.now();
    child.kill("SIGINT");
    const stderr = await watch.ended;
    const status = await child.status;
    assertEquals(status.code, 130, stderr);
    assertOk(performance.now() - stopped < 5000, "stopped promptly");
    assertOk(stderr.includes(`nbd: copy interrupted by SIGINT; ${out} was not created`), stderr);
    assertEquals([...Deno.readDirSync(dir.path)], [], "not even a temporary file");
  },
});
