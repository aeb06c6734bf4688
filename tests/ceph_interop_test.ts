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
    await t.step("nbd copy to and from s3:// objects (one PUT, multipart, ranged)", async () => {
      const nbd = await nbdExecutable();
      const env = { ...awsEnv, AWS_ENDPOINT_URL: s3.endpoint };
      const onePut = { ...env, NBD_S3_SINGLE_PUT_MAX: String(1 << 30) };
      const size = 40 * MiB + 4096; // five parts of 10 MiB, the last one short
      const source = new Uint8Array(size);
      source.set(randomBytes(3 * MiB, 14), 17 * MiB);
      source.fill(0x77, size - 8192);
      await Deno.writeFile(`${dir.path}/up.img`, source);
      // One streamed PUT (when asked for), then a multipart upload (the default).
      for (const [name, upEnv] of [["image.raw", onePut], ["parts.raw", env]] as const) {
        await runOk(nbd, ["copy", `${dir.path}/up.img`, `s3://disks/up/${name}`], { env: upEnv });
        await s3cmd("get", `s3://disks/up/${name}`, `${dir.path}/${name}.out`);
        assertBytes(await Deno.readFile(`${dir.path}/${name}.out`), source);
      }
      await runOk(nbd, ["copy", "s3://disks/up/image.raw", `${dir.path}/down.img`], { env });
      assertBytes(await Deno.readFile(`${dir.path}/down.img`), source);
      // A small object in one PUT, read back by our download.
      const small = randomBytes(70_000, 15);
      await Deno.writeFile(`${dir.path}/small.img`, small);
      await runOk(nbd, ["copy", `${dir.path}/small.img`, "s3://disks/up/small.raw"], {
        env: onePut,
      });
      await runOk(nbd, ["copy", "s3://disks/up/small.raw", `${dir.path}/small.out`], { env });
      assertBytes(await Deno.readFile(`${dir.path}/small.out`), small);
      // Parts the copy never touches (zero runs skipped) are still sent, as zeroes.
      await runOk(nbd, [
        "copy",
        "--destination-is-zero",
        `${dir.path}/up.img`,
        "s3://disks/up/skipped.raw",
      ], { env });
      await s3cmd("get", "s3://disks/up/skipped.raw", `${dir.path}/skipped.out`);
      assertBytes(await Deno.readFile(`${dir.path}/skipped.out`), source);

      // A source failing at 16 MiB, once the bytes before are sent: the PUT is cut short.
      const failing = await run(nbd, [
        "copy",
        "--",
        "[",
        "nbdkit",
        "eval",
        `get_size=echo ${size}`,
        "pread=if [ $4 -ge 16777216 ]; then sleep 0.5; echo EIO failing >&2; exit 1; fi; " +
        "head -c $3 /dev/zero",
        "]",
        "s3://disks/up/failed.raw",
      ], { env: onePut });
      assertEquals(failing.code, 1, failing.stderr);
      assertMatch(failing.stderr, /was cut short; no object was written/);
      assertOk(!(await s3cmd("ls", "s3://disks/up/")).stdout.includes("failed.raw"));

      // Refused credentials: one line, and no object left behind.
      const bad = await run(nbd, ["copy", `${dir.path}/up.img`, "s3://disks/up/bad.raw"], {
        env: { ...env, AWS_SECRET_ACCESS_KEY: "wrong-secret-for-nbd-test" },
      });
      assertEquals(bad.code, 1);
      assertEquals(bad.stderr.trim().split("\n").length, 1, bad.stderr);
      assertMatch(bad.stderr, /denied \(SignatureDoesNotMatch\)/);
      assertOk(!(await s3cmd("ls", "s3://disks/up/")).stdout.includes("bad.raw"));
    });

    const copyEnv = { ...awsEnv, AWS_ENDPOINT_URL: s3.endpoint };

    await t.step("nbd info, map and checksum read rbd: images and s3:// objects", async () => {
      const nbd = await nbdExecutable();
      const env = { ...copyEnv, ...cluster.env };
      const nbdOk = async (...args: string[]) => (await runOk(nbd, args, { env })).stdout;
      // rbd/copied holds patterned(16M, 13): its third 4 MiB object was never written.
      const image = "rbd:rbd/copied";
      const source = patterned(16 * MiB, 13);
      const info = JSON.parse(await nbdOk("info", "--json", image));
      assertEquals(info, {
        image,
        "image-size": 16 * MiB,
        format: "raw",
        "virtual-size": 16 * MiB,
      });
      assertEquals((await nbdOk("info", "--size", image)).trim(), String(16 * MiB));
      const map = JSON.parse(await nbdOk("map", "--json", `${image}:conf=${cluster.conf}`));
      assertEquals(
        map.map((e: { offset: number; length: number; type: number }) => [
          e.offset / MiB,
          e.length / MiB,
          e.type,
        ]),
        [[0, 8, 0], [8, 4, 3], [12, 4, 0]],
      );
      assertEquals(await nbdOk("info", "--map", image), await nbdOk("map", image));
      await Deno.writeFile(`${dir.path}/sum.img`, source);
      const expected = (await runOk("sha256sum", [`${dir.path}/sum.img`])).stdout.split(" ")[0];
      assertEquals(await nbdOk("checksum", image), `${expected}  ${image}\n`);

      // A qcow2 image stored in RBD is recognised as one.
      await runOk("qemu-img", ["create", "-f", "qcow2", `${dir.path}/small.qcow2`, "1G"]);
      await cluster.rbd("import", `${dir.path}/small.qcow2`, "rbd/qcow2");
      const qcow2 = await nbdOk("info", "rbd:rbd/qcow2");
      assertMatch(qcow2, /^image: rbd:rbd\/qcow2\n/);
      assertMatch(qcow2, /\tformat: qcow2\n/);
      assertMatch(qcow2, /\tvirtual-size: 1073741824\b/);

      // The object uploaded by the step before: 40 MiB + 4 KiB.
      const object = "s3://disks/up/image.raw";
      const objectInfo = await nbdOk("info", object);
      assertMatch(
        objectInfo,
        /^object: s3:\/\/disks\/up\/image\.raw\n\tobject-size: 41947136 \(40964K\)\n/,
      );
      const uploaded = (await runOk("sha256sum", [`${dir.path}/up.img`])).stdout.split(" ")[0];
      assertEquals(await nbdOk("checksum", object), `${uploaded}  ${object}\n`);
      assertEquals(await nbdOk("map", object), `         0    41947136    0  data\n`);
      const refused = await run(nbd, ["info", "--can", "trim", object], { env });
      assertEquals(refused.code, 2);
      assertMatch(refused.stderr.trim(), /^nbd: --can needs an NBD URI/);
      const absent = await run(nbd, ["checksum", "s3://disks/up/absent.raw"], { env });
      assertEquals(absent.code, 1);
      assertEquals(absent.stderr.trim(), "nbd: s3://disks/up/absent.raw does not exist");
    });
    /** The multipart uploads in progress under `key` in the bucket disks (their ids). */
    const uploadsOf = async (key: string): Promise<string[]> => {
      const listing = (await s3cmd("multipart", "s3://disks")).stdout;
      return [...listing.matchAll(/\ts3:\/\/disks\/(\S+)\t(\S+)/g)]
        .filter((m) => m[1] === key).map((m) => m[2]!);
    };
    /** Waits until the upload to `key` has stored at least one part (the copy is mid-way). */
    const partStored = async (key: string, copy: Promise<Deno.CommandOutput>) => {
      const deadline = Date.now() + 30_000;
      let ended: Deno.CommandOutput | undefined;
      copy.then((output) => ended = output);
      while (Date.now() < deadline && !ended) {
        const [id] = await uploadsOf(key);
        if (id !== undefined) {
          const parts = (await s3cmd("listmp", `s3://disks/${key}`, id)).stdout;
          if (/^\S+\t1\t/m.test(parts)) return;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      const why = ended ? `ended: ${new TextDecoder().decode(ended.stderr)}` : "ran on";
      throw new Error(`no part of ${key} was stored before the copy ${why}`);
    };
    const spawnNbd = async (args: string[]) =>
      new Deno.Command(await nbdExecutable(), {
        args,
        env: copyEnv,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
    /** HTTP status of a HEAD of the object, signed by curl. */
    const curlStatus = async (path: string): Promise<string> =>
      (await run("curl", [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-I",
        "--aws-sigv4",
        `aws:amz:${s3.region}:s3`,
        "--user",
        `${s3.accessKey}:${s3.secretKey}`,
        "-H",
        `x-amz-content-sha256: ${EMPTY_SHA256}`,
        `${s3.endpoint}/${path}`,
      ])).stdout;

    await t.step("s3: a 1 GiB sparse image uploads by parts and reads back equal", async () => {
      const nbd = await nbdExecutable();
      const size = 1024 * MiB;
      const path = `${dir.path}/sparse.img`;
      {
        using file = await Deno.open(path, { write: true, create: true, truncate: true });
        await file.truncate(size);
        for (const [at, seed] of [[0, 21], [517 * MiB + 4096, 22], [size - 2 * MiB, 23]]) {
          await file.seek(at, Deno.SeekMode.Start);
          const data = randomBytes(MiB, seed);
          for (let done = 0; done < data.length;) done += await file.write(data.subarray(done));
        }
      }
      // The default upload: by parts.
      await runOk(nbd, ["copy", path, "s3://disks/big/sparse.raw"], { env: copyEnv });
      // 10 MiB parts: 103 of them, named in the ETag of the assembled object.
      const head = (await runOk("s3cmd", ["-c", s3cmdConfig, "info", "s3://disks/big/sparse.raw"]))
        .stdout;
      assertMatch(head, /MD5 sum:\s+[0-9a-f]{32}-103\b/);
      const expected = (await runOk("sha256sum", [path])).stdout.split(" ")[0]!;
      const fetched = await runOk("sh", [
        "-c",
        `curl -sSf --aws-sigv4 aws:amz:${s3.region}:s3 --user "$KEYS" ` +
        `-H "x-amz-content-sha256: ${EMPTY_SHA256}" "$URL" | sha256sum`,
      ], {
        env: {
          KEYS: `${s3.accessKey}:${s3.secretKey}`,
          URL: `${s3.endpoint}/disks/big/sparse.raw`,
        },
      });
      assertEquals(fetched.stdout.split(" ")[0], expected);
      await s3cmd("del", "s3://disks/big/sparse.raw");
    });

    /**
     * A 64 MiB source (an sh plugin script) whose reads past 20 MiB wait until the file
     * `open` or `fail` appears in `gate`, and fail once `fail` is there: the copy stops
     * mid-way, after two 10 MiB parts, for as long as the test needs.
     */
    const gatedSource = async (gate: string) => {
      await Deno.mkdir(gate);
      const script = `${gate}/source.sh`;
      await Deno.writeTextFile(
        script,
        `#!/bin/sh
case "$1" in
  get_size) echo ${64 * MiB} ;;
  pread)
    if [ "$4" -ge ${20 * MiB} ]; then
      while [ ! -e '${gate}/open' ] && [ ! -e '${gate}/fail' ]; do sleep 0.05; done
      if [ -e '${gate}/fail' ]; then echo "EIO injected" >&2; exit 1; fi
    fi
    head -c "$3" /dev/urandom ;;
  *) exit 2 ;;
esac
`,
      );
      await Deno.chmod(script, 0o755);
      return await startNbdServe(["-r", "sh", script]);
    };

    await t.step("s3: radosgw stopped mid-copy: retries, one line, no object", async () => {
      const gate = `${dir.path}/gate-stopped`;
      await using source = await gatedSource(gate);
      const key = "stopped/image.raw";
      const copy = await spawnNbd(["copy", source.uri, `s3://disks/${key}`]);
      const output = copy.output();
      await partStored(key, output);
      await cluster.stopRgw();
      await Deno.writeTextFile(`${gate}/open`, "");
      const result = await output;
      await cluster.startRgw();
      const stderr = new TextDecoder().decode(result.stderr);
      assertEquals(result.code, 1, stderr);
      const lines = stderr.trim().split("\n");
      assertEquals(lines.length, 1, stderr);
      assertMatch(lines[0]!, /^nbd: .*\(gave up after 6 attempts\)/);
      assertIncludes(lines[0]!, `no object was written to s3://disks/${key}`);
      assertIncludes(lines[0]!, "could not be aborted");
      assertOk(!stderr.includes(s3.secretKey), "the secret key was printed");
      // Nothing looks complete: no object, only the unfinished upload (which the note names).
      assertEquals(await curlStatus(`disks/${key}`), "404");
      const [left] = await uploadsOf(key);
      assertOk(left !== undefined && lines[0]!.includes(left), stderr);
      await s3cmd("abortmp", `s3://disks/${key}`, left!);
    });

    await t.step("s3: a source failing mid-copy aborts the upload", async () => {
      const gate = `${dir.path}/gate-failed`;
      await using source = await gatedSource(gate);
      const key = "failed/image.raw";
      const copy = await spawnNbd(["copy", source.uri, `s3://disks/${key}`]);
      const output = copy.output();
      await partStored(key, output);
      await Deno.writeTextFile(`${gate}/fail`, "");
      const result = await output;
      const stderr = new TextDecoder().decode(result.stderr);
      assertEquals(result.code, 1, stderr);
      const lines = stderr.trim().split("\n");
      assertEquals(lines.length, 1, stderr);
      assertIncludes(
        lines[0]!,
        `the upload to s3://disks/${key} was aborted; no object was written`,
      );
      assertEquals(await curlStatus(`disks/${key}`), "404");
      assertEquals(await uploadsOf(key), []);
    });
  },
});
