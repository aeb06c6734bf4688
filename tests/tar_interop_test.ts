/**
 * The tar filter on archives made by GNU tar (its own format and pax
 * sparse formats 0.0, 0.1 and 1.0) and by bsdtar, with long names and
 * sparse members: each member reads equal to its file, sparse ones with
 * their holes reported as holes and read-only; a write changes that member
 * only, as `tar -xO` shows; over http only the headers before the member
 * and the member itself are fetched; missing entries and tar-limit are
 * clear errors.
 *
 * @module
 */

import type { Backend } from "../core/backend.ts";
import { createFilter, CTX, openPlugin } from "../filters/_test_utils.ts";
import { tarFilter } from "../filters/tar.ts";
import { filePlugin } from "../plugins/file.ts";
import { httpPlugin } from "../plugins/http.ts";
import { assertBytes, assertEquals, assertMatch, assertOk, assertRejects } from "./assert.ts";
import { peers, randomBytes, runOk, startNbdServe, tempDir } from "./helpers.ts";

const LONG = "a/directory/path/long/enough/that/ustar/cannot/hold/it/in/one/hundred/bytes/" +
  "of/name/field/disk-with-a-long-name.img";

const MEMBERS: Array<[string, Uint8Array]> = [
  ["small.txt", new TextEncoder().encode("hello\n")],
  ["disk1.img", randomBytes(2 * 1024 * 1024 + 512, 11)],
  [LONG, randomBytes(1_500_001, 12)],
  ["other.bin", randomBytes(777_777, 13)],
];

const MiB = 1 << 20;

/**
 * Sparse members: many data islands (more than the four an old GNU header
 * holds, and a map longer than one block in pax 1.0), one of them at the
 * odd-sized end; one with a long name, one all hole.
 */
const SPARSE: Array<[string, number, Array<[number, number]>]> = [
  ["sparse.img", 48 * MiB + 1234, [
    ...Array.from({ length: 60 }, (_, i): [number, number] => [i * 777 * 1024, 4096 + i]),
    [48 * MiB, 1234],
  ]],
  [`${LONG}.sparse`, 20 * MiB, [[0, 100], [7 * MiB + 3, 70_000], [19 * MiB, MiB]]],
  ["hole.img", 3 * MiB, []],
];

/** The sparse members' contents, as written. */
const sparseData = new Map<string, Uint8Array>();

async function writeSparse(path: string, size: number, islands: Array<[number, number]>) {
  const data = new Uint8Array(size);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  await file.truncate(size);
  for (const [i, [offset, length]] of islands.entries()) {
    const bytes = randomBytes(length, 50 + i);
    data.set(bytes, offset);
    await file.seek(offset, Deno.SeekMode.Start);
    await file.write(bytes);
  }
  file.close();
  return data;
}

/** Writes the members under `dir/src` and archives them with each tool and format. */
async function archives(dir: string): Promise<Record<string, string>> {
  const src = `${dir}/src`;
  for (const [name, data] of MEMBERS) {
    await Deno.mkdir(`${src}/${name}`.replace(/\/[^/]*$/, ""), { recursive: true });
    await Deno.writeFile(`${src}/${name}`, data);
  }
  for (const [name, size, islands] of SPARSE) {
    sparseData.set(name, await writeSparse(`${src}/${name}`, size, islands));
  }
  const names = [...MEMBERS.map(([name]) => name), ...SPARSE.map(([name]) => name)];
  const out: Record<string, string> = {
    gnu: `${dir}/gnu.tar`,
    pax: `${dir}/pax.tar`,
    "pax-0.0": `${dir}/pax00.tar`,
    "pax-0.1": `${dir}/pax01.tar`,
    bsd: `${dir}/bsd.tar`,
  };
  const gnuTar = (format: string, out: string, ...extra: string[]) =>
    runOk("tar", [`--format=${format}`, "-S", ...extra, "-C", src, "-cf", out, ...names]);
  await gnuTar("gnu", out.gnu!);
  await gnuTar("pax", out.pax!);
  await gnuTar("pax", out["pax-0.0"]!, "--sparse-version=0.0");
  await gnuTar("pax", out["pax-0.1"]!, "--sparse-version=0.1");
  await runOk("bsdtar", ["-C", src, "-cf", out.bsd!, ...names]);
  // The archives must hold the sparse members as sparse, or the test proves nothing.
  for (const archive of Object.values(out)) {
    const size = (await Deno.stat(archive)).size;
    assertOk(size < 20 * MiB, `${archive} stores its sparse members sparse (${size} bytes)`);
  }
  return out;
}

async function member(archive: string, entry: string, extra: string[] = []): Promise<Backend> {
  const { backend, instance } = await openPlugin(filePlugin, [archive]);
  const filter = await createFilter(tarFilter, [`tar-entry=${entry}`, ...extra]);
  return await filter.wrap(backend, CTX, () => instance.open(CTX));
}

async function readAll(backend: Backend): Promise<Uint8Array> {
  const out = new Uint8Array(backend.size());
  await backend.pread(out, 0);
  return out;
}

/** The extents of a whole member, merged: [offset, length, flags]. */
async function extentsOf(backend: Backend): Promise<Array<[number, number, number]>> {
  const out: Array<[number, number, number]> = [];
  for (let at = 0; at < backend.size();) {
    for (
      const { length, flags } of await backend.extents(at, backend.size() - at, { reqOne: false })
    ) {
      const last = out[out.length - 1];
      if (last && last[2] === flags) last[1] += length;
      else out.push([at, length, flags]);
      at += length;
    }
  }
  return out;
}

Deno.test({
  name: "tar: every member of GNU, pax and bsdtar archives reads equal, long names included",
  ...peers("tar", "bsdtar"),
  async fn() {
    await using dir = await tempDir();
    for (const [tool, archive] of Object.entries(await archives(dir.path))) {
      for (const [name, data] of MEMBERS) {
        const backend = await member(archive, name);
        assertBytes(await readAll(backend), data, `${tool} ${name}`);
        await backend.close();
      }
      for (const [name] of SPARSE) {
        const backend = await member(archive, name);
        assertBytes(await readAll(backend), sparseData.get(name)!, `${tool} ${name}`);
        // A read across an island's edges and a hole.
        const piece = new Uint8Array(3 * 4096 + 17);
        await backend.pread(piece, 777 * 1024 - 4096 - 5);
        assertBytes(
          piece,
          sparseData.get(name)!.subarray(777 * 1024 - 4096 - 5).subarray(0, piece.length),
        );
        await backend.close();
      }
      // A leading ./ is ignored, as tar -t of "." would list it.
      const dotted = await member(archive, "./other.bin");
      assertEquals(dotted.size(), MEMBERS[3]![1].length);
      await dotted.close();
    }
  },
});

Deno.test({
  name: "tar: sparse members report their holes, refuse writes; served, nbdcopy reads them",
  ...peers("tar", "bsdtar", "nbdcopy", "nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    const all = await archives(dir.path);
    // Both tools store what SEEK_DATA reports of the source file, so the member's
    // map equals nbdkit's map of that file, as nbdinfo prints it.
    const [name, size] = SPARSE[0]!;
    const source = await runOk("nbdinfo", [
      "--map",
      "--json",
      "--",
      "[",
      "nbdkit",
      "-r",
      "file",
      `${dir.path}/src/${name}`,
      "]",
    ]);
    const expected =
      (JSON.parse(source.stdout) as Array<{ offset: number; length: number; type: number }>)
        .map(({ offset, length, type }): [number, number, number] => [offset, length, type]);
    assertOk(expected.length > 100, "the source file has its holes");
    for (const [tool, archive] of Object.entries(all)) {
      const backend = await member(archive, name);
      assertEquals(backend.capabilities().writable, false, tool);
      assertEquals(backend.capabilities().extents, true, tool);
      const extents = await extentsOf(backend);
      assertEquals(extents.reduce((n, [, length]) => n + length, 0), size, tool);
      assertEquals(extents, expected, tool);
      // Every byte reported as a hole is zero in the file; every island lies in data.
      const data = sparseData.get(name)!;
      for (const [offset, length, flags] of extents) {
        if (flags === 3) assertOk(data.subarray(offset, offset + length).every((b) => b === 0));
      }
      let refused = "";
      await backend.pwrite(new Uint8Array(512).fill(1), 0, { fua: false }).catch((e) => {
        refused = (e as Error).message;
      });
      assertMatch(refused, /read-only/);
      await backend.close();
    }
    const hole = await member(all.gnu!, "hole.img");
    assertEquals(await extentsOf(hole), [[0, 3 * MiB, 3]]);
    await hole.close();
    // Served: a real client reads the member equal and sees the holes.
    for (const tool of ["pax", "bsd"]) {
      await using server = await startNbdServe([
        "-r",
        "--filter=tar",
        "file",
        all[tool]!,
        `tar-entry=${LONG}.sparse`,
      ]);
      const copied = `${dir.path}/copied-${tool}.img`;
      await runOk("nbdcopy", [server.uri, copied]);
      assertBytes(await Deno.readFile(copied), sparseData.get(`${LONG}.sparse`)!, tool);
      const map = await runOk("nbdinfo", ["--map", "--totals", server.uri]);
      // Data is at most the islands rounded out to 64 KiB; the rest is reported as hole.
      const dataLine = /^\s*(\d+)\s+[\d.]+%\s+0\s+data$/m.exec(map.stdout);
      assertOk(dataLine, map.stdout);
      assertOk(Number(dataLine![1]) <= 100 + 70_000 + MiB + 3 * 64 * 1024, map.stdout);
      assertOk(Number(dataLine![1]) >= 100 + 70_000 + MiB, map.stdout);
    }
  },
});

Deno.test({
  name: "tar: a write changes only that member (tar -xO shows it)",
  ...peers("tar", "bsdtar"),
  async fn() {
    await using dir = await tempDir();
    const { gnu, bsd } = await archives(dir.path);
    for (const archive of [gnu, bsd]) {
      const backend = await member(archive, LONG);
      assertOk(backend.capabilities().writable);
      const patch = randomBytes(5000, 21);
      await backend.pwrite(patch, 100_000, { fua: false });
      await backend.flush();
      await backend.close();
      const expected = MEMBERS[2]![1].slice();
      expected.set(patch, 100_000);
      const extracted = await new Deno.Command("tar", { args: ["-xOf", archive, LONG] }).output();
      assertEquals(extracted.code, 0);
      assertBytes(extracted.stdout, expected);
      for (const [name, data] of MEMBERS.filter(([n]) => n !== LONG)) {
        const other = await new Deno.Command("tar", { args: ["-xOf", archive, name] }).output();
        assertBytes(other.stdout, data, name);
      }
    }
  },
});

Deno.test({
  name: "tar over http: only the headers before the member and the member are fetched",
  ...peers("tar"),
  async fn() {
    await using dir = await tempDir();
    const { gnu } = await archives(dir.path);
    const data = await Deno.readFile(gnu);
    let served = 0;
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
      if (req.method === "HEAD") {
        return new Response(null, {
          headers: { "Content-Length": String(data.length), "Accept-Ranges": "bytes" },
        });
      }
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
      if (!range) return new Response("Range required", { status: 400 });
      const start = Number(range[1]);
      const end = Math.min(Number(range[2]), data.length - 1);
      served += end + 1 - start;
      return new Response(data.slice(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
      });
    });
    try {
      const { backend, instance } = await openPlugin(httpPlugin, [
        `http://127.0.0.1:${server.addr.port}/gnu.tar`,
      ]);
      const filter = await createFilter(tarFilter, ["tar-entry=disk1.img"]);
      const disk = await filter.wrap(backend, CTX, () => instance.open(CTX));
      served = 0;
      const read = await readAll(disk);
      assertBytes(read, MEMBERS[1]![1]);
      assertOk(served < MEMBERS[1]![1].length + 64 * 1024, `${served} bytes fetched`);
      await disk.close();
      await instance.close?.();
    } finally {
      await server.shutdown();
    }
  },
});

Deno.test({
  name: "tar: missing entries, tar-limit, directories and links, a non-archive: one line",
  ...peers("tar"),
  async fn() {
    await using dir = await tempDir();
    const { gnu } = await archives(dir.path);
    await assertRejects(
      () => member(gnu, "nothing.img"),
      Error,
      'tar: no entry named "nothing.img" in the archive',
    );
    await assertRejects(
      () => member(gnu, "other.bin", ["tar-limit=64K"]),
      Error,
      'tar: no entry named "other.bin" in the first 65536 bytes (tar-limit)',
    );
    // Directories and symbolic links are entries too, but not disks.
    await Deno.symlink("small.txt", `${dir.path}/src/link`);
    const withDirs = `${dir.path}/dirs.tar`;
    await runOk("tar", ["-C", `${dir.path}/src`, "-cf", withDirs, "a/directory", "link"]);
    await assertRejects(
      () => member(withDirs, "a/directory/"),
      Error,
      `tar: "a/directory/" is not a regular file (type '5')`,
    );
    await assertRejects(
      () => member(withDirs, "link"),
      Error,
      `tar: "link" is not a regular file (type '2')`,
    );
    const notTar = `${dir.path}/src/disk1.img`;
    await assertRejects(() => member(notTar, "x"), Error, "bad checksum (not a tar archive?)");
    const message = await member(gnu, "missing").catch((e) => (e as Error).message);
    assertMatch(String(message), /^[^\n]+$/);
  },
});
