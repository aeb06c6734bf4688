/**
 * What a command evaluates before its first line: the modules its file
 * imports statically, transitively. None of them may import a `node:`
 * module for its value: the first one starts the runtime's Node
 * compatibility layer, which costs every start-up time and memory
 * (docs/performance.md). Such modules load on first use instead (a
 * literal `import("node:...")` inside the function that needs it).
 *
 * @module
 */

import { assertEquals } from "./assert.ts";
import { ROOT } from "./helpers.ts";

/** Specifiers `text` imports or re-exports for their values (not `import type`). */
export function staticValueImports(text: string): string[] {
  const specifiers: string[] = [];
  for (
    const match of text.matchAll(/^\s*(import|export)\s+(type\s+)?([^;"]*?\bfrom\s*)?"([^"]+)"/gm)
  ) {
    if (match[2]) continue;
    // `import { type A, type B } from ...` brings no value either.
    const names = /\{([^}]*)\}/.exec(match[3] ?? "")?.[1];
    if (names && names.split(",").every((name) => /^\s*(type\s|$)/.test(name))) continue;
    specifiers.push(match[4]!);
  }
  return specifiers;
}

/** The `node:` modules evaluated when `entry` (relative to the root) is imported, with who imports each. */
function nodeModulesAtStart(entry: string): string[] {
  const found: string[] = [];
  const seen = new Set<string>();
  const visit = (path: string) => {
    if (seen.has(path)) return;
    seen.add(path);
    const text = Deno.readTextFileSync(`${ROOT}/${path}`);
    for (const specifier of staticValueImports(text)) {
      if (specifier.startsWith("node:")) found.push(`${path} imports ${specifier}`);
      else if (specifier.startsWith(".")) {
        visit(new URL(specifier, `file:///${path}`).pathname.slice(1));
      }
    }
  };
  visit(entry);
  return found;
}

/** The entry point and the client commands, which start before every short job. */
const ENTRIES = [
  "main.ts",
  "commands/copy.ts",
  "commands/info.ts",
  "commands/list.ts",
  "commands/map.ts",
  "commands/dump.ts",
  "commands/stats.ts",
];

for (const command of ENTRIES) {
  Deno.test(`start-up: ${command} evaluates no node: module before its first line`, () => {
    assertEquals(nodeModulesAtStart(command), []);
  });
}

/**
 * What `nbd copy` loads to read or write a qcow2 image: node:zlib waits for the first
 * compressed cluster (or a compression thread), node:fs and node:path for a backing file.
 */
const QCOW2_COPY = [
  "copy/qcow2.ts",
  "copy/file_source.ts",
  "copy/file_destination.ts",
  "copy/compress_pool.ts",
  "filters/qcow2.ts",
];

for (const module of QCOW2_COPY) {
  Deno.test(`start-up: a qcow2 copy's ${module} evaluates no node: module when loaded`, () => {
    assertEquals(nodeModulesAtStart(module), []);
  });
}

Deno.test("start-up: the import scan tells value imports from type-only ones", () => {
  const text = [
    'import { resolve } from "node:path";',
    'import type { Socket } from "node:net";',
    'import { type Server } from "node:http";',
    'import * as tls from "node:tls";',
    'export { x } from "./x.ts";',
    'import "./side_effect.ts";',
    'const later = await import("node:fs");',
  ].join("\n");
  assertEquals(staticValueImports(text), ["node:path", "node:tls", "./x.ts", "./side_effect.ts"]);
});
