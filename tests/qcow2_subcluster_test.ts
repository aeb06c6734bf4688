/**
 * Extended L2 entries through `nbd serve --filter=qcow2`: writes allocate
 * and copy only the subclusters they touch, aligned WRITE_ZEROES and TRIM
 * become zero subclusters, and random sequences from three connections
 * leave images that `qemu-img check` finds clean (no errors, no leaks) and
 * `qemu-img compare` finds equal to a raw model given the same changes.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { peers, run, runOk, startNbdServe, tempDir } from "./helpers.ts";

const PEERS = peers("qemu-img", "qemu-io");

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  data: boolean;
  zero: boolean;
}

/** `qemu-img map` of the byte range [from, to): one "depth:D|Z|H" per 512 bytes. */
async function mapOf(path: string, from: number, to: number): Promise<string[]> {
  const { stdout } = await runOk("qemu-img", ["map", "--output=json", path]);
  const out: string[] = [];
  for (const e of JSON.parse(stdout) as MapEntry[]) {
    for (let at = e.start; at < e.start + e.length; at += 512) {
      if (at >= from && at < to) out.push(`${e.depth}:${e.data ? "D" : e.zero ? "Z" : "H"}`);
    }
  }
  return out;
}

async function assertClean(path: string) {
  const result = await run("qemu-img", ["check", path]);
  assertEquals(result.code, 0, `qemu-img check ${path}:\n${result.stdout}${result.stderr}`);
}

async function assertSame(path: string, model: string) {
  const result = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", path, model]);
  assertEquals(result.code, 0, `qemu-img compare:\n${result.stdout}${result.stderr}`);
}

/** qemu-io commands on the raw model: a discard zeroes its whole subclusters only. */
function forModel(cmds: string[], subcluster: number, size: number): string[] {
  return cmds.flatMap((c) => {
    const m = /^discard (\d+) (\d+)$/.exec(c);
    if (!m) return [c];
    const offset = Number(m[1]);
    const end = offset + Number(m[2]);
    const from = Math.ceil(offset / subcluster) * subcluster;
    const to = end === size ? end : Math.floor(end / subcluster) * subcluster;
    return from < to ? [`write -z ${from} ${to - from}`] : [];
  });
}

/** Small random writes, zeroes and discards (512-byte units) inside [from, to). */
function randomCommands(seed: number, from: number, to: number, count: number): string[] {
  let x = seed;
  const next = () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const length = (1 + Math.floor(next() * 24)) * 512;
    const offset = from + Math.floor(next() * (to - from - length) / 512) * 512;
    const kind = next();
    if (kind < 0.55) cmds.push(`write -P ${1 + Math.floor(next() * 250)} ${offset} ${length}`);
    else if (kind < 0.8) cmds.push(`write -z ${offset} ${length}`);
    else cmds.push(`discard ${offset} ${length}`);
  }
  return cmds;
}

Deno.test({
  name: "qcow2 extended L2: a write over a backing file stores only its subclusters",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2-sc");
    const d = dir.path;
    await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "1M"]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xa1 0 1M", `${d}/base.raw`]);
    const top = `${d}/top.qcow2`;
    await runOk("qemu-img", [
      "create",
      ...["-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k"],
      ...["-F", "raw", "-b", "base.raw", top],
    ]);
    await runOk("qemu-img", ["convert", "-O", "raw", top, `${d}/model.raw`]);
    const cmds = [
      "write -P 0xb2 6k 2k", // one whole subcluster (2 KiB) of cluster 0
      "write -P 0xb3 9000 100", // inside subcluster 4: copied up from the backing file
      "write -z 40k 4k", // two zero subclusters
      "discard 128k 2k", // one subcluster of cluster 2, zero from then on
      "write -z 300000 3000", // partial subclusters: zero data, the aligned one zero
    ];
    {
      await using server = await startNbdServe([
        "--filter=qcow2",
        ...["file", top, "qcow2-follow-backing=true"],
      ]);
      await runOk("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), server.uri]);
    }
    await runOk("qemu-io", [
      "-f",
      "raw",
      ...forModel(cmds, 2048, 1 << 20).flatMap((c) => ["-c", c]),
      `${d}/model.raw`,
    ]);
    await assertClean(top);
    await assertSame(top, `${d}/model.raw`);
    // Only the touched subclusters belong to the top image; the rest still comes from below.
    const map = await mapOf(top, 0, 65536);
    const expected = Array.from({ length: 128 }, (_, i) => {
      const at = i * 512;
      if (at >= 6144 && at < 10240) return "0:D";
      if (at >= 40960 && at < 45056) return "0:Z";
      return "1:D";
    });
    assertEquals(map.join(" "), expected.join(" "), "cluster 0 by subcluster");
    assertEquals(
      (await mapOf(top, 128 * 1024, 132 * 1024)).join(" "),
      [...Array(4).fill("0:Z"), ...Array(4).fill("1:D")].join(" "),
      "discarded subcluster",
    );
    // 300000..303000: subcluster 147 (301056..303104) is not whole: only data zeroes.
    const zeroed = await mapOf(top, 299008, 303104);
    assertEquals(zeroed.join(" "), Array(8).fill("0:D").join(" "), "partial subclusters");
    // A cluster holding 2 subclusters of data takes one host cluster, not more.
    const { stdout } = await runOk("qemu-img", ["info", "--output=json", top]);
    const actual = (JSON.parse(stdout) as { "actual-size": number })["actual-size"];
    assertOk(actual < 64 * 1024 * 8, `image grew to ${actual} bytes`);
  },
});

Deno.test({
  name: "qcow2 extended L2: random subcluster writes from three connections stay consistent",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2-sc");
    const d = dir.path;
    await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "3M"]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x5c 0 3M", `${d}/base.raw`]);
    const size = 3 * 1024 * 1024;
    const layouts: [string, string[], number][] = [
      [
        "backed-64k",
        ["-o", "extended_l2=on,cluster_size=64k", "-F", "raw", "-b", "base.raw"],
        2048,
      ],
      ["plain-16k", ["-o", "extended_l2=on,cluster_size=16k"], 512],
      ["plain-2m", ["-o", "extended_l2=on,cluster_size=2M"], 65536],
    ];
    for (const [name, options, subcluster] of layouts) {
      const path = `${d}/${name}.qcow2`;
      const model = `${d}/${name}.raw`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...options, path, `${size}`]);
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x3e 512k 700k", path]);
      await runOk("qemu-img", ["convert", "-O", "raw", path, model]);
      // Three writers on disjoint byte ranges whose borders fall inside clusters.
      const borders = [0, 1024 * 1024 + 3072, 2 * 1024 * 1024 - 5120, size];
      const streams = [0, 1, 2].map((k) =>
        randomCommands(17 + k * 31, borders[k]!, borders[k + 1]!, 60)
      );
      {
        await using server = await startNbdServe([
          "--filter=qcow2",
          ...["file", path, "qcow2-follow-backing=true"],
        ]);
        await Promise.all(streams.map((cmds) =>
          runOk("qemu-io", [
            "-f",
            "raw",
            ...cmds.flatMap((c) => ["-c", c]),
            "-c",
            "flush",
            server.uri,
          ])
        ));
      }
      const all = forModel(streams.flat(), subcluster, size);
      await runOk("qemu-io", ["-f", "raw", ...all.flatMap((c) => ["-c", c]), model]);
      await assertClean(path);
      await assertSame(path, model);
    }
  },
});

Deno.test({
  name: "qcow2 extended L2: a server killed during subcluster writes leaves no corruption",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2-sc");
    const d = dir.path;
    await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "8M"]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x71 0 8M", `${d}/base.raw`]);
    for (let round = 0; round < 3; round++) {
      const path = `${d}/crash.qcow2`;
      const backed = round !== 1;
      await runOk("qemu-img", [
        "create",
        ...[
          "-q",
          "-f",
          "qcow2",
          "-o",
          `extended_l2=on,cluster_size=${round === 2 ? "16k" : "64k"}`,
        ],
        ...(backed ? ["-F", "raw", "-b", "base.raw"] : []),
        ...[path, "8M"],
      ]);
      const server = await startNbdServe([
        "--filter=qcow2",
        ...["file", path, ...(backed ? ["qcow2-follow-backing=true"] : [])],
      ]);
      // Durable first: written and flushed, in subclusters of clusters also written later.
      await runOk("qemu-io", [
        "-f",
        "raw",
        ...["-c", "write -P 0x5a 1M 3k", "-c", "write -P 0x5b 1030k 1k", "-c", "flush"],
        server.uri,
      ]);
      const writer = new Deno.Command("qemu-io", {
        args: [
          "-f",
          "raw",
          ...randomCommands(round + 41, 1024 * 1024 + 65536, 8 * 1024 * 1024, 400)
            .flatMap((c) => ["-c", c]),
          server.uri,
        ],
        stdout: "null",
        stderr: "null",
      }).spawn();
      await new Promise((r) => setTimeout(r, 200 + round * 150));
      server.child.kill("SIGKILL");
      await writer.status;
      await server[Symbol.asyncDispose]();
      const check = await run("qemu-img", ["check", path]);
      assertOk(
        check.code === 0 || check.code === 3,
        `round ${round}: qemu-img check exit ${check.code}\n${check.stdout}${check.stderr}`,
      );
      await runOk("qemu-io", [
        "-f",
        "qcow2",
        ...["-c", "read -P 0x5a 1M 3k", "-c", "read -P 0x5b 1030k 1k", path],
      ]);
    }
  },
});
