import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import type { Backend } from "../core/backend.ts";
import { filled, openPlugin, read, stack } from "./_test_utils.ts";
import { findPartition, partitionFilter } from "./partition.ts";

const S = 512;

/** Writes a 16-byte MBR-style entry into `sector` at slot `i`. */
function entry(sector: Uint8Array, i: number, type: number, start: number, count: number): void {
  const view = new DataView(sector.buffer);
  const base = 446 + 16 * i;
  sector[base + 4] = type;
  view.setUint32(base + 8, start, true);
  view.setUint32(base + 12, count, true);
  sector[510] = 0x55;
  sector[511] = 0xaa;
}

async function put(disk: Backend, lba: number, bytes: Uint8Array): Promise<void> {
  await disk.pwrite(bytes, lba * S, { fua: false });
}

Deno.test("partition filter finds MBR primary and logical partitions", async () => {
  const { backend: disk } = await openPlugin(memoryPlugin, ["4M"]);
  const mbr = new Uint8Array(S);
  entry(mbr, 0, 0x83, 2048, 100); // partition 1
  entry(mbr, 1, 0x05, 4096, 2048); // extended partition 2
  await put(disk, 0, mbr);
  // First EBR: logical 5 at +64, link to the next EBR at +1024.
  const ebr1 = new Uint8Array(S);
  entry(ebr1, 0, 0x83, 64, 200);
  entry(ebr1, 1, 0x05, 1024, 512);
  await put(disk, 4096, ebr1);
  const ebr2 = new Uint8Array(S);
  entry(ebr2, 0, 0x83, 32, 300); // logical 6, relative to its own EBR
  await put(disk, 4096 + 1024, ebr2);
  await put(disk, 2048, filled(S, 1));
  await put(disk, 4096 + 64, filled(S, 5));
  await put(disk, 4096 + 1024 + 32, filled(S, 6));

  assertEquals(await findPartition(disk, 1), { offset: 2048 * S, length: 100 * S });
  assertEquals(await findPartition(disk, 5), { offset: (4096 + 64) * S, length: 200 * S });
  assertEquals(await findPartition(disk, 6), {
    offset: (4096 + 1024 + 32) * S,
    length: 300 * S,
  });
  await assertRejects(() => findPartition(disk, 2), NbdError); // extended itself
  await assertRejects(() => findPartition(disk, 3), NbdError); // unused
  await assertRejects(() => findPartition(disk, 7), NbdError); // end of chain

  const { backend } = await stack(partitionFilter, ["partition=6"], disk);
  assertEquals(backend.size(), 300 * S);
  assertEquals(await read(backend, 0, S), filled(S, 6));
  await backend.pwrite(filled(S, 9), S, { fua: false });
  assertEquals(await read(disk, (4096 + 1024 + 33) * S, S), filled(S, 9));
});

Deno.test("partition filter reads GPT partition entries", async () => {
  const { backend: disk } = await openPlugin(memoryPlugin, ["4M"]);
  const mbr = new Uint8Array(S);
  entry(mbr, 0, 0xee, 1, 8191);
  await put(disk, 0, mbr);
  const header = new Uint8Array(S);
  header.set(new TextEncoder().encode("EFI PART"));
  const hv = new DataView(header.buffer);
  hv.setBigUint64(72, 2n, true); // entries at LBA 2
  hv.setUint32(80, 128, true); // 128 entries
  hv.setUint32(84, 128, true); // of 128 bytes
  await put(disk, 1, header);
  const entries = new Uint8Array(32 * S);
  const ev = new DataView(entries.buffer);
  // Entry 5 (index 4, in the second sector): LBA 3000..3999.
  entries.fill(0xab, 4 * 128, 4 * 128 + 16);
  ev.setBigUint64(4 * 128 + 32, 3000n, true);
  ev.setBigUint64(4 * 128 + 40, 3999n, true);
  await put(disk, 2, entries);
  await put(disk, 3000, filled(S, 0x55));
  assertEquals(await findPartition(disk, 5), { offset: 3000 * S, length: 1000 * S });
  await assertRejects(() => findPartition(disk, 1), NbdError); // unused entry
  await assertRejects(() => findPartition(disk, 129), NbdError);
  const { backend } = await stack(partitionFilter, ["partition=5"], disk);
  assertEquals(await read(backend, 0, S), filled(S, 0x55));
});

Deno.test("partition filter refuses a disk without a partition table", async () => {
  const { backend: disk } = await openPlugin(memoryPlugin, ["1M"]);
  await assertRejects(() => findPartition(disk, 1), Error, /no MBR or GPT/);
});
