import { assertEquals, assertIncludes, assertOk } from "../tests/assert.ts";
import { formatOptions, optionKey, type OptionSpecs, renderOptionTable } from "./command.ts";
import { COMMANDS } from "./mod.ts";

Deno.test("every command declares each option with its help, and its usage shows it", async () => {
  for (const entry of COMMANDS.values()) {
    const command = await entry.load();
    for (const [name, spec] of Object.entries(command.options)) {
      const where = `${command.name} --${name}`;
      if (spec.hidden) continue;
      if (spec.aliasOf) {
        assertOk(command.options[spec.aliasOf], `${where}: alias of nothing`);
        continue;
      }
      assertOk(spec.help, `${where}: no help`);
      if (spec.type === "string" || spec.optionalValue) assertOk(spec.value, `${where}: no value`);
      // The usage wraps help text, so only the option's key must appear whole.
      assertIncludes(command.usage, optionKey(name, command.options), where);
    }
  }
});

Deno.test("options render as aligned help lines and as a docs table", () => {
  const options: OptionSpecs = {
    port: { type: "string", short: "p", value: "N", help: "TCP port (default 10809)" },
    map: { type: "string", value: "CONTEXT", optionalValue: "joined", help: "print the map" },
    view: { type: "string", value: "ADDR", optionalValue: "separate", help: "view" },
    "destination-is-zero": { type: "boolean", help: "skip zero runs" },
    "target-is-zero": { type: "boolean", aliasOf: "destination-is-zero" },
    daemon: { type: "boolean", hidden: true },
    tls: { type: "string", value: "off|on", help: "a | b" },
  };
  assertEquals(
    formatOptions(options, 60),
    [
      "  -p, --port N              TCP port (default 10809)",
      "      --map[=CONTEXT]       print the map",
      "      --view [ADDR]         view",
      "      --destination-is-zero, --target-is-zero",
      "                            skip zero runs",
      "      --tls off|on          a | b",
    ].join("\n"),
  );
  assertEquals(
    renderOptionTable(options),
    [
      "| option | description |",
      "| --- | --- |",
      "| `-p, --port N` | TCP port (default 10809) |",
      "| `--map[=CONTEXT]` | print the map |",
      "| `--view [ADDR]` | view |",
      "| `--destination-is-zero, --target-is-zero` | skip zero runs |",
      "| `--tls off\\|on` | a \\| b |",
    ].join("\n"),
  );
});
