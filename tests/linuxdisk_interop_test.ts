/**
 * The linuxdisk plugin against e2fsprogs: the filesystem it serves is
 * clean for `e2fsck -fn`, `debugfs` lists the directory's files and dumps
 * them equal to the originals, the label, type and size are as asked;
 * writes go to the temporary image (never to the directory), which is
 * gone from TMPDIR while serving and after; bad input is a one-line error.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { assertBytes, assertEquals, assertMatch, assertOk } from "./assert.ts";
import {
  hasCommand,
  INTEROP_REQUIRED,
  peers,
  randomBytes,
  ROOT,
  run,
  runNbdAsNobody,
  runOk,
  startServer,
  tempDir,
} from "./helpers.ts";

const FILES: Array<[string, Uint8Array]> = [
  ["hello.txt", new TextEncoder().encode("hello\n")],
  ["empty", new Uint8Array(0)],
  ["data/random.bin", randomBytes(3_000_001, 1)],
  ["data/nested/deeper/small.bin", randomBytes(777, 2)],
  ["a name with spaces and a rather long tail to it.txt", randomBytes(5000, 3)],
];

async function makeTree(dir: string): Promise<void> {
  for (const [name, data] of FILES) {
    await Deno.mkdir(`${dir}/${name}`.replace(/\/[^/]*$/, ""), { recursive: true });
    await Deno.writeFile(`${dir}/${name}`, data);
  }
  await Deno.symlink("hello.txt", `${dir}/link`);
}

/** `nbd serve linuxdisk ARGS` with its temporary files in `tmp`. */
function serve(args: string[], tmp: string) {
  return startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", "linuxdisk", ...args],
    { env: { TMPDIR: tmp } },
  );
}

async function entries(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(dir)) out.push(e.name);
  return out;
}

for (const type of ["ext2", "ext4"]) {
  Deno.test({
    name: `linuxdisk ${type}: e2fsck is clean, debugfs lists and dumps the files`,
    ...peers("e2fsck", "debugfs", "dumpe2fs", "nbdcopy"),
    async fn() {
      await using dir = await tempDir();
      const src = `${dir.path}/src`;
      const tmp = `${dir.path}/tmp`;
      await Deno.mkdir(tmp);
      await makeTree(src);
      const image = `${dir.path}/disk.img`;
      {
        await using server = await serve([src, `type=${type}`, "label=CIROOT"], tmp);
        // The temporary image is already unlinked while serving.
        assertEquals(await entries(tmp), []);
        await runOk("nbdcopy", [server.uri, image]);
      }
      const fsck = await run("e2fsck", ["-fn", image]);
      assertEquals(fsck.code, 0, fsck.stdout + fsck.stderr);
      const header = await runOk("dumpe2fs", ["-h", image]);
      assertMatch(header.stdout, /^Filesystem volume name:\s+CIROOT$/m);
      if (type === "ext4") assertMatch(header.stdout, /features:.*has_journal.*extent/);
      else assertOk(!/has_journal/.test(header.stdout), "ext2 has no journal");
      const root = await runOk("debugfs", ["-R", "ls -l /", image]);
      for (const name of ["hello.txt", "empty", "data", "link", FILES[4]![0]]) {
        assertOk(root.stdout.includes(` ${name}\n`), `${name} in:\n${root.stdout}`);
      }
      const nested = await runOk("debugfs", ["-R", "ls -l /data/nested/deeper", image]);
      assertMatch(nested.stdout, / small\.bin\n/);
      for (const [name, data] of FILES) {
        const out = `${dir.path}/dumped`;
        await runOk("debugfs", ["-R", `dump "/${name}" ${out}`, image]);
        assertBytes(await Deno.readFile(out), data, name);
      }
      const link = await runOk("debugfs", ["-R", "stat /link", image]);
      assertMatch(link.stdout, /Fast link dest: "hello\.txt"/);
      // Gone after the server stopped, too.
      assertEquals(await entries(tmp), []);
    },
  });
}

Deno.test({
  name: "linuxdisk: size and +size; writes go to the image, shared by connections",
  ...peers("e2fsck", "dumpe2fs", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src`;
    await makeTree(src);
    const tmp = `${dir.path}/tmp`;
    await Deno.mkdir(tmp);
    {
      await using server = await serve([src, "size=48M"], tmp);
      await using client = await NbdClient.connect(server.uri);
      assertEquals(client.size(), 48 * 1024 * 1024);
    }
    {
      await using server = await serve([src, "size=+64M", "type=ext3"], tmp);
      const image = `${dir.path}/big.img`;
      await runOk("nbdcopy", [server.uri, image]);
      const header = await runOk("dumpe2fs", ["-h", image]);
      const field = (name: string) =>
        Number(new RegExp(`^${name}:\\s+(\\d+)$`, "m").exec(header.stdout)![1]);
      const free = field("Free blocks") * field("Block size");
      assertOk(free >= 64 * 1024 * 1024, `free space ${free}`);
      // A write, seen by another connection; the directory is untouched.
      const block = randomBytes(4096, 9);
      const at = 40 * 1024 * 1024;
      {
        await using writer = await NbdClient.connect(server.uri);
        await writer.pwrite(block, at);
        await writer.flush();
      }
      await using reader = await NbdClient.connect(server.uri);
      const back = new Uint8Array(4096);
      await reader.pread(back, at);
      assertBytes(back, block);
      assertBytes(await Deno.readFile(`${src}/data/random.bin`), FILES[2]![1]);
    }
    assertEquals(await entries(tmp), []);
  },
});

Deno.test("linuxdisk: missing mke2fs, a missing directory, a bad type are one-line errors", async () => {
  await using dir = await tempDir();
  const nbd = (args: string[], env: Record<string, string> = {}) =>
    run(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "serve",
      "-U",
      `${dir.path}/sock`,
      "linuxdisk",
      ...args,
    ], { env: { TMPDIR: dir.path, ...env } });
  const noTool = await nbd([dir.path], { PATH: "/nonexistent" });
  assertEquals(noTool.code, 1, noTool.stderr);
  assertEquals(
    noTool.stderr,
    "nbd: linuxdisk: mke2fs not found on PATH (install e2fsprogs; it is often in /usr/sbin)\n",
  );
  const missing = await nbd([`${dir.path}/missing`]);
  assertEquals(missing.code, 2, missing.stderr);
  assertMatch(missing.stderr, /^nbd: linuxdisk: cannot read .*missing: No such file.*\n$/);
  const type = await nbd([dir.path, "type=xfs"]);
  assertEquals(type.stderr, 'nbd: linuxdisk: type must be ext2, ext3 or ext4, got "xfs"\n');
  // Too small for the files: mke2fs's own reason, on one line; nothing left behind.
  await Deno.mkdir(`${dir.path}/big`);
  await Deno.writeFile(`${dir.path}/big/file`, randomBytes(3 * 1024 * 1024, 1));
  const small = await nbd([`${dir.path}/big`, "size=1M"]);
  assertEquals(small.code, 1, small.stderr);
  assertEquals(small.stderr.split("\n").length, 2, small.stderr);
  assertMatch(small.stderr, /^nbd: linuxdisk: mke2fs failed for a 1M ext2 filesystem: /);
  assertEquals((await entries(dir.path)).sort(), ["big"]);
  // A name that is not UTF-8: the runtime cannot size (or open) it again.
  await Deno.mkdir(`${dir.path}/odd`);
  await runOk("sh", ["-c", `printf x > "$1/$(printf 'bad-\\377-name')"`, "sh", `${dir.path}/odd`]);
  const odd = await nbd([`${dir.path}/odd`]);
  assertEquals(odd.code, 2, odd.stderr);
  assertEquals(
    odd.stderr,
    `nbd: linuxdisk: a name in ${dir.path}/odd is not valid UTF-8 (read as "bad-\uFFFD-name"): ` +
      "rename it\n",
  );
  assertEquals((await entries(dir.path)).sort(), ["big", "odd"]);
});

Deno.test({
  name: "linuxdisk: an unreadable file is named in a one-line error at start-up (run as nobody)",
  ignore: !hasCommand("setpriv") && !INTEROP_REQUIRED,
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src`;
    await Deno.mkdir(`${src}/sub`, { recursive: true });
    await Deno.chmod(src, 0o755);
    await Deno.chmod(`${src}/sub`, 0o755);
    await Deno.writeTextFile(`${src}/readable.txt`, "yes");
    await Deno.chmod(`${src}/readable.txt`, 0o644);
    await Deno.writeTextFile(`${src}/sub/secret.txt`, "no");
    await Deno.chmod(`${src}/sub/secret.txt`, 0o600);
    const result = await runNbdAsNobody(dir.path, [
      "serve",
      "-U",
      `${dir.path}/deno-dir/sock`,
      "linuxdisk",
      src,
    ]);
    assertEquals(result.code, 2, result.stderr);
    assertEquals(result.stderr.split("\n").length, 2, result.stderr);
    assertMatch(
      result.stderr,
      /^nbd: linuxdisk: cannot read .*: Permission denied.*sub\/secret\.txt/,
    );
  },
});
