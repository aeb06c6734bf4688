/**
 * The iso plugin against user-space ISO 9660 readers (the kernel here has
 * no iso9660 module): xorriso, isoinfo and bsdtar list exactly the
 * directory's tree; files extracted by osirrox and bsdtar equal the
 * originals byte for byte, deep and long names, symbolic links and
 * permissions included (Rock Ridge); Joliet names show with `isoinfo -J`;
 * a sparse file over 4 GiB comes back whole through multi-extent
 * records; bad input is a one-line error or EIO, never foreign bytes.
 *
 * @module
 */

import { isoPlugin } from "../plugins/iso.ts";
import { NbdError } from "../protocol/errors.ts";
import { sleep } from "../util/sleep.ts";
import { openPlugin } from "../filters/_test_utils.ts";
import {
  assertBytes,
  assertEquals,
  assertMatch,
  assertNotMatch,
  assertOk,
  assertRejects,
} from "./assert.ts";
import {
  hasCommand,
  INTEROP_REQUIRED,
  nbdExecutable,
  peers,
  randomBytes,
  run,
  runNbdAsNobody,
  runOk,
  startNbdServe,
  tempDir,
} from "./helpers.ts";

const DEEP = Array.from({ length: 11 }, (_, i) => `level${i}`).join("/");
const LONG_NAME = "a-file-name-that-is-much-longer-than-any-iso-9660-level-or-joliet-allows-" +
  "x".repeat(120) + ".data";
const LONG_TARGET = Array.from({ length: 40 }, (_, i) => `component-number-${i}`).join("/");

/** Regular files: path → contents. */
function files(): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  out.set("README.txt", new TextEncoder().encode("hello\n"));
  out.set("empty", new Uint8Array(0));
  out.set("bin/tool.sh", new TextEncoder().encode("#!/bin/sh\necho hi\n"));
  out.set("data/random.bin", randomBytes(1_000_003, 5));
  out.set("data/sector.bin", randomBytes(2048, 6));
  out.set(`${DEEP}/deep.txt`, new TextEncoder().encode("deep\n"));
  out.set(LONG_NAME, randomBytes(5000, 7));
  out.set("Ünïcödé näme.txt", new TextEncoder().encode("unicode\n"));
  out.set("same.name.tar.gz", randomBytes(100, 8));
  out.set("same_name_tar.gz", randomBytes(100, 9));
  // Enough entries that the directory spans several sectors.
  for (let i = 0; i < 120; i++) {
    out.set(`many/file-with-a-longish-name-${i}.txt`, randomBytes(i, i));
  }
  return out;
}

const SYMLINKS: Array<[string, string]> = [
  ["bin/link-to-readme", "../README.txt"],
  ["absolute-link", "/etc/hostname"],
  ["long-link", LONG_TARGET],
];

async function makeTree(dir: string): Promise<Map<string, Uint8Array>> {
  const contents = files();
  for (const [name, data] of contents) {
    await Deno.mkdir(`${dir}/${name}`.replace(/\/[^/]*$/, ""), { recursive: true });
    await Deno.writeFile(`${dir}/${name}`, data);
  }
  await Deno.mkdir(`${dir}/empty-dir`);
  for (const [name, target] of SYMLINKS) await Deno.symlink(target, `${dir}/${name}`);
  await Deno.chmod(`${dir}/bin/tool.sh`, 0o755);
  await Deno.chmod(`${dir}/README.txt`, 0o640);
  return contents;
}

/** Every path under `dir`, relative, sorted (directories included). */
async function tree(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(`${dir}/${prefix}`)) {
    const path = prefix ? `${prefix}/${entry.name}` : entry.name;
    out.push(path);
    if (entry.isDirectory) out.push(...await tree(dir, path));
  }
  return out.sort();
}

/** The image as a file, copied out of a served iso export with nbdcopy. */
async function isoImage(args: string[], out: string): Promise<void> {
  await using server = await startNbdServe(["iso", ...args]);
  await runOk("nbdcopy", [server.uri, out]);
}

/** Checks that extracted tree `got` equals `src`: names, bytes, links and modes. */
async function assertSameTree(src: string, got: string, who: string): Promise<void> {
  assertEquals(await tree(got), await tree(src), `${who}: the tree`);
  for (const path of await tree(src)) {
    const a = await Deno.lstat(`${src}/${path}`);
    const b = await Deno.lstat(`${got}/${path}`);
    if (a.isSymlink) {
      assertOk(b.isSymlink, `${who}: ${path} is a symbolic link`);
      assertEquals(await Deno.readLink(`${got}/${path}`), await Deno.readLink(`${src}/${path}`));
      continue;
    }
    assertEquals(b.mode! & 0o777, a.mode! & 0o777, `${who}: mode of ${path}`);
    if (a.isFile) {
      assertBytes(
        await Deno.readFile(`${got}/${path}`),
        await Deno.readFile(`${src}/${path}`),
        path,
      );
    }
  }
}

Deno.test({
  name: "iso: xorriso, isoinfo and bsdtar list the tree; osirrox and bsdtar extract it exactly",
  ...peers("xorriso", "osirrox", "isoinfo", "bsdtar", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src`;
    await Deno.mkdir(src);
    await makeTree(src);
    const image = `${dir.path}/tree.iso`;
    await isoImage([src, "label=CI_BUILD_42", "prep=nbd tests"], image);
    const expected = await tree(src);

    // xorriso: every path, nothing more.
    const find = await runOk("xorriso", ["-indev", image, "-find", "/"]);
    const listed = find.stdout.split("\n").filter((l) => l.startsWith("'/"))
      .map((l) => l.slice(2, -1)).filter((l) => l !== "").sort();
    assertEquals(listed, expected);
    assertNotMatch(find.stderr, /SORRY|FAILURE|WARNING/, find.stderr);

    // bsdtar: the same paths (directories end in /).
    const bsd = await runOk("bsdtar", ["-tf", image]);
    const bsdPaths = bsd.stdout.split("\n").filter((l) => l && l !== ".")
      .map((l) => l.replace(/\/$/, "")).sort();
    assertEquals(bsdPaths, expected);

    // isoinfo: label, preparer, Rock Ridge and Joliet found.
    const info = await runOk("isoinfo", ["-d", "-i", image]);
    assertMatch(info.stdout, /^Volume id: CI_BUILD_42$/m);
    assertMatch(info.stdout, /^Data preparer id: nbd tests$/m);
    assertMatch(info.stdout, /Rock Ridge signatures version 1 found/);
    assertMatch(info.stdout, /Joliet with UCS level 3 found/);
    const rr = await runOk("isoinfo", ["-l", "-R", "-i", image]);
    assertMatch(rr.stdout, /^-rw-r-----.* README\.txt $/m);
    assertMatch(rr.stdout, /^-rwxr-xr-x.* tool\.sh $/m);
    assertMatch(rr.stdout, /^lrwxrwxrwx.* link-to-readme -> \.\.\/README\.txt$/m);
    assertMatch(rr.stdout, new RegExp(` ${LONG_NAME.replace(/\./g, "\\.")} $`, "m"));
    const joliet = await runOk("isoinfo", ["-J", "-l", "-i", image]);
    assertMatch(joliet.stdout, /Directory listing of \/level0\/level1\/level2\/level3\/level4\//);
    assertMatch(joliet.stdout, / same\.name\.tar\.gz $/m);
    assertMatch(joliet.stdout, / README\.txt $/m);
    // Joliet keeps 64 characters of a longer name, extension included.
    assertMatch(
      joliet.stdout,
      / a-file-name-that-is-much-longer-than-any-iso-9660-level-or-\.data $/m,
    );
    const plain = await runOk("isoinfo", ["-l", "-i", image]);
    assertMatch(plain.stdout, / README\.TXT;1 $/m);
    assertMatch(plain.stdout, / SAME_NAME_TAR\.GZ;1 $/m);
    assertMatch(plain.stdout, / SAME_NAME_TAR_1\.GZ;1 $/m);

    // Extraction: byte for byte, links and modes through Rock Ridge.
    const byOsirrox = `${dir.path}/osirrox`;
    await runOk("osirrox", ["-indev", image, "-extract", "/", byOsirrox]);
    await assertSameTree(src, byOsirrox, "osirrox");
    const byBsdtar = `${dir.path}/bsdtar`;
    await Deno.mkdir(byBsdtar);
    await runOk("bsdtar", ["-C", byBsdtar, "-xf", image]);
    await assertSameTree(src, byBsdtar, "bsdtar");
  },
});

Deno.test({
  name: "iso: without Rock Ridge and Joliet, plain ISO 9660 names; readers still agree",
  ...peers("isoinfo", "bsdtar", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src`;
    await Deno.mkdir(src);
    await Deno.mkdir(`${src}/sub dir`);
    await Deno.writeFile(`${src}/sub dir/hello world.txt`, randomBytes(3000, 3));
    await Deno.writeFile(`${src}/noext`, randomBytes(10, 4));
    await Deno.symlink("noext", `${src}/skipped-link`);
    const image = `${dir.path}/plain.iso`;
    await isoImage([src, "rock=false", "joliet=false"], image);
    const info = await runOk("isoinfo", ["-d", "-i", image]);
    assertMatch(info.stdout, /^NO Joliet present$/m);
    assertMatch(info.stdout, /^NO Rock Ridge present$/m);
    assertMatch(info.stdout, /^Volume id: NBD$/m);
    const list = await runOk("isoinfo", ["-l", "-i", image]);
    assertMatch(list.stdout, /Directory listing of \/SUB_DIR\//);
    assertMatch(list.stdout, / HELLO_WORLD\.TXT;1 $/m);
    assertMatch(list.stdout, / NOEXT\.;1 $/m);
    assertNotMatch(list.stdout, /LINK/);
    const out = `${dir.path}/out`;
    await Deno.mkdir(out);
    await runOk("bsdtar", ["-C", out, "-xf", image]);
    assertBytes(
      await Deno.readFile(`${out}/SUB_DIR/HELLO_WORLD.TXT`),
      await Deno.readFile(`${src}/sub dir/hello world.txt`),
    );
  },
});

Deno.test({
  name: "iso: a sparse 5 GiB file spans several extents; the image holds all of it",
  ...peers("xorriso", "osirrox", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src`;
    await Deno.mkdir(src);
    const size = 5 * 2 ** 30 + 12345;
    const big = await Deno.open(`${src}/big.bin`, { write: true, create: true });
    await big.truncate(size);
    // Data at the start, across the first extent's end (4 GiB - 2 KiB), past 4 GiB, at the end.
    for (
      const [at, seed] of [[0, 1], [0xfffff800 - 70000, 2], [2 ** 32 + 5000, 3], [size - 70000, 4]]
    ) {
      await big.seek(at, Deno.SeekMode.Start);
      await big.write(randomBytes(70000, seed));
    }
    big.close();
    await Deno.writeFile(`${src}/after.txt`, new TextEncoder().encode("after\n"));
    const image = `${dir.path}/big.iso`;
    // Holes of the source stay holes of the image (block status), so this copy is quick.
    await isoImage([src], image);
    const lba = await runOk("xorriso", [
      "-indev",
      image,
      "-find",
      "/big.bin",
      "-exec",
      "report_lba",
    ]);
    const extents = lba.stdout.split("\n").filter((l) => l.startsWith("File data lba:"));
    assertEquals(extents.length, 2, lba.stdout);
    for (const line of extents) assertMatch(line, new RegExp(`, ${size} , '/big\\.bin'$`));
    // Where xorriso finds each extent, the image holds the file's bytes (reading
    // the whole file back would mean 5 GiB of reading here): check the pieces
    // that hold data, across the extents' seam too.
    const parsed = extents.map((line) => line.split(",").map((f) => f.trim()));
    const seams = parsed.map((f) => ({ lba: Number(f[1]), blocks: Number(f[2]) }));
    const imageFile = await Deno.open(image);
    const original = await Deno.open(`${src}/big.bin`);
    const readAt = async (file: Deno.FsFile, at: number, length: number) => {
      const out = new Uint8Array(length);
      await file.seek(at, Deno.SeekMode.Start);
      for (let done = 0; done < length;) done += (await file.read(out.subarray(done)))!;
      return out;
    };
    const ranges = [[0, 80000], [0xfffff800 - 75000, 150000], [2 ** 32 + 4000, 72000], [
      size - 75000,
      75000,
    ]];
    for (const [at, length] of ranges) {
      const got = new Uint8Array(length);
      for (let done = 0; done < length;) {
        // The extent holding file offset at + done.
        let base = 0;
        let extent = seams[0]!;
        for (const s of seams) {
          if (at + done < base + s.blocks * 2048) {
            extent = s;
            break;
          }
          base += s.blocks * 2048;
        }
        const n = Math.min(length - done, base + extent.blocks * 2048 - (at + done));
        got.set(await readAt(imageFile, extent.lba * 2048 + at + done - base, n), done);
        done += n;
      }
      assertBytes(got, await readAt(original, at, length), `bytes ${at}+${length}`);
    }
    imageFile.close();
    original.close();
    const out = `${dir.path}/out`;
    await Deno.mkdir(out);
    await runOk("osirrox", ["-indev", image, "-extract", "/after.txt", `${out}/after.txt`]);
    assertEquals(await Deno.readTextFile(`${out}/after.txt`), "after\n");
  },
});

const isEio = (error: unknown) => error instanceof NbdError && error.errno === "EIO";

Deno.test("iso: a file that changes size while served reads as EIO, never foreign bytes", async () => {
  await using dir = await tempDir();
  await Deno.writeFile(`${dir.path}/a.bin`, randomBytes(100_000, 1));
  await Deno.writeFile(`${dir.path}/b.bin`, randomBytes(50_000, 2));
  const { backend, instance } = await openPlugin(isoPlugin, [dir.path]);
  try {
    const whole = new Uint8Array(backend.size());
    await backend.pread(whole, 0);
    const at = (data: Uint8Array) => {
      for (let i = 0; i + data.length <= whole.length; i += 2048) {
        if (
          whole[i] === data[0] && whole.subarray(i, i + data.length).every((b, j) => b === data[j])
        ) {
          return i;
        }
      }
      return -1;
    };
    const a = await Deno.readFile(`${dir.path}/a.bin`);
    const offset = at(a);
    assertOk(offset > 0, "the file's data is in the image");
    // Shrunk: the bytes are gone.
    await Deno.truncate(`${dir.path}/a.bin`, 60_000);
    // Past the new end: at once.
    await assertRejects(() => backend.pread(new Uint8Array(4096), offset + 61_440), isEio);
    // Anywhere in the file, once the size has been looked at again (every 0.1 s).
    await sleep(150);
    await assertRejects(() => backend.pread(new Uint8Array(4096), offset), isEio);
    // Grown: the directory records no longer describe it.
    await Deno.writeFile(`${dir.path}/a.bin`, randomBytes(200_000, 3));
    await sleep(150);
    await assertRejects(() => backend.pread(new Uint8Array(4096), offset), isEio);
    // The other file still reads.
    const b = await Deno.readFile(`${dir.path}/b.bin`);
    const got = new Uint8Array(b.length);
    await backend.pread(got, at(b));
    assertBytes(got, b);
  } finally {
    await backend.close();
    await instance.close?.();
  }
});

Deno.test("iso: a missing directory, a file instead, a bad label, a non-UTF-8 name: one line", async () => {
  await using dir = await tempDir();
  const nbd = await nbdExecutable();
  const serve = (...args: string[]) =>
    run(nbd, ["serve", "-U", `${dir.path}/sock`, "iso", ...args]);
  const missing = await serve(`${dir.path}/missing`);
  assertEquals(missing.code, 2, missing.stderr);
  assertMatch(missing.stderr, /^nbd: iso: cannot read .*missing: No such file or directory.*\n$/);
  await Deno.writeTextFile(`${dir.path}/file`, "x");
  const file = await serve(`${dir.path}/file`);
  assertEquals(file.stderr, `nbd: iso: ${dir.path}/file is not a directory\n`);
  const label = await serve(dir.path, `label=${"x".repeat(33)}`);
  assertEquals(label.stderr, "nbd: iso: label must be 1 to 32 printable ASCII characters\n");
  const rock = await serve(dir.path, "rock=maybe");
  assertEquals(rock.code, 2);
  assertEquals(rock.stderr.split("\n").length, 2, rock.stderr);
  // A name that is not UTF-8 cannot be opened by the name the runtime reads back.
  const src = `${dir.path}/src`;
  await Deno.mkdir(src);
  await Deno.writeTextFile(`${src}/fine.txt`, "x");
  await runOk("sh", ["-c", `printf x > "$1/$(printf 'bad-\\377-name')"`, "sh", src]);
  const notUtf8 = await serve(src);
  assertEquals(notUtf8.code, 2, notUtf8.stderr);
  assertEquals(
    notUtf8.stderr,
    `nbd: iso: a name in ${src} is not valid UTF-8 (read as "bad-\uFFFD-name"): rename it\n`,
  );
});

Deno.test({
  name: "iso: an unreadable file is named in a one-line error at start-up (run as nobody)",
  ignore: !hasCommand("setpriv") && !INTEROP_REQUIRED,
  async fn() {
    await using dir = await tempDir();
    await Deno.chmod(dir.path, 0o755);
    const src = `${dir.path}/src`;
    await Deno.mkdir(src, { mode: 0o755 });
    await Deno.writeTextFile(`${src}/readable.txt`, "yes");
    await Deno.writeTextFile(`${src}/secret.txt`, "no");
    await Deno.chmod(`${src}/secret.txt`, 0o600);
    await Deno.chmod(src, 0o755);
    const result = await runNbdAsNobody(dir.path, [
      "serve",
      "-U",
      `${dir.path}/deno-dir/sock`,
      "iso",
      src,
    ]);
    assertEquals(result.code, 2, result.stderr);
    assertEquals(result.stderr.split("\n").length, 2, result.stderr);
    assertMatch(result.stderr, /^nbd: iso: cannot read .*: .*permission denied.*secret\.txt/i);
  },
});
