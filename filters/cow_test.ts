import { assertBytes, assertEquals } from "../tests/assert.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { nullPlugin } from "../plugins/null.ts";
import { fillPattern, patternPlugin } from "../plugins/pattern.ts";
import type { Backend } from "../core/backend.ts";
import { randomBytes } from "../tests/helpers.ts";
import {
  concurrentWrites,
  createFilter,
  CTX,
  filled,
  openPlugin,
  read,
  stack,
} from "./_test_utils.ts";
import { cowFilter } from "./cow.ts";

function pattern(offset: number, length: number): Uint8Array {
  const buf = new Uint8Array(length);
  fillPattern(buf, offset);
  return buf;
}

Deno.test("cow filter makes a read-only layer writable without writing it", async () => {
  const { backend: pat } = await openPlugin(patternPlugin, ["1M"]);
  const { backend, instance } = await stack(cowFilter, ["cow-block-size=4K"], pat);
  try {
    assertEquals(backend.capabilities().writable, true);
    await backend.pwrite(filled(10, 0xee), 4090, { fua: false }); // straddles two blocks
    const expected = pattern(0, 12288);
    expected.fill(0xee, 4090, 4100);
    assertEquals(await read(backend, 0, 12288), expected);
    // The layer below is unchanged.
    assertEquals(await read(pat, 4090, 10), pattern(4090, 10));
    await backend.zero(8192, 4096, { fua: false, fast: false, mayTrim: true });
    expected.fill(0, 8192);
    assertEquals(await read(backend, 0, 12288), expected);
    const extents = await backend.extents(0, 1 << 20, { reqOne: false });
    assertEquals(extents.slice(0, 2), [
      { length: 8192, flags: 0 },
      { length: 4096, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
    ]);
  } finally {
    await instance.close?.();
  }
});

Deno.test("cow filter never writes the layer below", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["256K"]);
  const original = randomBytes(256 * 1024, 5);
  await mem.pwrite(original, 0, { fua: false });
  const spy = { ...mem } as Backend;
  const fail = () => Promise.reject(new Error("the layer below was written"));
  spy.pwrite = fail;
  spy.zero = fail;
  spy.trim = fail;
  spy.flush = fail;
  const { backend, instance } = await stack(cowFilter, ["cow-on-read=true"], spy);
  try {
    await backend.pwrite(filled(70000, 1), 100, { fua: true });
    await backend.trim(0, 65536, { fua: false });
    await backend.flush();
    await read(backend, 0, 256 * 1024);
    assertEquals(await read(mem, 0, 256 * 1024), original);
  } finally {
    await instance.close?.();
  }
});

Deno.test("cow filter keeps concurrent writers on several connections coherent", async () => {
  const { backend: pat, instance: plugin } = await openPlugin(patternPlugin, ["512K"]);
  const instance = await createFilter(cowFilter, []);
  try {
    const conns: Backend[] = [];
    for (let id = 1; id <= 4; id++) {
      conns.push(
        await instance.wrap(
          await plugin.open({ ...CTX, connectionId: id }),
          CTX,
          () => Promise.reject(),
        ),
      );
    }
    const expected = await concurrentWrites(conns, 512 * 1024);
    for (const conn of conns) assertBytes(await read(conn, 0, 512 * 1024), expected);
    assertEquals(await read(pat, 0, 4096), pattern(0, 4096));
  } finally {
    await instance.close?.();
  }
});

Deno.test("cow filter: zeroing or trimming a huge disk that is already zero costs nothing", async () => {
  const { backend: nothing } = await openPlugin(nullPlugin, ["1P"]);
  const { backend, instance } = await stack(cowFilter, [], nothing);
  try {
    // Per-block bookkeeping here would mean 2^34 entries: it must not happen.
    await backend.zero(0, 2 ** 50, { fua: false, fast: false, mayTrim: true });
    await backend.trim(0, 2 ** 50, { fua: false });
    await backend.pwrite(filled(10, 3), 2 ** 49, { fua: false });
    assertEquals(
      await read(backend, 2 ** 49 - 5, 20),
      new Uint8Array([...filled(5, 0), ...filled(10, 3), ...filled(5, 0)]),
    );
    await backend.zero(2 ** 49, 65536, { fua: false, fast: false, mayTrim: true });
    assertEquals(await read(backend, 2 ** 49, 10), new Uint8Array(10));
  } finally {
    await instance.close?.();
  }
});
