/**
 * Plugins and filters loaded from modules outside the tree:
 * `nbd serve ./disk.ts`, `--filter=./x.ts`, their help, their start-up
 * errors (one line, exit 1), and wrong answers at run time (EIO for that
 * request; the server and its other requests carry on).
 */

import { assertBytes, assertEquals, assertIncludes, assertMatch, assertOk } from "./assert.ts";
import { peers, ROOT, run, runOk, startNbdServe, tempDir } from "./helpers.ts";
import { NbdClient } from "../client/client.ts";
import { NbdError } from "../protocol/errors.ts";

const SERVE = ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve"];

/** A plugin of fixed bytes, written as a plain object (no imports), with a magic size. */
const FILL_PLUGIN = `export default {
  name: "fill",
  summary: "every byte is the same",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "virtual size", required: true },
    { name: "byte", value: "N", type: "integer", description: "the byte (0-255)", default: "97" },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size");
    const byte = params.takeInteger("byte", 0, 255) ?? 97;
    return {
      open: () => ({
        size: () => size,
        pread: (buf) => { buf.fill(byte); return Promise.resolve(); },
      }),
    };
  },
};
`;

/** A filter that adds a constant to every byte read. */
const ADD_FILTER = `export default {
  name: "add",
  params: [{ name: "add", value: "N", type: "integer", description: "added to each byte" }],
  create(params) {
    const add = params.takeInteger("add", 0, 255) ?? 1;
    return {
      wrap: (next) => ({
        size: () => next.size(),
        pread: async (buf, offset) => {
          await next.pread(buf, offset);
          for (let i = 0; i < buf.length; i++) buf[i] = (buf[i] + add) & 255;
        },
      }),
    };
  },
};
`;

/** A plugin that answers some requests wrongly: the module's bugs, one per region. */
const BUGGY_PLUGIN = `export default {
  name: "buggy",
  params: [],
  create() {
    return {
      open: () => ({
        size: () => 1048576,
        async pread(buf, offset) {
          if (offset === 4096) return;                        // resolves without filling
          if (offset === 8192) return new Uint8Array(buf.length); // returns data instead
          if (offset === 12288) throw "a string";             // throws a non-error
          if (offset === 16384) { const e = new Error("full"); e.name = "NbdError"; e.errno = "ENOSPC"; e.detail = "full"; throw e; }
          buf.fill(7);
        },
        extents(offset) {
          if (offset === 0) return Promise.resolve("all of it");
          if (offset === 4096) return Promise.resolve([{ length: -1, flags: 0 }]);
          return Promise.resolve([{ length: 4096, flags: 0 }]);
        },
      }),
    };
  },
};
`;

async function writeModule(dir: string, name: string, text: string): Promise<string> {
  const path = `${dir}/${name}`;
  await Deno.writeTextFile(path, text);
  return path;
}

Deno.test("module plugin: --help shows its parameters like a built-in's", async () => {
  await using dir = await tempDir();
  await writeModule(dir.path, "fill.js", FILL_PLUGIN);
  const result = await runOk(Deno.execPath(), [...SERVE, "./fill.js", "--help"], {
    cwd: dir.path,
  });
  assertIncludes(result.stdout, "Usage: nbd serve [OPTIONS] ./fill.js [size=]SIZE [byte=N]");
  assertIncludes(result.stdout, "every byte is the same");
  assertMatch(result.stdout, /byte=N\s+the byte \(0-255; default: 97\)/);
  const filter = await writeModule(dir.path, "add.ts", ADD_FILTER);
  const help = await runOk(Deno.execPath(), [...SERVE, `--filter=${filter}`, "--help"]);
  assertIncludes(help.stdout, `--filter=${filter}`);
  assertMatch(help.stdout, /add=N\s+added to each byte/);
});

Deno.test({
  name: "module plugin and filter: served byte-exact to nbdcopy, filter among built-ins",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    await writeModule(dir.path, "fill.js", FILL_PLUGIN);
    await writeModule(dir.path, "add.mjs", ADD_FILTER);
    // offset (built-in) above the module filter above truncate (built-in).
    const result = await runOk(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      "--filter=offset",
      "--filter=./add.mjs",
      "--filter=truncate",
      "./fill.js",
      "size=64K",
      "byte=16",
      "add=3",
      "offset=4096",
      "truncate=12K",
      "--run",
      'nbdcopy "$uri" out.img',
    ], { cwd: dir.path });
    assertEquals(result.code, 0);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), new Uint8Array(8192).fill(19));
  },
});

Deno.test("module plugin: required and unknown parameters are checked as for built-ins", async () => {
  await using dir = await tempDir();
  await writeModule(
    dir.path,
    "fill.ts",
    FILL_PLUGIN.replace("create(params)", "create(params: any)"),
  );
  const missing = await run(Deno.execPath(), [...SERVE, "-U", "-", "./fill.ts", "--run", "true"], {
    cwd: dir.path,
  });
  assertEquals(missing.code, 2);
  assertEquals(missing.stderr, "nbd: fill: missing required parameter size=\n");
  const unknown = await run(
    Deno.execPath(),
    [...SERVE, "-U", "-", "./fill.ts", "1M", "colour=red", "--run", "true"],
    { cwd: dir.path },
  );
  assertEquals(unknown.code, 2);
  assertEquals(unknown.stderr, "nbd: unknown parameter: colour=\n");
});

Deno.test("module plugin: a broken module is one line at start-up, exit 1", async () => {
  await using dir = await tempDir();
  const cases: Array<[string, string, RegExp]> = [
    ["throws.ts", 'throw new Error("boom\\nmore");', /cannot load the module: boom$/],
    ["syntax.ts", "const x: = ;", /cannot load the module: SyntaxError/],
    ["named.ts", "export const plugin = {};", /no default export \(it exports plugin/],
    ["number.js", "export default 42;", /must be a plugin object, not number/],
    ["noname.js", "export default { create() {} };", /needs a name/],
    ["nocreate.js", 'export default { name: "x" };', /needs a create\(params\) method/],
    [
      "params.js",
      'export default { name: "x", params: {}, create() {} };',
      /params must be an array/,
    ],
    [
      "enum.js",
      'export default { name: "x", params: [{ name: "a", type: "enum" }], create() {} };',
      /an enum needs choices/,
    ],
    [
      "model.js",
      'export default { name: "x", threadModel: "fast", create() {} };',
      /threadModel must be/,
    ],
    [
      "create.js",
      'export default { name: "x", create() { return 1; } };',
      /create\(\) must return an object with open/,
    ],
    [
      "createthrows.js",
      'export default { name: "x", create() { throw new Error("no disk"); } };',
      /\.\/createthrows\.js: no disk$/,
    ],
    ["missing.ts", "", /cannot load the module: Module not found/],
  ];
  await Promise.all(cases.map(async ([name, text, pattern]) => {
    if (text) await writeModule(dir.path, name, text);
    const result = await run(Deno.execPath(), [...SERVE, "-U", "-", `./${name}`, "--run", "true"], {
      cwd: dir.path,
    });
    assertEquals(result.code, 1, `${name}: ${result.stderr}`);
    const lines = result.stderr.split("\n").filter((l) => l !== "");
    assertEquals(lines.length, 1, `${name}: ${result.stderr}`);
    assertMatch(lines[0]!, new RegExp(`^nbd: \\./${name.replace(".", "\\.")}: `));
    assertMatch(lines[0]!, pattern);
  }));
});

Deno.test("module plugin: wrong answers fail that request with EIO; the server carries on", async () => {
  await using dir = await tempDir();
  const path = await writeModule(dir.path, "buggy.js", BUGGY_PLUGIN);
  await using server = await startNbdServe([path]);
  await using client = await NbdClient.connect(server.uri);
  const buf = new Uint8Array(4096);
  const errno = async (run: () => Promise<unknown>) => {
    try {
      await run();
      return "ok";
    } catch (error) {
      return error instanceof NbdError ? error.errno : String(error);
    }
  };
  assertEquals(await errno(() => client.pread(buf, 4096)), "EIO");
  assertEquals(await errno(() => client.pread(buf, 8192)), "EIO");
  assertEquals(await errno(() => client.pread(buf, 12288)), "EIO");
  // An NbdError from another copy of the library keeps its errno.
  assertEquals(await errno(() => client.pread(buf, 16384)), "ENOSPC");
  assertEquals(await errno(() => client.extents(0, 4096)), "EIO");
  assertEquals(await errno(() => client.extents(4096, 4096)), "EIO");
  // Everything else still works, on this connection and a new one.
  await client.pread(buf, 0);
  assertBytes(buf, new Uint8Array(4096).fill(7));
  assertEquals((await client.extents(8192, 4096))[0]!.length, 4096);
  await using second = await NbdClient.connect(server.uri);
  await second.pread(buf, 20480);
  assertBytes(buf, new Uint8Array(4096).fill(7));
  assertIncludes(server.stderr(), "pread resolved without filling its buffer");
  assertOk(!/Uncaught/.test(server.stderr()), server.stderr());
});

Deno.test({
  name: "ts plugin: a one-line expression serves 1 MiB of one byte, byte-exact to nbdcopy",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const code = 'definePlugin({ name: "fives", size: () => 1048576, ' +
      "pread: async (buf) => void buf.fill(0x55) }) // trailing comment";
    await runOk(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      "ts",
      code,
      "--run",
      'nbdcopy "$uri" out.img',
    ], { cwd: dir.path });
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), new Uint8Array(1048576).fill(0x55));
  },
});

Deno.test({
  name: "ts plugin: a module on stdin with a parameter, read by qemu-io; NbdError keeps its errno",
  ...peers("qemu-io"),
  async fn() {
    const code = `import type { Params } from "${new URL("../mod.ts", import.meta.url).href}";
export default definePlugin({
  name: "counting",
  params: [{ name: "size", value: "SIZE", type: "size", description: "size", required: true }],
  create(params: Params) {
    const size = params.takeSize("size")!;
    return {
      size: () => size,
      async pread(buf: Uint8Array, offset: number) {
        if (offset >= 65536) throw new NbdError("ENOSPC", "not here");
        for (let i = 0; i < buf.length; i++) buf[i] = (offset + i) >> 9 & 255;
      },
    };
  },
});
`;
    const result = await run(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      "ts",
      "-",
      "size=128K",
      "--run",
      'qemu-io -r -f raw -c "read -P 3 1536 512" -c "read -P 0 0 512" -c "read 65536 512" "$uri"',
    ], { stdin: code });
    assertIncludes(result.stdout, "read 512/512 bytes at offset 1536");
    assertIncludes(result.stdout, "read 512/512 bytes at offset 0");
    assertMatch(result.stdout, /read failed: No space left on device/);
    assertOk(!/Pattern verification failed/.test(result.stdout), result.stdout);
  },
});

Deno.test("ts plugin: bad code is one line at start-up; missing parameters as for built-ins", async () => {
  const bad = await run(Deno.execPath(), [
    ...SERVE,
    "-U",
    "-",
    "ts",
    "definePlugin({",
    "--run",
    "true",
  ]);
  assertEquals(bad.code, 1);
  assertMatch(bad.stderr, /^nbd: ts: cannot load the code: [^\n]+\n$/);
  const notPlugin = await run(Deno.execPath(), [...SERVE, "-U", "-", "ts", "42", "--run", "true"]);
  assertEquals(notPlugin.code, 1);
  assertEquals(
    notPlugin.stderr,
    "nbd: ts: the default export must be a plugin object, not number\n",
  );
  const missing = await run(Deno.execPath(), [
    ...SERVE,
    "-U",
    "-",
    "ts",
    '({ name: "p", params: [{ name: "size", value: "SIZE", type: "size", description: "", required: true }], create: () => ({ open: () => ({ size: () => 1, pread: async () => {} }) }) })',
    "--run",
    "true",
  ]);
  assertEquals(missing.code, 2);
  assertEquals(missing.stderr, "nbd: p: missing required parameter size=\n");
});

/** A filter with a bug: it reads one sector further than it was asked. */
const OFF_BY_ONE_FILTER = `export default {
  name: "offbyone",
  params: [],
  create() {
    return {
      wrap: (next) => ({
        size: () => next.size(),
        pread: (buf, offset) => next.pread(buf, offset + 512),
      }),
    };
  },
};
`;

Deno.test("--debug-layers: a buggy filter is reported by name, between built-in layers", async () => {
  await using dir = await tempDir();
  const path = await writeModule(dir.path, "offbyone.js", OFF_BY_ONE_FILTER);
  await using server = await startNbdServe([
    "--debug-layers",
    "--filter=readonly",
    `--filter=${path}`,
    "--filter=truncate",
    "pattern",
    "1M",
    "truncate=64K",
  ]);
  await using client = await NbdClient.connect(server.uri);
  const buf = new Uint8Array(4096);
  await client.pread(buf, 0); // within the size below: fine
  let errno = "ok";
  await client.pread(buf, 65536 - 4096).catch((e) => errno = (e as NbdError).errno);
  assertEquals(errno, "EIO");
  assertIncludes(
    server.stderr(),
    "layer check: filter offbyone broke the contract of filter truncate: " +
      "pread(offset=61952, length=4096) beyond the size 65536",
  );
});
