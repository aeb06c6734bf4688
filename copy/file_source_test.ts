import { assertEquals, assertOk } from "../tests/assert.ts";
import { tempDir } from "../tests/helpers.ts";
import { FileSource } from "./file_source.ts";
import { sparseFile } from "./_test_utils.ts";

const MiB = 1 << 20;

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
