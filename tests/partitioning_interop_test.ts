/**
 * The partitioning plugin against real partitioning tools: sfdisk, sgdisk
 * and parted read our GPT and MBR disks (logical partitions included)
 * without complaint, each partition read back through the partition
 * filter equals its file, and writes land in the files in place while the
 * generated table refuses changes.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { assertBytes, assertEquals, assertMatch, assertNotMatch, assertOk } from "./assert.ts";
import {
  eventually,
  hasCommand,
  INTEROP_REQUIRED,
  nbdExecutable,
  peers,
  randomBytes,
  readExport,
  run,
  runNbdAsNobody,
  runOk,
  startNbdServe,
  startServer,
  tempDir,
} from "./helpers.ts";
import { mountable, type MountScratch, mountScratch } from "./mount_helpers.ts";

const MiB = 1 << 20;

/** Files of assorted sizes: whole MiBs, an odd size, one byte, a sparse one. */
async function makeFiles(dir: string, count: number): Promise<string[]> {
  const sizes = [3 * MiB, 5_000_000, 1, 2 * MiB + 512, 700 * 1024, 12345];
  const paths: string[] = [];
  for (let i = 0; i < count; i++) {
    const path = `${dir}/part${i + 1}.img`;
    await Deno.writeFile(path, randomBytes(sizes[i % sizes.length]!, 100 + i));
    paths.push(path);
  }
  const sparse = `${dir}/sparse.img`;
  const file = await Deno.open(sparse, { write: true, create: true });
  await file.truncate(16 * MiB);
  await file.seek(9 * MiB, Deno.SeekMode.Start);
  await file.write(randomBytes(4096, 99));
  file.close();
  paths.splice(1, 0, sparse);
  return paths;
}

/** The disk as an image file, copied out of a served partitioning export. */
async function diskImage(args: string[], out: string): Promise<void> {
  await using server = await startNbdServe(["-r", "partitioning", ...args]);
  await runOk(await nbdExecutable(), ["copy", server.uri, out]);
}

/** Partition numbers as tools name them: logical MBR partitions start at 5. */
function partitionNumbers(count: number, type: "gpt" | "mbr"): number[] {
  return Array.from(
    { length: count },
    (_, i) => type === "mbr" && count > 4 && i >= 3 ? i + 2 : i + 1,
  );
}

async function checkTools(image: string, type: "gpt" | "mbr", count: number): Promise<void> {
  const dump = await runOk("sfdisk", ["--dump", image]);
  assertMatch(dump.stdout, new RegExp(`label: ${type === "gpt" ? "gpt" : "dos"}`));
  const lines = dump.stdout.split("\n").filter((l) => l.startsWith(`${image}`));
  // MBR with logical partitions also lists the extended partition.
  assertEquals(lines.length, type === "mbr" && count > 4 ? count + 1 : count, dump.stdout);
  assertEquals(dump.stderr, "");
  const verify = await runOk("sfdisk", ["--verify", image]);
  assertMatch(verify.stdout, /No errors detected/);
  if (type === "gpt") {
    const sgdisk = await runOk("sgdisk", ["-v", image]);
    assertMatch(sgdisk.stdout, /No problems found/);
    assertNotMatch(sgdisk.stdout, /Problem:|Warning:|corrupt/i);
  }
  const parted = await run("parted", ["-s", image, "print"]);
  assertEquals(parted.code, 0, parted.stderr);
  assertEquals(parted.stderr, "");
  assertNotMatch(parted.stdout, /Warning|Error|fix/i);
  for (const n of partitionNumbers(count, type)) {
    assertMatch(parted.stdout, new RegExp(`^ *${n} `, "m"), parted.stdout);
  }
}

for (const [type, count] of [["gpt", 4], ["mbr", 3], ["mbr", 6]] as const) {
  Deno.test({
    name: `partitioning ${type} with ${count} partitions: sfdisk, sgdisk, parted agree`,
    ...peers("sfdisk", "sgdisk", "parted"),
    async fn() {
      await using dir = await tempDir();
      const files = await makeFiles(dir.path, count - 1);
      const image = `${dir.path}/disk.img`;
      await diskImage([...files, `partition-type=${type}`], image);
      await checkTools(image, type, count);
      // Each partition, read through the partition filter, is its file then zero padding.
      const numbers = partitionNumbers(count, type);
      for (let i = 0; i < files.length; i++) {
        await using server = await startNbdServe([
          "-r",
          "--filter=partition",
          "partitioning",
          ...files,
          `partition-type=${type}`,
          `partition=${numbers[i]}`,
        ]);
        const read = await readExport(server.uri);
        const expected = await Deno.readFile(files[i]!);
        assertEquals(read.length, Math.ceil(expected.length / 512) * 512);
        assertBytes(read.subarray(0, expected.length), expected, files[i]);
        assertOk(read.subarray(expected.length).every((b) => b === 0), "padding reads as zeroes");
      }
    },
  });
}

Deno.test({
  name: "partitioning: the same files give the same disk, types and alignment as asked",
  ...peers("sfdisk"),
  async fn() {
    await using dir = await tempDir();
    const files = await makeFiles(dir.path, 2);
    const one = `${dir.path}/one.img`;
    const two = `${dir.path}/two.img`;
    await diskImage(
      [...files, "partition-type=gpt", "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"],
      one,
    );
    await diskImage(
      [...files, "partition-type=gpt", "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"],
      two,
    );
    assertBytes(await Deno.readFile(one), await Deno.readFile(two));
    const dump = (await runOk("sfdisk", ["--dump", one])).stdout;
    assertEquals(dump.match(/type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B/g)?.length, 3, dump);
    const mbr = `${dir.path}/mbr.img`;
    await diskImage([...files, "alignment=64K", "mbr-id=0x0c", "mbr-id=0x83", "mbr-id=7"], mbr);
    const mbrDump = (await runOk("sfdisk", ["--dump", mbr])).stdout;
    assertMatch(mbrDump, /start=\s*128, size=\s*6144, type=c\n/);
    assertMatch(mbrDump, /type=83\n/);
    assertMatch(mbrDump, /type=7\n/);
  },
});

Deno.test("partitioning: writes land in the files; the table refuses changes", async () => {
  await using dir = await tempDir();
  const files = await makeFiles(dir.path, 2);
  await using server = await startNbdServe(["partitioning", ...files, "partition-type=gpt"]);
  await using client = await NbdClient.connect(server.uri);
  // Partition 2 (the sparse file) starts after partition 1 (3 MiB at 1 MiB), at 4 MiB.
  const data = randomBytes(10000, 7);
  await client.pwrite(data, 4 * MiB + 9 * MiB - 5000);
  await client.flush();
  const sparse = await Deno.readFile(files[1]!);
  assertBytes(sparse.subarray(9 * MiB - 5000, 9 * MiB + 5000), data);
  // A write across the end of partition 1's file into the padding after it is refused
  // unless the padding part is zero; nothing is written then.
  const header = new Uint8Array(512);
  await client.pread(header, 512);
  await client.pwrite(header, 512); // the same bytes: accepted
  const changed = header.slice();
  changed[100] ^= 1;
  let refused = "";
  try {
    await client.pwrite(changed, 512);
  } catch (error) {
    refused = (error as Error).message;
  }
  assertMatch(refused, /EPERM/);
  const after = new Uint8Array(512);
  await client.pread(after, 512);
  assertBytes(after, header);
});

Deno.test({
  name: "partitioning: NBD exports as partitions, read and written through to nbdkit",
  ...peers("nbdkit", "sfdisk", "nbdcopy", "qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const [file] = await makeFiles(dir.path, 1);
    const content = randomBytes(3 * MiB, 61);
    const seed = `${dir.path}/seed.img`;
    await Deno.writeFile(seed, content);
    // A copy-on-write overlay over the seed: the export reads as the seed, writes stay in nbdkit.
    await using upstream = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      "--filter=cow",
      "file",
      seed,
    ]);
    await using server = await startNbdServe([
      "partitioning",
      file!,
      upstream.uri,
      "partition-type=gpt",
    ]);
    const disk = `${dir.path}/disk.img`;
    await runOk("nbdcopy", [server.uri, disk]);
    const dump = (await runOk("sfdisk", ["--dump", disk])).stdout;
    const starts = [...dump.matchAll(/start=\s*(\d+), size=\s*(\d+)/g)].map((m) => Number(m[1]));
    assertEquals(starts.length, 2, dump);
    const image = await Deno.readFile(disk);
    const second = starts[1]! * 512;
    assertBytes(image.subarray(second, second + content.length), content);
    // A write into partition 2 lands in nbdkit's overlay, not in the seed file.
    await runOk("qemu-io", [
      "-f",
      "raw",
      "-c",
      `write -P 0x5a ${second + 4096} 65536`,
      server.uri.replace(/^nbd\+unix:\/\/\/\?socket=/, "nbd:unix:"),
    ]);
    const overlay = `${dir.path}/overlay.img`;
    await runOk("nbdcopy", [upstream.uri, overlay]);
    const expected = content.slice();
    expected.fill(0x5a, 4096, 4096 + 65536);
    assertBytes(await Deno.readFile(overlay), expected);
    assertBytes(await Deno.readFile(seed), content);
  },
});

Deno.test("partitioning: an NBD URI nobody serves is a one-line error", async () => {
  await using dir = await tempDir();
  const result = await run(await nbdExecutable(), [
    "serve",
    "partitioning",
    `nbd+unix:///?socket=${dir.path}/nobody.sock`,
    "-U",
    `${dir.path}/sock`,
  ]);
  assertOk(result.code === 1 || result.code === 2, `exit ${result.code}`);
  assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
  assertMatch(result.stderr, /^nbd: partitioning: cannot open nbd\+unix:.*nobody\.sock/);
});

Deno.test("partitioning: a missing file is a one-line error", async () => {
  await using dir = await tempDir();
  const result = await run(await nbdExecutable(), [
    "serve",
    "partitioning",
    `${dir.path}/missing.img`,
    "-U",
    `${dir.path}/sock`,
  ]);
  assertOk(result.code === 1 || result.code === 2, `exit ${result.code}`);
  assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
  assertMatch(result.stderr, /^nbd: partitioning: cannot open .*missing\.img/);
  const bad = await run(await nbdExecutable(), [
    "serve",
    "partitioning",
    "/etc/hostname",
    "partition-type=apm",
    "-U",
    `${dir.path}/sock`,
  ]);
  assertEquals([bad.code, bad.stderr], [
    2,
    'nbd: partitioning: partition-type must be gpt or mbr, got "apm"\n',
  ]);
});

Deno.test({
  name: "partitioning: a file that changes size never lends bytes to its neighbours",
  ...peers("nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    const a = `${dir.path}/a.img`;
    const b = `${dir.path}/b.img`;
    const aData = randomBytes(MiB + 100, 31);
    const bData = randomBytes(2 * MiB, 32);
    await Deno.writeFile(a, aData);
    await Deno.writeFile(b, bData);
    await using server = await startNbdServe(["partitioning", a, b, "partition-type=gpt"]);
    await using client = await NbdClient.connect(server.uri);
    // Partition 1 at 1 MiB (MiB + 100 bytes, padded to MiB + 512), partition 2 at 3 MiB.
    const region = new Uint8Array(2 * MiB);
    await client.pread(region, MiB);
    assertBytes(region.subarray(0, aData.length), aData);
    assertOk(region.subarray(aData.length).every((x) => x === 0));
    // Shrunk under an open connection: what is gone reads as zeroes, the padding
    // stays zero, and partition 2 is untouched.
    await Deno.truncate(a, 500_000);
    await client.pread(region, MiB);
    assertBytes(region.subarray(0, 500_000), aData.subarray(0, 500_000));
    assertOk(region.subarray(500_000).every((x) => x === 0), "zeroes past the shrunk end");
    const second = new Uint8Array(bData.length);
    await client.pread(second, 3 * MiB);
    assertBytes(second, bData);
    // Grown: the partition still ends where the table says; the new bytes stay out.
    const grown = randomBytes(3 * MiB, 33);
    await Deno.writeFile(a, grown);
    await client.pread(region, MiB);
    assertBytes(region.subarray(0, aData.length), grown.subarray(0, aData.length));
    assertOk(region.subarray(aData.length).every((x) => x === 0), "padding stays zero");
    await client.pread(second, 3 * MiB);
    assertBytes(second, bData);
    // A new connection is refused, and the server says why in one line.
    const refused = await run("nbdinfo", ["--size", server.uri]);
    assertEquals(refused.code, 1, refused.stdout);
    await eventually(() => /changed size/.test(server.stderr()));
    const lines = server.stderr().split("\n").filter((l) => /changed size/.test(l));
    assertEquals(lines.length, 1, server.stderr());
    assertMatch(lines[0]!, /^nbd: .*a\.img changed size since the partition table was made$/);
  },
});

Deno.test({
  name: "partitioning: an unreadable file is a one-line error at start-up (run as nobody)",
  ignore: !hasCommand("setpriv") && !INTEROP_REQUIRED,
  async fn() {
    await using dir = await tempDir();
    const readable = `${dir.path}/readable.img`;
    const secret = `${dir.path}/secret.img`;
    await Deno.writeFile(readable, randomBytes(4096, 1));
    await Deno.writeFile(secret, randomBytes(4096, 2));
    await Deno.chmod(readable, 0o644);
    await Deno.chmod(secret, 0o600);
    const result = await runNbdAsNobody(dir.path, [
      "serve",
      "-r",
      "-U",
      `${dir.path}/deno-dir/sock`,
      "partitioning",
      readable,
      secret,
    ]);
    assertEquals(result.code, 2, result.stderr);
    assertEquals(result.stderr.split("\n").length, 2, result.stderr);
    assertMatch(
      result.stderr,
      /^nbd: partitioning: cannot open .*secret\.img: .*permission denied/i,
    );
  },
});

/** `nbd attach ARGS`: the loop device it printed. */
async function attachDevice(scratch: MountScratch, args: string[]): Promise<string> {
  const result = await scratch.nbd(["attach", ...args]);
  assertEquals(result.code, 0, result.stderr);
  const device = result.stdout.trim();
  assertMatch(device, /^\/dev\/loop\d+$/);
  return device;
}

Deno.test({
  name: "partitioning: ext4 made in a partition mounts through nbd attach, by filter and offset",
  ...mountable(),
  ...peers("mkfs.ext4", "e2fsck", "debugfs", "sfdisk", "mount", "umount", "losetup"),
  async fn() {
    await using scratch = await mountScratch();
    const src = `${scratch.dir}/src`;
    await Deno.mkdir(`${src}/dir`, { recursive: true });
    const big = randomBytes(3 * MiB + 77, 41);
    await Deno.writeFile(`${src}/dir/big.bin`, big);
    await Deno.writeTextFile(`${src}/hello.txt`, "hello from a partition\n");
    const boot = `${scratch.dir}/boot.img`;
    await Deno.writeFile(boot, randomBytes(5 * MiB, 42));
    const root = `${scratch.dir}/root.img`;
    await runOk("mkfs.ext4", ["-q", "-F", "-L", "CIROOT", "-d", src, root, "48M"]);
    const bootBefore = await Deno.readFile(boot);

    // By the partition filter: the device is partition 2 only; a file written lands in root.img.
    {
      await using server = await startNbdServe([
        "--filter=partition",
        "partitioning",
        boot,
        root,
        "partition-type=gpt",
        "partition=2",
      ]);
      const device = await attachDevice(scratch, [server.uri]);
      try {
        await runOk("mount", [device, scratch.mnt]);
        try {
          assertEquals(
            await Deno.readTextFile(`${scratch.mnt}/hello.txt`),
            "hello from a partition\n",
          );
          assertBytes(await Deno.readFile(`${scratch.mnt}/dir/big.bin`), big);
          await Deno.writeTextFile(`${scratch.mnt}/written.txt`, "written through nbd attach\n");
        } finally {
          await runOk("umount", [scratch.mnt]);
        }
      } finally {
        const detached = await scratch.nbd(["detach", device]);
        assertEquals(detached.code, 0, detached.stderr);
      }
    }
    await runOk("e2fsck", ["-fn", root]);
    const cat = await runOk("debugfs", ["-R", "cat /written.txt", root]);
    assertEquals(cat.stdout, "written through nbd attach\n");
    assertBytes(await Deno.readFile(boot), bootBefore, "the other partition's file is untouched");

    // The whole disk, read-only: sfdisk reads the table from the device, and the file system
    // mounts at partition 2's offset.
    {
      await using server = await startNbdServe(["-r", "partitioning", boot, root]);
      const device = await attachDevice(scratch, ["-r", server.uri]);
      try {
        const table = JSON.parse((await runOk("sfdisk", ["--json", device])).stdout);
        const [, second] = table.partitiontable.partitions as Array<{ start: number }>;
        const offset = second!.start * 512;
        assertEquals(offset, 6 * MiB, "5 MiB at 1 MiB, aligned to 1 MiB");
        await runOk("mount", ["-o", `ro,offset=${offset}`, device, scratch.mnt]);
        try {
          assertEquals(
            await Deno.readTextFile(`${scratch.mnt}/written.txt`),
            "written through nbd attach\n",
          );
          assertBytes(await Deno.readFile(`${scratch.mnt}/dir/big.bin`), big);
        } finally {
          await runOk("umount", [scratch.mnt]);
        }
      } finally {
        const detached = await scratch.nbd(["detach", device]);
        assertEquals(detached.code, 0, detached.stderr);
      }
    }
  },
});
