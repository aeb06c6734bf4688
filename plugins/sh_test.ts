import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import { UsageError } from "../util/usage_error.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { parseExportList, parseExtents, scriptError } from "./_script.ts";
import { shPlugin } from "./sh.ts";

const SCRIPT = `#!/bin/sh
# A writable 64K disk kept in $tmpdir/disk.
disk="$tmpdir/disk"
case "$1" in
  config) [ "$2" = fill ] || { echo "EINVAL unknown key $2" >&2; exit 1; }
          printf "$3" > "$tmpdir/fill" ;;
  get_ready) [ -f "$disk" ] || head -c 65536 /dev/zero > "$disk" ;;
  open) echo "handle-$3" ;;
  get_size) echo 64K ;;
  can_write|can_flush|can_extents) exit 0 ;;
  can_trim) exit 3 ;;
  pread) [ "$2" = handle-disk ] || { echo "EIO bad handle $2" >&2; exit 1; }
         dd if="$disk" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) [ "$4" -ge 60000 ] && { echo "ENOSPC out of space" >&2; exit 1; }
          dd of="$disk" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;
  flush) touch "$tmpdir/flushed" ;;
  extents) echo "0 32K"; echo "32K 32K hole,zero" ;;
  *) exit 2 ;;
esac
`;

async function scriptFile(text: string): Promise<{ path: string; dir: string }> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-sh-test" });
  const path = `${dir}/plugin.sh`;
  await Deno.writeTextFile(path, text, { mode: 0o755 });
  return { path, dir };
}

Deno.test("sh plugin follows nbdkit's calling convention", async () => {
  const { path, dir } = await scriptFile(SCRIPT);
  try {
    const { backend, instance } = await openPlugin(shPlugin, [path], {
      exportName: "disk",
      readonly: false,
      tls: false,
      connectionId: 1,
    });
    assertEquals(backend.size(), 65536);
    const caps = backend.capabilities();
    assertEquals(caps.writable, true);
    assertEquals(caps.trim, false);
    assertEquals(caps.extents, true);
    const data = new TextEncoder().encode("hello, world");
    await backend.pwrite(data, 1000, { fua: false });
    assertEquals(await read(backend, 1000, data.length), data);
    await assertRejects(
      () => backend.pwrite(data, 61000, { fua: false }),
      (e) => e instanceof NbdError && e.errno === "ENOSPC" && /out of space/.test(e.message),
    );
    // zero is not implemented: emulated by writing zeroes.
    await backend.zero(1000, 5, { fua: false, fast: false, mayTrim: true });
    assertEquals(await read(backend, 1000, 7), new Uint8Array([0, 0, 0, 0, 0, 44, 32]));
    assertEquals(await backend.extents(0, 65536, { reqOne: false }), [
      { length: 32768, flags: 0 },
      { length: 32768, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
    ]);
    await backend.close();
    await instance.close?.();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("sh plugin passes other parameters to config and reports its errors", async () => {
  const { path, dir } = await scriptFile(SCRIPT);
  try {
    await assertRejects(
      () => openPlugin(shPlugin, [path, "colour=red"]),
      (e) => e instanceof UsageError && /unknown key colour/.test(e.message),
    );
    const { instance } = await openPlugin(shPlugin, [path, "fill=x"]);
    await instance.close?.();
    await assertRejects(() => openPlugin(shPlugin, [`${dir}/nothing.sh`]), UsageError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("sh plugin: a script without can_write is read-only, and short reads fail", async () => {
  const { path, dir } = await scriptFile(`#!/bin/sh
case "$1" in
  get_size) echo 100 ;;
  pread) head -c $(($3 - 1)) /dev/zero ;;
  *) exit 2 ;;
esac
`);
  try {
    const { backend } = await openPlugin(shPlugin, [path]);
    assertEquals(backend.capabilities().writable, false);
    await assertRejects(
      () => read(backend, 0, 10),
      (e) => e instanceof NbdError && e.errno === "EIO",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("script output parsers", () => {
  assertEquals(parseExportList("INTERLEAVED\na\nfirst\nb\nsecond\n"), [
    { name: "a", description: "first" },
    { name: "b", description: "second" },
  ]);
  assertEquals(parseExportList("NAMES+DESCRIPTIONS\na\nb\nA\nB\n"), [
    { name: "a", description: "A" },
    { name: "b", description: "B" },
  ]);
  assertEquals(parseExportList("x\ny\n"), [{ name: "x" }, { name: "y" }]);
  assertEquals(parseExtents("0 1M\n1M 9M hole,zero\n", 512, 2 * 1048576), [
    { length: 1048576 - 512, flags: 0 },
    { length: 1048576 + 512, flags: 3 },
  ]);
  const e = scriptError("pread", {
    status: "error",
    stdout: new Uint8Array(),
    stderr: "ENOSPC full\n",
  });
  assertEquals(e.errno, "ENOSPC");
  assertEquals(
    scriptError("pread", { status: "error", stdout: new Uint8Array(), stderr: "oops" }).errno,
    "EIO",
  );
});
