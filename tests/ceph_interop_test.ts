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
  ROOT,
  run,
  runOk,
  type ServerProcess,
  startNbdServe,
  startServer,
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

/** `nbd serve ARGS` with extra environment variables (S3 credentials). */
function serveWithEnv(args: string[], env: Record<string, string>): Promise<ServerProcess> {
  return startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", ...args],
    { env },
  );
}

const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

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

    await t.step("nbd copy to and from rbd: images", async () => {
      const nbd = await nbdExecutable();
      const source = patterned(16 * MiB, 13);
      await Deno.writeFile(`${dir.path}/c.img`, source);
      await runOk(nbd, ["copy", `${dir.path}/c.img`, `rbd:rbd/copied:conf=${cluster.conf}`]);
      assertBytes(await rbdExport(cluster, "rbd/copied", dir.path), source);
      // The zero object in the middle was never written.
      assertEquals(await usedBytes(cluster, "rbd/copied"), 12 * MiB);
      await runOk(nbd, ["copy", `rbd:rbd/copied:conf=${cluster.conf}`, `${dir.path}/c.out`]);
      assertBytes(await Deno.readFile(`${dir.path}/c.out`), source);
      const missing = await run(nbd, [
        "copy",
        `rbd:rbd/absent:conf=${cluster.conf}`,
        `${dir.path}/x`,
      ]);
      assertEquals(missing.code, 1);
      assertMatch(missing.stderr.trim(), /^nbd: .*rbd\/absent.*No such file or directory$/);
    });

    await t.step("nothing but the rbd plugin loads librbd", async () => {
      await using server = await startNbdServe(["memory", "1M"]);
      const maps = await Deno.readTextFile(`/proc/${server.child.pid}/maps`);
      assertOk(!maps.includes("librbd"), "nbd serve memory mapped librbd");
      await using rbd = await startNbdServe(["-r", "rbd", "rbd/imported", conf]);
      assertIncludes(await Deno.readTextFile(`/proc/${rbd.child.pid}/maps`), "librbd.so.1");
    });
    // ---- S3 through radosgw ----
    const s3 = cluster.s3!;
    const awsEnv = {
      AWS_ACCESS_KEY_ID: s3.accessKey,
      AWS_SECRET_ACCESS_KEY: s3.secretKey,
      AWS_SHARED_CREDENTIALS_FILE: `${dir.path}/no-credentials`,
    };
    const endpoint = `endpoint-url=${s3.endpoint}`;
    const s3cmdConfig = `${dir.path}/s3cmd.cfg`;
    const host = new URL(s3.endpoint).host;
    await Deno.writeTextFile(
      s3cmdConfig,
      `[default]\naccess_key = ${s3.accessKey}\nsecret_key = ${s3.secretKey}\n` +
        `host_base = ${host}\nhost_bucket = ${host}\nuse_https = False\nsignature_v2 = False\n`,
    );
    const s3cmd = (...args: string[]) => runOk("s3cmd", ["-c", s3cmdConfig, ...args]);
    /** GET of an object by curl, signed by curl (the expected layout, read by another client). */
    const curlGet = async (path: string): Promise<Uint8Array> => {
      const out = `${dir.path}/curl-${crypto.randomUUID()}`;
      await runOk("curl", [
        "-sSf",
        "--aws-sigv4",
        `aws:amz:${s3.region}:s3`,
        "--user",
        `${s3.accessKey}:${s3.secretKey}`,
        "-H",
        `x-amz-content-sha256: ${EMPTY_SHA256}`,
        "-o",
        out,
        `${s3.endpoint}/${path}`,
      ]);
      return await Deno.readFile(out);
    };
    await s3cmd("mb", "s3://disks");

    await t.step("s3: a disk of objects round-trips; curl and s3cmd see the layout", async () => {
      const size = 24 * MiB;
      const source = patterned(size, 11); // data in objects 0, 5-7 and 23 (1 MiB objects)
      await Deno.writeFile(`${dir.path}/s3src.img`, source);
      await using server = await serveWithEnv([
        "s3",
        "bucket=disks",
        "key=vm/disk",
        `size=${size}`,
        "object-size=1M",
        endpoint,
      ], awsEnv);
      await runOk("nbdcopy", [`${dir.path}/s3src.img`, server.uri]);
      const listing = (await s3cmd("ls", "s3://disks/vm/disk/")).stdout;
      const names = [...listing.matchAll(/vm\/disk\/([0-9a-f]{16})/g)].map((m) => m[1]);
      assertEquals(names, [0, 5, 6, 7, 23].map((i) => i.toString(16).padStart(16, "0")));
      assertBytes(
        await curlGet("disks/vm/disk/0000000000000006"),
        source.subarray(6 * MiB, 7 * MiB),
      );
      await runOk("nbdcopy", [server.uri, `${dir.path}/s3out.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/s3out.img`), source);
      const map = JSON.parse((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout);
      assertEquals(
        map.filter((e: { type: number }) => e.type === 0).map((
          e: { offset: number; length: number },
        ) => [e.offset / MiB, e.length / MiB]),
        [[0, 1], [5, 3], [23, 1]],
      );

      // TRIM deletes whole objects; zeroing part of one rewrites it.
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "discard 5M 2M",
        "-c",
        "write -z 7340544 1024",
        server.uri,
      ]);
      const after = (await s3cmd("ls", "s3://disks/vm/disk/")).stdout;
      assertEquals(
        [...after.matchAll(/vm\/disk\/([0-9a-f]{16})/g)].map((m) => parseInt(m[1]!, 16)),
        [0, 7, 23],
      );
      const expected = source.slice(7 * MiB, 8 * MiB);
      expected.fill(0, 512, 1536);
      assertBytes(await curlGet("disks/vm/disk/0000000000000007"), expected);
    });

    await t.step("s3: one existing object is served read-only with Range requests", async () => {
      const image = randomBytes(3 * MiB + 4096, 12);
      await Deno.writeFile(`${dir.path}/one.raw`, image);
      await s3cmd("put", `${dir.path}/one.raw`, "s3://disks/images/one.raw");
      await using server = await serveWithEnv(
        ["s3", "bucket=disks", "key=images/one.raw", endpoint],
        awsEnv,
      );
      const info = JSON.parse((await runOk("nbdinfo", ["--json", server.uri])).stdout);
      assertEquals(info.exports[0]["export-size"], image.length);
      assertEquals(info.exports[0]["is_read_only"], true);
      await runOk("nbdcopy", [server.uri, `${dir.path}/one.out`]);
      assertBytes(await Deno.readFile(`${dir.path}/one.out`), image);
    });

    await t.step("s3: bad credentials and a missing bucket are one clear line", async () => {
      const nbd = await nbdExecutable();
      const serve = (env: Record<string, string>, ...args: string[]) =>
        run(nbd, ["serve", "-U", `${dir.path}/s3fail`, "s3", endpoint, ...args], { env });
      const badSecret = "wrong-secret-for-nbd-test";
      for (
        const [env, args, pattern] of [
          [
            { ...awsEnv, AWS_SECRET_ACCESS_KEY: badSecret },
            ["bucket=disks", "key=d", "size=1M"],
            /denied \(SignatureDoesNotMatch\) with the credentials from the environment/,
          ],
          [
            { ...awsEnv, AWS_ACCESS_KEY_ID: "NOSUCHKEY" },
            ["bucket=disks", "key=d", "size=1M"],
            /denied \(InvalidAccessKeyId\)/,
          ],
          [
            awsEnv,
            ["bucket=nosuchbucket", "key=d", "size=1M"],
            /the bucket nosuchbucket does not exist/,
          ],
          [awsEnv, ["bucket=disks", "key=missing.raw"], /s3:\/\/disks\/missing.raw does not exist/],
        ] as const
      ) {
        const result = await serve(env, ...args);
        assertEquals(result.code, 1, result.stderr);
        const lines = result.stderr.trim().split("\n");
        assertEquals(lines.length, 1, result.stderr);
        assertMatch(lines[0]!, /^nbd: s3: /);
        assertMatch(lines[0]!, pattern);
        assertOk(!result.stderr.includes(badSecret) && !result.stderr.includes(s3.secretKey));
      }
    });
    await t.step("nbd copy to and from s3:// objects (multipart, ranged)", async () => {
      const nbd = await nbdExecutable();
      const env = { ...awsEnv, AWS_ENDPOINT_URL: s3.endpoint };
      const size = 40 * MiB + 4096; // five parts of 10 MiB, the last one short
      const source = new Uint8Array(size);
      source.set(randomBytes(3 * MiB, 14), 17 * MiB);
      source.fill(0x77, size - 8192);
      await Deno.writeFile(`${dir.path}/up.img`, source);
      await runOk(nbd, ["copy", `${dir.path}/up.img`, "s3://disks/up/image.raw"], { env });
      await s3cmd("get", "s3://disks/up/image.raw", `${dir.path}/s3cmd.out`);
      assertBytes(await Deno.readFile(`${dir.path}/s3cmd.out`), source);
      await runOk(nbd, ["copy", "s3://disks/up/image.raw", `${dir.path}/down.img`], { env });
      assertBytes(await Deno.readFile(`${dir.path}/down.img`), source);

      // Refused credentials: one line, and no object left behind.
      const bad = await run(nbd, ["copy", `${dir.path}/up.img`, "s3://disks/up/bad.raw"], {
        env: { ...env, AWS_SECRET_ACCESS_KEY: "wrong-secret-for-nbd-test" },
      });
      assertEquals(bad.code, 1);
      assertEquals(bad.stderr.trim().split("\n").length, 1, bad.stderr);
      assertMatch(bad.stderr, /denied \(SignatureDoesNotMatch\)/);
      assertOk(!(await s3cmd("ls", "s3://disks/up/")).stdout.includes("bad.raw"));
    });
  },
});
