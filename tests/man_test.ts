/**
 * The man pages of `deno task man`: each page of docs/ renders to roff that
 * groff formats without a single warning (-ww turns all of them on).
 */

import { assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { peers, run, tempDir } from "./helpers.ts";
import { isManSource, renderManPages, writeManPages } from "../tools/man.ts";
import { renderRoff } from "../util/markdown.ts";

/** Formats roff as man(1) would (tbl, then the man macros) and returns groff's output. */
async function groff(roff: string, lineLength?: number) {
  // -P-cbou: plain text, without the overstrikes or escapes of bold and underline.
  const args = ["-ww", "-t", "-man", "-Tutf8", "-P-cbou"];
  if (lineLength) args.push(`-rLL=${lineLength}n`);
  return await run("groff", args, { stdin: roff, env: { LC_ALL: "C.UTF-8" } });
}

/** A page with every construct of the docs' markdown, and the characters roff treats specially. */
const EVERY_CONSTRUCT = `# nbd-everything(1)

## NAME

nbd everything - a page with *every* construct of the **docs' markdown**

## SYNOPSIS

\`\`\`
nbd everything [-x] [--long-option=VALUE] FILE...
.leading dot, 'leading quote, back\\slash, "quotes"
\`\`\`

## DESCRIPTION

.A paragraph starting with a dot
'and a line with a quote, a back\\\\slash, \`\\fB not a font\`, a - dash and one-word-hyphens.
Non-ASCII — “quoted” café ≥ 1 → ok. A long address:
<https://example.com/a/very/long/path/that/does/not/fit/on/one/line/of/a/narrow/terminal/at/all.html>
and [a link](https://example.com/x) and [a page](nbd.md).

### A subsection with \`code\`

- a bullet
  continued
  - nested, with **bold**
- another

1. first
2. second

| column | another column | a third, wide one |
| --- | :---: | ---: |
| \`-x\` | \\| pipe | a long cell whose text has to wrap over several lines of a narrow table, with https://example.com/an-unbreakable-address-in-a-table-cell |
| .dot | 'quote | back\\\\slash |

## OPTIONS

<!-- options:everything -->
| option | description |
| --- | --- |
| \`-x, --extra\` | an option |
| \`--long-option=VALUE\` | one whose description is long enough to be wrapped over more than one line of the page |
<!-- /options -->
`;

Deno.test(
  "man: every command, plugin and filter page renders and groff formats it without a warning",
  peers("groff"),
  async () => {
    const pages = await renderManPages();
    const sources: string[] = [];
    for await (const entry of Deno.readDir(new URL("../docs/", import.meta.url))) {
      if (isManSource(entry.name)) sources.push(entry.name);
    }
    assertEquals(pages.map((p) => p.source), sources.sort());
    assertOk(pages.some((p) => p.file === "nbd.1"), "the overview page is nbd.1");
    for (const page of pages) {
      assertOk(/^nbd(-[a-z0-9-]+)?\.1$/.test(page.file), `${page.source} → ${page.file}`);
      for (const width of [undefined, 60]) {
        const result = await groff(page.roff, width);
        assertEquals(result.stderr, "", `${page.file} at width ${width ?? "default"}`);
        assertEquals(result.code, 0, page.file);
        assertIncludes(result.stdout, "NAME", page.file);
      }
    }
  },
);

Deno.test(
  "man: every markdown construct renders to roff that groff accepts, with its text intact",
  peers("groff"),
  async () => {
    const roff = renderRoff(EVERY_CONSTRUCT, { source: "nbd 0.0.0", manual: "nbd manual" });
    for (const width of [undefined, 50]) {
      const result = await groff(roff, width);
      assertEquals(result.stderr, "", `at width ${width ?? "default"}`);
      assertEquals(result.code, 0);
    }
    const text = (await groff(roff, 200)).stdout;
    assertIncludes(text, "NBD-EVERYTHING(1)");
    assertIncludes(text, "nbd everything - a page with every construct");
    assertIncludes(text, ".leading dot, 'leading quote, back\\slash");
    assertIncludes(
      text,
      ".A paragraph starting with a dot 'and a line with a quote, a back\\slash",
    );
    assertIncludes(text, "\\fB not a font");
    assertIncludes(text, "Non-ASCII — “quoted” café ≥ 1 → ok.");
    assertIncludes(text, "a link <https://example.com/x> and a page.");
    assertIncludes(text, "-x, --extra");
    assertOk(!text.includes("<!--"), "marker comments are dropped");
  },
);

Deno.test("man: the groff check catches a broken page", peers("groff"), async () => {
  const result = await groff(".TH X 1\n.SH NAME\n\\fQbad font\n.XY unknown macro\n");
  assertOk(result.stderr !== "", "groff -ww warns");
});

Deno.test("man: writeManPages writes the pages and removes stale ones", async () => {
  await using dir = await tempDir();
  await Deno.writeTextFile(`${dir.path}/nbd-gone.1`, "stale");
  await Deno.writeTextFile(`${dir.path}/other.txt`, "kept");
  const pages = await writeManPages(dir.path);
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir.path)) names.push(entry.name);
  assertEquals(names.sort(), [...pages.map((p) => p.file), "other.txt"].sort());
  const serve = pages.find((p) => p.source === "nbd-serve.md");
  assertOk(serve, "docs/nbd-serve.md is rendered");
  assertEquals(serve.file, "nbd-serve.1");
  assertEquals(await Deno.readTextFile(`${dir.path}/nbd-serve.1`), serve.roff);
  assertIncludes(serve.roff, '.TH "NBD-SERVE" "1"');
});
