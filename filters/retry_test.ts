import { assertEquals, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { memoryPlugin } from "../plugins/memory.ts";
import { type Backend, type OpenContext, PassthroughBackend } from "../core/backend.ts";
import { filled, openPlugin, read, stack } from "./_test_utils.ts";
import { retryFilter } from "./retry.ts";

/** A connection that fails every read until `healthy` is set, and counts opens. */
function flakySource(mem: Backend) {
  const state = { opens: 0, closes: 0, healthy: false, contexts: [] as OpenContext[] };
  const open = (context: OpenContext): Promise<Backend> => {
    state.opens++;
    state.contexts.push(context);
    const healthyNow = state.opens > 2; // the third open works
    return Promise.resolve(
      new (class extends PassthroughBackend {
        override pread(buf: Uint8Array, offset: number): Promise<void> {
          if (!healthyNow && !state.healthy) return Promise.reject(new NbdError("EIO", "down"));
          return this.next.pread(buf, offset);
        }
        override close(): Promise<void> {
          state.closes++;
          return Promise.resolve();
        }
      })(mem),
    );
  };
  return { state, open };
}

Deno.test("retry filter reopens the layer below and retries until it works", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  await mem.pwrite(filled(16, 4), 0, { fua: false });
  const source = flakySource(mem);
  const first = await source.open({ exportName: "", readonly: false, tls: false, connectionId: 1 });
  const { backend } = await stack(retryFilter, ["retry-delay=5ms", "retries=3"], first, {
    reopen: source.open,
  });
  // Two opens fail, the third works: two retries.
  assertEquals(await read(backend, 0, 16), filled(16, 4));
  assertEquals(source.state.opens, 3);
  assertEquals(source.state.closes, 2);
});

Deno.test("retry filter gives up after the configured retries", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const source = flakySource(mem);
  const first = await source.open({ exportName: "", readonly: false, tls: false, connectionId: 1 });
  const { backend } = await stack(retryFilter, ["retry-delay=1ms", "retries=1"], first, {
    reopen: source.open,
  });
  await assertRejects(() => read(backend, 0, 16), NbdError);
  assertEquals(source.state.opens, 2);
});

Deno.test("retry filter with retry-readonly reopens read-only and refuses writes", async () => {
  const { backend: mem } = await openPlugin(memoryPlugin, ["1M"]);
  const source = flakySource(mem);
  const first = await source.open({ exportName: "", readonly: false, tls: false, connectionId: 1 });
  const { backend } = await stack(
    retryFilter,
    [
      "retry-delay=1ms",
      "retry-exponential=no",
      "retry-readonly=yes",
    ],
    first,
    { reopen: source.open },
  );
  await read(backend, 0, 16);
  assertEquals(source.state.contexts.at(-1)!.readonly, true);
  await assertRejects(
    () => backend.pwrite(filled(4, 1), 0, { fua: false }),
    (e) => e instanceof NbdError && e.errno === "EPERM",
  );
});
