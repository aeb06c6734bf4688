/**
 * `nbd info`, `nbd list`, `nbd map` and `nbd dump` compared with nbdinfo
 * and nbddump run against the same servers, plus the one-line errors.
 */

import { assertEquals, assertMatch, assertOk } from "./assert.ts";
import {
  freePort,
  linuxPaths,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  type RunResult,
  type ServerProcess,
  startServer,
  tempDir,
} from "./helpers.ts";
import { makeCertificates } from "./certs.ts";
import { startNbdServer } from "./peer_servers.ts";

const MiB = 1024 * 1024;

/** Runs our CLI. */
function nbd(...args: string[]): Promise<RunResult> {
  return run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args]);
}

async function nbdOk(...args: string[]): Promise<string> {
  const result = await nbd(...args);
  assertEquals(result.code, 0, `nbd ${args.join(" ")} failed:\n${result.stderr}`);
  return result.stdout;
}

function nbdkit(args: string[], options: { exportName?: string } = {}): Promise<ServerProcess> {
  return startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args], options);
}

type Json = Record<string, unknown> & { exports: Array<Record<string, unknown>> };

/**
 * Checks that our JSON has every field nbdinfo's has, with the same value
 * (apart from fields named in `differ`, which are only required to exist).
 */
function assertSameInfo(ours: Json, theirs: Json, differ: string[] = []): void {
  for (const key of ["protocol", "TLS", "structured"]) {
    assertEquals(ours[key], theirs[key], `top-level field ${key}`);
  }
  assertEquals(ours.exports.length, theirs.exports.length, "number of exports");
  theirs.exports.forEach((expected, i) => {
    const actual = ours.exports[i]!;
    for (const [key, value] of Object.entries(expected)) {
      assertOk(key in actual, `export ${i}: field "${key}" is missing`);
      if (!differ.includes(key)) {
        assertEquals(actual[key], value, `export ${i}: field "${key}"`);
      }
    }
  });
}

async function compareInfo(uri: string, differ: string[] = []): Promise<Json> {
  const ours = JSON.parse(await nbdOk("info", "--json", uri)) as Json;
  const theirs = JSON.parse((await runOk("nbdinfo", ["--json", uri])).stdout) as Json;
  assertSameInfo(ours, theirs, differ);
  const oursList = JSON.parse(await nbdOk("list", "--json", uri)) as Json;
  const theirsList = JSON.parse((await runOk("nbdinfo", ["--list", "--json", uri])).stdout);
  assertSameInfo(oursList, theirsList, differ);
  return ours;
}

Deno.test({
  name: "nbd info --json agrees with nbdinfo --json on nbdkit exports",
  ...peers("nbdkit", "nbdinfo"),
  async fn() {
    const variants = [
      ["memory", "1M"],
      ["pattern", "3M"],
      ["-r", "sparse-random", "16M", "runlength=262144"],
      ["data", "raw=hello world, this is text", "size=4096"],
      ["--no-sr", "memory", "1M"],
      ["--mask-handshake=1", "null", "5000"],
      ["--filter=blocksize-policy", "memory", "8M", "blocksize-minimum=512"],
      ["--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable"],
    ];
    for (const args of variants) {
      await using server = await nbdkit(args);
      const ours = await compareInfo(server.uri);
      assertOk(ours.exports[0]!["export-size"]! as number > 0, args.join(" "));
    }
  },
});

Deno.test({
  name: "nbd info and nbd list agree with nbdinfo on nbdkit's named exports and old handshakes",
  ...peers("nbdkit", "nbdinfo"),
  async fn() {
    await using named = await nbdkit([
      "--filter=exportname",
      "memory",
      "1M",
      "exportname=a",
      "exportname=b",
      "exportname-list=explicit",
      "exportdesc=fixed:hello",
    ]);
    const listed = await compareInfo(named.uri);
    assertEquals(listed.exports.map((e) => e["export-name"]), [""]);
    const ours = JSON.parse(await nbdOk("list", "--json", named.uri)) as Json;
    assertEquals(ours.exports.map((e) => [e["export-name"], e.description]), [
      ["a", "hello"],
      ["b", "hello"],
    ]);
    // Oldstyle and non-fixed newstyle: info works, listing is refused by both tools.
    for (const flag of ["-o", "--mask-handshake=0"]) {
      await using server = await nbdkit([flag, "memory", "1M"]);
      const theirs = JSON.parse((await runOk("nbdinfo", ["--json", server.uri])).stdout);
      assertSameInfo(JSON.parse(await nbdOk("info", "--json", server.uri)), theirs);
      const list = await nbd("list", server.uri);
      assertEquals(list.code, 1);
      assertEquals((await run("nbdinfo", ["--list", server.uri])).code, 1);
      assertMatch(
        list.stderr,
        /^nbd: the server uses the \w+ handshake, which has no LIST option\n$/,
      );
    }
  },
});

/** qemu-nbd serving a 4 MiB qcow2 image with 64 KiB of data at 1 MiB. */
async function qemuServer(dir: string): Promise<ServerProcess> {
  const image = `${dir}/disk.qcow2`;
  await runOk("qemu-img", ["create", "-f", "qcow2", image, "4M"]);
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0xab 1M 64k", image]);
  return await startServer(
    "qemu-nbd",
    ["-f", "qcow2", "-x", "disk", "-k", "$SOCKET", "-t", "-A", "-D", "my disk", image],
    { exportName: "disk" },
  );
}

Deno.test({
  name: "nbd info, map and dump agree with nbdinfo and nbddump on qemu-nbd",
  ...peers("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "nbddump"),
  async fn() {
    await using dir = await tempDir();
    await using server = await qemuServer(dir.path);
    const ours = await compareInfo(server.uri);
    assertEquals(ours.exports[0]!.contexts, ["base:allocation", "qemu:allocation-depth"]);
    assertEquals(ours.exports[0]!.description, "my disk");
    for (
      const args of [
        ["--map"],
        ["--map", "--totals"],
        ["--map=qemu:allocation-depth"],
        ["--map", "--json"],
        ["--size"],
      ]
    ) {
      const theirs = (await runOk("nbdinfo", [...args, server.uri])).stdout;
      const mine = await nbdOk("info", ...args, server.uri);
      if (args.includes("--json")) assertEquals(JSON.parse(mine), JSON.parse(theirs));
      else assertEquals(mine, theirs, args.join(" "));
    }
    assertEquals(
      await nbdOk("map", "--context", "qemu:allocation-depth", server.uri),
      (await runOk("nbdinfo", ["--map=qemu:allocation-depth", server.uri])).stdout,
    );
    assertEquals(
      await nbdOk("dump", server.uri),
      (await runOk("nbddump", [server.uri])).stdout,
    );
  },
});

Deno.test({
  name: "nbd map agrees with nbdinfo --map on a sparse nbdkit export, with totals and JSON",
  ...peers("nbdkit", "nbdinfo"),
  async fn() {
    await using server = await nbdkit(["sparse-random", "64M", "runlength=262144", "seed=7"]);
    const theirs = (await runOk("nbdinfo", ["--map", server.uri])).stdout;
    assertOk(theirs.split("\n").length > 10, "the map has many runs");
    assertEquals(await nbdOk("map", server.uri), theirs);
    assertEquals(
      await nbdOk("map", "--totals", server.uri),
      (await runOk("nbdinfo", ["--map", "--totals", server.uri])).stdout,
    );
    assertEquals(
      JSON.parse(await nbdOk("map", "--json", server.uri)),
      JSON.parse((await runOk("nbdinfo", ["--map", "--json", server.uri])).stdout),
    );
    const totals = JSON.parse(await nbdOk("map", "--totals", "--json", server.uri));
    const theirTotals = JSON.parse(
      (await runOk("nbdinfo", ["--map", "--totals", "--json", server.uri])).stdout,
    );
    assertEquals(totals.length, theirTotals.length);
    totals.forEach((t: Record<string, number>, i: number) => {
      const expected = theirTotals[i];
      assertEquals(t.size, expected.size);
      assertEquals(t.type, expected.type);
      assertOk(Math.abs(t.percent! - expected.percent) < 1e-3, `percent ${t.percent}`);
    });
  },
});

/** Turns hexdump text back into bytes, expanding "*" lines. */
function undump(text: string, start: number, end: number): Uint8Array {
  const out = new Uint8Array(end - start);
  let previous: Uint8Array | undefined;
  let previousAddress = 0;
  let splat = false;
  const repeatUntil = (address: number) => {
    for (let a = previousAddress + 16; a < address; a += 16) {
      out.set(previous!.subarray(0, Math.min(16, end - a)), a - start);
    }
  };
  for (const line of text.split("\n")) {
    if (line === "") continue;
    if (line === "*") {
      splat = true;
      continue;
    }
    const match = /^([0-9a-f]{10,}): (.{49})\|/.exec(line);
    assertOk(match, `unexpected dump line: ${line}`);
    const address = parseInt(match[1]!, 16);
    const bytes = new Uint8Array(match[2]!.trim().split(/\s+/).map((h) => parseInt(h, 16)));
    if (splat) repeatUntil(address);
    splat = false;
    out.set(bytes, address - start);
    previous = new Uint8Array(16);
    previous.set(bytes);
    previousAddress = address;
  }
  if (splat) repeatUntil(end);
  return out;
}

Deno.test({
  name: "nbd dump matches nbddump and reproduces the export byte for byte",
  ...peers("nbdkit", "nbddump", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    // Known content: random bytes with repeated and zero regions in between.
    const content = new Uint8Array(3 * MiB + 1234);
    content.set(randomBytes(5000, 3), 100);
    content.fill(0x41, MiB, MiB + 4096);
    content.set(randomBytes(70000, 4), 2 * MiB + 7);
    content[content.length - 1] = 0x7a;
    const file = `${dir.path}/content.bin`;
    await Deno.writeFile(file, content);
    await using server = await nbdkit(["file", file]);
    const ours = await nbdOk("dump", server.uri);
    assertEquals(ours, (await runOk("nbddump", [server.uri])).stdout);
    assertEquals(undump(ours, 0, content.length), content);

    const part = await nbdOk("dump", "--offset", "4000", "--length", String(MiB), server.uri);
    assertMatch(part, /^0000000fa0: /);
    assertEquals(undump(part, 4000, 4000 + MiB), content.subarray(4000, 4000 + MiB));

    // A sparse export: block status lets zero regions go unread, output is unchanged.
    await using sparse = await nbdkit(["sparse-random", "8M", "runlength=262144", "seed=3"]);
    await runOk("nbdcopy", [sparse.uri, `${dir.path}/sparse.bin`]);
    const sparseDump = await nbdOk("dump", sparse.uri);
    assertEquals(sparseDump, (await runOk("nbddump", [sparse.uri])).stdout);
    assertEquals(
      undump(sparseDump, 0, 8 * MiB),
      await Deno.readFile(`${dir.path}/sparse.bin`),
    );
  },
});

Deno.test({
  name: "nbd info --can and --is exit like nbdinfo",
  ...peers("nbdkit", "nbdinfo"),
  async fn() {
    for (const args of [["-r", "memory", "1M"], ["--no-sr", "memory", "1M"]]) {
      await using server = await nbdkit(args);
      const checks = [
        ["--can", "connect"],
        ["--can", "read"],
        ["--can", "write"],
        ["--can", "trim"],
        ["--can", "zero"],
        ["--can", "fua"],
        ["--can", "df"],
        ["--can", "structured-reply"],
        ["--is", "read-only"],
        ["--is", "rotational"],
        ["--is", "tls"],
      ];
      for (const check of checks) {
        const theirs = (await run("nbdinfo", [...check, server.uri])).code;
        assertOk(theirs === 0 || theirs === 2, `nbdinfo ${check.join(" ")}: ${theirs}`);
        assertEquals((await nbd("info", ...check, server.uri)).code, theirs, check.join(" "));
      }
    }
  },
});

Deno.test({
  name: "nbd info handles nbd-server's size-0 INFO reply by asking with GO",
  ...peers("nbd-server", "nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    await Deno.writeFile(image, randomBytes(2 * MiB, 8));
    await using server = await startNbdServer(image);
    // nbdinfo shows nbd-server's INFO size (0) and probes 0 bytes; we show the real size.
    const ours = await compareInfo(server.uri, ["export-size", "export-size-str", "content"]);
    assertEquals(ours.exports[0]!["export-size"], 2 * MiB);
    assertEquals(ours.exports[0]!["export-size-str"], "2M");
    const list = JSON.parse(await nbdOk("list", "--json", server.uri)) as Json;
    assertEquals(list.exports[0]!["export-size"], 2 * MiB);
    assertEquals(await nbdOk("info", "--size", server.uri), `${2 * MiB}\n`);
  },
});

Deno.test({
  name: "nbd client commands fail with one clear line",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    await using strict = await nbdkit([
      "--filter=exportname",
      "memory",
      "1M",
      "exportname=a",
      "exportname-strict=true",
    ]);
    await using noSr = await nbdkit(["--no-sr", "memory", "1M"]);
    const socket = strict.socket!;
    const cases: Array<[string[], RegExp]> = [
      [["info", `nbd+unix:///?socket=${dir.path}/none`], /no such socket/],
      [["dump", "nbd://127.0.0.1:1/"], /Cannot connect to NBD server at 127\.0\.0\.1:1/],
      [["info", `nbd+unix:///nope?socket=${socket}`], /no export named "nope"/],
      [["map", `nbd+unix:///nope?socket=${socket}`], /no export named "nope"/],
      [["info", "nbd://host:99999/"], /bad port "99999"/],
      [["info", "nbd+unix:///disk"], /needs a socket=PATH/],
      [["list", "http://example.com/"], /unknown scheme "http"/],
      [
        ["info", `nbds+unix:///?socket=${socket}`],
        /refused TLS \(ERR_POLICY\); not connecting in plaintext/,
      ],
      [["map", noSr.uri], /does not support metadata context "base:allocation"/],
    ];
    for (const [args, pattern] of cases) {
      const result = await nbd(...args);
      assertEquals(result.code, 1, `${args.join(" ")}: ${result.stderr}`);
      assertEquals(result.stdout, "", args.join(" "));
      const lines = result.stderr.trimEnd().split("\n");
      assertEquals(lines.length, 1, `one line: ${result.stderr}`);
      assertMatch(lines[0]!, /^nbd: /);
      assertMatch(lines[0]!, pattern);
    }
    for (
      const args of [["info"], ["dump", "--length", "lots", "nbd://x/"], ["map", "--bogus", "x"]]
    ) {
      const result = await nbd(...args);
      assertEquals(result.code, 2, args.join(" "));
      assertMatch(result.stderr, /^nbd: /);
    }
  },
});

Deno.test({
  name: "nbd info over TCP agrees with nbdinfo, including the export URI",
  ...peers("nbdkit", "nbdinfo"),
  async fn() {
    const port = freePort();
    const server = new Deno.Command("nbdkit", {
      args: [
        "-f",
        "-p",
        String(port),
        "-i",
        "127.0.0.1",
        "--filter=exportname",
        "memory",
        "1M",
        "exportname=disk",
        "exportname-list=explicit",
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      const uri = `nbd://127.0.0.1:${port}/disk`;
      for (let i = 0; i < 200 && (await nbd("info", "--can", "connect", uri)).code !== 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      const ours = await compareInfo(uri);
      assertEquals(ours.exports[0]!.uri, `nbd://127.0.0.1:${port}/disk`);
    } finally {
      server.kill("SIGTERM");
      await server.status;
    }
  },
});

Deno.test({
  name:
    "client commands say so in one line when the server requires TLS, and work with --tls-certificates",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    await using server = await nbdkit([
      "--tls=require",
      `--tls-certificates=${dir.path}`,
      "memory",
      "1M",
    ]);
    for (const command of ["info", "list", "map", "dump"]) {
      const result = await nbd(command, server.uri);
      assertEquals(result.code, 1, command);
      assertMatch(result.stderr, /^nbd: the server requires TLS: connect with an nbds:\/\/ URI/);
      assertEquals(result.stderr.trimEnd().split("\n").length, 1, result.stderr);
      // The same command with the TLS flags works.
      const secure = await nbd(command, `--tls-certificates=${dir.path}`, server.uri);
      assertEquals(secure.code, 0, `${command}: ${secure.stderr}`);
    }
  },
});

Deno.test({
  name: "client commands start a server for themselves: nbd info/list/map -- [ CMD ARGS ]",
  ...linuxPaths("[ CMD ]", peers("nbdkit", "nbdinfo")),
  async fn() {
    const info = await nbd("info", "--json", "--", "[", "nbdkit", "memory", "3M", "]");
    assertEquals(info.code, 0, info.stderr);
    assertEquals(JSON.parse(info.stdout).exports[0]["export-size"], 3 * 1024 * 1024);
    const expected = await runOk("nbdinfo", [
      "--map",
      "--",
      "[",
      "nbdkit",
      "data",
      "data=1 @1048576 2",
      "]",
    ]);
    const map = await nbd("map", "--", "[", "nbdkit", "data", "data=1 @1048576 2", "]");
    assertEquals(map.stdout, expected.stdout);
    const bad = await nbd("info", "--", "[", "nbdkit", "memory", "1M");
    assertEquals(bad.code, 2);
    assertMatch(bad.stderr, /needs one URI, or a server command/);
  },
});
