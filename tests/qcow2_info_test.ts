/**
 * `nbd info` on qcow2 images, local and exported, against `qemu-img info`:
 * the format, version, virtual size, cluster size, backing file (named,
 * never followed), compression type and dirty/corrupt bits must agree.
 */

import { assertEquals, assertMatch, assertOk } from "./assert.ts";
import { peers, ROOT, run, runOk, startNbdServe, tempDir } from "./helpers.ts";

const PEERS = peers("qemu-img");

async function nbdInfo(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return await run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, "info", ...args]);
}

/** Sets bits in the incompatible features field of a version 3 header. */
async function setIncompatible(path: string, bits: number): Promise<void> {
  using file = await Deno.open(path, { read: true, write: true });
  const word = new Uint8Array(4);
  await file.seek(76, Deno.SeekMode.Start);
  await file.read(word);
  const view = new DataView(word.buffer);
  view.setUint32(0, view.getUint32(0) | bits);
  await file.seek(76, Deno.SeekMode.Start);
  await file.write(word);
}

/** Checks our JSON for one image against qemu-img's. */
function agree(ours: Record<string, unknown>, qemu: Record<string, unknown>, name: string) {
  const q = ours.qcow2 as Record<string, unknown>;
  const data = (qemu["format-specific"] as { data: Record<string, unknown> }).data;
  assertEquals(ours.format, qemu.format, `${name}: format`);
  assertEquals(q["virtual-size"], qemu["virtual-size"], `${name}: virtual size`);
  assertEquals(q["cluster-size"], qemu["cluster-size"], `${name}: cluster size`);
  assertEquals(q.compat, data.compat, `${name}: compat`);
  assertEquals(q["backing-file"], qemu["backing-filename"], `${name}: backing file`);
  assertEquals(q["backing-format"], qemu["backing-filename-format"], `${name}: backing format`);
  assertEquals(q["refcount-bits"], data["refcount-bits"], `${name}: refcount bits`);
  assertEquals(q.dirty, qemu["dirty-flag"], `${name}: dirty`);
  if (data.compat === "1.1") {
    assertEquals(q["lazy-refcounts"], data["lazy-refcounts"], `${name}: lazy refcounts`);
    assertEquals(q["compression-type"], data["compression-type"], `${name}: compression type`);
    assertEquals(q["extended-l2"], data["extended-l2"], `${name}: extended L2`);
    assertEquals(q.corrupt, data.corrupt, `${name}: corrupt`);
  }
}

Deno.test({
  name: "nbd info FILE reports qcow2 images as qemu-img info does, following nothing",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qinfo");
    const d = dir.path;
    await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "3M"]);
    const cases: [string, string[], string][] = [
      ["v2", ["-o", "compat=0.10"], "1G"],
      ["v3-512-rc1", ["-o", "cluster_size=512,refcount_bits=1"], "5M"],
      ["v3-2m-zstd", ["-o", "cluster_size=2M,compression_type=zstd,refcount_bits=64"], "9000000"],
      ["extl2-lazy", ["-o", "extended_l2=on,lazy_refcounts=on"], "64M"],
      // A backing name that leads nowhere: it is reported, never opened.
      ["backed", ["-u", "-b", "../../etc/passwd", "-F", "raw"], "3M"],
      ["backed-qcow2", ["-b", "v2.qcow2", "-F", "qcow2"], "1G"],
    ];
    for (const [name, options, size] of cases) {
      const path = `${d}/${name}.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...options, path, size]);
      const ours = JSON.parse((await nbdInfo(["--json", path])).stdout);
      const qemu = JSON.parse(
        (await runOk("qemu-img", ["info", "-U", "--output=json", path])).stdout,
      );
      agree(ours, qemu, name);
      assertEquals(ours["file-size"], (await Deno.stat(path)).size);
    }
    // Dirty and corrupt bits.
    await setIncompatible(`${d}/extl2-lazy.qcow2`, 1);
    await setIncompatible(`${d}/v3-512-rc1.qcow2`, 2);
    for (const name of ["extl2-lazy", "v3-512-rc1"]) {
      const path = `${d}/${name}.qcow2`;
      const ours = JSON.parse((await nbdInfo(["--json", path])).stdout);
      const qemu = JSON.parse(
        (await runOk("qemu-img", ["info", "-U", "--output=json", path])).stdout,
      );
      agree(ours, qemu, `${name} (bits set)`);
    }
    const text = (await nbdInfo([`${d}/backed.qcow2`])).stdout;
    assertMatch(text, /^file: .*backed\.qcow2\n/);
    assertMatch(text, /\tformat: qcow2\n/);
    assertMatch(text, /\tqcow2-version: 3 \(compat 1\.1\)\n/);
    assertMatch(text, /\tvirtual-size: 3145728\n/);
    assertMatch(text, /\tbacking-file: "\.\.\/\.\.\/etc\/passwd" \(not followed\)\n/);
    assertMatch(text, /\tdirty: false\n\tcorrupt: false\n$/);
    const dirty = (await nbdInfo([`${d}/extl2-lazy.qcow2`])).stdout;
    assertMatch(dirty, /\tdirty: true\n/);
    assertMatch(dirty, /\textended-l2: true\n/);
    const raw = JSON.parse((await nbdInfo(["--json", `${d}/base.raw`])).stdout);
    assertEquals(raw.format, "raw");
    assertEquals(raw["virtual-size"], 3 * 1024 * 1024);
    // qemu-img rounds the size up to whole sectors.
    assertEquals((await nbdInfo(["--size", `${d}/v3-2m-zstd.qcow2`])).stdout, "9000448\n");
    // A header that does not parse: one line, exit 1.
    const bad = `${d}/bad.qcow2`;
    const bytes = await Deno.readFile(`${d}/v2.qcow2`);
    bytes[23] = 40; // cluster_bits
    await Deno.writeFile(bad, bytes);
    const result = await nbdInfo([bad]);
    assertEquals(result.code, 1);
    assertMatch(result.stdout, /\tformat-error: cluster_bits 40 is out of range/);
  },
});

Deno.test({
  name: "nbd info on an export whose content is qcow2 adds its format to nbdinfo's fields",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qinfo");
    const path = `${dir.path}/disk.qcow2`;
    await runOk("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "cluster_size=4096,compression_type=zstd",
      "-u",
      "-b",
      "base.img",
      "-F",
      "raw",
      path,
      "100M",
    ]);
    await using server = await startNbdServe(["-r", "file", path]);
    const json = JSON.parse((await nbdInfo(["--json", server.uri])).stdout);
    const e = json.exports[0];
    assertEquals(e.format, "qcow2");
    assertEquals(e["export-size"], (await Deno.stat(path)).size);
    assertEquals(e.qcow2["virtual-size"], 100 * 1024 * 1024);
    assertEquals(e.qcow2["cluster-size"], 4096);
    assertEquals(e.qcow2["compression-type"], "zstd");
    assertEquals(e.qcow2["backing-file"], "base.img");
    assertOk("is_read_only" in e, "nbdinfo's fields stay");
    const text = (await nbdInfo([server.uri])).stdout;
    assertMatch(text, /\tformat: qcow2\n\tqcow2-version: 3 \(compat 1\.1\)\n/);
    assertMatch(text, /\tbacking-file: "base\.img" \(not followed\)\n/);
    // --no-content reads nothing, so says nothing about the format.
    assertOk(!(await nbdInfo(["--no-content", server.uri])).stdout.includes("format:"));
  },
});

Deno.test({
  name: "nbd info on a raw export prints what it printed before",
  ...PEERS,
  async fn() {
    await using server = await startNbdServe(["memory", "1M"]);
    const text = (await nbdInfo([server.uri])).stdout;
    assertOk(!text.includes("format:"), text);
  },
});

/** Per-512-byte classification: "D" data, "Z" reads as zero without data. */
function classify(entries: { start: number; length: number; data: boolean }[], size: number) {
  const out = new Array<string>(Math.ceil(size / 512)).fill("?");
  for (const e of entries) {
    for (let at = e.start; at < e.start + e.length && at < size; at += 512) {
      out[at / 512] = e.data ? "D" : "Z";
    }
  }
  return out.join("");
}

Deno.test({
  name: "nbd map --source-format=qcow2 shows the guest's allocation as qemu-img map does",
  ...peers("qemu-img", "qemu-io"),
  async fn() {
    await using dir = await tempDir("nbd-qmap");
    const d = dir.path;
    const cases: [string, string[]][] = [
      ["v2", ["-o", "compat=0.10"]],
      ["c4k", ["-o", "cluster_size=4096"]],
      ["extl2", ["-o", "extended_l2=on"]],
      ["prealloc", ["-o", "preallocation=metadata"]],
    ];
    for (const [name, options] of cases) {
      const path = `${d}/${name}.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...options, path, "8M"]);
      await runOk("qemu-io", [
        "-f",
        "qcow2",
        ...[
          "write -P 0x11 0 100k",
          "write -z 64k 128k",
          // qemu compresses only into unallocated clusters.
          name === "prealloc" ? "write -P 0x22 4M 64k" : "write -c -P 0x22 4M 64k",
          "write -P 0x33 6M 3k",
          "discard 6M 64k",
          "write -P 0x44 7M 32k",
        ].flatMap((w) => ["-c", w]),
        path,
      ]);
      const qemu = JSON.parse((await runOk("qemu-img", ["map", "--output=json", path])).stdout);
      const result = await run(Deno.execPath(), [
        "run",
        "-A",
        "--quiet",
        `${ROOT}/main.ts`,
        "map",
        "--json",
        "--source-format=qcow2",
        path,
      ]);
      assertEquals(result.code, 0, result.stderr);
      const ours = (JSON.parse(result.stdout) as { offset: number; length: number; type: number }[])
        .map((e) => ({ start: e.offset, length: e.length, data: (e.type & 1) === 0 }));
      assertEquals(classify(ours, 8 << 20), classify(qemu, 8 << 20), name);
    }
  },
});
