/**
 * `nbd copy` end to end, run as a subprocess the way users run it, between
 * every pair of endpoint kinds that makes sense: nbdkit, qemu-nbd, our own
 * server, files, pipes, an http(s) server in this process, and servers
 * started by socket activation. Every result is compared byte for byte
 * (with the source, or with what nbdcopy or qemu-img make of the same
 * source); sparse results are checked for allocated size too. Failures
 * are checked for their exact message and exit status.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { FileSource } from "../copy/file_source.ts";
import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import { serveImage } from "./http_server.ts";
import { platform } from "../io/platform.ts";
import {
  assertCopyFailedFull,
  freePort,
  LINUX_PATHS,
  linuxPaths,
  nbdExecutable,
  peers,
  randomBytes,
  readExport,
  run,
  runOk,
  type RunResult,
  type ServerProcess,
  startNbdServe,
  startServer,
  tempDir,
  watchStderr,
  withLoopDevice,
  withTmpfs,
} from "./helpers.ts";

const MiB = 1 << 20;

async function nbdCopy(
  args: string[],
  options: { stdin?: Uint8Array; env?: Record<string, string> } = {},
): Promise<RunResult> {
  return await run(await nbdExecutable(), ["copy", ...args], options);
}

async function nbdCopyOk(args: string[]): Promise<RunResult> {
  const result = await nbdCopy(args);
  if (result.code !== 0) {
    throw new Error(`nbd copy ${args.join(" ")} exited ${result.code}\n${result.stderr}`);
  }
  return result;
}

/** Starts nbdkit with `args` on a fresh Unix socket. */
function nbdkit(...args: string[]): Promise<ServerProcess> {
  return startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args]);
}

/** Writes `chunks` (offset → bytes) into an export. */
async function fill(uri: string, chunks: Array<[number, Uint8Array]>): Promise<void> {
  await using client = await NbdClient.connect(uri);
  await Promise.all(chunks.map(([offset, bytes]) => client.pwrite(bytes, offset)));
  await client.flush().catch(() => {});
}

/** Bytes a file really occupies on disk. */
async function allocated(path: string): Promise<number> {
  return (await Deno.stat(path)).blocks! * 512;
}

/** Contents of nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian. */
function pattern(size: number): Uint8Array {
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  for (let offset = 0; offset + 8 <= size; offset += 8) view.setBigUint64(offset, BigInt(offset));
  return out;
}

/** Names in a directory. */
async function names(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(dir)) out.push(entry.name);
  return out.sort();
}

Deno.test({
  name: "nbdkit_memory_to_file: byte-exact, multi-conn, new file appears only when complete",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("memory", "24M");
    const a = randomBytes(5 * MiB + 4096, 11);
    const b = randomBytes(MiB, 12);
    await fill(server.uri, [[0, a], [20 * MiB, b]]);
    const out = `${dir.path}/out.img`;
    await nbdCopyOk(["-C", "4", server.uri, out]);
    const expected = new Uint8Array(24 * MiB);
    expected.set(a, 0);
    expected.set(b, 20 * MiB);
    assertBytes(await Deno.readFile(out), expected);
    assertEquals(await names(dir.path), ["out.img"]);
    assertOk(await allocated(out) <= 7 * MiB, `holes stay holes: ${await allocated(out)}`);
  },
});

Deno.test({
  name: "nbdkit_sparse_random_to_file: same bytes as nbdcopy, allocation close to the data",
  ...peers("nbdkit", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("sparse-random", "64M", "seed=4242");
    const ours = `${dir.path}/ours.img`;
    const theirs = `${dir.path}/theirs.img`;
    await nbdCopyOk([server.uri, ours]);
    await runOk("nbdcopy", [server.uri, theirs]);
    assertBytes(await Deno.readFile(ours), await Deno.readFile(theirs));
    let data = 0;
    {
      await using client = await NbdClient.connect(server.uri);
      for await (const e of client.iterateExtents(0, client.size())) {
        if (!(e.flags & 1)) data += e.length;
      }
    }
    assertOk(data > 0 && data < 32 * MiB, `sparse-random has data and holes (${data})`);
    const used = await allocated(ours);
    assertOk(used <= data + MiB, `allocated ${used} for ${data} bytes of data`);
  },
});

Deno.test({
  name: "nbdkit_pattern_to_file: every word holds its offset, through a server started by [ CMD ]",
  ...linuxPaths("[ CMD ]", peers("nbdkit")),
  async fn() {
    await using dir = await tempDir();
    const out = `${dir.path}/out.img`;
    const size = 6 * MiB + 512;
    await nbdCopyOk(["--", "[", "nbdkit", "pattern", String(size), "]", out]);
    assertBytes(await Deno.readFile(out), pattern(size));
  },
});

Deno.test({
  name: "file_to_nbdkit_memory: byte-exact, with --flush, zero runs written as zeroes",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("memory", "16M");
    // Junk first, so that zero runs left unwritten would show.
    await fill(server.uri, [[0, new Uint8Array(16 * MiB).fill(0x5a)]]);
    const input = randomBytes(16 * MiB, 21);
    input.fill(0, 3 * MiB, 7 * MiB);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    await nbdCopyOk(["--flush", `${dir.path}/in.img`, server.uri]);
    assertBytes(await readExport(server.uri), input);
  },
});

Deno.test({
  name: "file_to_qemu_nbd: [ qemu-nbd -f raw ] as destination writes through to the file",
  ...linuxPaths("[ CMD ]", peers("qemu-nbd")),
  async fn() {
    await using dir = await tempDir();
    const input = randomBytes(4 * MiB, 22);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    await Deno.writeFile(`${dir.path}/dst.raw`, new Uint8Array(4 * MiB).fill(1));
    await nbdCopyOk([
      `${dir.path}/in.img`,
      "[",
      "qemu-nbd",
      "-f",
      "raw",
      `${dir.path}/dst.raw`,
      "]",
    ]);
    assertBytes(await Deno.readFile(`${dir.path}/dst.raw`), input);
  },
});

Deno.test({
  name: "qemu_nbd_qcow2_to_file: a qcow2 with holes, same bytes as qemu-img convert, still sparse",
  ...linuxPaths("[ CMD ]", peers("qemu-nbd", "qemu-img", "qemu-io")),
  async fn() {
    await using dir = await tempDir();
    const qcow2 = `${dir.path}/disk.qcow2`;
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, "64M"]);
    await runOk("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -q -P 0x55 1M 2M",
      "-c",
      "write -q -P 0xaa 40M 64k",
      "-c",
      "write -q -z 50M 1M",
      qcow2,
    ]);
    await runOk("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, `${dir.path}/ref.raw`]);
    const out = `${dir.path}/out.raw`;
    await nbdCopyOk(["[", "qemu-nbd", "-r", "-f", "qcow2", qcow2, "]", out]);
    assertBytes(await Deno.readFile(out), await Deno.readFile(`${dir.path}/ref.raw`));
    const used = await allocated(out);
    assertOk(used <= 3 * MiB, `allocated ${used} bytes for 2 MiB + 64 KiB of data`);
  },
});

Deno.test("nbd_serve_to_nbd_serve: our server to our server, zeroes and data", async () => {
  await using source = await startNbdServe(["memory", "12M"]);
  await using destination = await startNbdServe(["memory", "12M"]);
  const data = randomBytes(3 * MiB, 31);
  await fill(source.uri, [[MiB, data], [10 * MiB, data.subarray(0, MiB)]]);
  await fill(destination.uri, [[0, new Uint8Array(12 * MiB).fill(0xee)]]);
  await nbdCopyOk(["-R", "8", "--request-size", "1M", source.uri, destination.uri]);
  assertBytes(await readExport(destination.uri), await readExport(source.uri));
});

Deno.test({
  name: "command_to_file: [ nbd serve pattern ] started by socket activation",
  ...linuxPaths("[ CMD ]"),
}, async () => {
  await using dir = await tempDir();
  const nbd = await nbdExecutable();
  await nbdCopyOk(["[", nbd, "serve", "pattern", "3M", "]", `${dir.path}/out.img`]);
  assertBytes(await Deno.readFile(`${dir.path}/out.img`), pattern(3 * MiB));
});

Deno.test({
  name: "command_to_file: [ nbd serve ... ] runs this program when no nbd is on PATH",
  ...linuxPaths("[ CMD ]"),
}, async () => {
  await using dir = await tempDir();
  const out = `${dir.path}/out.img`;
  // Run from the checkout, as the README's first steps do, with a PATH that has no nbd.
  const result = await run(
    Deno.execPath(),
    [
      "run",
      "-A",
      new URL("../main.ts", import.meta.url).pathname,
      "copy",
      "[",
      "nbd",
      "serve",
      "pattern",
      "2M",
      "]",
      out,
    ],
    { env: { PATH: "/usr/bin:/bin", DENO_NO_UPDATE_CHECK: "1" } },
  );
  assertEquals(result.code, 0, result.stderr);
  assertBytes(await Deno.readFile(out), pattern(2 * MiB));
});

Deno.test("stdin_to_file and nbd_to_stdout: pipes in both directions", async () => {
  await using dir = await tempDir();
  const input = randomBytes(3 * MiB + 777, 41);
  input.fill(0, 0, MiB); // a zero run at the start of a stream: detected, file stays sparse
  const out = `${dir.path}/out.img`;
  const result = await nbdCopy(["-", out], { stdin: input });
  assertEquals(result.code, 0, result.stderr);
  assertBytes(await Deno.readFile(out), input);
  assertOk(await allocated(out) <= 2 * MiB + 64 * 1024, "the zero run became a hole");

  await using server = await startNbdServe(["memory", "4M"]);
  await fill(server.uri, [[512 * 1024, input.subarray(0, 2 * MiB)]]);
  const child = new Deno.Command(await nbdExecutable(), {
    args: ["copy", server.uri, "-"],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = await child.output();
  assertEquals(output.code, 0, new TextDecoder().decode(output.stderr));
  assertBytes(output.stdout, await readExport(server.uri));
});

Deno.test({
  name: "pipes: stdin, stdout and FIFOs are enlarged to 1 MiB, so their other end can run ahead",
  ...linuxPaths("pipe enlargement", peers("strace", "mkfifo")),
  async fn() {
    await using dir = await tempDir();
    const input = `${dir.path}/in.img`;
    await Deno.writeFile(input, randomBytes(4 * MiB, 43));
    const nbd = await nbdExecutable();
    const log = `${dir.path}/fcntl.log`;
    const traced = `strace -f -e trace=fcntl -o "${log}" "${nbd}" copy`;
    // In through a pipe, out through a pipe, and compared on the way out.
    await runOk("sh", [
      "-c",
      `cat "$0" | ${traced} - "$0.out" && ${traced} "$0.out" - | cmp - "$0"`,
      input,
    ]);
    // The log holds the last command's calls: the copy out to the pipe.
    const enlarged = (fd: number) =>
      new RegExp(`fcntl\\(${fd}, F_SETPIPE_SZ, 1048576\\)\\s*= 1048576`);
    assertOk(enlarged(1).test(await Deno.readTextFile(log)), "stdout enlarged");
    await runOk("sh", ["-c", `cat "$0" | ${traced} - "$0.again"`, input]);
    assertOk(enlarged(0).test(await Deno.readTextFile(log)), "stdin enlarged");
    assertBytes(await Deno.readFile(`${input}.again`), await Deno.readFile(input));
    // A FIFO given by name, read and written, through a descriptor opened for it.
    const fifo = `${dir.path}/fifo`;
    await runOk("mkfifo", [fifo]);
    const someFd = /fcntl\(\d+, F_SETPIPE_SZ, 1048576\)\s*= 1048576/;
    await runOk("sh", ["-c", `cat "$0" > "$1" & ${traced} "$1" "$0.fifo"; wait`, input, fifo]);
    assertOk(someFd.test(await Deno.readTextFile(log)), "FIFO source enlarged");
    assertBytes(await Deno.readFile(`${input}.fifo`), await Deno.readFile(input));
    await runOk("sh", ["-c", `cmp "$0" "$1" & ${traced} "$0" "$1"; wait $!`, input, fifo]);
    assertOk(someFd.test(await Deno.readTextFile(log)), "FIFO destination enlarged");
  },
});

Deno.test("stdin_to_nbd: a stream longer than the destination is an error", async () => {
  await using server = await startNbdServe(["memory", "1M"]);
  const result = await nbdCopy(["-R", "1", "-", server.uri], { stdin: randomBytes(MiB + 1, 5) });
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: copy failed: destination ${server.uri}: write at offset ${MiB} failed: ` +
      `the source is larger than the destination (${MiB} bytes); ` +
      `${server.uri} is incomplete`,
  );
});

/** An http(s) server in this process serving `data` with Range support. */
function httpServer(data: Uint8Array, tls?: { cert: string; key: string }) {
  let ranged = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {}, ...tls }, (req) => {
    if (req.method === "HEAD") {
      return new Response(null, { headers: { "Content-Length": String(data.length) } });
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
    if (!range) return new Response(data.slice());
    ranged++;
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), data.length - 1);
    return new Response(data.slice(start, end + 1), {
      status: 206,
      headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
    });
  });
  return {
    port: server.addr.port,
    ranged: () => ranged,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

Deno.test("http_to_file: Range requests, byte-exact", async () => {
  await using dir = await tempDir();
  const data = randomBytes(9 * MiB + 100, 51);
  await using server = httpServer(data);
  const out = `${dir.path}/out.img`;
  await nbdCopyOk([`http://127.0.0.1:${server.port}/disk.img`, out]);
  assertBytes(await Deno.readFile(out), data);
  // The one-byte probe, then requests of 4 MiB.
  assertEquals(server.ranged(), 4);
});

Deno.test("http_to_file through a redirect: resolved once, then every range to its target", async () => {
  await using dir = await tempDir();
  const data = randomBytes(9 * MiB + 100, 52);
  await using server = serveImage(data);
  const out = `${dir.path}/out.img`;
  await nbdCopyOk([server.redirectUrl, out]);
  assertBytes(await Deno.readFile(out), data);
  assertEquals(server.counts.get("/redirect/disk.img"), 1);
  assertEquals(server.counts.get("GET /signed/1/disk.img"), 4);
});

/** python3's static file server (which ignores Range requests) serving `dir` on a free port. */
async function pythonHttpServer(dir: string): Promise<{ port: number } & AsyncDisposable> {
  const child = new Deno.Command("python3", {
    args: ["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", dir],
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  let port: number | undefined;
  while (port === undefined) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`python3 http.server did not start: ${seen}`);
    seen += value;
    const match = /port (\d+)/.exec(seen);
    if (match) port = Number(match[1]);
  }
  lines.releaseLock();
  void child.stdout.cancel().catch(() => {});
  return {
    port,
    async [Symbol.asyncDispose]() {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

Deno.test({
  name: "http_to_file without Range: a static server that ignores it is read in order, sparse",
  ...peers("python3"),
  async fn() {
    await using dir = await tempDir();
    await Deno.mkdir(`${dir.path}/www`);
    const data = new Uint8Array(5 * MiB + 100);
    data.set(randomBytes(2 * MiB, 53), 0);
    data.set(randomBytes(MiB + 100, 54), 4 * MiB);
    await Deno.writeFile(`${dir.path}/www/disk.img`, data);
    await using server = await pythonHttpServer(`${dir.path}/www`);
    const url = `http://127.0.0.1:${server.port}/disk.img`;
    const out = `${dir.path}/out.img`;
    await nbdCopyOk([url, out]);
    assertBytes(await Deno.readFile(out), data);
    // The 2 MiB of zeroes in the middle stay a hole of the new file.
    const allocated = ((await Deno.stat(out)).blocks ?? 0) * 512;
    assertOk(allocated <= data.length - MiB, `${allocated} bytes allocated`);
    const piped = await new Deno.Command(await nbdExecutable(), {
      args: ["copy", url, "-"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assertEquals(piped.code, 0, new TextDecoder().decode(piped.stderr));
    assertBytes(piped.stdout, data);
  },
});

Deno.test("http_to_file without Range: a body shorter than announced fails the copy", async () => {
  await using dir = await tempDir();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const announced = 3 * MiB;
  const serving = (async () => {
    for await (const conn of listener) {
      (async () => {
        const request = new Uint8Array(4096);
        const n = (await conn.read(request)) ?? 0;
        const head = new TextDecoder().decode(request.subarray(0, n));
        const header =
          `HTTP/1.1 200 OK\r\nContent-Length: ${announced}\r\nConnection: close\r\n\r\n`;
        await conn.write(new TextEncoder().encode(header));
        // Every GET, ranged or not, gets the start of the whole image, then the connection closes.
        if (head.startsWith("GET")) {
          const part = randomBytes(MiB, 55);
          for (let done = 0; done < part.length;) done += await conn.write(part.subarray(done));
        }
        conn.close();
      })().catch(() => {});
    }
  })();
  try {
    const out = `${dir.path}/out.img`;
    const url = `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}/disk.img`;
    const result = await nbdCopy([url, out]);
    assertEquals(result.code, 1, result.stderr);
    assertIncludes(result.stderr, url);
    assertIncludes(result.stderr, "out.img was not created");
    assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
    assertEquals(await Deno.stat(out).then(() => true, () => false), false);
  } finally {
    listener.close();
    await serving.catch(() => {});
  }
});

Deno.test({
  name: "https_to_stdout: a private CA trusted through DENO_CERT",
  ...peers("openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    const data = randomBytes(MiB + 3, 52);
    await using server = httpServer(data, {
      cert: await Deno.readTextFile(`${dir.path}/server-cert.pem`),
      key: await Deno.readTextFile(`${dir.path}/server-key.pem`),
    });
    const url = `https://localhost:${server.port}/disk.img`;
    const child = new Deno.Command(await nbdExecutable(), {
      args: ["copy", url, "-"],
      env: { DENO_CERT: `${dir.path}/ca-cert.pem` },
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const output = await child.output();
    assertEquals(output.code, 0, new TextDecoder().decode(output.stderr));
    assertBytes(output.stdout, data);
  },
});

Deno.test({
  name: "nbdkit_memory_to_file: a mostly-empty 4 GiB export allocates only its data",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("memory", "4G");
    const pieces: Array<[number, Uint8Array]> = [
      [0, randomBytes(MiB, 61)],
      [2 ** 31 + 12345 * 4096, randomBytes(MiB, 62)],
      [2 ** 32 - MiB, randomBytes(MiB, 63)],
    ];
    await fill(server.uri, pieces);
    const out = `${dir.path}/out.img`;
    await nbdCopyOk([server.uri, out]);
    assertEquals((await Deno.stat(out)).size, 2 ** 32);
    const used = await allocated(out);
    assertOk(used <= 3 * MiB + 256 * 1024, `allocated ${used} bytes for 3 MiB of data`);
    // Byte for byte without reading 4 GiB: the data pieces are equal, and the
    // file has no allocated range outside them (holes read as zeroes).
    const file = await Deno.open(out);
    for (const [offset, bytes] of pieces) {
      const got = new Uint8Array(bytes.length);
      await file.seek(offset, Deno.SeekMode.Start);
      let done = 0;
      while (done < got.length) done += (await file.read(got.subarray(done)))!;
      assertBytes(got, bytes, `piece at ${offset}`);
    }
    file.close();
    const source = await FileSource.open(out);
    const extents = await source.extents(0, 2 ** 32);
    await source.close();
    for (const e of extents.filter((x) => !x.zero)) {
      const inside = pieces.some(([o, b]) =>
        e.offset >= o - 4096 && e.offset + e.length <= o + b.length + 4096
      );
      assertOk(inside, `unexpected data at ${e.offset} (+${e.length})`);
    }
  },
});

Deno.test({
  name: "nbdkit_memory_to_file: --allocated leaves no holes",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("memory", "8M");
    await fill(server.uri, [[MiB, randomBytes(MiB, 71)]]);
    const out = `${dir.path}/out.img`;
    await nbdCopyOk(["--allocated", server.uri, out]);
    assertBytes(await Deno.readFile(out), await readExport(server.uri));
    assertOk(await allocated(out) >= 8 * MiB, `allocated ${await allocated(out)}`);
  },
});

Deno.test({
  name: "nbdkit_pattern_to_null: progress to a descriptor and as JSON",
  ...linuxPaths("[ CMD ]", peers("nbdkit")),
  async fn() {
    await using dir = await tempDir();
    const nbd = await nbdExecutable();
    const result = await runOk("sh", [
      "-c",
      `"$0" copy --progress=3 --progress-json=4 -R 1 [ nbdkit pattern 8M ] null: ` +
      `3>"$1/percent" 4>"$1/json"`,
      nbd,
      dir.path,
    ]);
    assertEquals(result.stderr, "");
    const percent = (await Deno.readTextFile(`${dir.path}/percent`)).trim().split("\n");
    assertEquals(percent[0], "0/100");
    assertEquals(percent[percent.length - 1], "100/100");
    const values = percent.map((line) => Number(line.split("/")[0]));
    for (let i = 1; i < values.length; i++) assertOk(values[i]! > values[i - 1]!);
    const records = (await Deno.readTextFile(`${dir.path}/json`)).trim().split("\n").map((l) =>
      JSON.parse(l)
    );
    const last = records[records.length - 1];
    assertEquals([last.bytes, last.total, last.percent, last.state], [
      8 * MiB,
      8 * MiB,
      100,
      "done",
    ]);
    assertOk(typeof last.rate === "number" && typeof last.elapsed === "number");
  },
});

Deno.test({
  name: "nbdkit_error_to_file: a read error names the source, offset and errno; no file is left",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("--filter=error", "memory", "4M", "error-pread-rate=100%");
    const out = `${dir.path}/out.img`;
    // Without --no-extents the empty export would be all hole: nothing to read, nothing to fail.
    const result = await nbdCopy(["--no-extents", "-R", "1", server.uri, out]);
    assertEquals(result.code, 1);
    assertEquals(
      result.stderr.trim().split("\n").pop(),
      `nbd: copy failed: source ${server.uri}: read at offset 0 failed: EIO; ${out} was not created`,
    );
    assertEquals(await names(dir.path), []);
  },
});

Deno.test("nbd_serve_error_to_file: the server's error message is shown; an existing file says so", async () => {
  await using dir = await tempDir();
  await using server = await startNbdServe([
    "--filter=error",
    "pattern",
    "4M",
    "error-pread-rate=100%",
    "error=ENOSPC",
  ]);
  const out = `${dir.path}/out.img`;
  await Deno.writeFile(out, new Uint8Array(100));
  const result = await nbdCopy(["-R", "1", server.uri, out]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: copy failed: source ${server.uri}: read at offset 0 failed: ` +
      `ENOSPC (injected ENOSPC error into pread); ${out} is incomplete (it was partly overwritten)`,
  );
});

Deno.test({
  name: "file_to_nbdkit_error: a write error names the destination",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using server = await nbdkit("--filter=error", "memory", "1M", "error-pwrite-rate=100%");
    await Deno.writeFile(`${dir.path}/in.img`, randomBytes(MiB, 81));
    const result = await nbdCopy(["-R", "1", `${dir.path}/in.img`, server.uri]);
    assertEquals(result.code, 1);
    assertEquals(
      result.stderr.trim().split("\n").pop(),
      `nbd: copy failed: destination ${server.uri}: write at offset 0 failed: EIO; ${server.uri} is incomplete`,
    );
  },
});

Deno.test("nbd_to_nbd: a destination smaller than the source is refused before writing", async () => {
  await using source = await startNbdServe(["pattern", "2M"]);
  await using destination = await startNbdServe(["memory", "1M"]);
  await fill(destination.uri, [[0, new Uint8Array(MiB).fill(0xab)]]);
  const result = await nbdCopy([source.uri, destination.uri]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: the destination ${destination.uri} (${MiB} bytes) is smaller than the source ` +
      `${source.uri} (${2 * MiB} bytes)`,
  );
  assertBytes(await readExport(destination.uri), new Uint8Array(MiB).fill(0xab));
});

/** How a refusal on the portable paths names where it runs. */
const PORTABLE_WHERE = Deno.build.os === "linux"
  ? `this Linux runs the portable paths: ${platform().why}`
  : `this is ${platform().name}`;

Deno.test("unreachable servers: one line saying which side and why", async () => {
  await using dir = await tempDir();
  const missing = `nbd+unix:///?socket=${dir.path}/nothing.sock`;
  let result = await nbdCopy([missing, `${dir.path}/out.img`]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: source: Cannot connect to NBD server at Unix socket ${dir.path}/nothing.sock: no such socket`,
  );
  // A TCP port nobody listens on (bound and closed again).
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  await Deno.writeFile(`${dir.path}/in.img`, new Uint8Array(4096));
  result = await nbdCopy([`${dir.path}/in.img`, `nbd://127.0.0.1:${port}/`]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: destination: Cannot connect to NBD server at 127.0.0.1:${port}: connection refused`,
  );
  result = await nbdCopy(["--", "[", "false", "]", "null:"]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    LINUX_PATHS
      ? "nbd: source: the server command [ false ] exited with status 1 before serving the copy"
      : `nbd: source: [ CMD ] (a server started by socket activation) needs Linux (${PORTABLE_WHERE}); start the server yourself and give its URI instead`,
  );
  assertEquals(await names(dir.path), ["in.img"]);
});

Deno.test({
  name: "nbdkit_delay_to_file: Ctrl-C stops the copy, removes the new file and the server",
  ...linuxPaths("[ CMD ]", peers("nbdkit")),
  async fn() {
    await using dir = await tempDir();
    const out = `${dir.path}/out.img`;
    // A size no other test uses, to find this server's process afterwards.
    const size = String(64 * MiB + 4096 * (1 + Math.floor(Math.random() * 1000)));
    const child = new Deno.Command(await nbdExecutable(), {
      args: [
        "copy",
        "--progress-json",
        "[",
        "nbdkit",
        "--filter=delay",
        "pattern",
        size,
        "rdelay=200ms",
        "]",
        out,
      ],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const watch = watchStderr(child);
    // The first progress record means the copy is under way.
    await watch.until((text) => text.includes('"state":"running"'));
    child.kill("SIGINT");
    const stderr = await watch.ended;
    const status = await child.status;
    assertEquals(status.code, 130, stderr);
    assertIncludes(stderr, `nbd: copy interrupted by SIGINT; ${out} was not created`);
    assertIncludes(stderr, '"state":"failed"');
    assertEquals(await names(dir.path), []);
    const ps = await runOk("ps", ["-eo", "args"]);
    assertOk(!ps.stdout.includes(`pattern ${size}`), "the server was stopped");
  },
});

Deno.test({
  name: "nbds_to_file and file_to_nbds: TLS with X.509 certificates on both sides",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    await using server = await nbdkit(
      "--tls=require",
      `--tls-certificates=${dir.path}`,
      "memory",
      "4M",
    );
    const uri = `nbds+unix:///?socket=${server.socket}&tls-certificates=${dir.path}`;
    const input = randomBytes(4 * MiB, 91);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    await nbdCopyOk([`${dir.path}/in.img`, uri]);
    await nbdCopyOk([uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), input);
  },
});

Deno.test({
  name: "nbds:// over TCP with only a CA: both directions byte-exact; a wrong name is refused",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    // Only the CA: no client certificate, so the client may use the runtime's own TLS.
    await Deno.mkdir(`${dir.path}/ca`);
    await Deno.copyFile(`${dir.path}/ca-cert.pem`, `${dir.path}/ca/ca-cert.pem`);
    const port = freePort();
    const server = new Deno.Command("nbdkit", {
      args: [
        ...["-f", "-p", String(port), "-i", "127.0.0.1"],
        ...["--tls=require", `--tls-certificates=${dir.path}`, "memory", "6M"],
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    await using _stop = {
      async [Symbol.asyncDispose]() {
        server.kill("SIGTERM");
        await server.status;
      },
    };
    for (let i = 0;; i++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
        break;
      } catch (error) {
        if (i >= 300) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    const uri = `nbds://localhost:${port}/?tls-certificates=${dir.path}/ca`;
    const input = randomBytes(6 * MiB, 92);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    await nbdCopyOk([`${dir.path}/in.img`, uri]);
    await nbdCopyOk([uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), input);
    const wrong = await nbdCopy([`${uri}&tls-hostname=wrong.example`, "null:"]);
    assertEquals(wrong.code, 1, wrong.stderr);
    assertIncludes(wrong.stderr, "TLS handshake with localhost:");
    assertIncludes(wrong.stderr, "wrong.example");
  },
});

Deno.test({
  name: "file_to_block_device and block_device_to_file: a loop device, holes zeroed on it",
  ...linuxPaths("[ CMD ] and loop devices", peers("losetup", "fallocate", "nbdkit")),
  async fn(t) {
    await using dir = await tempDir();
    const backing = `${dir.path}/backing.img`;
    await Deno.writeFile(backing, new Uint8Array(8 * MiB).fill(0xff));
    await withLoopDevice(t, backing, async (device) => {
      const input = randomBytes(6 * MiB, 99);
      input.fill(0, MiB, 3 * MiB); // a hole in a sparse input file...
      await Deno.writeFile(`${dir.path}/in.img`, input);
      await runOk("fallocate", [
        "--punch-hole",
        "-o",
        String(MiB),
        "-l",
        String(2 * MiB),
        `${dir.path}/in.img`,
      ]);
      await nbdCopyOk([`${dir.path}/in.img`, device]);
      // ...which must read back as zeroes from a device that held 0xff there.
      const expected = new Uint8Array(8 * MiB).fill(0xff);
      expected.set(input, 0);
      const out = `${dir.path}/out.img`;
      await nbdCopyOk([device, out]);
      assertBytes(await Deno.readFile(out), expected);
      const small = await nbdCopy(["--", "[", "nbdkit", "pattern", "16M", "]", device]);
      assertEquals(small.code, 1);
      assertIncludes(small.stderr, `the destination ${device} (${8 * MiB} bytes) is smaller`);
    });
  },
});

Deno.test({
  name: "nbdkit_to_block_device: a large copy through the write thread, zero runs zeroed on it",
  ...peers("losetup", "nbdkit"),
  async fn(t) {
    await using dir = await tempDir();
    const size = 80 * MiB;
    const backing = `${dir.path}/backing.img`;
    await Deno.writeFile(backing, new Uint8Array(size).fill(0xff));
    await withLoopDevice(t, backing, async (device) => {
      // Data around a 16 MiB run that nbdkit reports as a hole.
      await using server = await nbdkit("memory", String(size));
      const head = randomBytes(30 * MiB, 31);
      const tail = randomBytes(size - 46 * MiB, 32);
      await fill(server.uri, [[0, head], [46 * MiB, tail]]);
      await nbdCopyOk([server.uri, device]);
      const expected = new Uint8Array(size);
      expected.set(head, 0);
      expected.set(tail, 46 * MiB);
      assertBytes(await Deno.readFile(device), expected);
    });
  },
});

Deno.test("unwritable destinations: a read-only server started for the copy, a missing directory", async () => {
  await using dir = await tempDir();
  await Deno.writeFile(`${dir.path}/in.img`, new Uint8Array(4096));
  const nbd = await nbdExecutable();
  let result = await nbdCopy([`${dir.path}/in.img`, "[", nbd, "serve", "-r", "memory", "1M", "]"]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    LINUX_PATHS
      ? `nbd: destination: Cannot write to [ ${nbd} serve -r memory 1M ]: the export is read-only`
      : `nbd: destination: [ CMD ] (a server started by socket activation) needs Linux (${PORTABLE_WHERE}); start the server yourself and give its URI instead`,
  );
  result = await nbdCopy([`${dir.path}/in.img`, `${dir.path}/missing/out.img`]);
  assertEquals(result.code, 1);
  assertEquals(
    result.stderr.trim(),
    `nbd: destination: Cannot create ${dir.path}/missing/out.img: no such file or directory`,
  );
});

Deno.test({
  name: "nbdkit_stuck_to_file: a second Ctrl-C exits at once and still stops the server",
  ...linuxPaths("[ CMD ]", peers("nbdkit")),
  async fn() {
    await using dir = await tempDir();
    const out = `${dir.path}/out.img`;
    // Every read takes a minute: the first Ctrl-C alone would wait for them.
    const size = String(64 * MiB + 4096 * (1 + Math.floor(Math.random() * 1000)));
    const child = new Deno.Command(await nbdExecutable(), {
      args: [
        "copy",
        "--progress-json",
        "[",
        "nbdkit",
        "--filter=delay",
        "pattern",
        size,
        "rdelay=60",
        "]",
        out,
      ],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const watch = watchStderr(child);
    await watch.until((text) => text.includes('"state":"running"'));
    // Time for the copy's reads to be on their way (each takes a minute).
    await new Promise((r) => setTimeout(r, 1000));
    child.kill("SIGINT");
    await new Promise((r) => setTimeout(r, 300));
    child.kill("SIGINT");
    const status = await child.status;
    const stderr = await watch.ended;
    assertOk(status.signal === "SIGINT" || status.code === 130, JSON.stringify(status));
    assertIncludes(stderr, "nbd: interrupted again: stopping at once");
    assertEquals(await names(dir.path), [], "the temporary file is removed");
    let gone = false;
    for (let i = 0; i < 100 && !gone; i++) {
      gone = !(await runOk("ps", ["-eo", "args"])).stdout.includes(`pattern ${size}`);
      if (!gone) await new Promise((r) => setTimeout(r, 50));
    }
    assertOk(gone, "the server was stopped");
  },
});

Deno.test({
  name: "nbdkit_to_full_filesystem: a write thread's ENOSPC stops the copy; no file is left",
  ...peers("nbdkit", "mount", "umount"),
  async fn(t) {
    await using dir = await tempDir();
    await withTmpfs(t, dir.path, "40M", async (small) => {
      // Large enough for the destination's write thread, which then meets the full disk.
      await using server = await nbdkit("pattern", "100M");
      const out = `${small}/out.img`;
      assertCopyFailedFull(await nbdCopy([server.uri, out]), out, small);
    });
  },
});
