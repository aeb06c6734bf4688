import { assertEquals, assertOk, assertThrows } from "../tests/assert.ts";
import type { IoEvent } from "../server/stats.ts";
import {
  ActivityAggregator,
  chooseBlockSize,
  clearBits,
  MAX_CELLS,
  type Runs,
  setBits,
  takeRuns,
} from "./activity.ts";

/** Expands runs to the list of cells they cover. */
function cellsOf(runs: Runs): number[] {
  const cells: number[] = [];
  for (let i = 0; i < runs.length; i += 2) {
    assertOk(runs[i + 1]! > 0, "runs are never empty");
    for (let c = runs[i]!; c < runs[i]! + runs[i + 1]!; c++) cells.push(c);
  }
  return cells;
}

/** A small deterministic generator for the randomised checks. */
function rng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function event(
  command: string,
  offset: number,
  length: number,
  ok = true,
  exportName = "",
): IoEvent {
  return { connection: 1, exportName, command, offset, length, ok };
}

Deno.test("chooseBlockSize() takes the smallest power of two from 4 KiB that fits", () => {
  assertEquals(chooseBlockSize(2 ** 30, 1_000_000), 4096);
  assertEquals(chooseBlockSize(2 ** 30, 262_144), 4096);
  assertEquals(chooseBlockSize(2 ** 30, 262_143), 8192);
  assertEquals(chooseBlockSize(2 ** 40, 1_000_000), 2 ** 21);
  assertEquals(chooseBlockSize(1000, 10), 4096);
  assertEquals(chooseBlockSize(2 ** 20, 4096, 512), 512);
  // Never more cells than MAX_CELLS, whatever is asked.
  assertEquals(chooseBlockSize(2 ** 50, 2 ** 40), 2 ** 50 / MAX_CELLS);
});

Deno.test("setBits(), clearBits() and takeRuns() agree with a plain set of cells", () => {
  const random = rng(7);
  for (let round = 0; round < 200; round++) {
    const cells = 1 + Math.floor(random() * 2000);
    const bits = new Uint32Array(Math.ceil(cells / 32));
    const model = new Set<number>();
    let low = Infinity;
    let high = -1;
    for (let i = 0, n = Math.floor(random() * 20); i < n; i++) {
      const a = Math.floor(random() * cells);
      const b = Math.min(cells - 1, a + Math.floor(random() * (random() < 0.3 ? 300 : 5)));
      if (random() < 0.25) {
        clearBits(bits, a, b);
        for (let c = a; c <= b; c++) model.delete(c);
      } else {
        setBits(bits, a, b);
        for (let c = a; c <= b; c++) model.add(c);
        low = Math.min(low, a);
        high = Math.max(high, b);
      }
    }
    const runs = high < 0 ? [] : takeRuns(bits, low, high);
    assertEquals(cellsOf(runs), [...model].sort((x, y) => x - y));
    // Runs are maximal: no two touch.
    for (let i = 2; i < runs.length; i += 2) assertOk(runs[i]! > runs[i - 2]! + runs[i - 1]!);
    assertOk(bits.every((w) => w === 0), "all bits cleared");
  }
});

Deno.test("ActivityAggregator reports every touched block once, under the last kind to touch it", () => {
  const a = new ActivityAggregator("disk", { block: 4096 });
  a.resize(1 << 20); // 256 cells
  assertEquals([a.block, a.cells], [4096, 256]);
  a.add(event("READ", 0, 4096, true, "disk"));
  a.add(event("TRIM", 10 * 4096, 3 * 4096, true, "disk"));
  a.add(event("WRITE", 4096 + 100, 8192, true, "disk")); // bytes 4196..12387: cells 1..3
  a.add(event("READ", 255 * 4096, 4096, true, "disk"));
  a.add(event("READ", 2 * 4096 + 5, 1, true, "disk")); // takes cell 2 from the write
  a.add(event("WRITE", 1, 1, true, "other")); // another export: ignored
  a.add(event("FLUSH", 0, 0, true, "disk")); // counted, no cells
  a.add(event("READ", 300 * 4096, 512, false, "disk")); // failed past the end: no cells
  a.add(event("WRITE", 5 * 4096, 4096, false, "disk")); // failed: ERROR
  assertOk(a.pending);
  const frame = a.take()!;
  assertEquals(frame, {
    export: "disk",
    size: 1 << 20,
    block: 4096,
    cells: 256,
    kinds: [
      ["READ", [0, 1, 2, 1, 255, 1]],
      ["WRITE", [1, 1, 3, 1]],
      ["TRIM", [10, 3]],
      ["ERROR", [5, 1]],
    ],
    requests: { READ: 4, TRIM: 1, WRITE: 2, FLUSH: 1 },
  });
  assertOk(!a.pending);
  assertEquals(a.take()!.kinds, []);
});

Deno.test("ActivityAggregator frames match a per-cell model over 30000 random requests", () => {
  const random = rng(99);
  const size = 64 * 1024 * 1024 + 512; // not a multiple of the block: a short last cell
  const a = new ActivityAggregator("", { maxCells: 5000 });
  a.resize(size);
  assertEquals(a.block, chooseBlockSize(size, 5000));
  const kinds = ["READ", "WRITE", "TRIM", "WRITE_ZEROES", "CACHE", "BLOCK_STATUS"];
  let model = new Map<number, string>(); // cell → last kind in this frame
  const check = () => {
    const frame = a.take()!;
    const got = new Map<number, string>();
    for (const [kind, runs] of frame.kinds) {
      for (const cell of cellsOf(runs)) {
        assertOk(!got.has(cell), `cell ${cell} listed twice`);
        got.set(cell, kind);
      }
    }
    assertEquals(got, model);
    model = new Map();
  };
  for (let i = 0; i < 30_000; i++) {
    const kind = kinds[Math.floor(random() * kinds.length)]!;
    const offset = Math.floor(random() * size);
    const length = 1 +
      Math.floor(random() * Math.min(size - offset, random() < 0.01 ? size : 65536));
    a.add(event(kind, offset, length));
    for (
      let c = Math.floor(offset / a.block);
      c <= Math.floor((offset + length - 1) / a.block);
      c++
    ) {
      model.set(c, kind);
    }
    if (i % 997 === 0) check();
  }
  check();
  check(); // and an empty frame after
});

Deno.test("ActivityAggregator refuses a fixed block size that needs too many cells", () => {
  const a = new ActivityAggregator("", { block: 512 });
  assertThrows(() => a.resize(512 * (MAX_CELLS + 1)), RangeError, "exceed");
  a.resize(512 * MAX_CELLS);
  assertEquals(a.cells, MAX_CELLS);
});

Deno.test("ActivityAggregator ignores events until it knows the export size", () => {
  const a = new ActivityAggregator("");
  a.add(event("READ", 0, 512));
  assertEquals([a.pending, a.take()], [false, undefined]);
});
