import { assertBytes, assertEquals, assertThrows } from "../tests/assert.ts";
import { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { dataPlugin, evaluateData, parseDataExpression } from "./data.ts";
import { fillPattern } from "./pattern.ts";
import { fillRandom } from "./random.ts";
import { memoryPlugin } from "./memory.ts";
import { nullPlugin } from "./null.ts";

const ctx = { exportName: "", readonly: false, tls: false, connectionId: 1 };

function evaluate(text: string): Uint8Array {
  const out = new Uint8Array(64);
  const end = evaluateData(parseDataExpression(text), (bytes, offset) => out.set(bytes, offset));
  return out.subarray(0, end);
}

Deno.test("data expressions: bytes, strings, moves, groups, repeats and words", () => {
  assertEquals(evaluate("1 0x02 003"), Uint8Array.from([1, 2, 3]));
  assertEquals(evaluate('"ab\\n"'), Uint8Array.from([97, 98, 10]));
  assertEquals(evaluate("1 @4 2 @+1 3 @-3 4"), Uint8Array.from([1, 0, 0, 0, 4, 0, 3]));
  assertEquals(evaluate("1 @^8 2"), Uint8Array.from([1, 0, 0, 0, 0, 0, 0, 0, 2]));
  assertEquals(evaluate("(1 2)*3 9*2"), Uint8Array.from([1, 2, 1, 2, 1, 2, 9, 9]));
  assertEquals(evaluate("le16:0x1234 be32:1"), Uint8Array.from([0x34, 0x12, 0, 0, 0, 1]));
  assertEquals(evaluate("# comment\n5"), Uint8Array.from([5]));
  assertThrows(() => evaluate("256"), UsageError, "larger than 255");
  assertThrows(() => evaluate("(1 2"), UsageError, "missing )");
  assertThrows(() => evaluate("*3"), UsageError, "must follow");
});

Deno.test("data plugin: size defaults to the end of the data and the disk is writable", async () => {
  const plugin = await dataPlugin.create(Params.parse(["1 2 @1M 3"], "data"));
  const backend = await plugin.open(ctx);
  assertEquals(backend.size(), 1024 * 1024 + 1);
  const buf = new Uint8Array(2);
  await backend.pread(buf, 1024 * 1024 - 1);
  assertEquals(buf, Uint8Array.from([0, 3]));
  await backend.pwrite(Uint8Array.from([7]), 0, { fua: false });
  await backend.pread(buf, 0);
  assertEquals(buf, Uint8Array.from([7, 2]));
});

Deno.test("pattern: every 8-byte big-endian word holds its own offset, at any alignment", () => {
  const buf = new Uint8Array(24);
  fillPattern(buf, 0x1_0000_0000 - 8);
  const view = new DataView(buf.buffer);
  assertEquals(view.getBigUint64(0), 0xfffffff8n);
  assertEquals(view.getBigUint64(8), 0x1_0000_0000n);
  const odd = new Uint8Array(5);
  fillPattern(odd, 13);
  assertBytes(odd, Uint8Array.from([0, 0, 8, 0, 0]));
});

Deno.test("random: contents depend only on seed and offset", () => {
  const whole = new Uint8Array(1000);
  fillRandom(whole, 0, 7);
  const part = new Uint8Array(101);
  fillRandom(part, 333, 7);
  assertBytes(part, whole.subarray(333, 434));
  const other = new Uint8Array(1000);
  fillRandom(other, 0, 8);
  assertEquals(whole.some((b, i) => b !== other[i]), true);
});

Deno.test("memory and null plugins take their size parameter and reject extras", async () => {
  const params = Params.parse(["1G"], "size");
  const memory = await memoryPlugin.create(params);
  params.assertEmpty();
  assertEquals((await memory.open(ctx)).size(), 2 ** 30);
  assertThrows(() => Params.parse(["size=1", "2"], "size"), UsageError, "unexpected argument");
  const extra = Params.parse(["1M", "colour=blue"], "size");
  await nullPlugin.create(extra);
  assertThrows(() => extra.assertEmpty(), UsageError, "colour=");
});
