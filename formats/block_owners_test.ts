import { assertEquals, assertOk } from "../tests/assert.ts";
import { hasCommand } from "../tests/helpers.ts";
import { blockOwners } from "./block_owners.ts";
import { CachedReader, type DiskReader } from "./disk_reader.ts";
import { ExtentCollector, ownerAt } from "./owned_extents.ts";

function readerOf(data: Uint8Array): DiskReader {
  return new CachedReader(data.length, (buf, offset) => {
    buf.set(data.subarray(offset, offset + buf.length));
    return Promise.resolve();
  });
}

function rng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

Deno.test("ExtentCollector merges an owner's adjacent ranges; ownerAt finds them", () => {
  const out = new ExtentCollector();
  out.add(8192, 4096, "/b", "file");
  out.add(0, 4096, "/a", "file");
  out.add(4096, 4096, "/a", "file");
  out.add(100, 0, "/none", "file");
  const extents = out.result();
  assertEquals(extents.map((e) => [e.offset, e.length, e.owner]), [[0, 8192, "/a"], [
    8192,
    4096,
    "/b",
  ]]);
  assertEquals(ownerAt(extents, 8191)?.owner, "/a");
  assertEquals(ownerAt(extents, 8192)?.owner, "/b");
  assertEquals(ownerAt(extents, 12288), undefined);
});

Deno.test("blockOwners: zeroes, and partition tables pointing anywhere, name nothing", async () => {
  assertEquals((await blockOwners(readerOf(new Uint8Array(1 << 20)))).filesystems, []);
  const random = rng(7);
  for (let round = 0; round < 200; round++) {
    const disk = new Uint8Array(256 * 1024);
    for (let i = 0; i < 2048; i++) disk[i] = random() * 256;
    disk[510] = 0x55;
    disk[511] = 0xaa;
    if (round % 2) disk[446 + 4] = 0xee; // protective MBR: a GPT header follows, or garbage
    if (round % 3 === 0) disk.set(new TextEncoder().encode("EFI PART"), 512);
    if (round % 6 === 3) {
      const h = new DataView(disk.buffer, 512);
      h.setUint32(84, 128, true); // a plausible entry size, so the entries' place is what is wrong
      h.setUint32(80, 128, true);
    }
    // A random table never throws past the analysis, nor reads past the end.
    await blockOwners(readerOf(disk)).catch((error) => {
      assertOk(error instanceof Error && !(error instanceof RangeError), String(error));
    });
  }
});

Deno.test({
  name: "blockOwners: a damaged ext4 is named as far as it reads, never crashes or hangs",
  ignore: !hasCommand("mkfs.ext4"),
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      await Deno.mkdir(`${dir}/src/d`, { recursive: true });
      for (let i = 0; i < 20; i++) {
        await Deno.writeFile(`${dir}/src/d/f${i}`, new Uint8Array(3000 * i + 1).fill(i));
      }
      const image = `${dir}/fs.img`;
      const mkfs = new Deno.Command("mkfs.ext4", {
        args: ["-q", "-b", "1024", "-d", `${dir}/src`, image, "4M"],
        stdout: "null",
        stderr: "null",
      });
      assertEquals((await mkfs.output()).code, 0);
      const clean = await Deno.readFile(image);
      const good = await blockOwners(readerOf(clean));
      assertEquals(good.filesystems[0]?.type, "ext4");
      assertOk(good.extents.some((e) => e.owner === "/d/f19"));
      const random = rng(11);
      for (let round = 0; round < 60; round++) {
        const disk = clean.slice();
        // Damage the metadata the walk trusts: superblock, descriptors, inode tables, directories.
        for (let i = 0; i < 40; i++) disk[Math.floor(random() * 600 * 1024)] = random() * 256;
        const owners = await blockOwners(readerOf(disk));
        for (const e of owners.extents) {
          assertOk(e.offset >= 0 && e.offset + e.length <= disk.length, JSON.stringify(e));
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
