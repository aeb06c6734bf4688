/**
 * `deno task docs`: rewrites the generated blocks of docs/*.md from the
 * declarations in code, so the pages and `--help` never disagree:
 *
 *     <!-- options:COMMAND -->          a command's options
 *     <!-- params:plugin:NAME -->       a plugin's parameters
 *     <!-- params:filter:NAME -->       a filter's parameters
 *
 * each closed by `<!-- /options -->` or `<!-- /params -->`. With `--check`
 * it changes nothing and exits 1 when a block is out of date or names
 * nothing.
 *
 * @module
 */

import { COMMANDS } from "../commands/mod.ts";
import { renderOptionTable } from "../commands/command.ts";
import { FILTERS } from "../filters/mod.ts";
import { PLUGINS } from "../plugins/mod.ts";
import { renderParamTable } from "../core/params.ts";

/** Every block the declarations define, by its name (`options:copy`, `params:plugin:memory`). */
export async function renderBlocks(): Promise<Map<string, string>> {
  const blocks = new Map<string, string>();
  for (const entry of COMMANDS.values()) {
    const command = await entry.load();
    blocks.set(`options:${command.name}`, renderOptionTable(command.options));
  }
  for (const plugin of PLUGINS.values()) {
    if (plugin.aliasOf) continue; // documented under the name it stands for
    blocks.set(`params:plugin:${plugin.name}`, renderParamTable(plugin.params, plugin.magicParam));
  }
  for (const filter of FILTERS.values()) {
    if (filter.aliasOf) continue;
    blocks.set(`params:filter:${filter.name}`, renderParamTable(filter.params));
  }
  return blocks;
}

/** One generated block found in a page. */
export interface FoundBlock {
  /** Its name, e.g. `options:copy`. */
  name: string;
  /** Its body as the page has it. */
  body: string;
}

const BLOCK =
  /<!-- ((options):[a-z-]+|(params):(?:plugin|filter):[a-z0-9-]+) -->\n([\s\S]*?)\n?<!-- \/(options|params) -->/g;

/** The generated blocks of a page, in order. */
export function findBlocks(text: string): FoundBlock[] {
  return [...text.matchAll(BLOCK)].map((m) => ({ name: m[1]!, body: m[4]!.trim() }));
}

/**
 * A page with every block's body replaced by its rendering, and the names
 * of the blocks that name nothing (left as they are).
 */
export function rewriteBlocks(
  text: string,
  blocks: ReadonlyMap<string, string>,
): { text: string; unknown: string[] } {
  const unknown: string[] = [];
  const out = text.replace(BLOCK, (whole, name: string, _o, _p, current: string, end: string) => {
    const body = blocks.get(name);
    const kind = name.slice(0, name.indexOf(":"));
    if (body === undefined || kind !== end) {
      unknown.push(name);
      return whole;
    }
    // An up-to-date block stays as it is, however deno fmt has aligned it.
    if (normalizeBlock(current) === normalizeBlock(body)) return whole;
    return `<!-- ${name} -->\n\n${body}\n\n<!-- /${kind} -->`;
  });
  return { text: out, unknown };
}

/**
 * A block body with its table's padding removed, so a table that `deno fmt`
 * has aligned compares equal to the rendering it came from.
 */
export function normalizeBlock(body: string): string {
  // Runs of spaces inside a cell count as one: deno fmt collapses them in tables.
  return body.trim().split("\n").map((line) => {
    if (!line.trimStart().startsWith("|")) return line.trim();
    const cells = line.trim().slice(1, -1).split(/(?<!\\)\|/).map((c) =>
      c.trim().replace(/\s+/g, " ")
    );
    return cells.map((c) => /^:?-+:?$/.test(c) ? "---" : c).join(" | ");
  }).join("\n");
}

/** The docs pages: every `.md` file of `dir`, sorted. */
export function docsPages(dir: string): string[] {
  return [...Deno.readDirSync(dir)].filter((e) => e.isFile && e.name.endsWith(".md"))
    .map((e) => `${dir}/${e.name}`).sort();
}

async function main(args: string[]): Promise<number> {
  const check = args.includes("--check");
  const dir = new URL("../docs", import.meta.url).pathname;
  const blocks = await renderBlocks();
  let status = 0;
  const seen = new Set<string>();
  for (const page of docsPages(dir)) {
    const text = await Deno.readTextFile(page);
    const { text: updated, unknown } = rewriteBlocks(text, blocks);
    for (const name of unknown) {
      console.error(`nbd docs: ${page}: block "${name}" names nothing`);
      status = 1;
    }
    for (const block of findBlocks(text)) seen.add(block.name);
    if (updated === text) continue;
    if (check) {
      console.error(`nbd docs: ${page} is out of date (run deno task docs)`);
      status = 1;
    } else {
      await Deno.writeTextFile(page, updated);
      console.log(`updated ${page}`);
    }
  }
  for (const name of blocks.keys()) {
    if (!seen.has(name)) console.error(`nbd docs: no page has a <!-- ${name} --> block`);
  }
  return status;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
