/**
 * `deno task man [OUTDIR]`: renders the command, plugin and filter pages of
 * docs/ (nbd.md and nbd-*.md) as man pages into build/man/ (or OUTDIR),
 * named by each page's title: nbd.1, nbd-serve.1, nbd-plugin-memory.1, ...
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { pageTitle, renderRoff } from "../util/markdown.ts";
import { VERSION } from "../util/version.ts";

/** The pages of docs/ this renders. */
export const DOCS_DIR: URL = new URL("../docs/", import.meta.url);

/** A rendered man page. */
export interface ManPage {
  /** The markdown page it comes from (`nbd-serve.md`). */
  source: string;
  /** The man page's file name (`nbd-serve.1`). */
  file: string;
  /** The roff text. */
  roff: string;
}

/** Whether a file of docs/ is a man page: the overview or a command, plugin or filter page. */
export function isManSource(name: string): boolean {
  return name === "nbd.md" || /^nbd-[A-Za-z0-9_.-]+\.md$/.test(name);
}

/** The footer's date: SOURCE_DATE_EPOCH's day when set (reproducible builds), else none. */
function buildDate(): string {
  const epoch = Number(Deno.env.get("SOURCE_DATE_EPOCH"));
  return Number.isFinite(epoch) && epoch > 0
    ? new Date(epoch * 1000).toISOString().slice(0, 10)
    : "";
}

/** Renders every man-page source of `docs` to roff, in file-name order. */
export async function renderManPages(docs: URL = DOCS_DIR): Promise<ManPage[]> {
  const sources: string[] = [];
  for await (const entry of Deno.readDir(docs)) {
    if (entry.isFile && isManSource(entry.name)) sources.push(entry.name);
  }
  const date = buildDate();
  const pages: ManPage[] = [];
  for (const source of sources.sort()) {
    const markdown = await Deno.readTextFile(new URL(source, docs));
    // The title (`# nbd-serve(1)`) names the page; a page without one is section 1.
    const title = pageTitle(markdown) ??
      { name: source.replace(/\.md$/, ""), section: "1" };
    const roff = renderRoff(markdown, {
      name: title.name,
      section: title.section,
      date,
      source: `nbd ${VERSION}`,
      manual: "nbd manual",
      comment: `Generated from docs/${source} by "deno task man": edit that page, not this file.`,
    });
    pages.push({ source, file: `${title.name.toLowerCase()}.${title.section}`, roff });
  }
  return pages;
}

/** Writes the man pages into `out`, replacing the nbd pages already there. */
export async function writeManPages(out: string, docs: URL = DOCS_DIR): Promise<ManPage[]> {
  const pages = await renderManPages(docs);
  await Deno.mkdir(out, { recursive: true });
  // Pages of a previous run whose source is gone must not linger.
  for await (const entry of Deno.readDir(out)) {
    if (entry.isFile && /^nbd.*\.\d[a-z]*$/.test(entry.name)) {
      await Deno.remove(`${out}/${entry.name}`);
    }
  }
  for (const page of pages) await Deno.writeTextFile(`${out}/${page.file}`, page.roff);
  return pages;
}

if (import.meta.main) {
  const out = Deno.args[0] ?? fileURLToPath(new URL("../build/man", import.meta.url));
  const pages = await writeManPages(out);
  console.log(`${pages.length} man pages written to ${out}`);
}
