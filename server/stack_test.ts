import { assertEquals, assertRejects } from "../tests/assert.ts";
import type { Filter, Plugin } from "../core/backend.ts";
import { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { startLayers } from "./stack.ts";

/** Layers that record their starts and closes in `events`. */
function recorder(events: string[]) {
  const filter = (name: string, fails = false): Filter => ({
    name,
    summary: "test filter",
    params: [],
    create(params) {
      params.take(name);
      if (fails) return Promise.reject(new Error(`${name} cannot start`));
      events.push(`start ${name}`);
      return Promise.resolve({
        wrap: (next) => Promise.resolve(next),
        close() {
          events.push(`close ${name}`);
          return Promise.resolve();
        },
      });
    },
  });
  const plugin = (fails = false): Plugin => ({
    name: "plugin",
    summary: "test plugin",
    params: [],
    create(params) {
      params.take("size");
      if (fails) return Promise.reject(new Error("plugin cannot start"));
      events.push("start plugin");
      return Promise.resolve({
        open: () => Promise.reject(new Error("not opened in these tests")),
        close() {
          events.push("close plugin");
          return Promise.resolve();
        },
      });
    },
  });
  return { filter, plugin };
}

Deno.test("startLayers() starts the filters outermost first, then the plugin", async () => {
  const events: string[] = [];
  const { filter, plugin } = recorder(events);
  const layers = await startLayers([filter("a"), filter("b")], plugin(), Params.parse(["size=1"]));
  assertEquals(events, ["start a", "start b", "start plugin"]);
  assertEquals(layers.filters.length, 2);
});

Deno.test("startLayers() closes the filters started before a failing filter, in reverse", async () => {
  const events: string[] = [];
  const { filter, plugin } = recorder(events);
  await assertRejects(
    () => startLayers([filter("a"), filter("b"), filter("c", true)], plugin(), Params.parse([])),
    Error,
    "c cannot start",
  );
  assertEquals(events, ["start a", "start b", "close b", "close a"]);
});

Deno.test("startLayers() closes every filter when the plugin fails to start", async () => {
  const events: string[] = [];
  const { filter, plugin } = recorder(events);
  await assertRejects(
    () => startLayers([filter("a"), filter("b")], plugin(true), Params.parse([])),
    Error,
    "plugin cannot start",
  );
  assertEquals(events, ["start a", "start b", "close b", "close a"]);
});

Deno.test("startLayers() closes every layer when a parameter is left over", async () => {
  const events: string[] = [];
  const { filter, plugin } = recorder(events);
  await assertRejects(
    () => startLayers([filter("a")], plugin(), Params.parse(["size=1", "colour=blue"])),
    UsageError,
    "unknown parameter: colour=",
  );
  assertEquals(events, ["start a", "start plugin", "close plugin", "close a"]);
});

Deno.test("startLayers() reports the start failure even when undoing it fails", async () => {
  const events: string[] = [];
  const { filter, plugin } = recorder(events);
  const broken: Filter = {
    name: "broken",
    summary: "test filter whose close fails",
    params: [],
    create: () =>
      Promise.resolve({
        wrap: (next) => Promise.resolve(next),
        close: () => Promise.reject(new Error("close failed")),
      }),
  };
  await assertRejects(
    () => startLayers([filter("a"), broken, filter("c", true)], plugin(), Params.parse([])),
    Error,
    "c cannot start",
  );
  assertEquals(events, ["start a", "close a"]);
});
