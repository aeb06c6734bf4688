/**
 * `nbd help [TOPIC]`: prints a page of docs/ (a command's, a plugin's, a
 * filter's or a topic's) as text for the terminal. The pages are read next
 * to the program (`../docs/`), so a compiled binary carries them too.
 *
 * @module
 */

import { parseInline, plainText, renderTerminal } from "../util/markdown.ts";
import { UsageError } from "../util/usage_error.ts";
import { FILTERS } from "../filters/mod.ts";
import { PLUGINS } from "../plugins/mod.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";

const OPTIONS = {
  list: { type: "boolean", help: "list the topics" },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd help [TOPIC]

Print the manual page of a command, a plugin, a filter or a topic; without
TOPIC, the overview page nbd(1).

TOPIC is a command (serve, copy, ...), a plugin (memory, file, ...), a
filter (cow, cache, ...), "plugin NAME" or "filter NAME" where a name is
both, or a topic page (architecture, protocol, security, performance).

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd help serve
  nbd help memory
  nbd help filter stats
  nbd help architecture
`;

/** Where the pages are: docs/ beside the program's folders. */
export const DOCS_DIR: URL = new URL("../docs/", import.meta.url);

/** What `nbd help` needs to know of a command. */
export interface HelpEntry {
  /** One-line summary, as `nbd --help` shows it. */
  summary: string;
  /** Loads the command (for its usage text when it has no page). */
  load(): Promise<Command>;
}

/** What a topic resolved to: a page of docs/, or a command's usage text when it has no page. */
export type HelpSource = { page: string } | { usage: string };

/** Page kinds that hold parameter blocks. */
type Kind = "plugin" | "filter";

async function exists(docs: URL, name: string): Promise<boolean> {
  try {
    return (await Deno.stat(new URL(name, docs))).isFile;
  } catch {
    return false;
  }
}

/** The markdown files of docs/, sorted (none when the folder is missing). */
async function pageNames(docs: URL): Promise<string[]> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(docs)) {
      if (entry.isFile && entry.name.endsWith(".md")) names.push(entry.name);
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return names.sort();
}

const PARAMS_BLOCK = /<!--\s*params:(plugin|filter):([A-Za-z0-9_.-]+)\s*-->/g;

/** Plugins or filters named by the parameter blocks of the pages, with the page of each. */
async function paramBlocks(docs: URL, kind: Kind): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  for (const name of await pageNames(docs)) {
    if (!name.startsWith(`nbd-${kind}-`)) continue;
    const text = await Deno.readTextFile(new URL(name, docs));
    for (const match of text.matchAll(PARAMS_BLOCK)) {
      if (match[1] === kind && !found.has(match[2]!)) found.set(match[2]!, name);
    }
  }
  return found;
}

/**
 * The page of a plugin or filter: its own page, or the family page holding
 * its parameters; another name of one (`curl`, `qcow2dec`) leads to its page.
 */
async function kindPage(docs: URL, kind: Kind, name: string): Promise<string | undefined> {
  const own = `nbd-${kind}-${name}.md`;
  if (await exists(docs, own)) return own;
  const page = (await paramBlocks(docs, kind)).get(name);
  if (page) return page;
  const aliasOf = (kind === "plugin" ? PLUGINS : FILTERS).get(name)?.aliasOf;
  return aliasOf ? await kindPage(docs, kind, aliasOf) : undefined;
}

/**
 * Finds what `nbd help ARGS` shows: a command's page (or its usage text when
 * it has none), a plugin's or filter's page, or a topic page. Throws a
 * `UsageError` for an unknown topic.
 */
export async function resolveTopic(
  args: string[],
  docs: URL,
  commands: ReadonlyMap<string, HelpEntry>,
): Promise<HelpSource> {
  const unknown = () =>
    new UsageError(`no help for "${args.join(" ")}"; "nbd help --list" lists the topics`);
  if (args.length === 0) return { page: "nbd.md" };
  if (args.length > 2) throw new UsageError(`expected at most one TOPIC, got "${args.join(" ")}"`);
  if (!args.every((a) => /^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(a) && !a.includes(".."))) {
    throw unknown();
  }
  if (args.length === 2) {
    const [kind, name] = args as [string, string];
    if (kind !== "plugin" && kind !== "filter") throw unknown();
    const page = await kindPage(docs, kind, name);
    if (!page) throw unknown();
    return { page };
  }
  // "nbd-serve" and "nbd-plugin-memory" name pages as man(1) would.
  const topic = args[0]!.replace(/\.md$/, "");
  if (topic === "nbd") return { page: "nbd.md" };
  const name = topic.replace(/^nbd-/, "");
  if (await exists(docs, `nbd-${name}.md`)) return { page: `nbd-${name}.md` };
  const command = commands.get(name);
  if (command) return { usage: (await command.load()).usage };
  const kinded = /^(plugin|filter)-(.+)$/.exec(name);
  if (kinded) {
    const page = await kindPage(docs, kinded[1] as Kind, kinded[2]!);
    if (page) return { page };
  }
  for (const kind of ["plugin", "filter"] as const) {
    const page = await kindPage(docs, kind, name);
    if (page) return { page };
  }
  if (!topic.startsWith("nbd") && await exists(docs, `${topic}.md`)) return { page: `${topic}.md` };
  throw unknown();
}

/** The text of `nbd help --list`: commands, plugins, filters and topic pages. */
export async function listTopics(
  docs: URL,
  commands: ReadonlyMap<string, HelpEntry>,
): Promise<string> {
  const lines: string[] = [];
  const section = (title: string, rows: [string, string][]) => {
    if (rows.length === 0) return;
    const width = Math.max(...rows.map(([name]) => name.length));
    lines.push(
      `${title}:`,
      ...rows.map(([name, text]) => `  ${name.padEnd(width)}  ${text}`.trimEnd()),
      "",
    );
  };
  section("Commands", [...commands].map(([name, entry]) => [name, entry.summary]));
  for (const [kind, title] of [["plugin", "Plugins"], ["filter", "Filters"]] as const) {
    const blocks = [...await paramBlocks(docs, kind)].sort(([a], [b]) => a.localeCompare(b));
    section(title, blocks.map(([name, page]) => [name, `(${page.replace(/\.md$/, "")})`]));
  }
  const topics: [string, string][] = [];
  for (const page of await pageNames(docs)) {
    if (page.startsWith("nbd")) continue;
    const text = await Deno.readTextFile(new URL(page, docs));
    const title = /^#\s+(.*)$/m.exec(text)?.[1] ?? "";
    topics.push([page.replace(/\.md$/, ""), plainText(parseInline(title))]);
  }
  section("Topics", topics);
  return lines.join("\n");
}

/** Columns to wrap to: the terminal's width, else $COLUMNS, else 80. */
function outputWidth(): number {
  if (Deno.stdout.isTerminal()) {
    try {
      return Deno.consoleSize().columns;
    } catch {
      // Not a console after all.
    }
  }
  const columns = Number(Deno.env.get("COLUMNS"));
  return Number.isInteger(columns) && columns > 0 ? columns : 80;
}

async function write(text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  try {
    for (let done = 0; done < bytes.length;) done += await Deno.stdout.write(bytes.subarray(done));
  } catch (error) {
    // A pager or `head` that has read enough closes the pipe: that is not an error.
    if (!(error instanceof Deno.errors.BrokenPipe)) throw error;
  }
}

/** The `help` command, given the registry whose commands it describes. */
export function helpCommand(commands: ReadonlyMap<string, HelpEntry>): Command {
  return {
    name: "help",
    summary: "show the manual page of a command, plugin, filter or topic",
    usage: USAGE,
    options: OPTIONS,
    async run(argv) {
      const { values, positionals } = parseOptions(argv, OPTIONS);
      if (values.help) {
        await write(USAGE);
        return 0;
      }
      if (values.list) {
        await write(await listTopics(DOCS_DIR, commands));
        return 0;
      }
      const source = await resolveTopic(positionals, DOCS_DIR, commands);
      if ("usage" in source) {
        await write(source.usage.endsWith("\n") ? source.usage : source.usage + "\n");
        return 0;
      }
      const markdown = await Deno.readTextFile(new URL(source.page, DOCS_DIR));
      const ansi = Deno.stdout.isTerminal() && !Deno.env.get("NO_COLOR");
      await write(renderTerminal(markdown, { width: outputWidth(), ansi }));
      return 0;
    },
  };
}
