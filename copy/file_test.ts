import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { peers, randomBytes, tempDir } from "../tests/helpers.ts";
import * as fs from "node:fs";
import { FileDestination, FileSource, WriteBehind } from "./file.ts";
import { WRITE_BEHIND_BUDGET } from "./writeback.ts";
import { copyImage } from "./scheduler.ts";
import { MemorySource, patterned } from "./_test_utils.ts";

const MiB = 1 << 20;

/** Names in `dir` (to see temporary files). */
async function names(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(dir)) out.push(entry.name);
  return out.sort();
}

/** A 4 MiB sparse file with data at 1 MiB and at the last 4 KiB. */
async function sparseFile(path: string): Promise<Uint8Array> {
  const expected = new Uint8Array(4 * MiB);
  const a = randomBytes(64 * 1024, 3);
  const b = randomBytes(4096, 4);
  expected.set(a, MiB);
  expected.set(b, 4 * MiB - 4096);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(4 * MiB);
  await file.seek(MiB, Deno.SeekMode.Start);
  await file.write(a);
  await file.seek(4 * MiB - 4096, Deno.SeekMode.Start);
  await file.write(b);
  file.close();
  return expected;
}

const OPTIONS = {
  requests: 8,
  requestSize: 256 * 1024,
  sparseSize: 4096,
  allocated: false,
  destinationIsZero: false,
  extents: true,
};

Deno.test("FileSource reports the holes of a sparse file", async () => {
  await using dir = await tempDir();
  await sparseFile(`${dir.path}/in.img`);
  const source = await FileSource.open(`${dir.path}/in.img`);
  assertOk(source instanceof FileSource);
  assertEquals(source.size, 4 * MiB);
  assertOk(source.canExtents);
  const extents = await source.extents(0, 4 * MiB);
  const data = extents.filter((e) => !e.zero);
  // Filesystems allocate in blocks of their own size: the data runs cover the writes.
  assertOk(data.some((e) => e.offset <= MiB && e.offset + e.length >= MiB + 64 * 1024));
  assertOk(data.reduce((n, e) => n + e.length, 0) < MiB, "most of the file is a hole");
  let at = 0;
  for (const e of extents) {
    assertEquals(e.offset, at);
    at += e.length;
  }
  assertEquals(at, 4 * MiB);
  await source.close();
});

Deno.test("FileDestination writes a new file under a temporary name, renamed on success", async () => {
  await using dir = await tempDir();
  const expected = await sparseFile(`${dir.path}/in.img`);
  const source = await FileSource.open(`${dir.path}/in.img`);
  const destination = await FileDestination.open(`${dir.path}/out.img`, source.size);
  assertEquals(destination.isZero, true);
  const during = await names(dir.path);
  assertEquals(during.length, 2);
  assertOk(during.some((n) => n.startsWith(".out.img.nbd-copy-")), during.join(","));
  await copyImage(source, destination, OPTIONS);
  await destination.close(true);
  await source.close();
  assertEquals(await names(dir.path), ["in.img", "out.img"]);
  assertBytes(await Deno.readFile(`${dir.path}/out.img`), expected);
  const blocks = (await Deno.stat(`${dir.path}/out.img`)).blocks!;
  assertOk(blocks * 512 < MiB, `the copy stayed sparse (${blocks} blocks)`);
});

Deno.test("FileDestination removes a new file when the copy fails", async () => {
  await using dir = await tempDir();
  const destination = await FileDestination.open(`${dir.path}/out.img`, MiB);
  await destination.write(new Uint8Array(4096).fill(1), 0);
  assertEquals(destination.incompleteNote(), `${dir.path}/out.img was not created`);
  await destination.close(false);
  assertEquals(await names(dir.path), []);
});

Deno.test("FileDestination overwrites an existing file in place, holes punched", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/out.img`;
  await Deno.writeFile(path, new Uint8Array(3 * MiB).fill(0xaa));
  await Deno.chmod(path, 0o640);
  const inode = (await Deno.stat(path)).ino;
  const holes = [{ offset: 0, length: MiB, zero: true }];
  const data = patterned(2 * MiB + 5, holes);
  const destination = await FileDestination.open(path, data.length);
  assertEquals(destination.isZero, false);
  assertEquals(destination.incompleteNote(), `${path} is incomplete (it was partly overwritten)`);
  await copyImage(new MemorySource(data, holes), destination, OPTIONS);
  await destination.close(true);
  const after = await Deno.stat(path);
  assertEquals([after.size, after.ino, after.mode! & 0o777], [data.length, inode, 0o640]);
  assertBytes(await Deno.readFile(path), data);
  assertOk(after.blocks! * 512 <= MiB + 64 * 1024, `the zero run was punched (${after.blocks})`);
});

Deno.test("FileDestination zero() punches holes, or keeps them allocated when asked", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/out.img`;
  const destination = await FileDestination.open(path, 2 * MiB);
  await destination.write(new Uint8Array(2 * MiB).fill(7), 0);
  await destination.zero(0, MiB, false);
  await destination.zero(MiB, 64 * 1024, true);
  await destination.flush();
  await destination.close(true);
  const bytes = await Deno.readFile(path);
  assertEquals([bytes[0], bytes[MiB - 1], bytes[MiB], bytes[MiB + 65535], bytes[MiB + 65536]], [
    0,
    0,
    0,
    0,
    7,
  ]);
  const blocks = (await Deno.stat(path)).blocks!;
  assertOk(blocks * 512 <= MiB + 4096, `the punched half is a hole (${blocks} blocks)`);
});

Deno.test("FileDestination refuses to copy a file onto itself", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/disk.img`;
  await Deno.writeFile(path, new Uint8Array(4096).fill(1));
  const source = await FileSource.open(path);
  assertOk(source instanceof FileSource);
  await assertRejects(
    () => FileDestination.open(path, source.size, source.identity),
    Error,
    "onto itself",
  );
  await source.close();
  assertEquals((await Deno.readFile(path))[0], 1);
});

Deno.test("WriteBehind flushes and drops written ranges without losing data", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/out.img`;
  const fd = fs.openSync(path, "w");
  const behind = new WriteBehind(fd, MiB, 2 * MiB);
  const data = randomBytes(8 * MiB, 17);
  // Out of order and concurrent, as the copy's lanes write.
  const order = Array.from({ length: 32 }, (_, i) => (i * 13) % 32);
  await Promise.all(order.map(async (i) => {
    const piece = data.subarray(i * 256 * 1024, (i + 1) * 256 * 1024);
    fs.writeSync(fd, piece, 0, piece.length, i * 256 * 1024);
    await behind.written(i * 256 * 1024, piece.length);
  }));
  fs.closeSync(fd);
  assertBytes(await Deno.readFile(path), data);
});

Deno.test("a copy into a file leaves at most the write-behind budget of it in the page cache", async () => {
  await using dir = await tempDir();
  const size = 192 * MiB;
  const data = patterned(size);
  const destination = await FileDestination.open(`${dir.path}/out.img`, size);
  await copyImage(new MemorySource(data), destination, OPTIONS);
  await destination.close(true);
  const fincore = await new Deno.Command("fincore", {
    args: ["--bytes", "--noheadings", "--output", "RES", `${dir.path}/out.img`],
  }).output();
  assertOk(
    fincore.success,
    `fincore (util-linux) failed: ${new TextDecoder().decode(fincore.stderr)}`,
  );
  const resident = Number(new TextDecoder().decode(fincore.stdout).trim());
  // The budget, the window being filled and one the writers may run ahead by.
  assertOk(
    resident <= WRITE_BEHIND_BUDGET + 16 * MiB,
    `${resident >> 20} MiB of the ${size >> 20} MiB copy stayed in the page cache`,
  );
  assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
});

Deno.test({
  name: "WriteBehind: nothing reaches the descriptor once stop() has resolved",
  ...peers("strace"),
  async fn() {
    await using dir = await tempDir();
    const script = `${dir.path}/behind.ts`;
    // Windows of 1 MiB with a 1 MiB budget: every write past the first starts a retire.
    await Deno.writeTextFile(
      script,
      `import { WriteBehind } from ${JSON.stringify(new URL("./file.ts", import.meta.url).href)};
import { closeFd, O_CREAT, O_WRONLY, openFd, pwrite } from ${
        JSON.stringify(new URL("../io/libc.ts", import.meta.url).href)
      };
const fd = openFd(${JSON.stringify(`${dir.path}/data`)}, O_WRONLY | O_CREAT)!;
const behind = new WriteBehind(fd, ${MiB}, ${MiB});
const chunk = new Uint8Array(${MiB}).fill(7);
const write = (i: number) => {
  pwrite(fd, chunk, i * ${MiB});
  void behind.written(i * ${MiB}, ${MiB});
};
for (let i = 0; i < 4; i++) write(i);
// Time for the first windows to be retired; the next ones are still on their way at the close.
await new Promise((resolve) => setTimeout(resolve, 100));
for (let i = 4; i < 8; i++) write(i);
await behind.stop();
closeFd(fd);
console.log(fd);
await new Promise((resolve) => setTimeout(resolve, 200));
`,
    );
    const log = `${dir.path}/trace`;
    const output = await new Deno.Command("strace", {
      args: [
        "-f",
        "-qq",
        "-o",
        log,
        "-e",
        "trace=close,pwrite64,sync_file_range,fadvise64",
        Deno.execPath(),
        "run",
        "-A",
        "--quiet",
        script,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assertOk(output.success, new TextDecoder().decode(output.stderr));
    const fd = Number(new TextDecoder().decode(output.stdout).trim());
    const lines = (await Deno.readTextFile(log)).split("\n");
    // The descriptor's number may have been used and closed before: the close that counts
    // is the first one after the script's writes.
    const lastWrite = lines.findLastIndex((line) => line.includes(`pwrite64(${fd},`));
    const closed = lines.findIndex((line, i) => i > lastWrite && line.includes(`close(${fd})`));
    assertOk(lastWrite >= 0 && closed >= 0, `no write and close of ${fd} in the trace`);
    const retired = lines.slice(0, closed).filter((line) => line.includes(`fadvise64(${fd},`));
    assertOk(retired.length > 0, "no window was retired before the close");
    const late = lines.slice(closed).filter((line) =>
      new RegExp(`(sync_file_range|fadvise64)\\(${fd},`).test(line)
    );
    assertEquals(late, []);
  },
});
