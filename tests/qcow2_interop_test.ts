/**
 * The qcow2 filter against qemu: images made by qemu-img and qemu-io are
 * read through `nbd serve --filter=qcow2` by nbdcopy and must equal
 * `qemu-img convert -O raw` byte for byte, with block status matching
 * `qemu-img map`; writes through our server leave images that `qemu-img
 * check` finds clean and `qemu-img compare` finds equal to a raw model;
 * a server killed during writes never leaves a corrupt image; bad images
 * get one-line errors.
 */

import { assertBytes, assertEquals, assertMatch, assertOk } from "./assert.ts";
import { peers, run, runOk, type ServerProcess, startNbdServe, tempDir } from "./helpers.ts";

const PEERS = peers("qemu-img", "qemu-io", "nbdcopy", "nbdinfo");

/** An image to build: qemu-img create options and qemu-io commands. */
interface Case {
  name: string;
  create: string[];
  size: string;
  io: string[];
}

const WRITES = [
  "write -P 0x11 0 100k",
  "write -P 0x22 1000000 70000",
  "write -z 128k 256k",
  "write -P 0x33 2M 16k",
  "discard 2M 8k",
  "write -P 0x44 3000000 1536",
];

const CASES: Case[] = [
  { name: "v2-64k", create: ["-o", "compat=0.10"], size: "4M", io: WRITES },
  {
    name: "v3-512-refcount1",
    create: ["-o", "cluster_size=512,refcount_bits=1"],
    size: "4M",
    io: WRITES,
  },
  { name: "v3-4k-refcount16", create: ["-o", "cluster_size=4096"], size: "4M", io: WRITES },
  {
    name: "v3-2m-refcount64-odd-size",
    create: ["-o", "cluster_size=2M,refcount_bits=64"],
    size: "5243392", // 5M + 512: the last cluster is partial
    io: [...WRITES, "write -P 0x55 5242880 512"],
  },
  {
    name: "extended-l2",
    create: ["-o", "extended_l2=on,cluster_size=64k"],
    size: "4M",
    io: [...WRITES, "write -P 0x66 3M 2k", "write -z 3M 4k"],
  },
  {
    name: "zlib",
    create: ["-o", "cluster_size=4096"],
    size: "4M",
    io: [...WRITES, "write -c -P 0x77 3584k 4k", "write -c -P 0x78 3600k 8k"],
  },
  {
    name: "zstd",
    create: ["-o", "compression_type=zstd"],
    size: "4M",
    io: [...WRITES, "write -c -P 0x79 3584k 64k", "write -c -P 0x7a 3M 64k"],
  },
  {
    name: "prealloc-metadata",
    create: ["-o", "preallocation=metadata"],
    size: "4M",
    io: WRITES,
  },
];

async function makeImage(dir: string, c: Case): Promise<string> {
  const path = `${dir}/${c.name}.qcow2`;
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", ...c.create, path, c.size]);
  const args = c.io.flatMap((cmd) => ["-c", cmd]);
  await runOk("qemu-io", ["-f", "qcow2", ...args, path]);
  return path;
}

async function serve(path: string, extra: string[] = []): Promise<ServerProcess> {
  const flags = extra.filter((e) => e.startsWith("-"));
  const params = extra.filter((e) => !e.startsWith("-"));
  return await startNbdServe([...flags, "--filter=qcow2", "file", path, ...params]);
}

/** Reads an export to a file with nbdcopy. */
async function copyOut(uri: string, out: string): Promise<Uint8Array> {
  await runOk("nbdcopy", [uri, out]);
  return await Deno.readFile(out);
}

/** The reference contents of an image. */
async function reference(path: string, out: string): Promise<Uint8Array> {
  await runOk("qemu-img", ["convert", "-O", "raw", path, out]);
  return await Deno.readFile(out);
}

/** Per-512-byte classification "D" (data) or "Z" (reads as zero, not data), from qemu-img map. */
async function qemuMap(path: string, size: number): Promise<string> {
  const { stdout } = await runOk("qemu-img", ["map", "--output=json", path]);
  const entries = JSON.parse(stdout) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }[];
  const out = new Array<string>(Math.ceil(size / 512)).fill("?");
  for (const e of entries) {
    for (let at = e.start; at < e.start + e.length; at += 512) {
      out[at / 512] = e.data ? "D" : e.zero ? "Z" : "H";
    }
  }
  return out.join("");
}

/** The same classification from our server's block status, through nbdinfo. */
async function ourMap(uri: string, size: number): Promise<string> {
  const { stdout } = await runOk("nbdinfo", ["--map", uri]);
  const out = new Array<string>(Math.ceil(size / 512)).fill("?");
  for (const line of stdout.trim().split("\n")) {
    const [offset, length, type] = line.trim().split(/\s+/).map(Number) as [number, number, number];
    const hole = (type & 1) !== 0;
    const zero = (type & 2) !== 0;
    for (let at = offset; at < offset + length; at += 512) {
      out[at / 512] = !hole ? "D" : zero ? "Z" : "H";
    }
  }
  return out.join("");
}

Deno.test({
  name: "qcow2 read matrix: nbdcopy through the filter equals qemu-img convert; map agrees",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    for (const c of CASES) {
      const path = await makeImage(dir.path, c);
      const expected = await reference(path, `${dir.path}/ref.raw`);
      await using server = await serve(path, ["-r"]);
      const got = await copyOut(server.uri, `${dir.path}/out.raw`);
      assertBytes(got, expected, c.name);
      assertEquals(
        await ourMap(server.uri, expected.length),
        await qemuMap(path, expected.length),
        c.name,
      );
    }
  },
});

Deno.test({
  name: "qcow2 backing chain of depth 3 (raw ← qcow2 ← qcow2): followed only when allowed",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    const d = dir.path;
    await runOk("qemu-img", ["create", "-q", "-f", "raw", `${d}/base.raw`, "4M"]);
    await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xa1 0 4M", `${d}/base.raw`]);
    await runOk("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-F",
      "raw",
      "-b",
      "base.raw",
      `${d}/mid.qcow2`,
    ]);
    await runOk("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -P 0xb2 64k 128k",
      "-c",
      "write -z 1M 64k",
      `${d}/mid.qcow2`,
    ]);
    await runOk("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "cluster_size=4096",
      "-F",
      "qcow2",
      "-b",
      "mid.qcow2",
      `${d}/top.qcow2`,
    ]);
    await runOk("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -P 0xc3 100k 8k",
      "-c",
      "write -z 2M 8k",
      "-c",
      "discard 3M 64k",
      `${d}/top.qcow2`,
    ]);
    const expected = await reference(`${d}/top.qcow2`, `${d}/ref.raw`);

    // Not allowed: refused with the reason, in one line.
    {
      await using server = await serve(`${d}/top.qcow2`, ["-r"]);
      const result = await run("nbdcopy", [server.uri, `${d}/out.raw`]);
      assertOk(result.code !== 0, "an image with a backing file is refused by default");
      assertMatch(server.stderr(), /backing file "mid.qcow2".*qcow2-follow-backing=true.*disclose/);
    }
    // Allowed: the whole chain, read and mapped.
    {
      await using server = await serve(`${d}/top.qcow2`, ["-r", "qcow2-follow-backing=true"]);
      assertBytes(await copyOut(server.uri, `${d}/out.raw`), expected);
      assertEquals(
        await ourMap(server.uri, expected.length),
        await qemuMap(`${d}/top.qcow2`, expected.length),
      );
    }
    // Named explicitly: mid's own backing needs following too.
    {
      await using server = await serve(`${d}/top.qcow2`, [
        "-r",
        `qcow2-backing=${d}/mid.qcow2`,
        "qcow2-follow-backing=true",
      ]);
      assertBytes(await copyOut(server.uri, `${d}/out.raw`), expected);
    }
    // A name that escapes the image's directory is never followed.
    await Deno.mkdir(`${d}/sub`);
    await runOk("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-F",
      "raw",
      "-b",
      "../base.raw",
      `${d}/sub/esc.qcow2`,
    ]);
    {
      await using server = await serve(`${d}/sub/esc.qcow2`, ["-r", "qcow2-follow-backing=true"]);
      const result = await run("nbdcopy", [server.uri, `${d}/out.raw`]);
      assertOk(result.code !== 0);
      assertMatch(server.stderr(), /lies outside .*not followed/);
    }
    // Self-reference.
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", `${d}/self.qcow2`, "1M"]);
    await runOk("qemu-img", ["rebase", "-u", "-F", "qcow2", "-b", "self.qcow2", `${d}/self.qcow2`]);
    {
      await using server = await serve(`${d}/self.qcow2`, ["-r", "qcow2-follow-backing=true"]);
      const result = await run("nbdcopy", [server.uri, `${d}/out.raw`]);
      assertOk(result.code !== 0);
      assertMatch(server.stderr(), /loops back/);
    }
    // Writes over the chain: partial clusters copied up from the backing files.
    await runOk("qemu-img", ["convert", "-O", "raw", `${d}/top.qcow2`, `${d}/model.raw`]);
    {
      await using server = await serve(`${d}/top.qcow2`, ["qcow2-follow-backing=true"]);
      const cmds = [
        "write -P 0xd4 70000 3000",
        "write -z 1040000 5000",
        "discard 0 1M",
        "write -P 0xd5 4000000 100",
      ];
      await writeBoth(server.uri, `${d}/model.raw`, cmds);
    }
    await assertClean(`${d}/top.qcow2`);
    await assertSame(`${d}/top.qcow2`, `${d}/model.raw`);
  },
});

/**
 * Applies qemu-io commands through our server and to a raw model; discards
 * of whole clusters read as zeroes afterwards (zero clusters over a backing
 * file), so the model zeroes them.
 */
async function writeBoth(uri: string, model: string, cmds: string[]) {
  await runOk("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), "-c", "flush", uri]);
  const forModel = cmds.map((c) => c.replace(/^discard/, "write -z"));
  await runOk("qemu-io", ["-f", "raw", ...forModel.flatMap((c) => ["-c", c]), model]);
}

async function assertClean(path: string) {
  const result = await run("qemu-img", ["check", path]);
  assertEquals(result.code, 0, `qemu-img check ${path}:\n${result.stdout}${result.stderr}`);
}

async function assertSame(path: string, model: string) {
  const result = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", path, model]);
  assertEquals(result.code, 0, `qemu-img compare:\n${result.stdout}${result.stderr}`);
}

/** A reproducible sequence of writes, zeroes and discards inside `size`. */
function randomCommands(seed: number, size: number, count: number): string[] {
  let x = seed;
  const next = () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  const cmds: string[] = [];
  for (let i = 0; i < count; i++) {
    const offset = Math.floor(next() * (size - 300000) / 512) * 512;
    const length = (1 + Math.floor(next() * 400)) * 512;
    const kind = next();
    if (kind < 0.6) cmds.push(`write -P ${1 + Math.floor(next() * 250)} ${offset} ${length}`);
    else if (kind < 0.85) cmds.push(`write -z ${offset} ${length}`);
    else cmds.push(`discard ${offset} ${length}`);
  }
  return cmds;
}

Deno.test({
  name: "qcow2 writes from two connections at once: qemu-img check clean, equal to a raw model",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    const d = dir.path;
    const size = 8 * 1024 * 1024;
    for (
      const c of CASES.filter((c) =>
        ["v2-64k", "v3-512-refcount1", "extended-l2", "zlib", "v3-2m-refcount64-odd-size"].includes(
          c.name,
        )
      )
    ) {
      const path = await makeImage(d, c);
      const model = `${d}/model.raw`;
      await reference(path, model);
      const imageSize = (await Deno.stat(model)).size;
      // Two writers on disjoint halves; discards go to the model as zeroes
      // (without a backing file a discarded cluster reads as zeroes).
      const half = Math.floor(imageSize / 2 / 65536) * 65536;
      const a = randomCommands(7, Math.min(half, size), 30).map((c) =>
        c.replace(/^discard/, "write -z")
      );
      const b = randomCommands(11, Math.min(imageSize - half, size), 30).map((cmd) =>
        cmd.replace(/ (\d+) (\d+)$/, (_m, o, l) => ` ${Number(o) + half} ${l}`).replace(
          /^discard/,
          "write -z",
        )
      );
      {
        await using server = await serve(path);
        await Promise.all([
          runOk("qemu-io", [
            "-f",
            "raw",
            ...a.flatMap((x) => ["-c", x]),
            "-c",
            "flush",
            server.uri,
          ]),
          runOk("qemu-io", [
            "-f",
            "raw",
            ...b.flatMap((x) => ["-c", x]),
            "-c",
            "flush",
            server.uri,
          ]),
        ]);
        // Real discards too, on whole clusters, after the zeroing of the same range.
        await runOk("qemu-io", [
          "-f",
          "raw",
          "-c",
          "write -z 0 128k",
          "-c",
          "discard 0 128k",
          server.uri,
        ]);
      }
      await runOk("qemu-io", [
        "-f",
        "raw",
        ...a.flatMap((x) => ["-c", x]),
        ...b.flatMap((x) => ["-c", x]),
        "-c",
        "write -z 0 128k",
        model,
      ]);
      await assertClean(path);
      await assertSame(path, model);
    }
  },
});

Deno.test({
  name: "qcow2 crash: a server killed during writes leaves no corruption; flushed data stays",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    const d = dir.path;
    for (let round = 0; round < 4; round++) {
      const path = `${d}/crash.qcow2`;
      await runOk("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        `cluster_size=${round % 2 ? 512 : 65536}`,
        path,
        "16M",
      ]);
      const server = await serve(path);
      // Durable: written and flushed before anything else.
      await runOk("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 300k",
        "-c",
        "flush",
        server.uri,
      ]);
      // Then a stream of unflushed changes, cut short by SIGKILL.
      const writer = new Deno.Command("qemu-io", {
        args: [
          "-f",
          "raw",
          ...randomCommands(round + 3, 16 * 1024 * 1024, 400).map((c) =>
            c.replace(
              / (\d+) (\d+)$/,
              (_m, o, l) => ` ${Number(o) % (1024 * 1024) + 2 * 1024 * 1024} ${l}`,
            )
          )
            .flatMap((c) => ["-c", c]),
          server.uri,
        ],
        stdout: "null",
        stderr: "null",
      }).spawn();
      await new Promise((r) => setTimeout(r, 150 + round * 100));
      server.child.kill("SIGKILL");
      await writer.status;
      await server[Symbol.asyncDispose]();
      const check = await run("qemu-img", ["check", path]);
      assertOk(
        check.code === 0 || check.code === 3,
        `round ${round}: qemu-img check exit ${check.code}\n${check.stdout}`,
      );
      await runOk("qemu-io", ["-f", "qcow2", "-c", "read -P 0x5a 1M 300k", path]);
    }
  },
});

Deno.test({
  name: "qcow2 bad input: one-line errors at open, EIO per request, the server keeps serving",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    const d = dir.path;
    // A truncated header.
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", `${d}/good.qcow2`, "1M"]);
    const good = await Deno.readFile(`${d}/good.qcow2`);
    await Deno.writeFile(`${d}/trunc.qcow2`, good.subarray(0, 80));
    {
      await using server = await serve(`${d}/trunc.qcow2`, ["-r"]);
      assertOk((await run("nbdinfo", [server.uri])).code !== 0);
      assertMatch(server.stderr(), /nbd: .*qcow2: .*(truncated|past the end)/);
    }
    // The L1 table past the end of the file.
    const l1 = good.slice();
    new DataView(l1.buffer).setUint32(44, 0x10000000);
    await Deno.writeFile(`${d}/l1.qcow2`, l1);
    {
      await using server = await serve(`${d}/l1.qcow2`, ["-r"]);
      assertOk((await run("nbdinfo", [server.uri])).code !== 0);
      assertMatch(server.stderr(), /L1 table lies past the end of the file/);
    }
    // A compressed cluster that does not inflate: EIO there, the rest reads.
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", `${d}/comp.qcow2`, "1M"]);
    await runOk("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -c -P 0x61 0 64k",
      "-c",
      "write -P 0x62 64k 64k",
      `${d}/comp.qcow2`,
    ]);
    const { stdout } = await runOk("qemu-img", ["map", "--output=json", `${d}/comp.qcow2`]);
    const dataAt = (JSON.parse(stdout) as { start: number; offset?: number }[]).find((e) =>
      e.start === 65536
    )!.offset!;
    // The compressed cluster was written before the plain one: it sits just below it.
    const bytes = await Deno.readFile(`${d}/comp.qcow2`);
    bytes.fill(0xff, dataAt - 65536, dataAt);
    await Deno.writeFile(`${d}/comp.qcow2`, bytes);
    {
      await using server = await serve(`${d}/comp.qcow2`, ["-r"]);
      const bad = await run("qemu-io", ["-f", "raw", "-r", "-c", "read 0 4k", server.uri]);
      assertMatch(bad.stdout + bad.stderr, /Input\/output error/);
      await runOk("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x62 64k 64k", server.uri]);
    }
  },
});

Deno.test({
  name: "qcow2 over file dir=: every export has its own image (size, mapping and data)",
  ...PEERS,
  async fn() {
    await using dir = await tempDir("nbd-qcow2");
    const d = dir.path;
    // Different sizes, cluster sizes and contents: a shared image state would mix them up.
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", `${d}/a.qcow2`, "1M"]);
    await runOk("qemu-img", [
      ...["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"],
      ...[`${d}/b.qcow2`, "3M"],
    ]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0xaa 0 64k", `${d}/a.qcow2`]);
    await runOk("qemu-io", [
      ...["-f", "qcow2", "-c", "write -P 0xbb 2M 8k", "-c", "write -P 0xcc 0 4k"],
      `${d}/b.qcow2`,
    ]);
    await using server = await startNbdServe(["-r", "--filter=qcow2", "file", `dir=${d}`]);
    for (const name of ["a.qcow2", "b.qcow2", "a.qcow2"]) {
      const uri = `nbd+unix:///${name}?socket=${server.socket}`;
      await runOk("nbdcopy", [uri, `${d}/${name}.out`]);
      await runOk("qemu-img", ["convert", "-O", "raw", `${d}/${name}`, `${d}/${name}.want`]);
      assertBytes(
        await Deno.readFile(`${d}/${name}.out`),
        await Deno.readFile(`${d}/${name}.want`),
      );
    }
  },
});
