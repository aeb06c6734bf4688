/**
 * `nbd map --files` against the filesystems' own tools: for ext4, every
 * file's blocks must be exactly those `debugfs -R "blocks PATH"` lists,
 * and `icheck`/`ncheck` must name the same path for a block of each; for
 * FAT32 (made by the floppy plugin), every file's clusters must be those
 * `mshowfat` lists; and for ext4 inside GPT partition 2 (the partitioning
 * plugin), the same debugfs answers shifted by where `sfdisk` says the
 * partition starts.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { peers, ROOT, run, runOk, startNbdServe, tempDir } from "./helpers.ts";
import type { BlockOwners } from "../formats/block_owners.ts";

async function mapFiles(uri: string): Promise<BlockOwners> {
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "map",
    "--files",
    "--json",
    uri,
  ]);
  assertEquals(result.code, 0, result.stderr);
  return JSON.parse(result.stdout);
}

/** Blocks of `blockSize` bytes that `owner` owns, relative to `base`, sorted. */
function blocksOf(owners: BlockOwners, owner: string, blockSize: number, base = 0): number[] {
  const blocks: number[] = [];
  for (const e of owners.extents) {
    if (e.owner !== owner) continue;
    for (let o = e.offset; o < e.offset + e.length; o += blockSize) {
      blocks.push((o - base) / blockSize);
    }
  }
  return blocks.sort((a, b) => a - b);
}

/** A source tree: nested directories, long and odd names, a file big enough to need an index. */
async function makeTree(dir: string): Promise<string[]> {
  const files: Array<[string, number]> = [
    ["/hello.txt", 6],
    ["/docs/a long name, with spaces.txt", 5000],
    ["/docs/deeper/Mixed.Case.BIN", 70_000],
    ["/big/fragmented.dat", 3_000_000],
    ["/empty", 0],
  ];
  for (const [path, size] of files) {
    const full = dir + path;
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    const data = new Uint8Array(size);
    for (let i = 0; i < size; i++) data[i] = (i * 7 + path.length) & 255;
    await Deno.writeFile(full, data);
  }
  return files.filter(([, size]) => size > 0).map(([path]) => path);
}

/** debugfs's list of a file's data blocks. */
async function debugfsBlocks(image: string, path: string): Promise<number[]> {
  const out = await runOk("debugfs", ["-R", `blocks "${path}"`, image]);
  return out.stdout.trim().split(/\s+/).filter(Boolean).map(Number).sort((a, b) => a - b);
}

/** For each block, the path debugfs names through icheck (block → inode) and ncheck (inode → path). */
async function debugfsOwners(image: string, blocks: number[]): Promise<Map<number, string>> {
  const icheck = await runOk("debugfs", ["-R", `icheck ${blocks.join(" ")}`, image]);
  const inodeOf = new Map<number, number>();
  for (const line of icheck.stdout.split("\n").slice(1)) {
    const [block, inode] = line.trim().split(/\s+/);
    if (block && /^\d+$/.test(inode ?? "")) inodeOf.set(Number(block), Number(inode));
  }
  const inodes = [...new Set(inodeOf.values())];
  const ncheck = await runOk("debugfs", ["-R", `ncheck ${inodes.join(" ")}`, image]);
  const pathOf = new Map<number, string>();
  for (const line of ncheck.stdout.split("\n").slice(1)) {
    const m = /^(\d+)\s+(.*)$/.exec(line.trim());
    if (m) pathOf.set(Number(m[1]), `/${m[2]!.replace(/^\/+/, "")}`); // root files show as //NAME
  }
  return new Map(blocks.map((b) => [b, pathOf.get(inodeOf.get(b)!) ?? "?"]));
}

/** Checks every file's blocks in `owners` (offset `base`) against debugfs on `image`. */
async function checkExt(owners: BlockOwners, image: string, files: string[], base: number) {
  const blockSize = 4096;
  const samples: number[] = [];
  const expected = new Map<number, string>();
  for (const path of files) {
    const ours = blocksOf(owners, path, blockSize, base);
    assertEquals(ours, await debugfsBlocks(image, path), path);
    const middle = ours[Math.floor(ours.length / 2)]!;
    samples.push(middle);
    expected.set(middle, path);
  }
  assertEquals(await debugfsOwners(image, samples), expected);
}

Deno.test({
  name: "map --files: ext4 files named as debugfs names them (blocks, icheck, ncheck)",
  ...peers("mkfs.ext4", "debugfs"),
  async fn() {
    await using dir = await tempDir();
    const files = await makeTree(`${dir.path}/src`);
    const image = `${dir.path}/ext4.img`;
    await runOk("mkfs.ext4", ["-q", "-b", "4096", "-d", `${dir.path}/src`, image, "32M"]);
    await using server = await startNbdServe(["-r", "file", image]);
    const owners = await mapFiles(server.uri);
    assertEquals(owners.filesystems, [
      { partition: 0, offset: 0, length: 32 << 20, type: "ext4" },
    ]);
    await checkExt(owners, image, files, 0);
    // Directories and metadata are named too.
    const names = new Set(owners.extents.map((e) => e.owner));
    for (const name of ["/", "/docs/", "/docs/deeper/", "<superblock>", "<inode table, group 0>"]) {
      assertOk(names.has(name), name);
    }
    assertOk(names.has("<journal>"));
  },
});

Deno.test({
  name: "map --files: FAT32 of the floppy plugin, clusters as mshowfat lists them",
  ...peers("mshowfat", "minfo", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const files = await makeTree(`${dir.path}/src`);
    await using server = await startNbdServe(["-r", "floppy", `${dir.path}/src`]);
    const owners = await mapFiles(server.uri);
    assertEquals(owners.filesystems.map((f) => [f.partition, f.type]), [[1, "FAT32"]]);
    const image = `${dir.path}/floppy.img`;
    await runOk("nbdcopy", [server.uri, image]);
    // Where cluster 2 starts, from minfo's boot sector fields.
    const info = (await runOk("minfo", ["-i", `${image}@@1M`, "::"])).stdout;
    const field = (re: RegExp) => Number(re.exec(info)![1]);
    const sector = field(/sector size: (\d+) bytes/);
    const cluster = field(/cluster size: (\d+) sectors/) * sector;
    const dataStart = (1 << 20) +
      (field(/reserved \(boot\) sectors: (\d+)/) + field(/fats: (\d+)/) * field(/fatlen=(\d+)/i)) *
        sector;
    for (const path of files) {
      const shown = (await runOk("mshowfat", ["-i", `${image}@@1M`, `::${path}`])).stdout;
      const want: number[] = [];
      for (const m of shown.matchAll(/(\d+)(?:-(\d+))?/g)) {
        if (shown.indexOf("<") > m.index!) continue; // digits in the name
        for (let c = Number(m[1]); c <= Number(m[2] ?? m[1]); c++) want.push(c);
      }
      const ours = blocksOf(owners, path, cluster, dataStart).map((c) => c + 2);
      assertEquals(ours, want, path);
    }
    const names = new Set(owners.extents.map((e) => e.owner));
    for (const name of ["<MBR>", "<FAT 1>", "<FAT 2>", "/", "/docs/", "/docs/deeper/"]) {
      assertOk(names.has(name), name);
    }
  },
});

Deno.test({
  name: "map --files: ext4 in GPT partition 2 of the partitioning plugin",
  ...peers("mkfs.ext4", "debugfs", "sfdisk", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const files = await makeTree(`${dir.path}/src`);
    const image = `${dir.path}/ext4.img`;
    await runOk("mkfs.ext4", ["-q", "-b", "4096", "-d", `${dir.path}/src`, image, "16M"]);
    await Deno.writeFile(`${dir.path}/first.img`, new Uint8Array(1 << 20));
    await using server = await startNbdServe([
      "-r",
      "partitioning",
      `${dir.path}/first.img`,
      image,
      "partition-type=gpt",
    ]);
    const owners = await mapFiles(server.uri);
    const disk = `${dir.path}/disk.img`;
    await runOk("nbdcopy", [server.uri, disk]);
    const table = JSON.parse((await runOk("sfdisk", ["--json", disk])).stdout).partitiontable;
    assertEquals(table.label, "gpt");
    const start = table.partitions[1].start * (table.sectorsize ?? 512);
    assertEquals(owners.filesystems.map((f) => [f.partition, f.offset, f.type]), [
      [1, table.partitions[0].start * 512, "unknown"], // zeroes: no filesystem
      [2, start, "ext4"],
    ]);
    await checkExt(owners, image, files, start);
    const names = new Set(owners.extents.map((e) => e.owner));
    for (
      const name of ["<protective MBR>", "<GPT header>", "<GPT entries>", "<backup GPT header>"]
    ) {
      assertOk(names.has(name), name);
    }
  },
});

Deno.test("map --files: a disk without a known filesystem is a one-line error", async () => {
  await using server = await startNbdServe(["-r", "memory", "1M"]);
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "map",
    "--files",
    server.uri,
  ]);
  assertEquals(result.code, 1);
  assertOk(/^nbd: no ext2\/3\/4 or FAT filesystem found/.test(result.stderr), result.stderr);
});
