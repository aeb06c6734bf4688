/**
 * The rbd and s3 plugins against a real, throwaway Ceph cluster
 * (tests/ceph_cluster.ts), checked by Ceph's own tools (rbd import/export,
 * rbd du), qemu's rbd driver, nbdinfo, nbdcopy and qemu-io. One cluster,
 * started once, serves every step.
 *
 * @module
 */

import { assertBytes, assertEquals, assertIncludes, assertMatch, assertOk } from "./assert.ts";
import {
  INTEROP_REQUIRED,
  nbdExecutable,
  randomBytes,
  run,
  runOk,
  startNbdServe,
  tempDir,
} from "./helpers.ts";
import { type CephCluster, missingCephCommands, startCephCluster } from "./ceph_cluster.ts";

const MiB = 1 << 20;
const PEERS = ["nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "curl", "s3cmd"];

function missingPeers(): string[] {
  const missing = missingCephCommands(true);
  for (const peer of PEERS) {
    if (new Deno.Command("sh", { args: ["-c", `command -v ${peer}`] }).outputSync().code !== 0) {
      missing.push(peer);
    }
  }
  return missing;
}

const missing = missingPeers();
if (missing.length > 0 && !INTEROP_REQUIRED) {
  console.error(
    `\n*** SKIPPING Ceph tests: missing ${
      missing.join(", ")
    } (set NBD_INTEROP=require to fail) ***\n`,
  );
}

/** An image of `size` with patterned data at a few places and holes elsewhere. */
function patterned(size: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(size);
  bytes.fill(0xaa, 0, MiB);
  bytes.set(randomBytes(3 * MiB, seed), 5 * MiB);
  bytes.fill(0x55, size - 64 * 1024);
  return bytes;
}

/** `rbd export` of an image (or snapshot) into memory. */
async function rbdExport(cluster: CephCluster, spec: string, dir: string): Promise<Uint8Array> {
  const path = `${dir}/export-${crypto.randomUUID()}`;
  await cluster.rbd("export", spec, path);
  const bytes = await Deno.readFile(path);
  await Deno.remove(path);
  return bytes;
}

async function usedBytes(cluster: CephCluster, spec: string): Promise<number> {
  const du = JSON.parse(await cluster.rbd("du", "--format", "json", spec));
  return du.images[0].used_size;
}

Deno.test({
  name: "ceph: rbd and s3 plugins against a single-node cluster",
  ignore: missing.length > 0 && !INTEROP_REQUIRED,
  async fn(t) {
    await using cluster = await startCephCluster({ rgw: true });
    await using dir = await tempDir("nbd-ceph-test");
    const conf = `conf=${cluster.conf}`;
    const qemuEnv = { ...cluster.env };

    await t.step("rbd import → nbd serve rbd: nbdinfo, nbdcopy and qemu-io agree", async () => {
      const size = 16 * MiB;
      const source = patterned(size, 7);
      await Deno.writeFile(`${dir.path}/src.img`, source);
      await cluster.rbd("import", `${dir.path}/src.img`, "rbd/imported");
      await using server = await startNbdServe(["-r", "rbd", "rbd/imported", conf]);
      const info = JSON.parse((await runOk("nbdinfo", ["--json", server.uri])).stdout);
      assertEquals(info.exports[0]["export-size"], size);
      assertEquals(info.exports[0]["is_read_only"], true);
      assertEquals(info.exports[0]["can_multi_conn"], true);
      // rbd import skips zero blocks, so the object map knows the holes (4 MiB objects).
      const map = JSON.parse((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout);
      const holes = map.filter((e: { type: number }) => e.type === 3);
      assertEquals(
        holes.map((e: { offset: number; length: number }) => [e.offset, e.length]),
        [[8 * MiB, 4 * MiB]],
      );
      await runOk("nbdcopy", [server.uri, `${dir.path}/copy.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/copy.img`), source);
      const io = await runOk("qemu-io", [
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0xaa 0 1M",
        "-c",
        "read -P 0 1M 4M",
        "-c",
        `read -P 0x55 ${size - 65536} 64k`,
        server.uri,
      ]);
      assertOk(!/Pattern verification failed/.test(io.stdout + io.stderr), io.stdout);
    });

    await t.step("qemu-img convert to rbd: → nbd serve rbd reads it back", async () => {
      const source = patterned(12 * MiB, 8);
      await Deno.writeFile(`${dir.path}/q.img`, source);
      await runOk("qemu-img", [
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        `${dir.path}/q.img`,
        `rbd:rbd/fromqemu:conf=${cluster.conf}`,
      ], { env: qemuEnv });
      await using server = await startNbdServe(["rbd", "rbd/fromqemu", conf]);
      await runOk("nbdcopy", [server.uri, `${dir.path}/q.out`]);
      assertBytes(await Deno.readFile(`${dir.path}/q.out`), source);
      await runOk("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0xaa 0 1M", server.uri]);
    });

    await t.step("writes through qemu-io and nbdcopy read back with rbd export", async () => {
      await cluster.rbd("create", "--size", "16M", "rbd/written");
      const payload = randomBytes(6 * MiB + 12345, 9);
      await Deno.writeFile(`${dir.path}/payload`, payload);
      await using server = await startNbdServe(["rbd", "rbd/written", conf]);
      // nbdcopy writes the payload at offset 0 (the rest stays zero).
      await runOk("nbdcopy", [`${dir.path}/payload`, server.uri]);
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x11 10M 65536",
        "-c",
        "write -z 1M 8192",
        "-c",
        "flush",
        server.uri,
      ]);
      const expected = new Uint8Array(16 * MiB);
      expected.set(payload);
      expected.fill(0x11, 10 * MiB, 10 * MiB + 65536);
      expected.fill(0, MiB, MiB + 8192);
      assertBytes(await rbdExport(cluster, "rbd/written", dir.path), expected);
    });

    await t.step("trims show in rbd du; snapshots are served read-only", async () => {
      await cluster.rbd("create", "--size", "16M", "rbd/trimmed");
      await using server = await startNbdServe(["rbd", "rbd/trimmed", conf]);
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x22 0 16M", server.uri]);
      assertEquals(await usedBytes(cluster, "rbd/trimmed"), 16 * MiB);
      await runOk("qemu-io", ["-f", "raw", "-c", "discard 4M 8M", "-c", "flush", server.uri]);
      assertEquals(await usedBytes(cluster, "rbd/trimmed"), 8 * MiB);
      const map = (await runOk("nbdinfo", ["--map", server.uri])).stdout;
      assertMatch(map, /4194304\s+8388608\s+3\s+hole,zero/);

      // A snapshot keeps today's contents while the image moves on.
      await cluster.rbd("snap", "create", "rbd/trimmed@before");
      await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush", server.uri]);
      await using snap = await startNbdServe(["rbd", "rbd/trimmed@before", conf]);
      const info = JSON.parse((await runOk("nbdinfo", ["--json", snap.uri])).stdout);
      assertEquals(info.exports[0]["is_read_only"], true);
      const write = await run("qemu-io", ["-f", "raw", "-c", "write 0 4096", snap.uri]);
      assertOk(
        write.code !== 0 || /failed|not permitted|read-only/i.test(write.stdout + write.stderr),
        write.stdout,
      );
      const expected = new Uint8Array(16 * MiB).fill(0x22);
      expected.fill(0, 4 * MiB, 12 * MiB);
      await runOk("nbdcopy", [snap.uri, `${dir.path}/snap.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/snap.img`), expected);
      assertBytes(await rbdExport(cluster, "rbd/trimmed@before", dir.path), expected);
    });

    await t.step("a missing image or pool is one line and exit 1", async () => {
      const nbd = await nbdExecutable();
      for (const [spec, text] of [["rbd/nope", "rbd/nope"], ["nopool/x", "nopool"]]) {
        const result = await run(nbd, ["serve", "-U", `${dir.path}/s`, "rbd", spec, conf]);
        assertEquals(result.code, 1);
        const lines = result.stderr.trim().split("\n");
        assertEquals(lines.length, 1, result.stderr);
        assertMatch(lines[0]!, /^nbd: rbd: cannot open/);
        assertIncludes(lines[0]!, text);
      }
    });

    await t.step("nothing but the rbd plugin loads librbd", async () => {
      await using server = await startNbdServe(["memory", "1M"]);
      const maps = await Deno.readTextFile(`/proc/${server.child.pid}/maps`);
      assertOk(!maps.includes("librbd"), "nbd serve memory mapped librbd");
      await using rbd = await startNbdServe(["-r", "rbd", "rbd/imported", conf]);
      assertIncludes(await Deno.readTextFile(`/proc/${rbd.child.pid}/maps`), "librbd.so.1");
    });
  },
});
