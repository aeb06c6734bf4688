/**
 * The portable paths in the main suite: a representative subset of the
 * interop tests with every nbd process on the path macOS takes
 * (NBD_PORTABLE=1: node:fs file I/O, no write-behind, no socket or pipe
 * tricks, lseek for holes) and one on the path Windows takes (--deny-ffi:
 * no FFI at all), checked byte for byte against the same peers. The whole
 * set runs with `deno task test:portable`.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import {
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  type ServerProcess,
  startServer,
  tempDir,
} from "./helpers.ts";

const MiB = 1024 * 1024;
const PORTABLE = { NBD_PORTABLE: "1" };

/** `nbd ARGS` on the portable paths (`flags` for the runtime, e.g. --deny-ffi). */
async function nbd(
  args: string[],
  options: { flags?: string[]; stdin?: Uint8Array } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  return await run(
    Deno.execPath(),
    ["run", "-A", ...(options.flags ?? []), "--quiet", `${ROOT}/main.ts`, ...args],
    { env: PORTABLE, stdin: options.stdin },
  );
}

async function nbdOk(args: string[], options: { flags?: string[]; stdin?: Uint8Array } = {}) {
  const result = await nbd(args, options);
  assertEquals(result.code, 0, `nbd ${args.join(" ")}: ${result.stderr}`);
  return result;
}

/** `nbd serve ARGS` on the portable paths, on a fresh Unix socket. */
function serve(args: string[], flags: string[] = []): Promise<ServerProcess> {
  return startServer(
    Deno.execPath(),
    ["run", "-A", ...flags, "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", ...args],
    { env: PORTABLE },
  );
}

/** A 6 MiB image: data, a 2 MiB hole, data. */
async function sparseImage(path: string): Promise<Uint8Array> {
  const data = randomBytes(6 * MiB, 26);
  data.fill(0, 2 * MiB, 4 * MiB);
  using file = await Deno.open(path, { write: true, create: true });
  await file.write(data.subarray(0, 2 * MiB));
  await file.seek(4 * MiB, Deno.SeekMode.Start);
  await file.write(data.subarray(4 * MiB));
  return data;
}

Deno.test({
  name: "portable paths: serve, copy, map, dump, TLS and --deny-ffi, byte for byte with peers",
  ...peers("nbdkit", "nbdinfo", "nbdcopy", "qemu-io", "openssl"),
  async fn(t) {
    await using dir = await tempDir();
    const image = `${dir.path}/sparse.img`;
    const data = await sparseImage(image);

    await t.step(
      "nbd serve file: nbdcopy reads it, qemu-io writes through, holes in the map",
      async () => {
        const served = `${dir.path}/served.img`;
        await sparseImage(served);
        await using server = await serve(["file", served]);
        await runOk("nbdcopy", [server.uri, `${dir.path}/read.img`]);
        assertBytes(await Deno.readFile(`${dir.path}/read.img`), data);
        await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 64k", server.uri]);
        const after = await Deno.readFile(served);
        assertOk(
          after.subarray(MiB, MiB + 65536).every((b) => b === 0x5a),
          "the write reached the file",
        );
        const map = JSON.parse((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout);
        assertOk(
          map.some((e: { offset: number; type: number }) => e.offset === 2 * MiB && (e.type & 1)),
          `a hole at 2 MiB (lseek): ${JSON.stringify(map)}`,
        );
        const ours = (await nbdOk(["map", server.uri])).stdout;
        assertIncludes(ours, "hole");
      },
    );

    await t.step("nbd copy: file → nbdkit → file, file → file, pipes, and http", async () => {
      await using memory = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", "6M"]);
      await nbdOk(["copy", image, memory.uri]);
      await runOk("nbdcopy", [memory.uri, `${dir.path}/peer.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/peer.img`), data);
      await nbdOk(["copy", memory.uri, `${dir.path}/back.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/back.img`), data);
      // Over an existing file (zeroes written, not punched) and into a new one.
      await nbdOk(["copy", image, `${dir.path}/back.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/back.img`), data);
      await nbdOk(["copy", image, `${dir.path}/new.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/new.img`), data);
      await nbdOk(["copy", "-", `${dir.path}/piped.img`], { stdin: data });
      assertBytes(await Deno.readFile(`${dir.path}/piped.img`), data);
      const out = await run(
        Deno.execPath(),
        ["run", "-A", "--quiet", `${ROOT}/main.ts`, "copy", image, "-"],
        { env: PORTABLE },
      );
      assertEquals(out.code, 0, out.stderr);
      assertEquals(out.stdout.length > 0, true);
      const http = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
        if (req.method === "HEAD") {
          return new Response(null, { headers: { "Content-Length": String(data.length) } });
        }
        const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "")!;
        const [start, end] = [Number(range[1]), Math.min(Number(range[2]), data.length - 1)];
        return new Response(data.slice(start, end + 1), {
          status: 206,
          headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
        });
      });
      try {
        await nbdOk([
          "copy",
          `http://127.0.0.1:${http.addr.port}/disk.img`,
          `${dir.path}/http.img`,
        ]);
        assertBytes(await Deno.readFile(`${dir.path}/http.img`), data);
      } finally {
        await http.shutdown();
      }
    });

    await t.step("nbd info and dump against nbdkit; nbdinfo against our TLS server", async () => {
      await using pattern = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "pattern", "1M"]);
      const info = JSON.parse((await nbdOk(["info", "--json", pattern.uri])).stdout);
      assertEquals(info.exports[0]["export-size"], MiB);
      const dump = (await nbdOk(["dump", "--length=16", pattern.uri])).stdout;
      assertIncludes(dump, "00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 08");
      const pki = `${dir.path}/pki`;
      await Deno.mkdir(pki);
      await makeCertificates(pki);
      await using tls = await serve(["--tls=require", `--tls-certificates=${pki}`, "file", image]);
      const uri = `nbds+unix:///?socket=${tls.socket}&tls-certificates=${pki}`;
      assertEquals(JSON.parse((await runOk("nbdinfo", ["--json", uri])).stdout).TLS, true);
      await runOk("nbdcopy", [uri, `${dir.path}/tls.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/tls.img`), data);
    });

    await t.step(
      "--deny-ffi (the path Windows takes): serve and copy, no holes detected",
      async () => {
        await using server = await serve(["-r", "file", image], ["--deny-ffi"]);
        await nbdOk(["copy", server.uri, `${dir.path}/denied.img`], { flags: ["--deny-ffi"] });
        assertBytes(await Deno.readFile(`${dir.path}/denied.img`), data);
        const map = JSON.parse((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout);
        assertEquals(map.length, 1, "without lseek the file is all data");
        const refused = await nbd(["mount", server.uri, dir.path], { flags: ["--deny-ffi"] });
        assertEquals(refused.code, 1);
        assertEquals(refused.stderr.trim().split("\n").length, 1, refused.stderr);
        assertIncludes(refused.stderr, "needs Linux");
      },
    );
  },
});
