/**
 * The shape of a subcommand and helpers shared by the command modules:
 * argument parsing with one-line errors, and the version string.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";

/** A subcommand of `nbd`. */
export interface Command {
  /** Name on the command line. */
  name: string;
  /** One-line summary for `nbd --help`. */
  summary: string;
  /** Full usage text for `nbd NAME --help` (its option lists come from `options`). */
  usage: string;
  /** The command's options: parsing, help, docs and completion all read them. */
  options: OptionSpecs;
  /** Runs the command; resolves to the exit status. Never calls Deno.exit. */
  run(argv: string[]): Promise<number>;
}

/**
 * Declaration of one option: how `parseOptions` parses it (as node:util's
 * parseArgs describes options) and how help, docs and completion show it.
 */
export interface OptionSpec {
  /** A string takes a value; a boolean does not. */
  type: "string" | "boolean";
  /** One-letter alias (`-C`). */
  short?: string;
  /** Repeatable: the values are collected in an array. */
  multiple?: boolean;
  /** Placeholder for the value in help, e.g. "N" (string options, and optional values). */
  value?: string;
  /**
   * The value may be left out; the command reads it before parsing. Either
   * only as `--map=CONTEXT` ("joined", shown `--map[=CONTEXT]`), or also
   * as the next word when that looks like one ("separate", `--view [ADDR]`).
   */
  optionalValue?: "joined" | "separate";
  /** The value is a file or directory name (completed as one). */
  path?: boolean;
  /** Another name of the option `aliasOf`, listed on its row. */
  aliasOf?: string;
  /** Not shown in help or docs (used between nbd's own processes). */
  hidden?: boolean;
  /** One-line help. */
  help?: string;
}

/** The options of a command, by long name. */
export type OptionSpecs = Record<string, OptionSpec>;

type OptionValue<O extends OptionSpec> = O["type"] extends "string"
  ? (O["multiple"] extends true ? string[] : string)
  : (O["multiple"] extends true ? boolean[] : boolean);

/** What `parseOptions` found: a value for each option given, and the positionals. */
export interface ParsedOptions<T extends OptionSpecs> {
  /** Values of the options that were given (absent ones are undefined). */
  values: { [K in keyof T]?: OptionValue<T[K]> };
  /** The other arguments, in order. */
  positionals: string[];
}

/**
 * Parses `argv` like node:util's parseArgs in strict mode (`--name value`,
 * `--name=value`, `-n value`, `-nvalue`, grouped short booleans `-rv`,
 * `--` ending the options), without loading the Node compatibility layer,
 * which would cost every command several milliseconds at start-up. Errors
 * become `UsageError`s with one-line messages.
 */
export function parseOptions<T extends OptionSpecs>(
  argv: string[],
  options: T,
  allowPositionals = true,
): ParsedOptions<T> {
  const values: Record<string, unknown> = {};
  const positionals: string[] = [];
  const byShort = new Map<string, string>();
  for (const [name, spec] of Object.entries(options)) {
    if (spec.short) byShort.set(spec.short, name);
  }
  const label = (name: string) => {
    const short = options[name]!.short;
    return short ? `-${short}, --${name}` : `--${name}`;
  };
  const store = (name: string, value: string | boolean) => {
    if (options[name]!.multiple) ((values[name] ??= []) as unknown[]).push(value);
    else values[name] = value;
  };
  const positional = (arg: string) => {
    if (!allowPositionals) {
      throw new UsageError(
        `Unexpected argument '${arg}'. This command does not take positional arguments`,
      );
    }
    positionals.push(arg);
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") {
      for (const rest of argv.slice(i + 1)) positional(rest);
      break;
    }
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
      const spec = Object.hasOwn(options, name) ? options[name] : undefined;
      if (!spec) throw new UsageError(`Unknown option '--${name}'`);
      if (spec.type === "boolean") {
        if (eq !== -1) throw new UsageError(`Option '${label(name)}' does not take an argument`);
        store(name, true);
      } else if (eq !== -1) {
        store(name, arg.slice(eq + 1));
      } else {
        const value = argv[i + 1];
        if (value === undefined) {
          throw new UsageError(`Option '${label(name)} <value>' argument missing`);
        }
        store(name, value);
        i++;
      }
      continue;
    }
    if (arg.startsWith("-") && arg.length > 1) {
      // Short options, possibly grouped; a string option takes the rest or the next argument.
      for (let j = 1; j < arg.length; j++) {
        const letter = arg[j]!;
        const name = byShort.get(letter);
        if (name === undefined) throw new UsageError(`Unknown option '-${letter}'`);
        if (options[name]!.type === "boolean") {
          store(name, true);
          continue;
        }
        let value: string | undefined = arg.slice(j + 1);
        if (value === "") {
          value = argv[i + 1];
          if (value === undefined) {
            throw new UsageError(`Option '${label(name)} <value>' argument missing`);
          }
          i++;
        }
        store(name, value);
        break;
      }
      continue;
    }
    positional(arg);
  }
  return { values, positionals } as ParsedOptions<T>;
}

/** The option as written in help: `-p, --port N`, `    --map[=CONTEXT]`, with its aliases. */
export function optionKey(name: string, options: OptionSpecs): string {
  const spec = options[name]!;
  const value = spec.value ?? (spec.type === "string" ? "VALUE" : "");
  let long = `--${name}`;
  for (const [alias, other] of Object.entries(options)) {
    if (other.aliasOf === name) long += `, --${alias}`;
  }
  if (spec.optionalValue === "joined") long += `[=${value}]`;
  else if (spec.optionalValue === "separate") long += ` [${value}]`;
  else if (spec.type === "string") long += ` ${value}`;
  return spec.short ? `-${spec.short}, ${long}` : long;
}

function visibleOptions(options: OptionSpecs): string[] {
  return Object.keys(options).filter((name) => !options[name]!.hidden && !options[name]!.aliasOf);
}

/**
 * The options as help lines, aligned, each description wrapped to the
 * terminal width: the `Options:` part of `nbd COMMAND --help`.
 */
export function formatOptions(options: OptionSpecs, width = 100): string {
  const rows = visibleOptions(options).map((name) => {
    const key = optionKey(name, options);
    return [options[name]!.short ? `  ${key}` : `      ${key}`, options[name]!.help ?? ""] as const;
  });
  const column = Math.min(28, Math.max(0, ...rows.map(([k]) => k.length)) + 2);
  const lines: string[] = [];
  for (const [key, help] of rows) {
    const words = help.split(" ");
    let line = key.padEnd(column);
    if (key.length + 2 > column) {
      lines.push(key);
      line = " ".repeat(column);
    }
    let start = true;
    for (const word of words) {
      if (!start && line.length + 1 + word.length > width) {
        lines.push(line);
        line = " ".repeat(column) + word;
      } else {
        line += (start ? "" : " ") + word;
      }
      start = false;
    }
    lines.push(line.trimEnd());
  }
  return lines.join("\n");
}

/** The markdown body of an `<!-- options:COMMAND -->` docs block. */
export function renderOptionTable(options: OptionSpecs): string {
  return [
    "| option | description |",
    "| --- | --- |",
    ...visibleOptions(options).map((name) =>
      `| \`${optionKey(name, options).replaceAll("|", "\\|")}\` | ${
        (options[name]!.help ?? "").replaceAll("|", "\\|")
      } |`
    ),
  ].join("\n");
}

/** Prints an error line to stderr in the `nbd: message` form. */
export function printError(message: string): void {
  console.error(`nbd: ${message}`);
}
