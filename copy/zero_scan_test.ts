import { assertEquals } from "../tests/assert.ts";
import { rangeIsZero, zeroRuns } from "./zero_scan.ts";

function buffers(size: number): { bytes: Uint8Array; words: Int32Array } {
  const buffer = new ArrayBuffer(size);
  return { bytes: new Uint8Array(buffer), words: new Int32Array(buffer, 0, size >>> 2) };
}

Deno.test("rangeIsZero() finds a single non-zero byte anywhere, with unaligned edges", () => {
  const { bytes, words } = buffers(64);
  for (let start = 0; start < 8; start++) {
    for (let end = start; end <= 64; end += 3) {
      assertEquals(rangeIsZero(bytes, words, start, end), true);
      for (let i = start; i < end; i++) {
        bytes[i] = 1;
        assertEquals(rangeIsZero(bytes, words, start, end), false, `byte ${i} in ${start}-${end}`);
        bytes[i] = 0;
      }
      // Bytes outside the range do not count.
      if (start > 0) bytes[start - 1] = 9;
      if (end < 64) bytes[end] = 9;
      assertEquals(rangeIsZero(bytes, words, start, end), true);
      bytes.fill(0);
    }
  }
});

Deno.test("zeroRuns() merges neighbouring blocks of one kind and handles a short tail", () => {
  const { bytes, words } = buffers(5 * 4096);
  bytes[4096] = 1; // block 1
  bytes[3 * 4096 + 17] = 1; // block 3
  assertEquals(zeroRuns(bytes, words, 5 * 4096 - 100, 4096), [
    { start: 0, end: 4096, zero: true },
    { start: 4096, end: 8192, zero: false },
    { start: 8192, end: 12288, zero: true },
    { start: 12288, end: 16384, zero: false },
    { start: 16384, end: 5 * 4096 - 100, zero: true },
  ]);
  bytes.fill(7);
  assertEquals(zeroRuns(bytes, words, 5 * 4096, 4096), [{ start: 0, end: 5 * 4096, zero: false }]);
  assertEquals(zeroRuns(bytes, words, 0, 4096), []);
});
