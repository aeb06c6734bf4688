import { assertEquals, assertOk } from "../tests/assert.ts";
import { PayloadPool } from "./payload_pool.ts";

Deno.test("PayloadPool hands back buffers of the size in use, within its budget", () => {
  const pool = new PayloadPool(4 * 1024);
  const a = pool.take(1024);
  const b = pool.take(1024);
  assertOk(a !== b);
  pool.give(a);
  pool.give(b);
  assertEquals(pool.idle, 2);
  // Last in, first out: the buffer most recently used is the one most likely in the cache.
  assertOk(pool.take(1024) === b);
  assertOk(pool.take(1024) === a);
  assertOk(pool.take(1024) !== a);
  // Other sizes are allocated; giving one back switches the pool to that size.
  pool.give(a);
  const other = pool.take(512);
  assertEquals(other.length, 512);
  pool.give(other);
  assertEquals(pool.idle, 1);
  assertOk(pool.take(1024) !== a);
  // The budget: at most 4 KiB of idle buffers.
  for (let i = 0; i < 6; i++) pool.give(new Uint8Array(1024));
  assertEquals(pool.idle, 4);
  // A buffer larger than the budget is never kept.
  pool.give(new Uint8Array(8 * 1024));
  assertEquals(pool.idle, 4);
});

Deno.test("PayloadPool: the default budget keeps every reply of a full nbdcopy pipeline", () => {
  // nbdcopy keeps 64 requests of 256 KiB in flight per connection.
  const pool = new PayloadPool();
  const first = Array.from({ length: 64 }, () => pool.take(256 * 1024));
  for (const buffer of first) pool.give(buffer);
  assertEquals(pool.idle, 64);
  const again = new Set(Array.from({ length: 64 }, () => pool.take(256 * 1024)));
  assertEquals(first.filter((buffer) => again.has(buffer)).length, 64);
});
