import { assertEquals, assertIncludes, assertOk, assertRejects } from "../tests/assert.ts";
import {
  Checkpointer,
  type CopyState,
  FLUSH_BYTES,
  FlushPacer,
  MAX_STATE_RANGES,
  RangeSet,
  readState,
  refusal,
  STATE_VERSION,
  StateError,
  writeState,
} from "./resume.ts";

function state(done: Array<[number, number]> = []): CopyState {
  return {
    version: STATE_VERSION,
    source: {
      argument: "nbd://h/disk",
      kind: "nbd",
      size: 1 << 20,
      export: { name: "disk", flags: 0x4d, description: "the disk" },
    },
    destination: { argument: "out.img", kind: "file", size: 1 << 20, partial: "/t/.out" },
    options: { sparse: 4096, allocated: false, destinationIsZero: false, extents: true },
    done,
  };
}

Deno.test("RangeSet merges ranges added in any order", () => {
  const set = new RangeSet();
  set.add(0, 10);
  set.add(10, 10);
  set.add(40, 10);
  set.add(30, 5);
  assertEquals(set.toArray(), [[0, 20], [30, 35], [40, 50]]);
  set.add(15, 30);
  assertEquals(set.toArray(), [[0, 50]]);
  set.add(60, 0);
  assertEquals(set.count, 1);
  assertEquals(set.bytes, 50);
  assertEquals(new RangeSet([[5, 9], [0, 5], [20, 30]]).toArray(), [[0, 9], [20, 30]]);
});

Deno.test("RangeSet.gaps() widens what is left to whole aligned blocks", () => {
  const set = new RangeSet([[0, 4096], [8192 + 100, 12288]]);
  // [4096, 8292) widens to [4096, 12288), which then touches [12288, 20000).
  assertEquals(set.gaps(20000, 4096), [{ offset: 4096, end: 20000 }]);
  assertEquals(new RangeSet([[4096, 8192]]).gaps(16384, 4096), [
    { offset: 0, end: 4096 },
    { offset: 8192, end: 16384 },
  ]);
  assertEquals(new RangeSet().gaps(100, 512), [{ offset: 0, end: 100 }]);
  assertEquals(new RangeSet([[0, 100]]).gaps(100, 512), []);
});

Deno.test("RangeSet.bounded() keeps the largest ranges, in order", () => {
  const set = new RangeSet([[0, 10], [20, 21], [30, 50], [60, 62]]);
  assertEquals(set.bounded(2), [[0, 10], [30, 50]]);
  assertEquals(set.bounded(10).length, 4);
});

Deno.test("refusal() names what changed: arguments, sizes, export identity, options", () => {
  const saved = state([[0, 4096]]);
  assertEquals(refusal(saved, state()), undefined);
  const bigger = state();
  bigger.source.size = 2 << 20;
  assertIncludes(
    refusal(saved, bigger)!,
    "the source nbd://h/disk changed size (1048576 → 2097152",
  );
  const described = state();
  described.source.export!.description = "another disk";
  assertIncludes(refusal(saved, described)!, 'description "the disk"');
  const readonly = state();
  readonly.source.export!.flags = 0x4f;
  assertIncludes(refusal(saved, readonly)!, "flags 0x4d");
  const renamed = state();
  renamed.destination.argument = "other.img";
  assertEquals(refusal(saved, renamed), "the destination was out.img, not other.img");
  const options = state();
  options.options.extents = false;
  assertIncludes(refusal(saved, options)!, "other options (extents was true, now false)");
  const touched = state();
  saved.source.mtime = 1;
  touched.source.mtime = 2;
  assertIncludes(refusal(saved, touched)!, "was modified");
});

Deno.test("writeState() and readState() round-trip; bad files give one line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/state.json`;
    await writeState(path, state([[0, 512], [1024, 2048]]));
    assertEquals((await readState(path)).done, [[0, 512], [1024, 2048]]);
    assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), ["state.json"]);
    await assertRejects(() => readState(`${dir}/none`), StateError, "no such state file");
    await Deno.writeTextFile(path, "{not json");
    await assertRejects(() => readState(path), StateError, "is not a copy state file");
    await Deno.writeTextFile(path, JSON.stringify({ ...state(), done: [[5, 1]] }));
    await assertRejects(() => readState(path), StateError, "version 1");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Checkpointer saves only what was done before a successful flush", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/state.json`;
    let failFlush = false;
    let flushes = 0;
    const { done: _, ...base } = state();
    const checkpoints = new Checkpointer(path, base, new RangeSet(), () => {
      flushes++;
      return failFlush ? Promise.reject(new Error("EIO")) : Promise.resolve();
    }, 10);
    await checkpoints.saveNow();
    assertEquals((await readState(path)).done, []);
    checkpoints.record(0, 4096);
    await checkpoints.save();
    assertEquals((await readState(path)).done, [[0, 4096]]);
    failFlush = true;
    checkpoints.record(4096, 4096);
    await assertRejects(() => checkpoints.save(), Error, "EIO");
    // The file still says what the last good flush covered.
    assertEquals((await readState(path)).done, [[0, 4096]]);
    failFlush = false;
    checkpoints.start();
    const deadline = Date.now() + 5000;
    while ((await readState(path)).done[0]![1] !== 8192) {
      assertOk(Date.now() < deadline, "no periodic checkpoint");
      await new Promise((r) => setTimeout(r, 10));
    }
    await checkpoints.stop();
    assertOk(flushes >= 3, `${flushes} flushes`);
    await checkpoints.remove();
    assertEquals([...Deno.readDirSync(dir)], []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("RangeSet.without() and aligned()", () => {
  const set = new RangeSet([[0, 100], [200, 300]]);
  assertEquals(set.without(new RangeSet([[50, 250]])).toArray(), [[0, 50], [250, 300]]);
  assertEquals(set.without(new RangeSet([[10, 20], [30, 40]])).toArray(), [
    [0, 10],
    [20, 30],
    [40, 100],
    [200, 300],
  ]);
  assertEquals(set.without(new RangeSet()).toArray(), set.toArray());
  assertEquals(set.without(new RangeSet([[0, 1000]])).toArray(), []);
  assertEquals(new RangeSet([[100, 600], [700, 900]]).aligned(1000, 512), [{
    offset: 0,
    end: 1000,
  }]);
  assertEquals(new RangeSet([[100, 200], [2000, 2100]]).aligned(2050, 512), [
    { offset: 0, end: 512 },
    { offset: 1536, end: 2050 },
  ]);
});

Deno.test("FlushPacer flushes after FLUSH_BYTES, and more often after each loss", async () => {
  const lost = new RangeSet();
  let flushes = 0;
  const pacer = new FlushPacer(
    () => {
      flushes++;
      return Promise.resolve();
    },
    lost,
    4096,
    60_000,
  );
  pacer.done(FLUSH_BYTES - 1);
  assertEquals(flushes, 0);
  pacer.done(1);
  assertEquals(flushes, 1);
  await pacer.stop();
  // 1 MiB lost: flushes every 256 KiB from now on.
  lost.add(0, 1 << 20);
  pacer.done(1);
  assertEquals(pacer.interval, 256 << 10);
  pacer.done(256 << 10);
  assertEquals(flushes, 2);
  // Never below the minimum.
  lost.add(2 << 20, 4096);
  pacer.done(1);
  assertEquals(pacer.interval, 4096);
  await pacer.stop();
});

Deno.test("a state file keeps at most MAX_STATE_RANGES ranges, the largest", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/state.json`;
    const { done: _, ...base } = state();
    const checkpoints = new Checkpointer(path, base, new RangeSet(), () => Promise.resolve());
    // 10,000 islands of 512 bytes, and one large range.
    for (let i = 0; i < 10_000; i++) checkpoints.record(i * 1024, 512);
    checkpoints.record(100 << 20, 1 << 20);
    await checkpoints.save();
    const saved = (await readState(path)).done;
    assertEquals(saved.length, MAX_STATE_RANGES);
    assertOk(saved.some(([s, e]) => s === 100 << 20 && e === (100 << 20) + (1 << 20)));
    assertOk((await Deno.stat(path)).size < 100_000, "the file stays small");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
