/**
 * Our server driven by real peers: nbdinfo, nbdcopy, qemu-img, qemu-io and
 * nbdsh (libnbd), with byte-exact data checks.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  nbdExecutable,
  NBDSH_ENV,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  tempDir,
} from "./helpers.ts";

const MiB = 1024 * 1024;

/** Runs an nbdsh script; with a URI the handle is connected first (asking for base:allocation). */
async function nbdsh(uri: string, script: string): Promise<string> {
  const connect = uri
    ? `h.add_meta_context("base:allocation")\nh.connect_uri(${JSON.stringify(uri)})\n`
    : "";
  const result = await runOk("nbdsh", ["-c", connect + script], { env: NBDSH_ENV });
  return result.stdout;
}

async function nbdinfoJson(args: string[]): Promise<Record<string, unknown>> {
  return JSON.parse((await runOk("nbdinfo", ["--json", ...args])).stdout);
}

type ExportJson = Record<string, unknown>;

Deno.test({
  name: "nbdinfo --json reports size, flags, block sizes and base:allocation",
  ...peers("nbdinfo"),
  async fn() {
    await using server = await startNbdServe([
      "-e",
      "disk",
      "--description",
      "scratch disk",
      "memory",
      "1G",
    ], {
      exportName: "disk",
    });
    const info = await nbdinfoJson([server.uri]);
    assertEquals(info.protocol, "newstyle-fixed");
    assertEquals(info.TLS, false);
    const exp = (info.exports as ExportJson[])[0]!;
    assertEquals(exp["export-name"], "disk");
    assertEquals(exp["description"], "scratch disk");
    assertEquals(exp["export-size"], 2 ** 30);
    assertEquals(exp["contexts"], ["base:allocation"]);
    for (
      const key of [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
      ]
    ) {
      assertEquals(exp[key], true, key);
    }
    assertEquals(exp["is_read_only"], false);
    assertEquals(exp["block_size_minimum"], 1);
    assertEquals(exp["block_size_preferred"], 4096);
    assertEquals(exp["block_size_maximum"], 32 * MiB);
  },
});

Deno.test({
  name: "nbdinfo sees a read-only file export and named exports from dir=",
  ...peers("nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    await Deno.writeFile(`${dir.path}/a.img`, new Uint8Array(MiB));
    await Deno.writeFile(`${dir.path}/b.img`, new Uint8Array(2 * MiB));
    {
      await using server = await startNbdServe(["-r", "file", `${dir.path}/a.img`]);
      const exp = ((await nbdinfoJson([server.uri])).exports as ExportJson[])[0]!;
      assertEquals([exp["is_read_only"], exp["can_trim"], exp["can_zero"]], [true, false, false]);
    }
    await using server = await startNbdServe(["file", `dir=${dir.path}`]);
    const list = await nbdinfoJson(["--list", server.uri]);
    const exports = (list.exports as ExportJson[]).map((e) => [e["export-name"], e["export-size"]]);
    assertEquals(exports, [["a.img", MiB], ["b.img", 2 * MiB]]);
    const size = await runOk("nbdinfo", ["--size", server.uri.replace("///", "///b.img")]);
    assertEquals(size.stdout.trim(), String(2 * MiB));
    const missing = await run("nbdinfo", [server.uri.replace("///", "///nope")]);
    assertOk(missing.code !== 0);
  },
});

Deno.test({
  name: "nbdcopy copies random data in and out byte for byte (with and without extents)",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const data = randomBytes(16 * MiB, 7);
    data.fill(0, 4 * MiB, 9 * MiB); // a zero run the copy may turn into a hole
    await Deno.writeFile(`${dir.path}/src.img`, data);
    await using server = await startNbdServe(["memory", "16M"]);
    await runOk("nbdcopy", [`${dir.path}/src.img`, server.uri]);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out1.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out1.img`), data);
    await runOk("nbdcopy", [
      "--no-extents",
      "-S",
      "0",
      "--connections=1",
      server.uri,
      `${dir.path}/out2.img`,
    ]);
    assertBytes(await Deno.readFile(`${dir.path}/out2.img`), data);
  },
});

Deno.test({
  name: "qemu-img convert, compare, info and map against our server",
  ...peers("qemu-img"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src.img`;
    const data = randomBytes(8 * MiB, 3);
    data.fill(0, 2 * MiB, 6 * MiB);
    await Deno.writeFile(src, data);
    await using server = await startNbdServe(["memory", "8M"]);
    await runOk("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", src, server.uri]);
    await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", src, server.uri]);
    const info = JSON.parse(
      (await runOk("qemu-img", ["info", "--output=json", server.uri])).stdout,
    );
    assertEquals(info["virtual-size"], 8 * MiB);
    const map = JSON.parse(
      (await runOk("qemu-img", ["map", "-f", "raw", "--output=json", server.uri])).stdout,
    );
    // qemu-img convert skipped the zero run: it reads back as zero and is not allocated.
    const zeroes = (map as { start: number; length: number; zero: boolean; data: boolean }[])
      .filter((e) => e.zero && !e.data);
    assertOk(
      zeroes.some((e) => e.start <= 2 * MiB && e.start + e.length >= 6 * MiB),
      JSON.stringify(map),
    );
  },
});

Deno.test({
  name: "qemu-io writes, reads, zeroes, discards and flushes with verified patterns",
  ...peers("qemu-io"),
  async fn() {
    await using server = await startNbdServe(["memory", "16M"]);
    const result = await runOk("qemu-io", [
      "-f",
      "raw",
      ...["-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"],
      ...["-c", "write -P 0xcd 1M 1M", "-c", "write -z 1M 512k", "-c", "read -P 0 1M 512k"],
      ...["-c", "read -P 0xcd 1536k 512k", "-c", "discard 0 64k", "-c", "flush"],
      ...["-c", "write -P 0x11 -f 8M 4k", "-c", "read -P 0x11 8M 4k"],
      server.uri,
    ]);
    assertOk(
      !/verification failed|error/i.test(result.stdout + result.stderr),
      result.stdout + result.stderr,
    );
    assertEquals((result.stdout.match(/^read /gm) ?? []).length, 4);
  },
});

Deno.test({
  name: "nbdsh: structured replies, sparse reads, block status after trim and zero",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe(["memory", "4M"]);
    const out = await nbdsh(
      server.uri,
      `
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
h.pwrite(b"\\x01" * 262144, 0)
h.trim(65536, 65536)
h.zero(131072, 65536)
entries = []
def cb(meta, offset, e, err):
    entries.extend(e)
h.block_status(4 * 1048576, 0, cb)
print("extents", entries)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((status, offset, len(buf), bytes(buf).count(0) == len(buf)))
    return 0
h.pread_structured(262144, 0, chunk)
print("chunks", chunks)
`,
    );
    const extents = /extents \[(.*)\]/.exec(out)![1]!.split(",").map((s) => Number(s.trim()));
    assertEquals(extents, [65536, 0, 131072, 3, 65536, 0, 4 * MiB - 262144, 3]);
    // status 1 = OFFSET_DATA, 2 = OFFSET_HOLE: the trimmed and zeroed pages come back as one hole.
    assertIncludes(
      out,
      "chunks [(1, 0, 65536, False), (2, 65536, 131072, True), (1, 196608, 65536, False)]",
    );
  },
});

Deno.test({
  name: "nbdsh: many requests in flight complete with the right data",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe(["pattern", "64M"]);
    const out = await nbdsh(
      server.uri,
      `
import struct
bufs = []
for i in range(256):
    buf = nbd.Buffer(4096)
    cookie = h.aio_pread(buf, i * 65536)
    bufs.append((i, buf, cookie))
while h.aio_in_flight() > 0:
    h.poll(-1)
bad = 0
for i, buf, cookie in bufs:
    assert h.aio_command_completed(cookie)
    if struct.unpack(">Q", buf.to_bytearray()[0:8])[0] != i * 65536: bad += 1
print("bad", bad, "done", len(bufs))
`,
    );
    assertIncludes(out, "bad 0 done 256");
  },
});

Deno.test({
  name: "nbdsh: out-of-range and bad-flag requests get errors and the connection keeps working",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe(["memory", "1M"]);
    const out = await nbdsh(
      server.uri,
      `
h.set_strict_mode(0)
sz = h.get_size()
for name, f, a, k in [("read past end", h.pread, (512, sz - 256), {}),
                      ("write past end", h.pwrite, (b"x" * 512, sz - 256), {}),
                      ("zero past end", h.zero, (512, sz), {}),
                      ("read unknown flag", h.pread, (512, 0), {"flags": 1 << 7})]:
    try:
        f(*a, **k)
        print(name, "OK")
    except nbd.Error as e:
        print(name, e.errno)
h.pwrite(b"fine", 0)
print("after", bytes(h.pread(4, 0)))
`,
    );
    assertIncludes(out, "read past end EINVAL");
    assertIncludes(out, "write past end ENOSPC");
    assertIncludes(out, "zero past end ENOSPC");
    assertIncludes(out, "read unknown flag EINVAL");
    assertIncludes(out, "after b'fine'");
  },
});

Deno.test({
  name: "libnbd without structured replies or fixed newstyle still works (simple replies)",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe(["memory", "1M"]);
    const out = await nbdsh(
      "",
      `
h.set_request_structured_replies(False)
h.set_handshake_flags(0)
h.connect_uri("${server.uri}")
print("sr", h.get_structured_replies_negotiated(), "proto", h.get_protocol())
h.pwrite(b"abc" * 1000, 100)
print("ok", bytes(h.pread(3000, 100)) == b"abc" * 1000)
`,
    );
    assertIncludes(out, "sr False proto newstyle");
    assertIncludes(out, "ok True");
  },
});

Deno.test({
  name: "socket activation: nbdinfo -- [ nbd serve ... ] and nbdcopy [ nbd serve ... ]",
  ...peers("nbdinfo", "nbdcopy"),
  async fn() {
    const nbd = await nbdExecutable();
    const info = JSON.parse(
      (await runOk("nbdinfo", ["--json", "--", "[", nbd, "serve", "memory", "3M", "]"])).stdout,
    );
    assertEquals((info.exports as ExportJson[])[0]!["export-size"], 3 * MiB);
    await using dir = await tempDir();
    await runOk("nbdcopy", ["--", "[", nbd, "serve", "pattern", "4M", "]", `${dir.path}/p.img`]);
    const bytes = await Deno.readFile(`${dir.path}/p.img`);
    const view = new DataView(bytes.buffer);
    assertEquals(bytes.length, 4 * MiB);
    for (let off = 0; off < bytes.length; off += 65528) {
      const word = off - (off % 8);
      assertEquals(view.getBigUint64(word), BigInt(word));
    }
  },
});

Deno.test({
  name: "-s serves one connection on stdin/stdout (libnbd connect_command)",
  ...peers("nbdsh"),
  async fn() {
    const nbd = await nbdExecutable();
    const out = await nbdsh(
      "",
      `
h.connect_command(["${nbd}", "serve", "-s", "memory", "1M"])
h.pwrite(b"stdio", 10)
print("got", bytes(h.pread(5, 10)), h.get_size())
`,
    );
    assertIncludes(out, "got b'stdio' 1048576");
  },
});

Deno.test({
  name: "--run exports $uri, $nbd, $unixsocket, $port and exits with the command's status",
  ...peers("nbdinfo"),
  async fn() {
    const ok = await runOk(Deno.execPath(), [
      "run",
      "-A",
      `${ROOT}/main.ts`,
      "serve",
      "memory",
      "2M",
      "--run",
      'nbdinfo --size "$uri"; echo "nbd=$nbd"; echo "sock=$unixsocket"; echo "port=[$port]"',
    ]);
    assertIncludes(ok.stdout, `${2 * MiB}\n`);
    assertOk(/nbd=nbd\+unix:\/\/\/\?socket=\/.*\/socket/.test(ok.stdout), ok.stdout);
    assertIncludes(ok.stdout, "port=[]");
    const failed = await run(Deno.execPath(), [
      "run",
      "-A",
      `${ROOT}/main.ts`,
      "serve",
      "memory",
      "1M",
      "--run",
      "exit 3",
    ]);
    assertEquals(failed.code, 3);
  },
});

Deno.test({
  name: "TCP with --print-uri on a chosen port, read by nbdcopy",
  ...peers("nbdcopy"),
  async fn() {
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        `${ROOT}/main.ts`,
        "serve",
        "-p",
        "0",
        "-i",
        "127.0.0.1",
        "--print-uri",
        "pattern",
        "1M",
      ],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const reader = child.stdout.getReader();
    const { value } = await reader.read();
    const uri = new TextDecoder().decode(value).trim();
    try {
      assertOk(/^nbd:\/\/127\.0\.0\.1:\d+\/$/.test(uri), uri);
      await using dir = await tempDir();
      await runOk("nbdcopy", [uri, `${dir.path}/p.img`]);
      assertEquals((await Deno.stat(`${dir.path}/p.img`)).size, MiB);
    } finally {
      child.kill("SIGTERM");
      reader.releaseLock();
      await child.stdout.cancel();
      assertEquals((await child.status).code, 0);
    }
  },
});

Deno.test({
  name: "SIGTERM flushes a file export: written data is on disk after a clean stop",
  ...peers("nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const file = `${dir.path}/disk.img`;
    await Deno.writeFile(file, new Uint8Array(MiB));
    {
      await using server = await startNbdServe(["file", file]);
      await nbdsh(server.uri, 'h.pwrite(b"persist" * 100, 4096)');
    }
    const bytes = await Deno.readFile(file);
    assertEquals(new TextDecoder().decode(bytes.subarray(4096, 4096 + 14)), "persistpersist");
  },
});
