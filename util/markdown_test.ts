import { assertEquals, assertIncludes, assertOk } from "../tests/assert.ts";
import {
  type Block,
  pageTitle,
  parseBlocks,
  parseInline,
  renderRoff,
  renderTerminal,
  splitRow,
} from "./markdown.ts";

const PAGE = `# nbd-demo(1)

## NAME

nbd demo - a page with *every* element

## SYNOPSIS

\`\`\`
nbd demo [--fast] FILE
.dotted line
\`\`\`

## OPTIONS

<!-- options:demo -->
| option | description |
| --- | --- |
| \`-f, --fast\` | go **fast** |
| \`--pipe A\\|B\` | a cell with a pipe |
<!-- /options -->

- one
  two
- three

## SEE ALSO

[nbd(1)](nbd.md), <https://example.com/x>
`;

Deno.test("parseBlocks: headings, code, tables, lists; marker comments dropped", () => {
  const blocks = parseBlocks(PAGE);
  assertEquals(blocks.map((b) => b.kind), [
    "heading",
    "heading",
    "paragraph",
    "heading",
    "code",
    "heading",
    "table",
    "list",
    "heading",
    "paragraph",
  ]);
  assertEquals(blocks[4], { kind: "code", lines: ["nbd demo [--fast] FILE", ".dotted line"] });
  const table = blocks[6] as Extract<Block, { kind: "table" }>;
  assertEquals(table.header, ["option", "description"]);
  assertEquals(table.rows, [["`-f, --fast`", "go **fast**"], [
    "`--pipe A|B`",
    "a cell with a pipe",
  ]]);
  assertEquals(blocks[7], {
    kind: "list",
    items: [{ depth: 0, number: undefined, text: "one\ntwo" }, {
      depth: 0,
      number: undefined,
      text: "three",
    }],
  });
});

Deno.test("parseBlocks: nested and numbered lists, fences of tildes, multi-line comments", () => {
  const blocks = parseBlocks(
    "- a\n  - b\n- c\n\n1. x\n2. y\n\n<!--\nhidden\n-->\n~~~~\n```\n~~~~\ntext\n",
  );
  assertEquals(blocks, [
    {
      kind: "list",
      items: [
        { depth: 0, number: undefined, text: "a" },
        {
          depth: 1,
          number: undefined,
          text: "b",
        },
        { depth: 0, number: undefined, text: "c" },
        { depth: 0, number: 1, text: "x" },
        {
          depth: 0,
          number: 2,
          text: "y",
        },
      ],
    },
    { kind: "code", lines: ["```"] },
    { kind: "paragraph", text: "text" },
  ]);
});

Deno.test("splitRow: pipes in code spans and escaped pipes stay in their cell", () => {
  assertEquals(splitRow("| `a|b` | c \\| d | e |"), ["`a|b`", "c | d", "e"]);
  assertEquals(splitRow("a | b"), ["a", "b"]);
});

Deno.test("parseInline: emphasis pairs, unpaired delimiters stay text, snake_case is not emphasis", () => {
  assertEquals(parseInline("**bold _it_** and 2 * 3 and snake_case_name"), [
    {
      kind: "strong",
      children: [{ kind: "text", text: "bold " }, {
        kind: "em",
        children: [{ kind: "text", text: "it" }],
      }],
    },
    { kind: "text", text: " and 2 * 3 and snake_case_name" },
  ]);
  assertEquals(parseInline("***both***"), [{
    kind: "em",
    children: [{ kind: "strong", children: [{ kind: "text", text: "both" }] }],
  }]);
  assertEquals(parseInline("\\*not\\* `a*b*c` ``x ` y``"), [
    { kind: "text", text: "*not* " },
    { kind: "code", text: "a*b*c" },
    { kind: "text", text: " " },
    { kind: "code", text: "x ` y" },
  ]);
  assertEquals(parseInline("see [the *page*](nbd.md) <!-- gone -->now"), [
    { kind: "text", text: "see " },
    {
      kind: "link",
      href: "nbd.md",
      children: [{ kind: "text", text: "the " }, {
        kind: "em",
        children: [{ kind: "text", text: "page" }],
      }],
    },
    { kind: "text", text: " now" },
  ]);
  assertEquals(parseInline("**unclosed and `open"), [{
    kind: "text",
    text: "**unclosed and `open",
  }]);
});

Deno.test("pageTitle: the name and section of the first-line title", () => {
  assertEquals(pageTitle(PAGE), { name: "nbd-demo", section: "1" });
  assertEquals(pageTitle("# Architecture\n"), undefined);
});

Deno.test("renderTerminal: plain text without ANSI, wrapped, tables aligned", () => {
  const text = renderTerminal(PAGE, { width: 40, ansi: false });
  assertOk(!text.includes("\x1b"), "no escape sequences without ansi");
  assertOk(!text.includes("<!--"), "comments are dropped");
  for (const line of text.split("\n")) assertOk([...line].length <= 40, `too wide: "${line}"`);
  assertEquals(
    text,
    `nbd-demo(1)

NAME
    nbd demo - a page with every element

SYNOPSIS
        nbd demo [--fast] FILE
        .dotted line

OPTIONS
    option      description
    ----------  ------------------
    -f, --fast  go fast
    --pipe A|B  a cell with a pipe

    - one two
    - three

SEE ALSO
    nbd(1), https://example.com/x
`,
  );
});

Deno.test("renderTerminal: ANSI bold for headings and code, underline for italic", () => {
  const text = renderTerminal("## NAME\n\n*x* `y`\n", { width: 80, ansi: true });
  assertEquals(text, "\x1b[1mNAME\x1b[0m\n    \x1b[4mx\x1b[0m \x1b[1my\x1b[0m\n");
});

Deno.test("renderTerminal: a table too wide for the terminal wraps its widest column", () => {
  const long = "word ".repeat(30).trim();
  const text = renderTerminal(`| a | b | c |\n|---|---|--:|\n| \`x\` | ${long} | 7 |\n`, {
    width: 50,
    ansi: false,
  });
  const lines = text.trimEnd().split("\n");
  for (const line of lines) assertOk(line.length <= 50, `too wide: "${line}"`);
  // The right-aligned last column ends at the terminal's edge, under its header.
  assertEquals(lines[0]!.length, 50);
  assertEquals(lines[0]!.indexOf("c"), lines[2]!.indexOf("7"));
  assertOk(lines[2]!.startsWith("    x  word word"), lines[2]);
  assertOk(lines.length > 4, "the long cell took several lines");
  // Every continuation line keeps the column: text starts under "b".
  for (const line of lines.slice(3)) assertEquals(line.slice(0, 7), "       ");
});

Deno.test("renderTerminal: a link outside the docs shows its address; a page link its text", () => {
  const text = renderTerminal("[spec](https://example.com/p) and [nbd(1)](nbd.md)\n", {
    width: 80,
    ansi: false,
  });
  assertEquals(text, "    spec <https://example.com/p> and nbd(1)\n");
});

Deno.test("renderRoff: .TH from the title, sections, tagged paragraphs for option tables", () => {
  const roff = renderRoff(PAGE, { source: "nbd 1.2.3", manual: "nbd manual" });
  const lines = roff.split("\n");
  assertEquals(lines.slice(0, 2), ['.TH "NBD-DEMO" "1" "" "nbd 1.2.3" "nbd manual"', ".ad l"]);
  assertIncludes(roff, ".SH\nNAME\nnbd demo \\- a page with \\fIevery\\fR element\n");
  assertIncludes(roff, ".nf\nnbd demo [\\-\\-fast] FILE\n\\&.dotted line\n.fi");
  assertIncludes(roff, ".TP\n\\fB\\%\\-f, \\%\\-\\-fast\\fR\ngo \\fBfast\\fR\n");
  assertIncludes(roff, ".TP\n\\fB\\%\\-\\-pipe \\%A|B\\fR\n");
  assertIncludes(roff, ".IP \\(bu 2\none\ntwo\n.PD 0\n.IP \\(bu 2\nthree\n.PD\n");
  assertIncludes(roff, ".SH\nSEE ALSO\n\\%nbd(1), \\%https://example.com/\\:x\n");
  assertOk(!roff.includes("<!--"));
  assertOk(!roff.startsWith("'\\\" t"), "no tbl preprocessor line without a tbl table");
});

Deno.test("renderRoff: escapes backslashes, leading dots and quotes, dashes and non-ASCII", () => {
  const roff = renderRoff("# x(1)\n\n.a\n'b\nc\\\\d -e one-two — é\n");
  assertIncludes(roff, "\\&.a\n\\&'b\nc\\ed \\-e one-two \\[u2014] \\[u00E9]\n");
});

Deno.test("renderRoff: a narrow table of three or more columns goes through tbl", () => {
  const roff = renderRoff(
    "# x(1)\n\n| a | b | c |\n|---|---|---|\n| 1 | `-x` | |\n| _ | = | . |\n",
  );
  assertOk(roff.startsWith("'\\\" t\n"), "the tbl preprocessor line comes first");
  assertIncludes(
    roff,
    ".TS\nallbox;\nlb lb lb\nl l l.\n\\&a\t\\&b\t\\&c\n\\&1\t\\&\\fB\\%\\-x\\fR\t\\&\n" +
      "\\&_\t\\&=\t\\&.\n.TE\n",
  );
});

Deno.test("renderRoff: a wide table becomes tagged paragraphs with labelled middle columns", () => {
  const long = "a description long enough that the table would not fit a terminal";
  const roff = renderRoff(
    `# x(1)\n\n| option | default | description |\n|---|---|---|\n| \`-x\` | 60 | ${long} |\n| \`-y\` | | |\n`,
  );
  assertOk(!roff.includes(".TS") && !roff.startsWith("'"), "no tbl");
  assertIncludes(
    roff,
    `.TP\n\\fB\\%\\-x\\fR\n\\fIdefault\\fR: 60\n.br\n${long}\n.TP\n\\fB\\%\\-y\\fR\n\\&\n`,
  );
});

Deno.test("renderers: random mixes of the subset never throw or emit stray roff requests", () => {
  const pieces = [
    "# t(1)",
    "## H",
    "### s",
    "text",
    ".dot",
    "'quote",
    "back\\slash",
    "- item",
    "  - nested",
    "1. one",
    "```",
    "~~~",
    "| a | b | c |",
    "| --- | :-: | --: |",
    "| x | y |",
    "<!-- c -->",
    "<!--",
    "-->",
    "",
    "**b",
    "*i*",
    "`c`",
    "[l](u.md)",
    "<https://e.com/p>",
    "a_b_c",
    "averyveryverylongwordwithoutanyspacesatall/and/a/path/too",
    "— é",
    "\t",
  ];
  let seed = 42;
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  const macros = /^\.(TH|SH|SS|PP|TP|IP|RS|RE|PD|nf|fi|TS|TE|ad)( |$)|^\.\\" /;
  for (let round = 0; round < 300; round++) {
    const lines = Array.from(
      { length: 1 + random(12) },
      () => Array.from({ length: 1 + random(3) }, () => pieces[random(pieces.length)]).join(" "),
    );
    const markdown = lines.join("\n");
    const text = renderTerminal(markdown, { width: 30, ansi: random(2) === 0 });
    assertOk(text.endsWith("\n"), markdown);
    const roff = renderRoff(markdown, { comment: "from a test" });
    let inTable = false;
    for (const line of roff.split("\n")) {
      if (line === ".TS") inTable = true;
      if (line === ".TE") inTable = false;
      if (/^[.']/.test(line) && !inTable && line !== `'\\" t`) {
        assertOk(macros.test(line), `stray request "${line}" from:\n${markdown}`);
      }
    }
  }
});
