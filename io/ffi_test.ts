import { assertEquals, assertOk } from "../tests/assert.ts";
import { lazyLibc } from "./ffi.ts";

Deno.test("lazyLibc binds each function on first use, so an unused missing one does no harm", () => {
  const libc = lazyLibc({
    getpid: { parameters: [], result: "i32" },
    // Not in any libc: binding everything at once would fail on it.
    nbd_no_such_function: { parameters: [], result: "i32" },
  });
  const lib = libc();
  assertOk(lib, "libc opens on Linux with FFI allowed");
  assertEquals(lib.symbols.getpid(), Deno.pid);
  assertEquals(lib.symbols.getpid(), Deno.pid, "bound once, then reused");
  assertOk(libc() === lib, "one loader per declaration");
});

Deno.test("lazyLibc gives null without FFI permission", async () => {
  const script = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    const url = new URL("./ffi.ts", import.meta.url).href;
    await Deno.writeTextFile(
      script,
      `const { lazyLibc } = await import(${JSON.stringify(url)});\n` +
        `console.log(lazyLibc({ getpid: { parameters: [], result: "i32" } })() === null);\n`,
    );
    // No permission flags: FFI is denied (and not prompted for without a terminal).
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", script],
      env: { DENO_NO_UPDATE_CHECK: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    assertEquals(
      new TextDecoder().decode(output.stdout).trim(),
      "true",
      new TextDecoder().decode(output.stderr),
    );
  } finally {
    await Deno.remove(script);
  }
});
