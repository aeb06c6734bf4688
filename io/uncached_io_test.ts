import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { linuxPaths, randomBytes, runOk, tempDir } from "../tests/helpers.ts";
import { closeFd, O_DIRECT, O_RDWR, openFd } from "./libc.ts";
import {
  alignedBuffer,
  DIRECT_ALIGNMENT,
  directAligned,
  PageCacheEviction,
  readDirect,
  writeDirect,
} from "./uncached_io.ts";

function address(buf: Uint8Array): number {
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

Deno.test({
  name: "alignedBuffer() starts on the alignment; directAligned() wants offset and length aligned",
  ...linuxPaths("FFI pointers"),
  fn() {
    for (const length of [1, 4096, 65536 + 512]) {
      const buf = alignedBuffer(length);
      assertEquals(buf.length, length);
      assertEquals(address(buf) % DIRECT_ALIGNMENT, 0);
    }
    assertEquals(address(alignedBuffer(100, 512)) % 512, 0);
    assertOk(directAligned(8192, 4096));
    assertOk(!directAligned(8192, 0));
    assertOk(!directAligned(512, 4096));
    assertOk(!directAligned(4096, 4608));
  },
});

Deno.test({
  name: "readDirect()/writeDirect() move unaligned buffers through O_DIRECT, byte for byte",
  ...linuxPaths("O_DIRECT"),
  async fn() {
    await using dir = await tempDir();
    const path = `${dir.path}/data`;
    await Deno.writeFile(path, new Uint8Array(1 << 20));
    const fd = openFd(path, O_RDWR | O_DIRECT)!;
    try {
      // A view one byte into its buffer: never aligned, so it goes through a bounce buffer.
      const data = randomBytes(65536, 5);
      const unaligned = new Uint8Array(65536 + 1).subarray(1);
      unaligned.set(data);
      assertEquals(await writeDirect(fd, unaligned, 131072), 65536);
      const back = new Uint8Array(65536 + 3).subarray(3);
      assertEquals(await readDirect(fd, back, 131072), 65536);
      assertBytes(back, data);
      // An aligned buffer goes as it is.
      const aligned = alignedBuffer(4096);
      assertEquals(await readDirect(fd, aligned, 131072), 4096);
      assertBytes(aligned, data.subarray(0, 4096));
      // Direct I/O refuses a misaligned offset: -1, for the caller to take the buffered path.
      assertEquals(await readDirect(fd, alignedBuffer(4096), 100), -1);
    } finally {
      closeFd(fd);
    }
    assertBytes((await Deno.readFile(path)).subarray(131072, 196608), randomBytes(65536, 5));
  },
});

Deno.test({
  name: "PageCacheEviction drops read ranges at once and written ranges after their writeback",
  ...linuxPaths("posix_fadvise"),
  async fn() {
    await using dir = await tempDir();
    const path = `${dir.path}/data`;
    // Written a page at a time, so that the page cache holds it in single pages: only whole
    // folios can be dropped, and one large write may be cached in large ones.
    const data = randomBytes(1 << 20, 6);
    {
      using file = await Deno.open(path, { write: true, create: true });
      for (let at = 0; at < data.length; at += 4096) {
        await file.write(data.subarray(at, at + 4096));
      }
    }
    const cached = async () =>
      Number(
        (await runOk("fincore", ["--bytes", "--noheadings", "--output", "RES", path])).stdout
          .trim(),
      );
    const fd = openFd(path, O_RDWR)!;
    try {
      const eviction = new PageCacheEviction(fd);
      await runOk("sync", [path]);
      // A range not on page boundaries: the pages it touches go.
      await eviction.afterRead(100, 8000);
      assertEquals(await cached(), (1 << 20) - 8192);
      for (let i = 0; i < 12; i++) await eviction.afterWrite(65536 * i + 1, 65536);
      await eviction.drain();
      // Pages 0 to 192: the twelve ranges and the page the last one ends in.
      assertEquals(await cached(), (1 << 20) - 12 * 65536 - 4096);
    } finally {
      closeFd(fd);
    }
  },
});
