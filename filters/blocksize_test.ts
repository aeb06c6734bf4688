import { assertEquals, assertOk } from "../tests/assert.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { PassthroughBackend, type WriteFlags } from "../core/backend.ts";
import { randomBytes } from "../tests/helpers.ts";
import { openPlugin, read, stack } from "./_test_utils.ts";
import { blocksizeFilter } from "./blocksize.ts";

/** Records every request that reaches the layer below and checks its alignment. */
class Recorder extends PassthroughBackend {
  calls: string[] = [];
  constructor(
    next: ConstructorParameters<typeof PassthroughBackend>[0],
    readonly align: number,
    readonly max: number,
  ) {
    super(next);
  }
  #check(kind: string, offset: number, length: number, max: number): void {
    this.calls.push(`${kind} ${offset} ${length}`);
    if (offset % this.align !== 0 || length % this.align !== 0 || length > max) {
      throw new Error(`misaligned or oversized ${kind} ${offset}+${length}`);
    }
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#check("read", offset, buf.length, this.max);
    return this.next.pread(buf, offset);
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#check("write", offset, buf.length, this.max);
    return this.next.pwrite(buf, offset, flags);
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    this.#check("trim", offset, length, Infinity);
    return this.next.trim(offset, length, flags);
  }
}

Deno.test("blocksize filter aligns and splits reads and writes, byte-exact", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const reference = randomBytes(1 << 20, 3);
  await mem.pwrite(reference, 0, { fua: false });
  const rec = new Recorder(mem, 4096, 16384);
  const { backend } = await stack(blocksizeFilter, ["minblock=4K", "maxdata=16K"], rec);
  assertEquals(backend.capabilities().blockSize.minimum, 1);
  for (const [offset, length] of [[1, 10], [4095, 2], [100, 70000], [8192, 4096], [5000, 3000]]) {
    assertEquals(
      await read(backend, offset!, length!),
      reference.subarray(offset!, offset! + length!),
    );
  }
  const patch = randomBytes(50000, 9);
  await backend.pwrite(patch, 12345, { fua: false });
  reference.set(patch, 12345);
  await backend.zero(70001, 9000, { fua: false, fast: false, mayTrim: true });
  reference.fill(0, 70001, 79001);
  assertEquals(await read(mem, 0, 1 << 20), reference);
  assertOk(rec.calls.some((c) => c.startsWith("write")));
});

Deno.test("blocksize filter drops unaligned trim edges and rounds the size down", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["10000"]);
  const rec = new Recorder(mem, 4096, 1 << 20);
  const { backend } = await stack(blocksizeFilter, ["minblock=4096"], rec);
  assertEquals(backend.size(), 8192);
  await backend.trim(100, 8092, { fua: false });
  assertEquals(rec.calls, ["trim 4096 4096"]);
});

Deno.test("blocksize filter keeps concurrent unaligned writes to one block intact", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["64K"]);
  const { backend } = await stack(blocksizeFilter, ["minblock=4K"], mem);
  // 64 one-byte writes into the same block at once: each is a read-modify-write.
  await Promise.all(
    Array.from(
      { length: 64 },
      (_, i) => backend.pwrite(new Uint8Array([i + 1]), i * 3, { fua: false }),
    ),
  );
  const block = await read(mem, 0, 4096);
  for (let i = 0; i < 64; i++) assertEquals(block[i * 3], i + 1, `byte ${i * 3}`);
});
