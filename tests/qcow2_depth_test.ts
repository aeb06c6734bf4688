/**
 * `qemu:allocation-depth` from the qcow2 filter: for the same images and
 * chains, `nbdinfo --map=qemu:allocation-depth` over our server prints what
 * it prints over `qemu-nbd -A`; both contexts in one BLOCK_STATUS (nbdsh)
 * agree with the separate maps; a filter above that moves offsets hides
 * the context.
 */

import { assertEquals, assertMatch, assertOk } from "./assert.ts";
import { peers, runOk, startNbdServe, tempDir } from "./helpers.ts";

const PEERS = peers("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdsh");

/** Builds raw base (4M) ← mid.qcow2 (5M) ← top.qcow2 (6M, 4k clusters), plus a lone image. */
async function makeChain(d: string): Promise<void> {
  await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "4M"]);
  await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xa1 0 3M", `${d}/base.raw`]);
  await runOk("qemu-img", [
    "create",
    ...["-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", "base.raw"],
    ...[`${d}/mid.qcow2`, "5M"],
  ]);
  await runOk("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 0xb2 64k 128k", "-c", "write -z 1M 64k", "-c", "write -P 3 2M 6k"],
    `${d}/mid.qcow2`,
  ]);
  await runOk("qemu-img", [
    "create",
    ...["-q", "-f", "qcow2", "-o", "cluster_size=4096", "-F", "qcow2", "-b", "mid.qcow2"],
    ...[`${d}/top.qcow2`, "6M"],
  ]);
  await runOk("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 0xc3 100k 8k", "-c", "write -z 2M 8k", "-c", "discard 3M 64k"],
    ...["-c", "write -c -P 0xd4 5M 4k"],
    `${d}/top.qcow2`,
  ]);
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", `${d}/solo.qcow2`, "2M"]);
  await runOk("qemu-io", [
    "-f",
    "qcow2",
    ...["-c", "write -P 1 0 64k", "-c", "write -z 1M 64k"],
    `${d}/solo.qcow2`,
  ]);
}

async function depthMap(args: string[]): Promise<string> {
  return (await runOk("nbdinfo", ["--map=qemu:allocation-depth", ...args])).stdout;
}

Deno.test({
  name: "qcow2 qemu:allocation-depth: the same map as qemu-nbd -A for chains and lone images",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2-depth");
    const d = dir.path;
    await makeChain(d);
    for (const image of ["top", "mid", "solo"]) {
      const path = `${d}/${image}.qcow2`;
      const theirs = await depthMap(["--", "[", "qemu-nbd", "-r", "-A", "-f", "qcow2", path, "]"]);
      await using server = await startNbdServe([
        "-r",
        "--filter=qcow2",
        ...["file", path, "qcow2-follow-backing=true"],
      ]);
      const ours = await depthMap([server.uri]);
      assertEquals(ours, theirs, `${image}: qemu:allocation-depth`);
    }
    // The chain's map really has every level in it.
    const top = await depthMap([
      "--",
      ...["[", "qemu-nbd", "-r", "-A", "-f", "qcow2", `${d}/top.qcow2`, "]"],
    ]);
    for (const depth of ["local", "backing depth 2", "backing depth 3"]) {
      assertOk(top.includes(depth), `the top map has "${depth}":\n${top}`);
    }
  },
});

Deno.test({
  name: "qcow2 qemu:allocation-depth: both contexts in one request; hidden under offset",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2-depth");
    const d = dir.path;
    await makeChain(d);
    const path = `${d}/top.qcow2`;
    await using server = await startNbdServe([
      "-r",
      "--filter=qcow2",
      ...["file", path, "qcow2-follow-backing=true"],
    ]);
    // One BLOCK_STATUS per 1 MiB with both contexts; each context's extents are
    // printed as "offset length value" lines, like nbdinfo --map.
    const script = `
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(${JSON.stringify(server.uri)})
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:allocation-depth")
size = h.get_size()
maps = {"base:allocation": [], "qemu:allocation-depth": []}
def seen(ctx, offset, entries, err):
    at = offset
    for i in range(0, len(entries), 2):
        maps[ctx].append((at, entries[i], entries[i + 1]))
        at += entries[i]
    return 0
for offset in range(0, size, 1 << 20):
    h.block_status(min(1 << 20, size - offset), offset, seen)
for ctx in ["base:allocation", "qemu:allocation-depth"]:
    merged = []
    for (at, length, value) in maps[ctx]:
        if merged and merged[-1][2] == value and merged[-1][0] + merged[-1][1] == at:
            merged[-1][1] += length
        else:
            merged.append([at, length, value])
    print(ctx)
    for (at, length, value) in merged:
        print(at, length, value)
`;
    const { stdout } = await runOk("/usr/bin/python3", ["-c", script]);
    const [base, depth] = stdout.split("qemu:allocation-depth\n") as [string, string];
    const flat = (map: string) =>
      map.trim().split("\n").map((l) => l.trim().split(/\s+/).slice(0, 3).join(" ")).join("\n");
    assertEquals(
      flat(base.replace("base:allocation\n", "")),
      flat((await runOk("nbdinfo", ["--map", server.uri])).stdout),
      "base:allocation",
    );
    assertEquals(flat(depth), flat(await depthMap([server.uri])), "qemu:allocation-depth");

    // A filter that moves offsets does not pass the context through.
    await using shifted = await startNbdServe([
      "-r",
      "--filter=offset",
      "--filter=qcow2",
      ...["file", path, "qcow2-follow-backing=true", "offset=4096"],
    ]);
    const info = (await runOk("nbdinfo", [shifted.uri])).stdout;
    assertMatch(info, /contexts:\n\t\tbase:allocation\n/);
    assertOk(!info.includes("qemu:allocation-depth"), info);
  },
});
