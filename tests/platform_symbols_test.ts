/**
 * The platform switch keeps Linux-only libc symbols out of the portable
 * paths: every FFI declaration goes through io/ffi.ts, whose Linux loader
 * binds only where io/platform.ts chose the fast paths, and whose POSIX
 * loader declares only symbols every POSIX C library has. A probe process
 * records each symbol bound while it copies files, serves a file and asks
 * for the Linux-only commands: on the portable paths (NBD_PORTABLE=1, which
 * is what macOS runs, and --deny-ffi, which is what Windows runs) only
 * lseek and the errno location (or nothing) are bound, and the data comes
 * out byte for byte.
 */

import { assertEquals, assertIncludes, assertMatch, assertOk } from "./assert.ts";
import { ROOT, tempDir } from "./helpers.ts";

/** Symbols the portable paths may bind: in every POSIX C library (glibc, macOS libSystem). */
const POSIX_SYMBOLS = new Set(["lseek", "__errno_location", "__error"]);

/** The non-test sources of the tree, relative to ROOT. */
async function sources(dir = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(`${ROOT}/${dir || "."}`)) {
    const path = dir ? `${dir}/${entry.name}` : entry.name;
    if (entry.isDirectory) {
      if (!entry.name.startsWith(".") && entry.name !== "node_modules") {
        out.push(...await sources(path));
      }
    } else if (entry.name.endsWith(".ts") && !entry.name.endsWith("_test.ts")) {
      if (!path.startsWith("tests/") && !path.startsWith("bench/")) out.push(path);
    }
  }
  return out.sort();
}

/**
 * The symbol names of the object literal `const NAME = { ... } as const`:
 * each entry's key, or its `name:` (both branches of a `cond ? "a" : "b"`).
 */
function declaredSymbols(text: string, name: string): string[] {
  const start = text.indexOf(`const ${name} = {`);
  assertOk(start >= 0, `${name} is declared`);
  const lines = text.slice(start, text.indexOf("} as const;", start)).split("\n").slice(1);
  const entries: string[][] = [];
  for (const line of lines) {
    if (/^ {2}\w+: \{/.test(line)) entries.push([line]);
    else entries.at(-1)?.push(line);
  }
  return entries.flatMap((entry) => {
    const text = entry.join("\n");
    const override = /name: ([^\n]+)/.exec(text)?.[1];
    if (!override) return [/^ {2}(\w+):/.exec(text)![1]!];
    const choices = [...override.matchAll(/(?:^|[?:]\s*)"(\w+)"/g)].map((m) => m[1]!);
    assertOk(choices.length > 0, `a literal name in ${override}`);
    return choices;
  });
}

Deno.test("every FFI declaration goes through the platform switch", async () => {
  const texts = new Map<string, string>();
  for (const path of await sources()) texts.set(path, await Deno.readTextFile(`${ROOT}/${path}`));
  const dlopen = [...texts].filter(([, text]) => /Deno\.dlopen\(/.test(text)).map(([p]) => p);
  // librbd is opened only when the rbd plugin starts (its absence is a one-line error there).
  assertEquals(
    dlopen,
    ["io/ffi.ts", "io/librbd.ts", "io/platform.ts"],
    "only the loaders open libraries",
  );
  const linux = [...texts].filter(([, text]) => /\blazyLibc\(/.test(text)).map(([p]) => p);
  assertEquals(
    linux,
    [
      "io/libc.ts",
      "io/librbd.ts",
      "io/listening_fds.ts",
      "io/pipes.ts",
      "io/socket_buffers.ts",
      "io/socket_fast.ts",
    ],
    "the modules declaring Linux symbols (add a new one here once it is behind the switch)",
  );
  const ffi = texts.get("io/ffi.ts")!;
  assertIncludes(ffi, `platform().linuxFast ? bindOnUse("libc.so.6", symbols) : null`);
  assertIncludes(ffi, "const library = platform().posixLibc;");
  const posix = [...texts].filter(([, text]) => /\blazyPosixLibc\(/.test(text)).map(([p]) => p);
  assertEquals(posix, ["io/libc.ts"]);
  for (const path of [...linux, ...posix]) {
    assertMatch(texts.get(path)!, /import \{[^}]*\blazy(Posix)?Libc\b[^}]*\} from "\.\/ffi\.ts";/);
  }
  const declared = declaredSymbols(texts.get("io/libc.ts")!, "POSIX_SYMBOLS");
  assertEquals(declared, ["lseek", "__error", "__errno_location"]);
  for (const name of declared) assertOk(POSIX_SYMBOLS.has(name), `${name} is POSIX`);
  // The Linux table holds Linux-only symbols that must never reach the portable loader.
  const linuxDeclared = declaredSymbols(texts.get("io/libc.ts")!, "SYMBOLS");
  for (const name of ["fallocate", "sync_file_range", "preadv2", "mount", "umount2"]) {
    assertOk(linuxDeclared.includes(name), `${name} is in the Linux table`);
  }
});

/** What the probe reports. */
interface ProbeResult {
  bound: string[];
  dlopenCalls: number;
  copies: boolean[];
  plugin: boolean;
  extents: number;
  refusals: { code: number; stderr: string }[];
}

/** The probe: records every FFI symbol bound, then runs the file paths and the Linux-only commands. */
const PROBE = `
const bound = new Set();
let dlopenCalls = 0;
const open = Deno.dlopen;
Deno.dlopen = (path, symbols) => {
  dlopenCalls++;
  for (const [key, value] of Object.entries(symbols)) bound.add(value.name ?? key);
  return open(path, symbols);
};
const dir = Deno.args[0];
const { main } = await import(${JSON.stringify(`file://${ROOT}/main.ts`)});
const { fileBackend } = await import(${JSON.stringify(`file://${ROOT}/plugins/file.ts`)});
const MiB = 1 << 20;
// A sparse source: data, a hole, data.
const data = new Uint8Array(9 * MiB);
for (let i = 0; i < 4 * MiB; i++) data[i] = (i * 7 + 3) & 255;
for (let i = 8 * MiB; i < 9 * MiB; i++) data[i] = (i * 13 + 1) & 255;
const src = dir + "/src.img";
{
  using file = Deno.openSync(src, { write: true, create: true });
  file.writeSync(data.subarray(0, 4 * MiB));
  file.seekSync(8 * MiB, Deno.SeekMode.Start);
  file.writeSync(data.subarray(8 * MiB));
}
const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const copies = [];
// A new file, then the same file overwritten in place.
for (const round of [1, 2]) {
  const code = await main(["copy", src, dir + "/dst.img"]);
  copies.push(code === 0 && same(Deno.readFileSync(dir + "/dst.img"), data));
}
// The file plugin: read, write, zero, trim, flush, block status.
const backend = fileBackend(dir + "/dst.img", false);
const buf = new Uint8Array(MiB);
await backend.pread(buf, 3 * MiB);
let plugin = same(buf, data.subarray(3 * MiB, 4 * MiB));
await backend.pwrite(new Uint8Array(4096).fill(9), 5 * MiB);
await backend.trim?.(0, 4096);
await backend.flush?.();
const back = new Uint8Array(4096);
await backend.pread(back, 5 * MiB);
plugin &&= back.every((b) => b === 9);
await backend.close?.();
// Block status of the sparse source.
const source = fileBackend(src, true);
const extents = (await source.extents(0, 9 * MiB)).length;
await source.close?.();
// The Linux-only commands answer with one line.
const refusals = [];
const errors = [];
const write = console.error;
console.error = (...args) => errors.push(args.join(" "));
for (const args of [
  ["mount", "nbd://localhost", dir],
  ["attach", "nbd://localhost"],
  ["detach", "/dev/loop0"],
  ["attached"],
  ["umount", dir],
  ["copy", "[", "nbd", "serve", "memory", "1M", "]", dir + "/x.img"],
]) {
  errors.length = 0;
  const code = await main(args);
  refusals.push({ code, stderr: errors.join("\\n") });
}
console.error = write;
console.log(JSON.stringify({ bound: [...bound].sort(), dlopenCalls, copies, plugin, extents, refusals }));
`;

async function probe(flags: string[], env: Record<string, string>): Promise<ProbeResult> {
  await using dir = await tempDir();
  const script = `${dir.path}/probe.js`;
  await Deno.writeTextFile(script, PROBE);
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...flags, "--quiet", script, dir.path],
    env: { DENO_NO_UPDATE_CHECK: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  assertOk(output.success, new TextDecoder().decode(output.stderr) + stdout);
  return JSON.parse(stdout.trim().split("\n").at(-1)!);
}

function checkPortable(result: ProbeResult, expected: RegExp): void {
  assertEquals(result.copies, [true, true], "both copies byte for byte");
  assertOk(result.plugin, "the file plugin reads and writes");
  for (const refusal of result.refusals) {
    assertEquals(refusal.code, 1, refusal.stderr);
    assertEquals(refusal.stderr.split("\n").length, 1, `one line: ${refusal.stderr}`);
    assertOk(expected.test(refusal.stderr), refusal.stderr);
  }
}

Deno.test({
  name: "NBD_PORTABLE=1 binds only POSIX symbols; copies and the file plugin are exact",
  ignore: Deno.build.os !== "linux",
  async fn() {
    const result = await probe([], { NBD_PORTABLE: "1" });
    checkPortable(
      result,
      /^nbd: .* needs Linux \(this Linux runs the portable paths: NBD_PORTABLE=1\); /,
    );
    assertOk(result.bound.includes("lseek"), "sparse detection binds lseek");
    for (const name of result.bound) assertOk(POSIX_SYMBOLS.has(name), `${name} is POSIX`);
    // Sparse detection still works through lseek: data, hole, data.
    assertEquals(result.extents, 3);
  },
});

Deno.test({
  name: "--deny-ffi binds nothing and opens no library; copies and the file plugin are exact",
  async fn() {
    const result = await probe(["--deny-ffi"], { NBD_PORTABLE: "0" });
    checkPortable(result, /^nbd: .* needs Linux \(.*\); /);
    assertEquals(result.bound, []);
    assertEquals(result.dlopenCalls, 0);
    // Without lseek, the whole file is one data run.
    assertEquals(result.extents, 1);
  },
});

Deno.test({
  name: "the Linux fast paths bind Linux symbols (so the probe can tell)",
  ignore: Deno.build.os !== "linux",
  async fn() {
    const result = await probe([], { NBD_PORTABLE: "0" });
    assertEquals(result.copies, [true, true]);
    for (const name of ["pread", "pwrite", "fallocate"]) {
      assertOk(result.bound.includes(name), `${name} bound: ${result.bound.join(" ")}`);
    }
  },
});
