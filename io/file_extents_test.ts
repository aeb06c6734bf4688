import { assertEquals } from "../tests/assert.ts";
import { tempDir } from "../tests/helpers.ts";
import { closeFd, O_NONBLOCK, O_RDONLY, O_RDWR, openFd } from "./libc.ts";
import { type FileExtent, fileExtents } from "./file_extents.ts";

const KiB = 1024;
const MiB = 1 << 20;

/**
 * A 4 MiB file with data only at [1 MiB, 1 MiB + 64 KiB) and in its last
 * 64 KiB: holes at the start and between. The runs are whole 64 KiB, so
 * that any filesystem block size up to that reports them exactly.
 */
async function sparseFile(path: string): Promise<number> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(4 * MiB);
  await file.seek(MiB, Deno.SeekMode.Start);
  await file.write(new Uint8Array(64 * KiB).fill(1));
  await file.seek(4 * MiB - 64 * KiB, Deno.SeekMode.Start);
  await file.write(new Uint8Array(64 * KiB).fill(2));
  file.close();
  return openFd(path, O_RDONLY)!;
}

const hole = (offset: number, length: number): FileExtent => ({ offset, length, zero: true });
const data = (offset: number, length: number): FileExtent => ({ offset, length, zero: false });

Deno.test("fileExtents: a hole at the start, data between holes, data at the end", async () => {
  await using dir = await tempDir();
  const fd = await sparseFile(`${dir.path}/sparse`);
  try {
    assertEquals(fileExtents(fd, 0, 4 * MiB), [
      hole(0, MiB),
      data(MiB, 64 * KiB),
      hole(MiB + 64 * KiB, 3 * MiB - 128 * KiB),
      data(4 * MiB - 64 * KiB, 64 * KiB),
    ]);
    // A range that starts and ends inside runs is cut to them.
    assertEquals(fileExtents(fd, MiB - 4 * KiB, 72 * KiB), [
      hole(MiB - 4 * KiB, 4 * KiB),
      data(MiB, 64 * KiB),
      hole(MiB + 64 * KiB, 4 * KiB),
    ]);
    assertEquals(fileExtents(fd, 0, 0), []);
  } finally {
    closeFd(fd);
  }
});

Deno.test("fileExtents: a range inside one hole, and one inside one data run", async () => {
  await using dir = await tempDir();
  const fd = await sparseFile(`${dir.path}/sparse`);
  try {
    assertEquals(fileExtents(fd, 2 * MiB, 4 * KiB), [hole(2 * MiB, 4 * KiB)]);
    assertEquals(fileExtents(fd, 128 * KiB, 512 * KiB), [hole(128 * KiB, 512 * KiB)]);
    assertEquals(fileExtents(fd, MiB + 4 * KiB, 8 * KiB), [data(MiB + 4 * KiB, 8 * KiB)]);
  } finally {
    closeFd(fd);
  }
});

Deno.test("fileExtents: past the end of the file reads as zeroes", async () => {
  await using dir = await tempDir();
  const fd = await sparseFile(`${dir.path}/sparse`);
  try {
    // Data up to the end of the file, then the space beyond it.
    assertEquals(fileExtents(fd, 4 * MiB - 8 * KiB, 24 * KiB), [
      data(4 * MiB - 8 * KiB, 8 * KiB),
      hole(4 * MiB, 16 * KiB),
    ]);
    // A hole up to the end of the file, and beyond.
    assertEquals(fileExtents(fd, 2 * MiB, 3 * MiB), [
      hole(2 * MiB, 2 * MiB - 64 * KiB),
      data(4 * MiB - 64 * KiB, 64 * KiB),
      hole(4 * MiB, MiB),
    ]);
    // Wholly past the end.
    assertEquals(fileExtents(fd, 8 * MiB, 4 * KiB), [hole(8 * MiB, 4 * KiB)]);
  } finally {
    closeFd(fd);
  }
});

Deno.test("fileExtents: a file without holes is one data run", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/full`;
  await Deno.writeFile(path, new Uint8Array(256 * KiB).fill(3));
  const fd = openFd(path, O_RDONLY)!;
  try {
    assertEquals(fileExtents(fd, 0, 256 * KiB), [data(0, 256 * KiB)]);
  } finally {
    closeFd(fd);
  }
});

Deno.test("fileExtents: undefined where SEEK_DATA is not supported", async () => {
  await using dir = await tempDir();
  // A FIFO cannot seek (ESPIPE); opened for reading and writing, the open never waits.
  const fifo = `${dir.path}/fifo`;
  const made = await new Deno.Command("mkfifo", { args: [fifo] }).output();
  assertEquals(made.success, true, "mkfifo");
  const fd = openFd(fifo, O_RDWR | O_NONBLOCK)!;
  try {
    assertEquals(fileExtents(fd, 0, 4 * KiB), undefined);
  } finally {
    closeFd(fd);
  }
  // Nor on a descriptor that is not open.
  assertEquals(fileExtents(-1, 0, 4 * KiB), undefined);
});
