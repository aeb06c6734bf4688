import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { NBD_STATE_HOLE } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { SPARSE_BLOCK, sparseRandomPlugin } from "./sparse_random.ts";

Deno.test("sparse-random is reproducible from its seed and roughly honours percent", async () => {
  const size = 256 * 1024 * 1024;
  const words = ["256M", "seed=7", "percent=25", "runlength=1M"];
  const { backend: a } = await openPlugin(sparseRandomPlugin, words);
  const { backend: b } = await openPlugin(sparseRandomPlugin, words);
  const { backend: c } = await openPlugin(sparseRandomPlugin, [
    "256M",
    "seed=8",
    "percent=25",
    "runlength=1M",
  ]);
  const extents = await a.extents(0, size, { reqOne: false });
  assertEquals(extents.reduce((n, e) => n + e.length, 0), size);
  const data = extents.filter((e) => !(e.flags & NBD_STATE_HOLE)).reduce((n, e) => n + e.length, 0);
  assertOk(data > size * 0.15 && data < size * 0.35, `${data / size}`);
  // Reads agree with extents, and two instances with one seed agree byte for byte.
  let pos = 0;
  for (const e of extents.slice(0, 20)) {
    const sample = await read(a, pos, Math.min(e.length, 3 * SPARSE_BLOCK));
    assertEquals(sample.every((x) => x === 0), (e.flags & NBD_STATE_HOLE) !== 0);
    pos += e.length;
  }
  const first = await read(a, 0, 8 * 1024 * 1024);
  assertBytes(await read(b, 0, 8 * 1024 * 1024), first);
  const other = await read(c, 0, 8 * 1024 * 1024);
  assertOk(other.some((x, i) => x !== first[i]));
});

Deno.test("sparse-random accepts writes of its own data and refuses others", async () => {
  const { backend } = await openPlugin(sparseRandomPlugin, [
    "16M",
    "seed=3",
    "percent=50",
    "runlength=64K",
    "random-content=true",
  ]);
  const extents = await backend.extents(0, 16 << 20, { reqOne: false });
  const dataAt = extents.findIndex((e) => !(e.flags & NBD_STATE_HOLE));
  const offset = extents.slice(0, dataAt).reduce((n, e) => n + e.length, 0);
  const same = await read(backend, offset + 100, 5000);
  assertOk(new Set(same).size > 50); // random content really is random
  await backend.pwrite(same, offset + 100, { fua: false });
  same[4000] ^= 1;
  await assertRejects(() => backend.pwrite(same, offset + 100, { fua: false }), NbdError);
  await assertRejects(
    () => backend.zero(offset, 4096, { fua: false, fast: false, mayTrim: false }),
    NbdError,
  );
  const holeAt = extents.findIndex((e) => (e.flags & NBD_STATE_HOLE) !== 0);
  const hole = extents.slice(0, holeAt).reduce((n, e) => n + e.length, 0);
  await backend.zero(hole, extents[holeAt]!.length, { fua: false, fast: false, mayTrim: false });
});

Deno.test("sparse-random with percent 0 and 100", async () => {
  const { backend: empty } = await openPlugin(sparseRandomPlugin, ["1M", "percent=0"]);
  assertEquals(await empty.extents(0, 1 << 20, { reqOne: false }), [{
    length: 1 << 20,
    flags: 3,
  }]);
  const { backend: full } = await openPlugin(sparseRandomPlugin, [
    "1M",
    "percent=100",
    "runlength=64K",
  ]);
  assertEquals(await full.extents(0, 1 << 20, { reqOne: false }), [{
    length: 1 << 20,
    flags: 0,
  }]);
  assertOk((await read(full, 0, 1 << 20)).every((x) => x !== 0));
});
