/**
 * A renderer for the markdown subset of the pages in docs/: headings,
 * paragraphs, fenced code blocks, bullet (and numbered) lists, pipe tables,
 * inline code, bold, italic and links. `<!-- ... -->` comments (the markers
 * of generated blocks) are dropped. Two back ends: wrapped terminal text
 * for `nbd help`, and roff with the man(7) macros for `deno task man`.
 *
 * Anything outside the subset is shown as text rather than rejected, so a
 * page never fails to render.
 *
 * @module
 */

/** An inline element of a paragraph, list item, heading or table cell. */
export type Inline =
  | { kind: "text"; text: string }
  | { kind: "code"; text: string }
  | { kind: "strong"; children: Inline[] }
  | { kind: "em"; children: Inline[] }
  | { kind: "link"; href: string; children: Inline[] };

/** Alignment of a table column. */
export type Align = "left" | "right" | "center";

/** An item of a list; `depth` counts the levels of nesting (0 for the outer list). */
export interface ListItem {
  /** Nesting level, 0 for the outermost list. */
  depth: number;
  /** The item's number in a numbered list; undefined in a bullet list. */
  number?: number;
  /** The item's text (markdown inline syntax). */
  text: string;
}

/** A block of a page. */
export type Block =
  | { kind: "heading"; level: number; text: string }
  | { kind: "paragraph"; text: string }
  | { kind: "code"; lines: string[] }
  | { kind: "list"; items: ListItem[] }
  | { kind: "table"; header: string[]; align: Align[]; rows: string[][] };

const FENCE = /^(\s*)(`{3,}|~{3,})/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
const BULLET = /^(\s*)[-*+]\s+(.*)$/;
const NUMBERED = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;
const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function isListLine(line: string): boolean {
  return BULLET.test(line) || NUMBERED.test(line);
}

/** Splits a table row into its cells: `|` inside code spans or after `\` does not split. */
export function splitRow(line: string): string[] {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const cells: string[] = [];
  let cell = "";
  let ticks = 0; // length of the open code span's backtick run, 0 outside one
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === "\\" && text[i + 1] === "|") {
      cell += "|";
      i++;
    } else if (c === "`") {
      let n = 1;
      while (text[i + n] === "`") n++;
      if (ticks === 0) ticks = n;
      else if (ticks === n) ticks = 0;
      cell += "`".repeat(n);
      i += n - 1;
    } else if (c === "|" && ticks === 0) {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += c;
    }
  }
  cells.push(cell.trim());
  return cells;
}

function isTableStart(lines: string[], i: number): boolean {
  const line = lines[i]!;
  const next = lines[i + 1];
  return line.includes("|") && next !== undefined && next.includes("-") &&
    TABLE_SEPARATOR.test(next) && (next.includes("|") || splitRow(line).length === 1);
}

function startsBlock(lines: string[], i: number): boolean {
  const line = lines[i]!;
  return FENCE.test(line) || HEADING.test(line) || line.trim().startsWith("<!--") ||
    isListLine(line) || isTableStart(lines, i);
}

/** Parses a page into blocks. Comments are dropped; so are the lines that only hold them. */
export function parseBlocks(markdown: string): Block[] {
  const lines = markdown.replace(/\r\n?/g, "\n").split("\n");
  const blocks: Block[] = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i]!;
    if (line.trim() === "") {
      i++;
      continue;
    }
    if (line.trim().startsWith("<!--")) {
      // A comment runs to its `-->`; text after it on the same line is kept.
      let j = i;
      while (j < lines.length && !lines[j]!.includes("-->")) j++;
      if (j >= lines.length) break;
      const rest = lines[j]!.slice(lines[j]!.indexOf("-->") + 3);
      if (rest.trim() === "") i = j + 1;
      else {
        lines[j] = rest;
        i = j;
      }
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const indent = fence[1]!.length;
      const marker = fence[2]!;
      const code: string[] = [];
      i++;
      while (i < lines.length) {
        const closing = FENCE.exec(lines[i]!);
        if (
          closing && closing[2]![0] === marker[0] && closing[2]!.length >= marker.length &&
          lines[i]!.trim() === closing[2]
        ) {
          i++;
          break;
        }
        const content = lines[i]!;
        const strip = Math.min(indent, content.length - content.trimStart().length);
        code.push(content.slice(strip));
        i++;
      }
      blocks.push({ kind: "code", lines: code });
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      blocks.push({ kind: "heading", level: heading[1]!.length, text: heading[2] ?? "" });
      i++;
      continue;
    }
    if (isTableStart(lines, i)) {
      const header = splitRow(line);
      const align = splitRow(lines[i + 1]!).map((spec): Align =>
        spec.endsWith(":") ? (spec.startsWith(":") ? "center" : "right") : "left"
      );
      const rows: string[][] = [];
      i += 2;
      while (
        i < lines.length && lines[i]!.includes("|") && lines[i]!.trim() !== "" &&
        !lines[i]!.trim().startsWith("<!--")
      ) {
        const cells = splitRow(lines[i]!);
        // Rows shorter or longer than the header are padded or cut, as GitHub does.
        rows.push(header.map((_, k) => cells[k] ?? ""));
        i++;
      }
      while (align.length < header.length) align.push("left");
      blocks.push({ kind: "table", header, align: align.slice(0, header.length), rows });
      continue;
    }
    if (isListLine(line)) {
      const items: ListItem[] = [];
      const indents: number[] = []; // the indent of each open nesting level
      while (i < lines.length) {
        const current = lines[i]!;
        if (current.trim() === "") {
          // A blank line ends the list unless another item follows.
          let j = i;
          while (j < lines.length && lines[j]!.trim() === "") j++;
          if (j < lines.length && isListLine(lines[j]!)) {
            i = j;
            continue;
          }
          break;
        }
        const bullet = BULLET.exec(current);
        const numbered = bullet ? null : NUMBERED.exec(current);
        if (bullet || numbered) {
          const indent = (bullet ?? numbered)![1]!.length;
          while (indents.length > 0 && indent < indents[indents.length - 1]!) indents.pop();
          if (indents.length === 0 || indent > indents[indents.length - 1]!) indents.push(indent);
          items.push({
            depth: indents.length - 1,
            number: numbered ? Number(numbered[2]) : undefined,
            text: bullet ? bullet[2]! : numbered![3]!,
          });
          i++;
          continue;
        }
        if (startsBlock(lines, i)) break;
        // A continuation line of the last item.
        const last = items[items.length - 1]!;
        last.text += "\n" + current.trim();
        i++;
      }
      blocks.push({ kind: "list", items });
      continue;
    }
    const paragraph: string[] = [];
    while (
      i < lines.length && lines[i]!.trim() !== "" &&
      (paragraph.length === 0 || !startsBlock(lines, i))
    ) {
      paragraph.push(lines[i]!.trim());
      i++;
    }
    blocks.push({ kind: "paragraph", text: paragraph.join("\n") });
  }
  return blocks;
}

interface Delimiter {
  kind: "delimiter";
  char: "*" | "_";
  count: number;
  canOpen: boolean;
  canClose: boolean;
}

type Token = Inline | Delimiter;

const PUNCTUATION = /[!-/:-@[-`{-~]/;

function isSpace(c: string | undefined): boolean {
  return c === undefined || /\s/.test(c);
}

function isWordChar(c: string | undefined): boolean {
  return c !== undefined && /[\p{L}\p{N}]/u.test(c);
}

/** Finds the `]` that closes the `[` at `open`, allowing nested brackets and code spans. */
function closingBracket(text: string, open: number): number {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    const c = text[i];
    if (c === "\\") i++;
    else if (c === "[") depth++;
    else if (c === "]" && --depth === 0) return i;
  }
  return -1;
}

function pushText(tokens: Token[], text: string): void {
  const last = tokens[tokens.length - 1];
  if (last?.kind === "text") last.text += text;
  else tokens.push({ kind: "text", text });
}

function asInlines(tokens: Token[]): Inline[] {
  const out: Token[] = [];
  for (const token of tokens) {
    if (token.kind === "delimiter") pushText(out, token.char.repeat(token.count));
    else if (token.kind === "text") pushText(out, token.text);
    else out.push(token);
  }
  return out as Inline[];
}

/** Pairs `*`/`_` delimiters into strong and em elements; unpaired ones stay text. */
function resolveEmphasis(tokens: Token[]): Inline[] {
  for (let i = 0; i < tokens.length; i++) {
    const closer = tokens[i]!;
    if (closer.kind !== "delimiter" || !closer.canClose) continue;
    let j = i - 1;
    while (j >= 0) {
      const t = tokens[j]!;
      if (t.kind === "delimiter" && t.char === closer.char && t.canOpen && t.count > 0) break;
      j--;
    }
    if (j < 0) continue;
    const opener = tokens[j] as Delimiter;
    const use = opener.count >= 2 && closer.count >= 2 ? 2 : 1;
    const children = resolveEmphasis(tokens.slice(j + 1, i));
    const node: Inline = use === 2 ? { kind: "strong", children } : { kind: "em", children };
    opener.count -= use;
    closer.count -= use;
    const replacement: Token[] = [];
    if (opener.count > 0) replacement.push(opener);
    replacement.push(node);
    if (closer.count > 0) replacement.push(closer);
    tokens.splice(j, i - j + 1, ...replacement);
    // Go on from the node (or from the closer's rest, which may close another opener).
    i = j + replacement.indexOf(node);
  }
  return asInlines(tokens);
}

/** Parses inline markdown: code spans, `**strong**`, `*em*`, links, `\` escapes. */
export function parseInline(source: string): Inline[] {
  const text = source.replace(/<!--[\s\S]*?-->/g, "");
  const tokens: Token[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1]!)) {
      pushText(tokens, text[i + 1]!);
      i += 2;
      continue;
    }
    if (c === "`") {
      let n = 1;
      while (text[i + n] === "`") n++;
      const run = "`".repeat(n);
      let end = text.indexOf(run, i + n);
      while (end !== -1 && text[end + n] === "`") {
        // A longer run of backticks does not close this span.
        let m = end;
        while (text[m] === "`") m++;
        end = text.indexOf(run, m);
      }
      if (end === -1) {
        pushText(tokens, run);
        i += n;
        continue;
      }
      let code = text.slice(i + n, end).replace(/\n/g, " ");
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim() !== "") {
        code = code.slice(1, -1);
      }
      tokens.push({ kind: "code", text: code });
      i = end + n;
      continue;
    }
    if (c === "[" || (c === "!" && text[i + 1] === "[")) {
      const open = c === "!" ? i + 1 : i;
      const close = closingBracket(text, open);
      if (close !== -1 && text[close + 1] === "(") {
        const end = text.indexOf(")", close + 2);
        if (end !== -1) {
          const href = text.slice(close + 2, end).trim().replace(/^<(.*)>$/, "$1").split(
            /\s+/,
          )[0]!;
          const children = parseInline(text.slice(open + 1, close));
          // An image shows its alternative text.
          if (c === "!") tokens.push(...children);
          else tokens.push({ kind: "link", href, children });
          i = end + 1;
          continue;
        }
      }
    }
    if (c === "<") {
      const auto = /^<((?:https?|mailto|ftp):[^\s<>]+)>/.exec(text.slice(i));
      if (auto) {
        tokens.push({ kind: "link", href: auto[1]!, children: [{ kind: "text", text: auto[1]! }] });
        i += auto[0].length;
        continue;
      }
    }
    if (c === "*" || c === "_") {
      let n = 1;
      while (text[i + n] === c) n++;
      const before = text[i - 1];
      const after = text[i + n];
      const leftFlanking = !isSpace(after);
      const rightFlanking = !isSpace(before);
      tokens.push({
        kind: "delimiter",
        char: c,
        count: n,
        // An underscore inside a word (snake_case) is not emphasis.
        canOpen: leftFlanking && (c === "*" || !isWordChar(before)),
        canClose: rightFlanking && (c === "*" || !isWordChar(after)),
      });
      i += n;
      continue;
    }
    pushText(tokens, c);
    i++;
  }
  return resolveEmphasis(tokens);
}

/** A stretch of text in one style, as the back ends lay it out. */
interface Run {
  text: string;
  bold: boolean;
  italic: boolean;
  code: boolean;
  /** Not to be hyphenated (code and link text). */
  nobreak?: boolean;
  /** An address, which may be broken after a `/`. */
  url?: boolean;
}

/** Whether a link points outside the docs (its address is then shown after its text). */
function isExternal(href: string): boolean {
  return /^[a-z][a-z0-9+.-]*:/i.test(href);
}

function flatten(
  inlines: Inline[],
  style: { bold: boolean; italic: boolean } = { bold: false, italic: false },
  out: Run[] = [],
): Run[] {
  for (const node of inlines) {
    switch (node.kind) {
      case "text":
        out.push({ text: node.text, ...style, code: false });
        break;
      case "code":
        out.push({ text: node.text, ...style, code: true });
        break;
      case "strong":
        flatten(node.children, { ...style, bold: true }, out);
        break;
      case "em":
        flatten(node.children, { ...style, italic: true }, out);
        break;
      case "link": {
        // A link's text (often a page name, `nbd-copy(1)`) is not hyphenated.
        const start = out.length;
        flatten(node.children, style, out);
        const shown = plainText(node.children);
        const address = node.href.replace(/^mailto:/, "");
        for (let k = start; k < out.length; k++) {
          // An address shown as the link's text breaks like one.
          if (shown === address) out[k]!.url = true;
          else out[k]!.nobreak = true;
        }
        if (isExternal(node.href) && shown !== address) {
          out.push({ text: " ", bold: false, italic: false, code: false });
          out.push({ text: `<${address}>`, bold: false, italic: false, code: false, url: true });
        }
        break;
      }
    }
  }
  return out;
}

/** The text of inline elements without any markup. */
export function plainText(inlines: Inline[]): string {
  return inlines.map((node) =>
    node.kind === "text" || node.kind === "code" ? node.text : plainText(node.children)
  ).join("");
}

/** The name and section of a page from its first-line title `# nbd-copy(1)`, if it has one. */
export function pageTitle(markdown: string): { name: string; section: string } | undefined {
  const first = parseBlocks(markdown).find((b) => b.kind === "heading");
  if (first?.kind !== "heading" || first.level !== 1) return undefined;
  const match = /^([^\s()]+)\((\d[a-z]*)\)$/i.exec(plainText(parseInline(first.text)).trim());
  return match ? { name: match[1]!, section: match[2]! } : undefined;
}

// ---------------------------------------------------------------------------
// Terminal text

/** How `renderTerminal` lays a page out. */
export interface TerminalOptions {
  /** Columns to wrap to. */
  width: number;
  /** Use ANSI bold and underline (only when writing to a terminal). */
  ansi: boolean;
}

/** A word as laid out: its width in columns and its text with any ANSI styling. */
interface Word {
  width: number;
  plain: string;
  styled: string;
}

/** Columns a string takes in a terminal (combining marks take none). */
function columns(text: string): number {
  return [...text.replace(/\p{M}/gu, "")].length;
}

function styleText(text: string, run: Run, ansi: boolean): string {
  if (!ansi || text === "") return text;
  const on: string[] = [];
  if (run.bold || run.code) on.push("1");
  if (run.italic) on.push("4");
  return on.length === 0 ? text : `\x1b[${on.join(";")}m${text}\x1b[0m`;
}

/** Splits styled runs into words at white space; a word may mix styles (`**a**,`). */
function words(runs: Run[], ansi: boolean): Word[] {
  const out: Word[] = [];
  let current: Word | undefined;
  for (const run of runs) {
    for (const part of run.text.split(/(\s+)/)) {
      if (part === "") continue;
      if (/^\s+$/.test(part)) {
        current = undefined;
        continue;
      }
      if (!current) {
        current = { width: 0, plain: "", styled: "" };
        out.push(current);
      }
      current.width += columns(part);
      current.plain += part;
      current.styled += styleText(part, run, ansi);
    }
  }
  return out;
}

/** Cuts a word wider than `width` into pieces that fit (their styling is dropped). */
function cutWord(word: Word, width: number): Word[] {
  const chars = [...word.plain];
  const pieces: Word[] = [];
  for (let k = 0; k < chars.length; k += width) {
    const plain = chars.slice(k, k + width).join("");
    pieces.push({ width: columns(plain), plain, styled: plain });
  }
  return pieces;
}

/** Fills words into lines of at most `width` columns (a longer word gets a line of its own, or is cut when `cut`). */
function fill(items: Word[], width: number, cut = false): Word[][] {
  const lines: Word[][] = [];
  let line: Word[] = [];
  let used = 0;
  const available = Math.max(1, width);
  for (
    const word of items.flatMap((w) => cut && w.width > available ? cutWord(w, available) : [w])
  ) {
    const needed = line.length === 0 ? word.width : used + 1 + word.width;
    if (line.length > 0 && needed > available) {
      lines.push(line);
      line = [word];
      used = word.width;
    } else {
      line.push(word);
      used = needed;
    }
  }
  if (line.length > 0) lines.push(line);
  return lines;
}

function joinWords(line: Word[]): { width: number; text: string } {
  return {
    width: line.reduce((sum, w) => sum + w.width, 0) + Math.max(0, line.length - 1),
    text: line.map((w) => w.styled).join(" "),
  };
}

function wrapText(
  runs: Run[],
  options: TerminalOptions,
  firstPrefix: string,
  restPrefix: string,
): string[] {
  const lines = fill(words(runs, options.ansi), options.width - columns(restPrefix));
  if (lines.length === 0) return [firstPrefix.trimEnd()];
  return lines.map((line, k) => (k === 0 ? firstPrefix : restPrefix) + joinWords(line).text);
}

function pad(text: string, width: number, visible: number, align: Align): string {
  const space = Math.max(0, width - visible);
  if (align === "right") return " ".repeat(space) + text;
  if (align === "center") {
    const left = Math.floor(space / 2);
    return " ".repeat(left) + text + " ".repeat(space - left);
  }
  return text + " ".repeat(space);
}

/** Column widths that fit `available`: the widest columns give way first, down to their longest word. */
function fitColumns(cells: Word[][][], available: number): number[] {
  const count = cells[0]!.length;
  const natural = Array.from(
    { length: count },
    (_, c) => Math.max(1, ...cells.map((row) => joinWords(row[c]!).width)),
  );
  const longestWord = Array.from(
    { length: count },
    (_, c) => Math.max(1, ...cells.flatMap((row) => row[c]!.map((w) => w.width))),
  );
  const widths = [...natural];
  const total = () => widths.reduce((a, b) => a + b, 0);
  for (const floor of [longestWord, widths.map(() => 6)]) {
    while (total() > available) {
      let widest = -1;
      for (let c = 0; c < count; c++) {
        if (
          widths[c]! > Math.min(floor[c]!, natural[c]!) &&
          (widest < 0 || widths[c]! > widths[widest]!)
        ) {
          widest = c;
        }
      }
      if (widest < 0) break;
      widths[widest]!--;
    }
  }
  return widths;
}

function renderTable(
  block: Extract<Block, { kind: "table" }>,
  options: TerminalOptions,
  indent: number,
): string[] {
  const gap = 2;
  const header = block.header.map((cell) =>
    words(flatten(parseInline(cell), { bold: true, italic: false }), options.ansi)
  );
  const rows = block.rows.map((row) =>
    row.map((cell) => words(flatten(parseInline(cell)), options.ansi))
  );
  const all = [header, ...rows];
  const available = options.width - indent - gap * (header.length - 1);
  const widths = fitColumns(all, available);
  const out: string[] = [];
  const prefix = " ".repeat(indent);
  const emit = (row: Word[][]) => {
    const wrapped = row.map((cell, c) => fill(cell, widths[c]!, true).map(joinWords));
    const height = Math.max(1, ...wrapped.map((cell) => cell.length));
    for (let k = 0; k < height; k++) {
      const parts = wrapped.map((cell, c) => {
        const line = cell[k] ?? { width: 0, text: "" };
        return pad(line.text, widths[c]!, line.width, block.align[c]!);
      });
      out.push((prefix + parts.join(" ".repeat(gap))).trimEnd());
    }
  };
  emit(header);
  out.push(prefix + widths.map((w) => "-".repeat(w)).join(" ".repeat(gap)));
  for (const row of rows) emit(row);
  return out;
}

/** Body text is indented under the section headings, as man(1) shows pages. */
const BODY_INDENT = 4;

/** Renders a page as terminal text: wrapped to `width`, bold headings when `ansi`. */
export function renderTerminal(markdown: string, options: TerminalOptions): string {
  const width = Math.max(20, options.width);
  const opts = { ...options, width };
  const out: string[] = [];
  const separate = () => {
    if (out.length > 0 && out[out.length - 1] !== "") out.push("");
  };
  let afterHeading = false;
  for (const block of parseBlocks(markdown)) {
    if (!afterHeading) separate();
    afterHeading = false;
    const body = " ".repeat(BODY_INDENT);
    switch (block.kind) {
      case "heading": {
        const indent = block.level >= 3 ? " ".repeat(BODY_INDENT / 2) : "";
        out.push(
          ...wrapText(
            flatten(parseInline(block.text), { bold: true, italic: false }),
            opts,
            indent,
            indent,
          ),
        );
        // The title stands apart; a section's text follows its heading directly.
        afterHeading = block.level > 1;
        break;
      }
      case "paragraph":
        out.push(...wrapText(flatten(parseInline(block.text)), opts, body, body));
        break;
      case "code":
        for (const line of block.lines) {
          const text = line.replace(/\t/g, "        ").trimEnd();
          out.push(text === "" ? "" : body + "    " + text);
        }
        break;
      case "list":
        for (const item of block.items) {
          const marker = item.number === undefined ? "-" : `${item.number}.`;
          const indent = body + "  ".repeat(item.depth);
          out.push(
            ...wrapText(
              flatten(parseInline(item.text)),
              opts,
              `${indent}${marker} `,
              indent + " ".repeat(marker.length + 1),
            ),
          );
        }
        break;
      case "table":
        out.push(...renderTable(block, opts, BODY_INDENT));
        break;
    }
  }
  while (out.length > 0 && out[out.length - 1] === "") out.pop();
  return out.join("\n") + "\n";
}

// ---------------------------------------------------------------------------
// roff (man(7))

/** What `.TH` says besides the page's name and section. */
export interface RoffOptions {
  /** The page's name when its first line is not `# NAME(SECTION)`. */
  name?: string;
  /** The section when the first line does not give one (default 1). */
  section?: string;
  /** Date shown in the footer (default none). */
  date?: string;
  /** The program and version, shown in the footer (`nbd 0.1.0`). */
  source?: string;
  /** The manual's title, shown in the header. */
  manual?: string;
  /** A comment placed at the top of the output (where it comes from). */
  comment?: string;
}

/** Escapes characters of text for roff; hyphens at the start of a word or in code are minus signs. */
function roffEscape(text: string, code: boolean): string {
  let out = "";
  const chars = [...text];
  for (let k = 0; k < chars.length; k++) {
    const c = chars[k]!;
    const codePoint = c.codePointAt(0)!;
    if (c === "\\") out += "\\e";
    else if (c === "-") {
      // Options (`--port`), dashes standing alone and code take the minus sign
      // so that they can be copied; a hyphen inside a word stays a hyphen.
      const before = chars[k - 1];
      out += code || before === undefined || !isWordChar(before) ? "\\-" : "-";
    } else if (c === "\n" && !code) out += c; // the source's line breaks are kept
    else if (codePoint < 0x20) out += " ";
    else if (codePoint > 0x7e) {
      out += `\\[u${codePoint.toString(16).toUpperCase().padStart(4, "0")}]`;
    } else out += c;
  }
  return out;
}

/** Lets roff break a line after the slashes of a path or address (`\:` is an invisible break point). */
function breakAfterSlashes(word: string): string {
  return word.replace(/(?<=[^/\s])\/(?=[^/\s])/g, "/\\:");
}

/** Break points in words too long for a narrow column: paths and addresses. */
function breakLongWords(text: string): string {
  return text.replace(/\S{20,}/g, breakAfterSlashes);
}

/** Roff for inline runs: font changes as escapes, ending in the roman font. */
function roffInline(runs: Run[]): string {
  let out = "";
  let font = "R";
  for (const run of runs) {
    if (run.text === "") continue;
    const bold = run.bold || run.code;
    const wanted = bold && run.italic ? "(BI" : bold ? "B" : run.italic ? "I" : "R";
    if (wanted !== font) {
      out += `\\f${wanted}`;
      font = wanted;
    }
    // Code and link text are not hyphenated (`\%` before each word).
    const escaped = roffEscape(run.text, run.code);
    if (run.url) out += "\\%" + breakAfterSlashes(escaped);
    else if (run.code || run.nobreak) {
      out += breakLongWords(escaped).replace(/(^|\s)(?=\S)/g, "$1\\%");
    } else out += breakLongWords(escaped);
  }
  if (font !== "R") out += "\\fR";
  return out;
}

/** Text lines for roff: no leading blanks, single spaces, and a leading `.` or `'` made literal. */
function roffLines(text: string): string[] {
  return text.split("\n").map((line) => line.replace(/[ \t]+/g, " ").trim()).filter((line) =>
    line !== ""
  ).map((line) => /^[.']/.test(line) ? "\\&" + line : line);
}

function roffText(markdown: string, style?: { bold: boolean; italic: boolean }): string[] {
  return roffLines(roffInline(flatten(parseInline(markdown), style)));
}

function roffQuote(text: string): string {
  return `"${text.replace(/"/g, "\\(dq")}"`;
}

/** Columns that a tbl table may take in all: narrow enough for a terminal of 80 columns or less. */
const TBL_WIDTH = 48;

/**
 * Whether a table is set with tbl: when it has more than two columns and
 * its cells fit on one line each. Other tables become tagged paragraphs,
 * which wrap at any width (tbl cannot break a long word in a narrow column).
 */
function usesTbl(block: Extract<Block, { kind: "table" }>): boolean {
  if (block.header.length <= 2) return false;
  const widths = block.header.map((_, c) =>
    Math.max(
      ...[block.header, ...block.rows].map((row) =>
        columns(flatten(parseInline(row[c] ?? "")).map((r) => r.text).join(""))
      ),
    )
  );
  return widths.reduce((a, b) => a + b, 0) + 3 * block.header.length + 1 <= TBL_WIDTH;
}

/** Renders a page as a man(7) page; its `# name(section)` title becomes `.TH`. */
export function renderRoff(markdown: string, options: RoffOptions = {}): string {
  const blocks = parseBlocks(markdown);
  const title = pageTitle(markdown);
  let name = title?.name ?? options.name;
  const section = title?.section ?? options.section ?? "1";
  if (name === undefined) {
    const first = blocks.find((b) => b.kind === "heading");
    name = first?.kind === "heading" ? plainText(parseInline(first.text)) : "untitled";
  }
  const out: string[] = [];
  // The first line tells man(1) to run tbl; groff needs -t.
  if (blocks.some((b) => b.kind === "table" && usesTbl(b))) out.push(`'\\" t`);
  if (options.comment) {
    for (const line of options.comment.split("\n")) out.push(`.\\" ${roffEscape(line, false)}`);
  }
  out.push(
    [
      ".TH",
      roffQuote(roffEscape(name.toUpperCase(), false)),
      roffQuote(section),
      roffQuote(roffEscape(options.date ?? "", false)),
      roffQuote(roffEscape(options.source ?? "", false)),
      roffQuote(roffEscape(options.manual ?? "", false)),
    ].join(" "),
  );
  // Ragged right: a line holding only part of a long address or path cannot be justified.
  out.push(".ad l");
  let skippedTitle = title === undefined;
  let afterHeading = true;
  for (const block of blocks) {
    const wasAfterHeading = afterHeading;
    afterHeading = false;
    switch (block.kind) {
      case "heading": {
        if (!skippedTitle && block.level === 1) {
          skippedTitle = true;
          afterHeading = true;
          break;
        }
        // The heading's text goes on the next line, so that it needs no quoting.
        out.push(block.level <= 2 ? ".SH" : ".SS");
        const text = roffText(block.text).join(" ");
        out.push(text === "" ? "\\&" : text);
        afterHeading = true;
        break;
      }
      case "paragraph":
        if (!wasAfterHeading) out.push(".PP");
        out.push(...roffText(block.text));
        break;
      case "code":
        if (!wasAfterHeading) out.push(".PP");
        out.push(".RS 4", ".nf");
        for (const line of block.lines) {
          const escaped = roffEscape(line.replace(/\t/g, "        ").trimEnd(), true);
          out.push(/^[.']/.test(escaped) ? "\\&" + escaped : escaped);
        }
        out.push(".fi", ".RE");
        break;
      case "list": {
        if (!wasAfterHeading) out.push(".PP");
        let depth = 0;
        for (const item of block.items) {
          while (depth < item.depth) {
            out.push(".RS 2");
            depth++;
          }
          while (depth > item.depth) {
            out.push(".RE");
            depth--;
          }
          const marker = item.number === undefined ? "\\(bu" : `${item.number}.`;
          out.push(`.IP ${marker} ${item.number === undefined ? 2 : 4}`);
          const text = roffText(item.text);
          out.push(...(text.length > 0 ? text : ["\\&"]));
          // Items follow each other without a blank line, as in the markdown.
          if (item === block.items[0]) out.push(".PD 0");
        }
        while (depth-- > 0) out.push(".RE");
        out.push(".PD", ".PP");
        break;
      }
      case "table":
        if (!wasAfterHeading) out.push(".PP");
        if (usesTbl(block)) {
          const count = block.header.length;
          const spec = (font: string) => Array.from({ length: count }, () => "l" + font).join(" ");
          out.push(".TS", "allbox;", spec("b"), spec("") + ".");
          // `\&` first: an entry of `_`, `=` or `\^` would otherwise draw a rule or span.
          const cell = (markdown: string) =>
            "\\&" + roffText(markdown).join(" ").replace(/^\\&/, "");
          for (const row of [block.header, ...block.rows]) out.push(row.map(cell).join("\t"));
          out.push(".TE");
        } else {
          // Tagged paragraphs fit any width: the first column is the tag (an
          // option, a parameter); the middle ones are labelled lines; the last
          // is the text.
          for (const row of block.rows) {
            out.push(".TP");
            const tag = roffText(row[0]!).join(" ");
            out.push(tag === "" ? "\\&" : tag);
            const body: string[][] = [];
            for (let c = 1; c < row.length; c++) {
              const text = roffText(row[c]!);
              if (text.length === 0) continue;
              const last = c === row.length - 1;
              const label = roffText(block.header[c]!, { bold: false, italic: true }).join(" ");
              body.push(last || label === "" ? text : [`${label}: ${text[0]}`, ...text.slice(1)]);
            }
            out.push(
              ...(body.length > 0 ? body.flatMap((b, k) => k > 0 ? [".br", ...b] : b) : ["\\&"]),
            );
          }
        }
        out.push(".PP");
        break;
    }
  }
  // Drop a trailing `.PP` and ones that directly follow a heading or another `.PP`.
  const cleaned: string[] = [];
  for (const line of out) {
    const previous = cleaned[cleaned.length - 1];
    if (line === ".PP" && (previous === ".PP" || previous === ".SH" || previous === ".SS")) {
      continue;
    }
    if (line === ".PP" && cleaned.length >= 2 && /^\.S[HS]$/.test(cleaned[cleaned.length - 2]!)) {
      continue;
    }
    cleaned.push(line);
  }
  while (cleaned[cleaned.length - 1] === ".PP") cleaned.pop();
  return cleaned.join("\n") + "\n";
}
