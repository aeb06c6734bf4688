/**
 * The shape of the tree: a file imports only from its own folder or from a
 * folder the layer table of docs/architecture.md allows, and no module
 * imports itself through others (no import cycles, type-only ones included).
 */

import { assertEquals, assertOk } from "./assert.ts";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../", import.meta.url));

/** Files that only tests use, which may reach into tests/. */
const TEST_SUPPORT = /(_test\.ts|\/_test_[a-z_]+\.ts|_fixtures?\.ts)$/;

/** The layer table of docs/architecture.md: folder → folders it may import. */
export function readLayerTable(markdown: string): Map<string, Set<string>> {
  const start = markdown.indexOf("<!-- layers -->");
  const end = markdown.indexOf("<!-- /layers -->");
  if (start < 0 || end < start) throw new Error("docs/architecture.md has no layer table");
  const table = new Map<string, Set<string>>();
  for (const line of markdown.slice(start, end).split("\n")) {
    const cells = line.split("|").map((c) => c.trim());
    if (cells.length < 4 || !cells[1]!.startsWith("`")) continue;
    const folder = cells[1]!.replaceAll("`", "");
    const allowed = cells[2]!.split(",").map((c) => c.trim().replaceAll("`", "")).filter((c) =>
      c !== "" && c !== "—"
    );
    table.set(folder, new Set(allowed));
  }
  return table;
}

/** Every TypeScript file of the program (not tests/, bench/ or test-only files). */
function programFiles(): string[] {
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(ROOT + dir)) {
      const path = dir ? `${dir}/${entry.name}` : entry.name;
      if (entry.isDirectory) {
        if (!entry.name.startsWith(".") && !["node_modules", "tests", "bench"].includes(path)) {
          walk(path);
        }
      } else if (path.endsWith(".ts") && !TEST_SUPPORT.test("/" + path)) {
        files.push(path);
      }
    }
  };
  walk("");
  return files.sort();
}

/**
 * The local TypeScript modules `file` depends on: static imports and
 * re-exports, literal dynamic imports and, with `workers`, the modules it
 * starts as workers (separate module graphs, so they count for layering
 * but cannot make a cycle).
 */
export function localImports(file: string, text: string, workers = true): string[] {
  const specifiers = [
    ...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s*"(\.[^"]+)"/gms),
    ...text.matchAll(/\bimport\(\s*"(\.[^"]+)"\s*\)/g),
    ...(workers
      ? text.matchAll(/new Worker\(\s*new URL\(\s*"(\.[^"]+)"\s*,\s*import\.meta\.url\s*\)/g)
      : []),
  ].map((m) => m[1]!).filter((s) => s.endsWith(".ts"));
  const dir = file.includes("/") ? file.slice(0, file.lastIndexOf("/")) : "";
  return specifiers.map((s) => new URL(s, `file:///${dir}/`).pathname.slice(1));
}

function folderOf(path: string): string {
  return path.includes("/") ? path.slice(0, path.indexOf("/")) : ".";
}

const files = programFiles();
const sources = new Map(files.map((f) => [f, Deno.readTextFileSync(ROOT + f)]));
const graph = new Map(files.map((f) => [f, localImports(f, sources.get(f)!)]));
const importGraph = new Map(files.map((f) => [f, localImports(f, sources.get(f)!, false)]));

Deno.test("layering: every import goes to the same folder or one the layer table allows", () => {
  const table = readLayerTable(Deno.readTextFileSync(ROOT + "docs/architecture.md"));
  const wrong: string[] = [];
  for (const [file, imports] of graph) {
    const from = folderOf(file);
    const allowed = table.get(from);
    if (!allowed) {
      wrong.push(`${file}: folder "${from}" is not in the layer table`);
      continue;
    }
    for (const target of imports) {
      const to = folderOf(target);
      if (to !== from && !allowed.has(to)) wrong.push(`${file} imports ${target}`);
    }
  }
  assertEquals(wrong, []);
});

Deno.test("layering: the layer table only allows edges downwards (no two folders allow each other)", () => {
  const table = readLayerTable(Deno.readTextFileSync(ROOT + "docs/architecture.md"));
  for (const [folder, allowed] of table) {
    for (const other of allowed) {
      assertOk(!table.get(other)?.has(folder), `${folder} and ${other} allow each other`);
    }
  }
});

Deno.test("layering: the table's check catches an upward import", () => {
  const table = readLayerTable(Deno.readTextFileSync(ROOT + "docs/architecture.md"));
  const imports = localImports(
    "core/x.ts",
    'import { serveCommand } from "../commands/serve.ts";\nnew Worker(new URL("../copy/w.ts", import.meta.url));',
  );
  assertEquals(imports, ["commands/serve.ts", "copy/w.ts"]);
  assertOk(!table.get("core")!.has("commands"));
  assertOk(!table.get("core")!.has("copy"));
});

Deno.test("layering: no import cycles", () => {
  const cycles: string[] = [];
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (file: string) => {
    state.set(file, "open");
    stack.push(file);
    for (const next of importGraph.get(file) ?? []) {
      if (!importGraph.has(next)) continue;
      if (state.get(next) === "open") {
        cycles.push([...stack.slice(stack.indexOf(next)), next].join(" → "));
      } else if (!state.has(next)) {
        visit(next);
      }
    }
    stack.pop();
    state.set(file, "done");
  };
  for (const file of importGraph.keys()) if (!state.has(file)) visit(file);
  assertEquals(cycles, []);
});
