/**
 * Helpers for filter and plugin unit tests: open a plugin or stack a
 * filter on a backend directly, without sockets.
 *
 * @module
 */

import type {
  Backend,
  Filter,
  FilterInstance,
  OpenContext,
  Plugin,
  PluginInstance,
  Reopen,
} from "../core/backend.ts";
import { checkRequired, Params } from "../core/params.ts";

/** A context as a plain read-write connection would get it. */
export const CTX: OpenContext = { exportName: "", readonly: false, tls: false, connectionId: 1 };

/** Configures a plugin from command-line words and opens one connection. */
export async function openPlugin(
  plugin: Plugin,
  words: string[],
  context: OpenContext = CTX,
): Promise<{ backend: Backend; instance: PluginInstance }> {
  const params = Params.parse(words, plugin.magicParam);
  checkRequired(plugin.name, plugin.params, params);
  const instance = await plugin.create(params);
  params.assertEmpty();
  return { backend: await instance.open(context), instance };
}

/** Configures a filter from `key=value` words (all must be taken). */
export async function createFilter(filter: Filter, words: string[]): Promise<FilterInstance> {
  const params = Params.parse(words);
  checkRequired(filter.name, filter.params, params);
  const instance = await filter.create(params);
  params.assertEmpty();
  return instance;
}

/** Configures a filter and wraps `next` with it for one connection. */
export async function stack(
  filter: Filter,
  words: string[],
  next: Backend,
  options: { context?: OpenContext; reopen?: Reopen } = {},
): Promise<{ backend: Backend; instance: FilterInstance }> {
  const instance = await createFilter(filter, words);
  const reopen: Reopen = options.reopen ??
    (() => Promise.reject(new Error("this test cannot reopen")));
  return { backend: await instance.wrap(next, options.context ?? CTX, reopen), instance };
}

/** Reads `length` bytes at `offset`. */
export async function read(backend: Backend, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await backend.pread(buf, offset);
  return buf;
}

/** A buffer of `length` bytes all set to `byte`. */
export function filled(length: number, byte: number): Uint8Array {
  return new Uint8Array(length).fill(byte);
}

/** Creates a temporary directory (the caller removes it). */
export function tempDirSync(): string {
  return Deno.makeTempDirSync({ prefix: "nbd-filter-test" });
}

/**
 * Hammers several connections with concurrent writes and zeroes that share
 * blocks but never the same bytes: the disk is cut into 1000-byte stripes
 * owned by writer `stripe % writers`, and each request stays inside one of
 * its writer's stripes. Returns the bytes the disk must hold afterwards.
 */
export async function concurrentWrites(
  connections: Backend[],
  size: number,
  options: { requests?: number; inFlight?: number; seed?: number } = {},
): Promise<Uint8Array> {
  const stripe = 1000;
  const expected = new Uint8Array(size);
  await connections[0]!.pread(expected, 0);
  let x = options.seed ?? 12345;
  const random = (n: number) => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return Math.floor((x / 2 ** 32) * n);
  };
  const stripes = Math.floor(size / stripe);
  const writers = connections.map(async (conn, w) => {
    const ops: Array<() => Promise<void>> = [];
    for (let i = 0; i < (options.requests ?? 200); i++) {
      let s = random(stripes);
      s -= s % connections.length;
      s += w;
      if (s >= stripes) s -= connections.length;
      const start = s * stripe + random(stripe - 1);
      const length = 1 + random(s * stripe + stripe - start - 1);
      if (random(5) === 0) {
        expected.fill(0, start, start + length);
        ops.push(() => conn.zero(start, length, { fua: false, fast: false, mayTrim: true }));
      } else {
        const data = new Uint8Array(length).map(() => 1 + random(255));
        expected.set(data, start);
        ops.push(() => conn.pwrite(data, start, { fua: false }));
      }
    }
    // Several requests in flight per connection, started in order.
    const inFlight = options.inFlight ?? 8;
    let next = 0;
    await Promise.all(Array.from({ length: inFlight }, async () => {
      while (next < ops.length) await ops[next++]!();
    }));
  });
  await Promise.all(writers);
  return expected;
}
