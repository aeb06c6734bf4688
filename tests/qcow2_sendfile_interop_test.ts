/**
 * READ replies of the qcow2 filter over the file plugin sent straight from
 * the page cache (sendfile) where guest ranges map to plain data clusters:
 * images made by qemu-img and qemu-io (converted, 4 KiB and 2 MiB
 * clusters, an odd size, compressed and zero clusters, a backing file,
 * extended L2 with partly allocated clusters) read the same through
 * nbdcopy, qemu-img convert and our client as `qemu-img convert -O raw`
 * says, with sendfile on and turned off (NBD_NO_SENDFILE=1); sendfile
 * sends only bytes of plain data clusters; a filter above qcow2 turns it
 * off. Writes, zeroes and discards from one connection while another
 * reads, and a discard of a range whose replies wait to be sent, never
 * make a reply carry other bytes; `qemu-img check` is clean after.
 */

import { assertBytes, assertEquals, assertOk } from "./assert.ts";
import {
  linuxPaths,
  peers,
  randomBytes,
  run,
  runOk,
  sendfileRanges,
  startNbdServe,
  tempDir,
} from "./helpers.ts";
import { RawClient } from "./raw_client.ts";
import { NbdClient } from "../client/client.ts";
import { NBD_CMD_READ } from "../protocol/constants.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const PEERS = peers("strace", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo");

/** Runs qemu-io commands on an image; `write -s @SEED` writes random bytes made from SEED. */
async function qemuIo(dir: string, path: string, format: string, cmds: string[]): Promise<void> {
  const args: string[] = [];
  for (const cmd of cmds) {
    const match = cmd.match(/^(write(?: -c)?) -s @(\d+) (\d+) (\d+)$/);
    if (match) {
      const source = `${dir}/source-${match[2]}`;
      await Deno.writeFile(source, randomBytes(Number(match[4]), Number(match[2])));
      args.push("-c", `${match[1]} -s ${source} ${match[3]} ${match[4]}`);
    } else args.push("-c", cmd);
  }
  await runOk("qemu-io", ["-f", format, ...args, path]);
}

/** Random bytes with runs of zeroes (left unallocated by qemu-img convert). */
function rawData(size: number, seed: number, holes: Array<[number, number]>): Uint8Array {
  const data = randomBytes(size, seed);
  for (const [offset, length] of holes) data.fill(0, offset, offset + length);
  return data;
}

/** Converts raw bytes to a qcow2 image with `options`. */
async function converted(
  dir: string,
  name: string,
  data: Uint8Array,
  options: string[],
): Promise<string> {
  await Deno.writeFile(`${dir}/${name}.raw`, data);
  const path = `${dir}/${name}.qcow2`;
  await runOk("qemu-img", ["convert", "-q", "-O", "qcow2", ...options, `${dir}/${name}.raw`, path]);
  return path;
}

/** An image to read, and the parameters to serve it with. */
interface ReadCase {
  name: string;
  build: (dir: string) => Promise<{ path: string; params?: string[] }>;
}

const HOLES: Array<[number, number]> = [[2 * MiB, MiB], [5 * MiB + 4096, 64 * KiB]];
/** Writes into the holes in reverse order (so host order differs from guest order), and zeroes. */
const AFTER = [
  `write -s @41 ${2 * MiB + 512 * KiB} ${256 * KiB}`,
  `write -s @42 ${2 * MiB} ${256 * KiB}`,
  `write -z ${6 * MiB} ${256 * KiB}`,
  `write -z ${7 * MiB + 4096} 8192`,
];

const CASES: ReadCase[] = [
  {
    name: "converted, 64 KiB clusters",
    async build(dir) {
      const path = await converted(dir, "c64k", rawData(8 * MiB, 1, HOLES), []);
      await qemuIo(dir, path, "qcow2", AFTER);
      return { path };
    },
  },
  {
    name: "converted, 4 KiB clusters",
    async build(dir) {
      const path = await converted(dir, "c4k", rawData(8 * MiB, 2, HOLES), [
        "-o",
        "cluster_size=4096",
      ]);
      await qemuIo(dir, path, "qcow2", AFTER);
      return { path };
    },
  },
  {
    name: "2 MiB clusters, odd size",
    async build(dir) {
      // 5 MiB + 512: the last cluster is partial.
      const data = rawData(5 * MiB + 512, 3, [[2 * MiB + 4096, 100000]]);
      const path = await converted(dir, "c2m", data, ["-o", "cluster_size=2M"]);
      await qemuIo(dir, path, "qcow2", [
        `write -z ${2 * MiB} ${2 * MiB}`,
        `write -s @43 ${4 * MiB + 1024} ${300 * KiB}`,
      ]);
      return { path };
    },
  },
  {
    name: "compressed, with plain clusters written over some",
    async build(dir) {
      const path = await converted(dir, "comp", rawData(8 * MiB, 4, HOLES), ["-c"]);
      await qemuIo(dir, path, "qcow2", [
        `write -s @44 ${MiB} ${512 * KiB}`,
        `write -s @45 ${3 * MiB} ${MiB}`,
        `write -c -s @46 ${6 * MiB} ${64 * KiB}`,
        `write -z ${7 * MiB} ${128 * KiB}`,
      ]);
      return { path };
    },
  },
  {
    name: "over a backing file",
    async build(dir) {
      const base = await converted(dir, "base", rawData(8 * MiB, 5, HOLES), []);
      const path = `${dir}/top.qcow2`;
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path]);
      await qemuIo(dir, path, "qcow2", [
        `write -s @47 ${MiB} ${512 * KiB}`,
        // Partial clusters: the rest is copied from the backing file.
        `write -s @48 ${MiB + 512 * KiB + 700} 70000`,
        `write -z ${4 * MiB} ${128 * KiB}`,
        `write -s @49 ${6 * MiB} ${MiB}`,
      ]);
      return { path, params: ["qcow2-follow-backing=true"] };
    },
  },
  {
    name: "extended L2, partly allocated clusters",
    async build(dir) {
      const path = await converted(dir, "ext", rawData(8 * MiB, 6, HOLES), [
        "-o",
        "extended_l2=on,cluster_size=64k",
      ]);
      // Subclusters are 2 KiB: pieces of clusters in the hole, and zeroed subclusters.
      await qemuIo(dir, path, "qcow2", [
        `write -s @50 ${2 * MiB + 2 * KiB} ${6 * KiB}`,
        `write -s @51 ${2 * MiB + 96 * KiB} ${32 * KiB}`,
        `write -s @52 ${2 * MiB + 128 * KiB} ${192 * KiB}`,
        `write -z ${5 * MiB + 8 * KiB} ${4 * KiB}`,
        `write -z ${MiB + 60 * KiB} ${8 * KiB}`,
      ]);
      return { path };
    },
  },
];

/** Host ranges of the image's own plain data clusters, from `qemu-img map`. */
async function plainHostRanges(path: string): Promise<Array<[number, number]>> {
  const { stdout } = await runOk("qemu-img", ["map", "--output=json", path]);
  const entries = JSON.parse(stdout) as Array<
    { length: number; data: boolean; depth: number; offset?: number; compressed?: boolean }
  >;
  return entries
    .filter((e) => e.data && e.depth === 0 && e.offset !== undefined && !e.compressed)
    .map((e) => [e.offset!, e.offset! + e.length]);
}

/** Reads the export every way there is and compares it with `expected`. */
async function readAll(uri: string, dir: string, expected: Uint8Array, what: string) {
  await runOk("nbdcopy", [uri, `${dir}/copy.raw`]);
  assertBytes(await Deno.readFile(`${dir}/copy.raw`), expected, `${what}: nbdcopy`);
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, `${dir}/q.raw`]);
  assertBytes(await Deno.readFile(`${dir}/q.raw`), expected, `${what}: qemu-img convert`);
  const info = await runOk("nbdinfo", ["--size", uri]);
  assertEquals(Number(info.stdout.trim()), expected.length, `${what}: nbdinfo --size`);
  // Unaligned ranges of 64 KiB and more, across cluster kinds and discontiguities.
  await using client = await NbdClient.connect(uri);
  let x = 12345;
  const next = () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  await Promise.all(Array.from({ length: 40 }, async () => {
    const length = 64 * KiB + Math.floor(next() * 1.5 * MiB);
    const offset = Math.floor(next() * (expected.length - length));
    const buf = new Uint8Array(length);
    await client.pread(buf, offset);
    assertBytes(buf, expected.subarray(offset, offset + length), `${what}: ${offset}+${length}`);
  }));
}

for (const on of [true, false]) {
  Deno.test({
    name: `qcow2 READs of plain clusters are exact, sendfile ${on ? "on" : "turned off"}`,
    ...linuxPaths("sendfile", PEERS),
    async fn() {
      await using dir = await tempDir("nbd-qcow2-sendfile");
      for (const c of CASES) {
        const { path, params = [] } = await c.build(dir.path);
        await runOk("qemu-img", ["convert", "-O", "raw", path, `${dir.path}/want.raw`]);
        const expected = await Deno.readFile(`${dir.path}/want.raw`);
        await using server = await startNbdServe(
          ["-r", "--filter=qcow2", "file", path, ...params],
          {
            env: on ? {} : { NBD_NO_SENDFILE: "1" },
          },
        );
        const ranges = await sendfileRanges(
          server,
          () => readAll(server.uri, dir.path, expected, c.name),
        );
        if (!on) {
          assertEquals(ranges.length, 0, `${c.name}: sendfile ran while turned off`);
          continue;
        }
        assertOk(ranges.length > 0, `${c.name}: no READ reply went out with sendfile`);
        // Only bytes of the image's plain data clusters.
        const plain = await plainHostRanges(path);
        for (const [start, end] of ranges) {
          assertOk(
            plain.some(([from, to]) => start >= from && end <= to),
            `${c.name}: sendfile of ${start}..${end}, not all plain data`,
          );
        }
      }
    },
  });
}

Deno.test({
  name: "qcow2 READs through a filter above qcow2 do not use sendfile and stay exact",
  ...linuxPaths("sendfile", PEERS),
  async fn() {
    await using dir = await tempDir("nbd-qcow2-sendfile");
    const path = await converted(dir.path, "stack", rawData(4 * MiB, 7, []), []);
    const expected = randomBytes(4 * MiB, 7).subarray(64 * KiB);
    await using server = await startNbdServe([
      "-r",
      "--filter=offset",
      "--filter=qcow2",
      "file",
      path,
      "offset=64K",
    ]);
    const ranges = await sendfileRanges(server, async () => {
      await runOk("nbdcopy", [server.uri, `${dir.path}/copy.raw`]);
      assertBytes(await Deno.readFile(`${dir.path}/copy.raw`), expected);
    });
    assertEquals(ranges.length, 0, "sendfile through the offset filter");
  },
});

/** A cluster-aligned sub-range of [from, to), or undefined when none fits. */
function wholeClusters(from: number, to: number, cs: number): [number, number] | undefined {
  const start = Math.ceil(from / cs) * cs;
  const end = Math.floor(to / cs) * cs;
  return end > start ? [start, end - start] : undefined;
}

for (const variant of ["64 KiB clusters", "extended L2, 32 KiB clusters"]) {
  Deno.test({
    name:
      `qcow2 writes on one connection while another reads (${variant}): reads exact, check clean`,
    ...linuxPaths("sendfile", PEERS),
    async fn() {
      await using dir = await tempDir("nbd-qcow2-sendfile");
      const size = 16 * MiB;
      const extended = variant.startsWith("extended");
      const cs = extended ? 32 * KiB : 64 * KiB;
      const model = rawData(size, 8, [[10 * MiB, 2 * MiB]]);
      const options = extended ? ["-o", "extended_l2=on,cluster_size=32k"] : [];
      const path = await converted(dir.path, "rw", model, options);
      await using server = await startNbdServe(["--filter=qcow2", "file", path]);
      let x = extended ? 99 : 98;
      const next = () => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
      // Slots of an unaligned size: a read and a write in neighbouring slots share clusters.
      const slot = 200000;
      const slots = Math.floor(size / slot);
      const ranges = await sendfileRanges(server, async () => {
        await using reader = await NbdClient.connect(server.uri);
        await using writer = await NbdClient.connect(server.uri);
        for (let round = 0; round < 24; round++) {
          const order = Array.from({ length: slots }, (_, i) => i).sort(() => next() - 0.5);
          const writeSlots = order.slice(0, 12);
          const readSlots = order.slice(12, 36);
          const effects: Array<() => void> = [];
          const ops = writeSlots.map((s) => {
            const from = s * slot + Math.floor(next() * slot / 2);
            const length = 1 + Math.floor(next() * (s * slot + slot - from - 1));
            const kind = next();
            if (kind < 0.55) {
              const bytes = randomBytes(length, 1000 + round * 100 + s);
              effects.push(() => model.set(bytes, from));
              return writer.pwrite(bytes, from);
            }
            if (kind < 0.85) {
              const mayTrim = next() < 0.6;
              effects.push(() => model.fill(0, from, from + length));
              return writer.zero(from, length, { mayTrim });
            }
            // Discards of whole clusters (of whole subclusters they would be too) read as zeroes.
            const whole = wholeClusters(from, from + length, cs);
            if (!whole) return Promise.resolve();
            effects.push(() => model.fill(0, whole[0], whole[0] + whole[1]));
            return writer.trim(whole[0], whole[1]);
          });
          const before = model.slice();
          const reads = readSlots.map(async (s) => {
            const length = 64 * KiB + Math.floor(next() * (slot - 64 * KiB));
            const offset = s * slot + Math.floor(next() * (slot - length));
            const buf = new Uint8Array(length);
            await reader.pread(buf, offset);
            assertBytes(
              buf,
              before.subarray(offset, offset + length),
              `round ${round}: ${offset}+${length}`,
            );
          });
          await Promise.all([...ops, ...reads]);
          for (const effect of effects) effect();
          // Freed clusters are released (and their space punched) at a flush.
          if (round % 3 === 2) await writer.flush();
        }
        await writer.flush();
        const all = new Uint8Array(size);
        await reader.pread(all, 0);
        assertBytes(all, model, "the whole export after the writes");
      });
      assertOk(ranges.length > 0, "no READ reply went out with sendfile");
      await server[Symbol.asyncDispose]();
      const check = await run("qemu-img", ["check", path]);
      assertEquals(check.code, 0, `qemu-img check:\n${check.stdout}${check.stderr}`);
      await Deno.writeFile(`${dir.path}/model.raw`, model);
      const compare = await run("qemu-img", [
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        path,
        `${dir.path}/model.raw`,
      ]);
      assertEquals(compare.code, 0, `qemu-img compare:\n${compare.stdout}${compare.stderr}`);
    },
  });
}

Deno.test({
  name:
    "qcow2: a range zeroed and freed while its sendfile replies wait reads as old bytes or zeroes",
  ...linuxPaths("sendfile", PEERS),
  async fn() {
    await using dir = await tempDir("nbd-qcow2-sendfile");
    const size = 16 * MiB;
    const data = rawData(size, 9, [[8 * MiB, 8 * MiB]]);
    const path = await converted(dir.path, "held", data, []);
    await using server = await startNbdServe(["--filter=qcow2", "file", path]);
    const old = data.subarray(0, 2 * MiB);
    const ranges = await sendfileRanges(server, async () => {
      // The mapping of [0, 2 MiB) is cached: the first READ loads its L2 table.
      await using writer = await NbdClient.connect(server.uri);
      await writer.pread(new Uint8Array(4096), 0);
      const raw = await RawClient.connect(server.socket!);
      try {
        await raw.start();
        await raw.go("", { structured: false });
        // Far more than the socket buffers hold: most replies wait to be sent.
        const count = 24;
        for (let i = 0; i < count; i++) {
          await raw.request(NBD_CMD_READ, { offset: 0, length: 2 * MiB, cookie: i });
        }
        await new Promise((r) => setTimeout(r, 300));
        // The range becomes zeroes, its clusters are freed and punched at the flush,
        // and new data is written elsewhere (where freed space would be reused).
        await writer.zero(0, 2 * MiB, { mayTrim: true });
        await writer.flush();
        await writer.pwrite(randomBytes(4 * MiB, 77), 8 * MiB);
        await writer.flush();
        let zeroed = 0;
        for (let i = 0; i < count; i++) {
          const reply = await raw.reply(2 * MiB);
          assertEquals(reply.kind === "simple" && reply.errno, 0);
          const got = (reply as { data: Uint8Array }).data;
          for (let j = 0; j < got.length; j++) {
            if (got[j] !== old[j] && got[j] !== 0) {
              throw new Error(`reply ${i}, byte ${j}: ${got[j]}, neither old nor zero`);
            }
          }
          if (got[got.length - 1] === 0) zeroed++;
        }
        assertOk(zeroed > 0, "no reply read the zeroed range");
      } finally {
        raw.close();
      }
    });
    assertOk(ranges.length > 0, "no READ reply went out with sendfile");
    await server[Symbol.asyncDispose]();
    const check = await run("qemu-img", ["check", path]);
    assertEquals(check.code, 0, `qemu-img check:\n${check.stdout}${check.stderr}`);
  },
});
