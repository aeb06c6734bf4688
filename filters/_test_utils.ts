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
} from "../server/backend.ts";
import { Params } from "../server/params.ts";

/** A context as a plain read-write connection would get it. */
export const CTX: OpenContext = { exportName: "", readonly: false, tls: false, connectionId: 1 };

/** Configures a plugin from command-line words and opens one connection. */
export async function openPlugin(
  plugin: Plugin,
  words: string[],
  context: OpenContext = CTX,
): Promise<{ backend: Backend; instance: PluginInstance }> {
  const params = Params.parse(words, plugin.magicParam);
  const instance = await plugin.create(params);
  params.assertEmpty();
  return { backend: await instance.open(context), instance };
}

/** Configures a filter from `key=value` words (all must be taken). */
export async function createFilter(filter: Filter, words: string[]): Promise<FilterInstance> {
  const params = Params.parse(words);
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
