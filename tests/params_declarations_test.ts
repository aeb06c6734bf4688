/**
 * The parameter declarations are true: each typed parameter is parsed as
 * its declared type (a bad value is refused naming it), required ones are
 * enforced from the declaration, and the help and docs renderings agree.
 */

import { assertEquals, assertIncludes, assertOk, assertThrows } from "./assert.ts";
import { FILTERS } from "../filters/mod.ts";
import { PLUGINS } from "../plugins/mod.ts";
import {
  checkRequired,
  formatParams,
  Params,
  type ParamSpec,
  renderParamTable,
} from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";

const LAYERS = [...PLUGINS.values(), ...FILTERS.values()];

Deno.test("every declaration is complete", () => {
  for (const layer of LAYERS) {
    const names = new Set<string>();
    for (const spec of layer.params) {
      const where = `${layer.name} ${spec.name}`;
      assertOk(!names.has(spec.name), `${where}: declared twice`);
      names.add(spec.name);
      assertOk(spec.value && spec.description && spec.type, where);
      assertEquals(spec.type === "enum", (spec.choices?.length ?? 0) > 0, where);
      assertOk(!(spec.required && spec.default !== undefined), `${where}: required with a default`);
      assertOk(!/\(default|default:|\(required/.test(spec.description), `${where}: note in text`);
    }
    const magic = "magicParam" in layer ? layer.magicParam : undefined;
    if (magic) assertOk(names.has(magic), `${layer.name}: magic ${magic} not declared`);
  }
});

Deno.test("required parameters are enforced from the declaration with one message", () => {
  const specs: ParamSpec[] = [
    { name: "size", value: "SIZE", type: "size", description: "size", required: true },
    { name: "KEY", value: "VALUE", type: "string", description: "any", anyKey: true },
  ];
  assertThrows(
    () => checkRequired("memory", specs, Params.parse([])),
    UsageError,
    "memory: missing required parameter size=",
  );
  checkRequired("memory", specs, Params.parse(["1M"], "size"));
});

Deno.test("help lines and the docs table show the same notes", () => {
  const specs: ParamSpec[] = [
    { name: "size", value: "SIZE", type: "size", description: "size", required: true },
    {
      name: "cache",
      value: "MODE",
      type: "enum",
      choices: ["a", "b"],
      default: "a",
      description: "mode",
    },
    { name: "file", value: "PATH|-", type: "path", description: "files", repeatable: true },
  ];
  assertEquals(
    formatParams(specs, "size"),
    [
      "  [size=]SIZE  size (required)",
      "  cache=MODE   mode (one of: a, b; default: a)",
      "  file=PATH|-  files (repeatable)",
    ].join("\n"),
  );
  assertEquals(
    renderParamTable(specs, "size"),
    [
      "| parameter | description |",
      "| --- | --- |",
      "| `[size=]SIZE` | size (required) |",
      "| `cache=MODE` | mode (one of: a, b; default: a) |",
      "| `file=PATH\\|-` | files (repeatable) |",
    ].join("\n"),
  );
  assertEquals(renderParamTable([]), "No parameters.");
});

/** Values that satisfy each layer's required parameters without a network. */
async function requiredWords(dir: string): Promise<Record<string, string[]>> {
  const file = `${dir}/disk.img`;
  await Deno.writeFile(file, new Uint8Array(4096));
  return {
    data: ["data=1"],
    eval: ["get_size=echo 1M", "pread=exit 1"],
    file: [`file=${file}`],
    floppy: [`dir=${dir}`],
    http: ["url=http://127.0.0.1:9/"],
    curl: ["url=http://127.0.0.1:9/"],
    memory: ["size=1M"],
    nbd: ["hostname=127.0.0.1"],
    pattern: ["size=1M"],
    random: ["size=1M"],
    sh: [`script=${dir}/none`],
    "sparse-random": ["size=1M"],
    split: [`file=${file}`],
    log: [`logfile=${dir}/log`],
    stats: [`statsfile=${dir}/stats`],
    partition: ["partition=1"],
    partitioning: [`file=${file}`],
    tar: ["tar-entry=disk.img"],
    rbd: ["image=rbd/none"],
    s3: ["bucket=b", "key=k"],
    iso: [`dir=${dir}`],
    linuxdisk: [`dir=${dir}`],
    tmpdisk: ["size=1M"],
  };
}

const TYPED = new Set(["size", "integer", "boolean", "duration", "enum"]);

Deno.test("each typed parameter refuses a bad value, naming itself", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const words = await requiredWords(dir);
    for (const layer of LAYERS) {
      for (const spec of layer.params.filter((p) => TYPED.has(p.type))) {
        const params = Params.parse([
          ...(words[layer.name] ?? []).filter((w) => !w.startsWith(`${spec.name}=`)),
          `${spec.name}=bogus?`,
        ]);
        let error: unknown;
        try {
          const instance = await layer.create(params);
          await instance.close?.();
        } catch (e) {
          error = e;
        }
        const where = `${layer.name} ${spec.name}=bogus?`;
        assertOk(error instanceof UsageError, `${where}: ${error ?? "accepted"}`);
        assertIncludes(error.message, spec.name, where);
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
