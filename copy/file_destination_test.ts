import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { tempDir } from "../tests/helpers.ts";
import { FileDestination } from "./file_destination.ts";
import { FileSource } from "./file_source.ts";
import { WRITE_BEHIND_BUDGET } from "./writeback.ts";
import { copyImage } from "./scheduler.ts";
import { MemorySource, patterned, sparseFile } from "./_test_utils.ts";

const MiB = 1 << 20;

/** Names in `dir` (to see temporary files). */
async function names(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(dir)) out.push(entry.name);
  return out.sort();
}

const OPTIONS = {
  requests: 8,
  requestSize: 256 * 1024,
  sparseSize: 4096,
  allocated: false,
  destinationIsZero: false,
  extents: true,
};

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
