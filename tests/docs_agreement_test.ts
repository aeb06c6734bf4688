/**
 * The generated blocks of docs/*.md agree with the declarations `--help`
 * shows: every command has one options block, every plugin and filter one
 * parameters block, each as `deno task docs` renders it, and no block
 * names something that does not exist.
 */

import { assertEquals } from "./assert.ts";
import {
  docsPages,
  findBlocks,
  normalizeBlock,
  renderBlocks,
  rewriteBlocks,
} from "../tools/docs.ts";
import { ROOT } from "./helpers.ts";

Deno.test("docs: every generated block matches the declarations, once each", async () => {
  const blocks = await renderBlocks();
  const where = new Map<string, string[]>();
  const problems: string[] = [];
  for (const page of docsPages(`${ROOT}/docs`)) {
    const name = page.slice(page.lastIndexOf("/") + 1);
    const text = await Deno.readTextFile(page);
    for (const block of findBlocks(text)) {
      where.set(block.name, [...(where.get(block.name) ?? []), name]);
      const expected = blocks.get(block.name);
      if (expected === undefined) problems.push(`${name}: ${block.name} names nothing`);
      else if (normalizeBlock(block.body) !== normalizeBlock(expected)) {
        problems.push(`${name}: ${block.name} differs from --help (run deno task docs)`);
      }
    }
    // A block whose closing marker is of the other kind is not generated either.
    for (const unknown of rewriteBlocks(text, blocks).unknown) {
      if (blocks.has(unknown)) problems.push(`${name}: ${unknown} is closed by the wrong marker`);
    }
  }
  for (const name of blocks.keys()) {
    const pages = where.get(name) ?? [];
    if (pages.length !== 1) {
      problems.push(`${name}: in ${pages.length} pages (${pages.join(", ")})`);
    }
  }
  assertEquals(problems, []);
});

Deno.test("docs: blocks are found, rewritten and compared whatever the table padding", () => {
  const blocks = new Map([[
    "options:x",
    "| option | description |\n| --- | --- |\n| `-a` | a \\| b |",
  ]]);
  const page = "# x\n\n<!-- options:x -->\nold\n<!-- /options -->\n\n<!-- options:nosuch -->\n" +
    "| a |\n<!-- /options -->\n";
  const { text, unknown } = rewriteBlocks(page, blocks);
  assertEquals(unknown, ["options:nosuch"]);
  assertEquals(findBlocks(text)[0], { name: "options:x", body: blocks.get("options:x")! });
  const aligned = "| option | description |\n| ------ | ----------- |\n| `-a`   | a \\| b      |";
  assertEquals(normalizeBlock(aligned), normalizeBlock(blocks.get("options:x")!));
  // An aligned, up-to-date block is left as deno fmt made it.
  const formatted = `<!-- options:x -->\n${aligned}\n<!-- /options -->\n`;
  assertEquals(rewriteBlocks(formatted, blocks).text, formatted);
});
