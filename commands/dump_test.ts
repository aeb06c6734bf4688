import { assertEquals } from "../tests/assert.ts";
import { formatLine, HexDumper } from "./dump.ts";

function dump(bytes: Uint8Array, start = 0): string {
  const dumper = new HexDumper(start, start + bytes.length);
  dumper.data(bytes);
  dumper.finish();
  return dumper.take();
}

Deno.test("formatLine() prints hex in two groups of eight and a padded ASCII column", () => {
  const bytes = new Uint8Array([...new TextEncoder().encode("hello, world!"), 0, 0x7f, 0xff]);
  assertEquals(
    formatLine(0x100, bytes, 16),
    "0000000100: 68 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 00 7f ff |hello, world!...|\n",
  );
  assertEquals(
    formatLine(0x1f40, new Uint8Array([1, 2, 3]), 3),
    "0000001f40: 01 02 03                                         |...             |\n",
  );
  assertEquals(formatLine(2 ** 44, bytes, 1).slice(0, 13), "100000000000:");
});

Deno.test("HexDumper collapses repeated lines but never the first or the last", () => {
  const bytes = new Uint8Array(16 * 6);
  bytes[0] = 1;
  const text = dump(bytes);
  assertEquals(
    text,
    [
      "0000000000: 01 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|",
      "0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|",
      "*",
      "0000000050: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|",
      "",
    ].join("\n"),
  );
  // Non-zero repeats collapse too, and a line that differs ends the run.
  const pattern = new Uint8Array(16 * 4).fill(0x41);
  pattern[16 * 3] = 0x42;
  assertEquals(dump(pattern).split("\n").map((l) => l.slice(0, 12)), [
    "0000000000: ",
    "*",
    "0000000030: ",
    "",
  ]);
});

Deno.test("HexDumper prints addresses from the start offset and a partial last line", () => {
  const bytes = new Uint8Array(20).map((_, i) => 0x61 + i);
  assertEquals(
    dump(bytes, 0x1000),
    "0000001000: 61 62 63 64 65 66 67 68  69 6a 6b 6c 6d 6e 6f 70 |abcdefghijklmnop|\n" +
      "0000001010: 71 72 73 74                                      |qrst            |\n",
  );
  assertEquals(dump(new Uint8Array()), "");
});

Deno.test("HexDumper.zeros() prints exactly what the same bytes fed as data would", () => {
  // Random layouts of data and zero runs, with unaligned boundaries.
  let seed = 12345;
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  for (let round = 0; round < 200; round++) {
    const start = random(40);
    const pieces: Array<Uint8Array | number> = [];
    let total = 0;
    for (let i = 0, n = 1 + random(6); i < n; i++) {
      const length = 1 + random(200);
      if (random(2)) {
        const value = random(3); // often zero, sometimes repeated, sometimes not
        pieces.push(new Uint8Array(length).map((_, j) => value === 2 ? j & 0xff : value));
      } else pieces.push(length);
      total += length;
    }
    const bytes = new Uint8Array(total);
    const viaZeros = new HexDumper(start, start + total);
    let pos = 0;
    for (const piece of pieces) {
      if (typeof piece === "number") {
        viaZeros.zeros(piece);
        pos += piece;
      } else {
        viaZeros.data(piece);
        bytes.set(piece, pos);
        pos += piece.length;
      }
    }
    viaZeros.finish();
    assertEquals(viaZeros.take(), dump(bytes, start), `round ${round}`);
  }
});

Deno.test("HexDumper.zeros() skips a huge zero run without materialising it", () => {
  const dumper = new HexDumper(0, 2 ** 50);
  dumper.data(new Uint8Array(16));
  dumper.zeros(2 ** 50 - 16);
  dumper.finish();
  assertEquals(
    dumper.take(),
    "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n" +
      "*\n" +
      "3fffffffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n",
  );
});
