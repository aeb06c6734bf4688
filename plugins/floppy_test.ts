import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import type { Backend } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { randomBytes } from "../tests/helpers.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { floppyPlugin } from "./floppy.ts";

/** A minimal FAT32 reader, enough to check the generated volume from the outside. */
async function fatReader(disk: Backend) {
  const mbr = await read(disk, 0, 512);
  const mv = new DataView(mbr.buffer);
  assertEquals(mbr[510], 0x55);
  assertEquals(mbr[446 + 4], 0x0c);
  const base = mv.getUint32(446 + 8, true) * 512;
  const boot = await read(disk, base, 512);
  const bv = new DataView(boot.buffer);
  const spc = boot[13]!;
  const reserved = bv.getUint16(14, true);
  const fatSectors = bv.getUint32(36, true);
  const dataStart = base + (reserved + 2 * fatSectors) * 512;
  const clusterBytes = spc * 512;
  const fatEntry = async (c: number) => {
    const b = await read(disk, base + reserved * 512 + c * 4, 4);
    return new DataView(b.buffer).getUint32(0, true) & 0x0fffffff;
  };
  const chain = async (first: number, size?: number) => {
    const parts: Uint8Array[] = [];
    for (let c = first; c >= 2 && c < 0x0ffffff8; c = await fatEntry(c)) {
      parts.push(await read(disk, dataStart + (c - 2) * clusterBytes, clusterBytes));
    }
    const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    return size === undefined ? all : all.subarray(0, size);
  };
  /** Lists a directory: long name (or short) → [cluster, size, isDir]. */
  const list = async (cluster: number) => {
    const bytes = await chain(cluster);
    const dv = new DataView(bytes.buffer);
    const out = new Map<string, [number, number, boolean]>();
    let long = "";
    for (let at = 0; at < bytes.length && bytes[at] !== 0; at += 32) {
      const attr = bytes[at + 11]!;
      if (attr === 0x0f) {
        let part = "";
        for (const off of [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]) {
          const code = dv.getUint16(at + off, true);
          if (code === 0 || code === 0xffff) break;
          part += String.fromCharCode(code);
        }
        long = part + long;
        continue;
      }
      const raw = new TextDecoder().decode(bytes.subarray(at, at + 11));
      const ext = raw.slice(8).trim();
      const short = raw.slice(0, 8).trim() + (ext ? `.${ext}` : "");
      const c = (dv.getUint16(at + 20, true) << 16) | dv.getUint16(at + 26, true);
      out.set(long || short, [c, dv.getUint32(at + 28, true), (attr & 0x10) !== 0]);
      long = "";
    }
    return out;
  };
  return {
    label: new TextDecoder().decode(boot.subarray(71, 82)),
    list,
    chain,
    root: bv.getUint32(44, true),
  };
}

Deno.test("floppy plugin builds a FAT32 volume whose files read back byte-exact", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-floppy-test" });
  try {
    const big = randomBytes(300000, 5);
    await Deno.mkdir(`${dir}/Sub Dir/deeper`, { recursive: true });
    await Deno.writeFile(`${dir}/Sub Dir/a long file name with spaces.bin`, big);
    await Deno.writeTextFile(`${dir}/README.TXT`, "hello\n");
    await Deno.writeTextFile(`${dir}/Sub Dir/deeper/x`, "x");
    await Deno.writeFile(`${dir}/empty`, new Uint8Array());
    const { backend, instance } = await openPlugin(floppyPlugin, [dir, "label=mydisk"]);
    assertEquals(backend.capabilities().writable, false);
    const fat = await fatReader(backend);
    assertEquals(fat.label, "MYDISK     ");
    const root = await fat.list(fat.root);
    assertEquals([...root.keys()].sort(), ["MYDISK", "README.TXT", "Sub Dir", "empty"]);
    const [readme, readmeSize] = root.get("README.TXT")!;
    assertEquals(new TextDecoder().decode(await fat.chain(readme, readmeSize)), "hello\n");
    assertEquals(root.get("empty"), [0, 0, false]);
    const sub = await fat.list(root.get("Sub Dir")![0]);
    assertOk(sub.has(".") && sub.has(".."));
    const [bigCluster, bigSize] = sub.get("a long file name with spaces.bin")!;
    assertEquals(bigSize, big.length);
    assertBytes(await fat.chain(bigCluster, bigSize), big);
    const deeper = await fat.list(sub.get("deeper")![0]);
    assertEquals(deeper.get("..")![0], sub.get(".")![0]);
    await instance.close?.();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("floppy plugin honours size= and rejects bad labels and missing directories", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-floppy-test" });
  try {
    const { backend, instance } = await openPlugin(floppyPlugin, [`dir=${dir}`, "size=64M"]);
    assertEquals(backend.size(), 64 * 1024 * 1024);
    await instance.close?.();
    await assertRejects(
      () => openPlugin(floppyPlugin, [dir, "label=far too long a label"]),
      UsageError,
    );
    await assertRejects(() => openPlugin(floppyPlugin, [`${dir}/missing`]), UsageError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
