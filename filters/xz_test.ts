import { assertBytes, assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import type { Backend } from "../core/backend.ts";
import { createFilter, CTX, openPlugin, read, stack } from "./_test_utils.ts";
import { xzFixtureContent } from "./_xz_fixture.ts";
import { crc32, crc64 } from "./_xz_format.ts";
import { xzFilter } from "./xz.ts";

const testdata = new URL("../testdata/", import.meta.url);

async function diskOf(bytes: Uint8Array): Promise<Backend> {
  const { backend } = await openPlugin(memoryPlugin, [`size=${bytes.length}`]);
  await backend.pwrite(bytes, 0, { fua: false });
  return backend;
}

Deno.test("crc32 and crc64 match the published check values", () => {
  const digits = new TextEncoder().encode("123456789");
  assertEquals(crc32(digits), 0xcbf43926);
  assertEquals(crc64(digits), [0x995dc9bb, 0xdf1939fa]);
});

Deno.test("xz filter decodes every check type, byte-exact", async () => {
  const expected = xzFixtureContent();
  for (const name of ["blocks.xz", "crc32.xz", "sha256.xz", "nocheck.xz"]) {
    const disk = await diskOf(await Deno.readFile(new URL(name, testdata)));
    const { backend } = await stack(xzFilter, [], disk);
    assertEquals(backend.size(), expected.length, name);
    assertEquals(backend.capabilities().writable, false);
    assertBytes(await read(backend, 0, expected.length), expected, name);
  }
});

Deno.test("xz filter reads across block boundaries and concatenated streams", async () => {
  const blocks = await Deno.readFile(new URL("blocks.xz", testdata));
  const crc = await Deno.readFile(new URL("crc32.xz", testdata));
  const joined = new Uint8Array(blocks.length + 8 + crc.length); // 8 bytes of stream padding
  joined.set(blocks);
  joined.set(crc, blocks.length + 8);
  const content = xzFixtureContent();
  const expected = new Uint8Array(content.length * 2);
  expected.set(content);
  expected.set(content, content.length);
  const { backend } = await stack(xzFilter, ["xz-max-depth=2"], await diskOf(joined));
  assertEquals(backend.size(), expected.length);
  for (const [offset, length] of [[65530, 20], [0, 1], [content.length - 5, 10], [131000, 70000]]) {
    assertBytes(
      await read(backend, offset!, length!),
      expected.subarray(offset!, offset! + length!),
    );
  }
  await assertRejects(() => backend.pwrite(new Uint8Array(1), 0, { fua: false }), NbdError);
});

Deno.test("xz filter reports corruption and oversized blocks", async () => {
  const good = await Deno.readFile(new URL("blocks.xz", testdata));
  const bad = good.slice();
  bad[100] ^= 0x40; // inside the first block's compressed data
  const { backend } = await stack(xzFilter, [], await diskOf(bad));
  await assertRejects(
    () => read(backend, 0, 100),
    (e) => e instanceof NbdError && e.errno === "EIO",
  );
  const small = await createFilter(xzFilter, ["xz-max-block=32K"]);
  await assertRejects(
    async () => small.wrap(await diskOf(good), CTX, () => Promise.reject()),
    Error,
    /larger than xz-max-block/,
  );
  const notXz = await createFilter(xzFilter, []);
  await assertRejects(
    async () => notXz.wrap(await diskOf(new Uint8Array(4096).fill(1)), CTX, () => Promise.reject()),
    NbdError,
  );
});
