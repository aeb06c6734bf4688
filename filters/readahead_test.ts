import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { completeBackend } from "../core/backend.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { randomBytes } from "../tests/helpers.ts";
import { createFilter, openPlugin, read, stack, tempDirSync } from "./_test_utils.ts";
import { readaheadFilter } from "./readahead.ts";
import { statsFilter } from "./stats.ts";

const MiB = 1024 * 1024;

/**
 * `data` in the memory plugin, under the stats filter, under readahead;
 * `upstream()` closes the stats filter and returns what reached the plugin.
 */
async function readaheadOverStats(data: Uint8Array, words: string[] = []) {
  const dir = tempDirSync();
  const statsfile = `${dir}/stats`;
  const { backend: memory } = await openPlugin(memoryPlugin, [`size=${data.length}`]);
  await memory.pwrite(data, 0, { fua: false });
  const stats = await stack(statsFilter, [`statsfile=${statsfile}`], memory);
  const { backend } = await stack(readaheadFilter, words, stats.backend);
  return {
    backend,
    async upstream(): Promise<{ reads: number; bytes: number }> {
      await stats.instance.close!();
      const text = Deno.readTextFileSync(statsfile);
      Deno.removeSync(dir, { recursive: true });
      const line = /^read: (\d+) ops, 0 errors, [\d.]+ s, ([\d.]+) (bytes|KiB|MiB)/m.exec(text);
      if (!line) return { reads: 0, bytes: 0 };
      const unit = { bytes: 1, KiB: 1024, MiB: MiB }[line[3] as "bytes" | "KiB" | "MiB"];
      return { reads: Number(line[1]), bytes: Math.round(Number(line[2]) * unit) };
    },
  };
}

Deno.test("readahead: a sequential scan makes fewer, larger reads below, byte-exact", async () => {
  const data = randomBytes(16 * MiB, 31);
  const { backend, upstream } = await readaheadOverStats(data);
  const out = new Uint8Array(data.length);
  for (let at = 0; at < data.length; at += 65536) {
    await backend.pread(out.subarray(at, at + 65536), at);
  }
  assertBytes(out, data);
  const { reads, bytes } = await upstream();
  // 256 reads of 64 KiB from the client; windows doubling from 128 KiB to 8 MiB below.
  assertOk(reads <= 10, `${reads} reads below`);
  assertEquals(bytes, data.length);
});

Deno.test("readahead: sequential reads with many in flight are served in order", async () => {
  const data = randomBytes(8 * MiB, 32);
  const { backend, upstream } = await readaheadOverStats(data, ["readahead-max=1M"]);
  const out = new Uint8Array(data.length);
  const requests: Promise<void>[] = [];
  for (let at = 0; at < data.length; at += 256 * 1024) {
    requests.push(backend.pread(out.subarray(at, at + 256 * 1024), at));
  }
  await Promise.all(requests);
  assertBytes(out, data);
  const { reads, bytes } = await upstream();
  assertOk(reads < 32 && reads >= 8, `${reads} reads below, of at most 1 MiB`);
  assertEquals(bytes, data.length);
});

Deno.test("readahead: random reads start over with a small window", async () => {
  const data = randomBytes(4 * MiB, 33);
  const { backend, upstream } = await readaheadOverStats(data);
  let seed = 7;
  for (let i = 0; i < 50; i++) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    const at = (seed % (data.length / 4096 - 1)) * 4096;
    assertBytes(await read(backend, at, 4096), data.subarray(at, at + 4096));
  }
  const { reads, bytes } = await upstream();
  assertOk(reads <= 50, `${reads} reads below`);
  assertOk(bytes <= 50 * 128 * 1024, `${bytes} bytes read below for 50 random 4 KiB reads`);
});

Deno.test("readahead: a write drops the windows it overlaps", async () => {
  const data = randomBytes(1 * MiB, 34);
  const { backend, upstream } = await readaheadOverStats(data);
  assertEquals(backend.capabilities().multiConn, false);
  assertBytes(await read(backend, 0, 4096), data.subarray(0, 4096));
  const patch = randomBytes(1000, 35);
  await backend.pwrite(patch, 5000, { fua: false });
  assertBytes(await read(backend, 4096, 904), data.subarray(4096, 5000));
  assertBytes(await read(backend, 5000, 1000), patch);
  await backend.zero(0, 4096, { fua: false, mayTrim: true, fast: false });
  assertBytes(await read(backend, 0, 4096), new Uint8Array(4096));
  await upstream();
});

Deno.test("readahead: a failing window below does not fail a read that does not need it", async () => {
  const data = randomBytes(1 * MiB, 36);
  const bad = 600 * 1024;
  const below = completeBackend({
    size: () => data.length,
    pread(buf, offset) {
      if (offset + buf.length > bad) return Promise.reject(new NbdError("EIO", "bad sector"));
      buf.set(data.subarray(offset, offset + buf.length));
      return Promise.resolve();
    },
  });
  const { backend } = await stack(readaheadFilter, [], below);
  for (let at = 0; at + 65536 <= bad; at += 65536) {
    assertBytes(await read(backend, at, 65536), data.subarray(at, at + 65536));
  }
  await assertRejects(
    () => read(backend, bad, 4096),
    (e) => e instanceof NbdError && e.errno === "EIO",
  );
});

Deno.test("readahead: readahead-max out of range is refused", async () => {
  await assertRejects(() => createFilter(readaheadFilter, ["readahead-max=4k"]), Error, /64K/);
});
