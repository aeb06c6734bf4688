/**
 * Plugins driven through real clients (qemu-io, nbdcopy, nbdinfo, mtools)
 * against `nbd serve`, with byte-exact checks.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { peers, randomBytes, ROOT, run, runOk, startNbdServe, tempDir } from "./helpers.ts";

const MiB = 1024 * 1024;

const SERVE = ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve"];

Deno.test({
  name: "sh plugin: an inline script on stdin serves 1M of zeroes to qemu-io",
  ...peers("qemu-io"),
  async fn() {
    const script = `case "$1" in
  get_size) echo 1M ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  *) exit 2 ;;
esac
`;
    const result = await runOk(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      "sh",
      "-",
      "--run",
      'qemu-io -r -f raw -c "read -P 0 0 1M" -c "read -P 0 1000 5000" "$uri"',
    ], { stdin: script });
    assertIncludes(result.stdout, "read 1048576/1048576 bytes at offset 0");
    assertOk(!/Pattern verification failed/.test(result.stdout), result.stdout);
  },
});

Deno.test({
  name: "sh plugin: a writable script disk round-trips qemu-io writes; errors reach the client",
  ...peers("qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const script = `${dir.path}/disk.sh`;
    await Deno.writeTextFile(
      script,
      `#!/bin/sh
disk=$tmpdir/disk
case "$1" in
  get_ready) truncate -s 1M "$disk" ;;
  get_size) echo 1M ;;
  can_write) exit 0 ;;
  pread) dd if="$disk" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) [ "$4" -ge 917504 ] && { echo "ENOSPC the last 128K are full" >&2; exit 1; }
          dd of="$disk" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;
  *) exit 2 ;;
esac
`,
      { mode: 0o755 },
    );
    await using server = await startNbdServe(["sh", script]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 4096 65536", server.uri]);
    const check = await runOk("qemu-io", [
      "-r",
      "-f",
      "raw",
      "-c",
      "read -P 0x5a 4096 65536",
      server.uri,
    ]);
    assertOk(!/Pattern verification failed/.test(check.stdout), check.stdout);
    const full = await run("qemu-io", ["-f", "raw", "-c", "write 950000 512", server.uri]);
    assertIncludes(full.stdout + full.stderr, "No space left on device");
  },
});

Deno.test({
  name: "eval plugin: nbdinfo sees the size and nbdcopy the data",
  ...peers("nbdinfo", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    await using server = await startNbdServe([
      "eval",
      "get_size=echo 64K",
      "pread=head -c $3 /dev/zero | tr '\\0' Z",
    ]);
    assertEquals((await runOk("nbdinfo", ["--size", server.uri])).stdout.trim(), "65536");
    await runOk("nbdcopy", [server.uri, `${dir.path}/out`]);
    assertBytes(await Deno.readFile(`${dir.path}/out`), new Uint8Array(65536).fill(0x5a));
  },
});

Deno.test({
  name: "floppy plugin: mtools lists the files and extracts them byte-exact",
  ...peers("nbdcopy", "mdir", "mcopy"),
  async fn() {
    await using src = await tempDir();
    await using work = await tempDir();
    const big = randomBytes(700000, 12);
    await Deno.mkdir(`${src.path}/Nested Dir/inner`, { recursive: true });
    await Deno.writeFile(`${src.path}/Nested Dir/A Long Mixed-Case Name.bin`, big);
    await Deno.writeTextFile(`${src.path}/hello.txt`, "hello, floppy\n");
    await Deno.writeTextFile(`${src.path}/Nested Dir/inner/deep.txt`, "deep\n");
    const image = `${work.path}/floppy.img`;
    {
      await using server = await startNbdServe(["floppy", src.path, "label=TESTDISK"]);
      await runOk("nbdcopy", [server.uri, image]);
    }
    const at = `${image}@@1M`;
    const root = (await runOk("mdir", ["-i", at, "::"])).stdout;
    assertIncludes(root, "TESTDISK");
    assertIncludes(root, "hello.txt");
    assertIncludes(root, "Nested Dir");
    const nested = (await runOk("mdir", ["-i", at, "::/Nested Dir"])).stdout;
    assertIncludes(nested, "A Long Mixed-Case Name.bin");
    assertIncludes(nested, "700000");
    await runOk("mcopy", [
      "-i",
      at,
      "::/Nested Dir/A Long Mixed-Case Name.bin",
      `${work.path}/big`,
    ]);
    assertBytes(await Deno.readFile(`${work.path}/big`), big);
    await runOk("mcopy", ["-i", at, "::/Nested Dir/inner/deep.txt", `${work.path}/deep`]);
    assertEquals(await Deno.readTextFile(`${work.path}/deep`), "deep\n");
    await runOk("mcopy", ["-i", at, "::/hello.txt", `${work.path}/hello`]);
    assertEquals(await Deno.readTextFile(`${work.path}/hello`), "hello, floppy\n");
  },
});

Deno.test({
  name: "floppy plugin: fsck.fat finds the generated FAT32 volume clean",
  ...peers("nbdcopy", "fsck.fat"),
  async fn() {
    await using src = await tempDir();
    await using work = await tempDir();
    for (let i = 0; i < 30; i++) {
      await Deno.mkdir(`${src.path}/dir ${i % 3}`, { recursive: true });
      await Deno.writeFile(
        `${src.path}/dir ${i % 3}/file number ${i}.dat`,
        randomBytes(i * 1000, i),
      );
    }
    const image = `${work.path}/floppy.img`;
    {
      await using server = await startNbdServe([
        "--filter=offset",
        "floppy",
        src.path,
        "offset=1M",
      ]);
      await runOk("nbdcopy", [server.uri, image]);
    }
    const check = await runOk("fsck.fat", ["-n", "-v", image]);
    // 30 files and 3 directories, plus the volume label entry fsck.fat counts too.
    assertIncludes(check.stdout, "34 files");
    assertOk(!/(differ|corrupt|invalid|bad)/i.test(check.stdout), check.stdout);
  },
});

Deno.test({
  name: "split plugin: nbdcopy reads the concatenation and writes across file boundaries",
  ...peers("nbdcopy", "qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const parts = [randomBytes(300000, 1), randomBytes(5, 2), randomBytes(1 * MiB, 3)];
    const files = parts.map((_, i) => `${dir.path}/part${i}`);
    for (let i = 0; i < parts.length; i++) await Deno.writeFile(files[i]!, parts[i]!);
    const joined = new Uint8Array([...parts[0]!, ...parts[1]!, ...parts[2]!]);
    await using server = await startNbdServe(["split", ...files.map((f) => `file=${f}`)]);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out`]);
    assertBytes(await Deno.readFile(`${dir.path}/out`), joined);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x11 299990 20", server.uri]);
    assertBytes(await Deno.readFile(files[1]!), new Uint8Array(5).fill(0x11));
    assertBytes((await Deno.readFile(files[2]!)).subarray(0, 5), new Uint8Array(5).fill(0x11));
  },
});

Deno.test({
  name: "sparse-random plugin: nbdcopy copies the disk onto itself (writes are verified)",
  ...peers("nbdcopy", "nbdinfo"),
  async fn() {
    await using server = await startNbdServe(["sparse-random", "64M", "seed=5", "runlength=1M"]);
    await runOk("nbdcopy", [server.uri, server.uri]);
    const map = (await runOk("nbdinfo", ["--map", server.uri])).stdout;
    assertIncludes(map, "hole,zero");
    assertIncludes(map, "data");
  },
});

Deno.test({
  name: "http plugin: nbdcopy reads an image from a local HTTP server byte-exact",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const data = randomBytes(3 * MiB + 123, 44);
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
      if (req.method === "HEAD") {
        return new Response(null, { headers: { "Content-Length": String(data.length) } });
      }
      if (!range) return new Response(data.slice());
      const start = Number(range[1]);
      const end = Math.min(Number(range[2]), data.length - 1);
      return new Response(data.slice(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
      });
    });
    try {
      await using nbd = await startNbdServe(["http", `http://127.0.0.1:${server.addr.port}/disk`]);
      await runOk("nbdcopy", [nbd.uri, `${dir.path}/out`]);
      assertBytes(await Deno.readFile(`${dir.path}/out`), data);
    } finally {
      await server.shutdown();
    }
  },
});
