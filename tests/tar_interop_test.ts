/**
 * The tar filter on archives made by GNU tar (its own format and pax) and
 * by bsdtar, with long names: each member reads equal to its file; a
 * write changes that member only, as `tar -xO` shows; over http only the
 * headers before the member and the member itself are fetched; sparse
 * members, missing entries and tar-limit are clear errors.
 *
 * @module
 */

import type { Backend } from "../core/backend.ts";
import { createFilter, CTX, openPlugin } from "../filters/_test_utils.ts";
import { tarFilter } from "../filters/tar.ts";
import { filePlugin } from "../plugins/file.ts";
import { httpPlugin } from "../plugins/http.ts";
import { assertBytes, assertEquals, assertMatch, assertOk, assertRejects } from "./assert.ts";
import { peers, randomBytes, runOk, tempDir } from "./helpers.ts";

const LONG = "a/directory/path/long/enough/that/ustar/cannot/hold/it/in/one/hundred/bytes/" +
  "of/name/field/disk-with-a-long-name.img";

const MEMBERS: Array<[string, Uint8Array]> = [
  ["small.txt", new TextEncoder().encode("hello\n")],
  ["disk1.img", randomBytes(2 * 1024 * 1024 + 512, 11)],
  [LONG, randomBytes(1_500_001, 12)],
  ["other.bin", randomBytes(777_777, 13)],
];

/** Writes the members under `dir/src` and archives them with each tool. */
async function archives(dir: string): Promise<Record<string, string>> {
  const src = `${dir}/src`;
  for (const [name, data] of MEMBERS) {
    await Deno.mkdir(`${src}/${name}`.replace(/\/[^/]*$/, ""), { recursive: true });
    await Deno.writeFile(`${src}/${name}`, data);
  }
  const names = MEMBERS.map(([name]) => name);
  const out = { gnu: `${dir}/gnu.tar`, pax: `${dir}/pax.tar`, bsd: `${dir}/bsd.tar` };
  await runOk("tar", ["--format=gnu", "-C", src, "-cf", out.gnu, ...names]);
  await runOk("tar", ["--format=pax", "-C", src, "-cf", out.pax, ...names]);
  await runOk("bsdtar", ["-C", src, "-cf", out.bsd, ...names]);
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
      // A leading ./ is ignored, as tar -t of "." would list it.
      const dotted = await member(archive, "./other.bin");
      assertEquals(dotted.size(), MEMBERS[3]![1].length);
      await dotted.close();
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
  name: "tar: missing entries, sparse members and tar-limit are one-line errors",
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
    const sparse = `${dir.path}/src/sparse.img`;
    const file = await Deno.open(sparse, { write: true, create: true });
    await file.truncate(8 * 1024 * 1024);
    await file.seek(5_000_000, Deno.SeekMode.Start);
    await file.write(new Uint8Array([1, 2, 3]));
    file.close();
    const withSparse = `${dir.path}/sparse.tar`;
    await runOk("tar", [
      "-S",
      "-C",
      `${dir.path}/src`,
      "-cf",
      withSparse,
      "small.txt",
      "sparse.img",
    ]);
    await assertRejects(
      () => member(withSparse, "sparse.img"),
      Error,
      'tar: "sparse.img" is a sparse member, which is not supported',
    );
    // The members next to it are still served.
    assertEquals(
      new TextDecoder().decode(await readAll(await member(withSparse, "small.txt"))),
      "hello\n",
    );
    const notTar = `${dir.path}/src/disk1.img`;
    await assertRejects(() => member(notTar, "x"), Error, "bad checksum (not a tar archive?)");
    const message = await member(gnu, "missing").catch((e) => (e as Error).message);
    assertMatch(String(message), /^[^\n]+$/);
  },
});
