/**
 * Plugin and filter parameters (`key=value` on the command line): their
 * declarations, the one source of help text and docs, and the bag of
 * values each plugin or filter takes its own from.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";
import { parseBoolean, parseDuration, parseSize } from "../util/parse.ts";

/** The kind of value a parameter takes (how it is parsed, and completed). */
export type ParamType =
  | "string"
  | "size"
  | "boolean"
  | "integer"
  | "duration"
  | "enum"
  | "path";

/**
 * Declaration of one parameter: the one source of its help line, its docs
 * row, its completion, and the check that required ones are given.
 */
export interface ParamSpec {
  /** Parameter name (`name=value`). */
  name: string;
  /** Placeholder for the value in help, e.g. "SIZE". */
  value: string;
  /** How the value is parsed. */
  type: ParamType;
  /** The accepted values, for `type: "enum"`. */
  choices?: readonly string[];
  /** The value used when the parameter is not given, as users would write it. */
  default?: string;
  /** One-line description. */
  description: string;
  /** Must be given (checked by `checkRequired` before the plugin or filter is created). */
  required?: boolean;
  /** May be given more than once. */
  repeatable?: boolean;
  /** Stands for any key not declared otherwise (`KEY=VALUE`); never completed or checked. */
  anyKey?: boolean;
}

/**
 * The `key=value` parameters of a plugin and its filters. Each plugin or
 * filter takes the keys it owns; whatever is left at the end is an error.
 */
export class Params {
  #values = new Map<string, string[]>();

  /**
   * Builds parameters from `key=value` words; a bare word sets `magic` if
   * given (every bare word, when `magicRepeats`: `partitioning a.img b.img`).
   */
  static parse(words: string[], magic?: string, magicRepeats = false): Params {
    const params = new Params();
    for (const word of words) {
      const eq = word.indexOf("=");
      if (eq > 0 && /^[A-Za-z_][A-Za-z0-9_.-]*$/.test(word.slice(0, eq))) {
        params.add(word.slice(0, eq), word.slice(eq + 1));
      } else if (magic !== undefined && (magicRepeats || !params.has(magic))) {
        params.add(magic, word);
      } else {
        throw new UsageError(`unexpected argument "${word}" (expected key=value)`);
      }
    }
    return params;
  }

  /** Adds a value for `key`. */
  add(key: string, value: string): void {
    const list = this.#values.get(key);
    if (list) list.push(value);
    else this.#values.set(key, [value]);
  }

  /** Whether `key` was given. */
  has(key: string): boolean {
    return this.#values.has(key);
  }

  /** The value of a single-valued key without taking it (for a filter that needs to know the plugin's). */
  peek(key: string): string | undefined {
    const list = this.#values.get(key);
    return list?.[list.length - 1];
  }

  /** Keys not yet taken. */
  keys(): string[] {
    return [...this.#values.keys()];
  }

  /** Takes every value of a repeatable key. */
  takeAll(key: string): string[] {
    const list = this.#values.get(key) ?? [];
    this.#values.delete(key);
    return list;
  }

  /** Takes a single-valued key; giving it twice is an error. */
  take(key: string): string | undefined {
    const list = this.takeAll(key);
    if (list.length > 1) throw new UsageError(`parameter ${key} was given more than once`);
    return list[0];
  }

  /** Takes a size-valued key. */
  takeSize(key: string): number | undefined {
    const value = this.take(key);
    return value === undefined ? undefined : parseSize(value, key);
  }

  /** Takes a duration-valued key (seconds, or `NNms`); returns milliseconds. */
  takeDuration(key: string): number | undefined {
    const value = this.take(key);
    return value === undefined ? undefined : parseDuration(value, key);
  }

  /** Takes a boolean key. */
  takeBoolean(key: string): boolean | undefined {
    const value = this.take(key);
    return value === undefined ? undefined : parseBoolean(value, key);
  }

  /** Takes an integer key within [min, max]. */
  takeInteger(key: string, min: number, max: number): number | undefined {
    const value = this.take(key);
    if (value === undefined) return undefined;
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) {
      throw new UsageError(`${key}: expected an integer from ${min} to ${max}, got "${value}"`);
    }
    return n;
  }

  /** Throws a usage error naming every key nobody took. */
  assertEmpty(): void {
    const left = this.keys();
    if (left.length > 0) {
      throw new UsageError(
        `unknown parameter${left.length > 1 ? "s" : ""}: ${left.map((k) => `${k}=`).join(", ")}`,
      );
    }
  }
}

/**
 * Throws the one usage error for a missing parameter when a parameter
 * declared required was not given. Called wherever a plugin or filter is
 * built from parameters, before its `create`, so `create` may rely on them.
 */
export function checkRequired(owner: string, specs: readonly ParamSpec[], params: Params): void {
  for (const spec of specs) {
    if (spec.required && !spec.anyKey && !params.has(spec.name)) {
      throw new UsageError(`${owner}: missing required parameter ${spec.name}=`);
    }
  }
}

/** The parameter as written in help: `name=VALUE`, `[name=]VALUE` for the magic one. */
export function paramKey(spec: ParamSpec, magic?: string): string {
  return spec.name === magic ? `[${spec.name}=]${spec.value}` : `${spec.name}=${spec.value}`;
}

/**
 * The notes shown after a parameter's description: its choices, default,
 * and whether it is required or repeatable, e.g. "(required)",
 * "(one of: a, b; default: a)".
 */
function paramNotes(spec: ParamSpec): string {
  const notes: string[] = [];
  if (spec.choices?.length) notes.push(`one of: ${spec.choices.join(", ")}`);
  if (spec.default !== undefined) notes.push(`default: ${spec.default}`);
  if (spec.required) notes.push("required");
  if (spec.repeatable) notes.push("repeatable");
  return notes.length ? `(${notes.join("; ")})` : "";
}

/** The description with its notes; a closing parenthesis takes them in: "(1 to 100; default: 95)". */
function describe(spec: ParamSpec): string {
  const notes = paramNotes(spec);
  if (!notes) return spec.description;
  if (spec.description.endsWith(")")) return `${spec.description.slice(0, -1)}; ${notes.slice(1)}`;
  return `${spec.description} ${notes}`;
}

/** Formats parameter specs as help lines. */
export function formatParams(params: readonly ParamSpec[], magic?: string): string {
  if (params.length === 0) return "  (none)";
  const rows = params.map((p) => [paramKey(p, magic), describe(p)] as const);
  const width = Math.max(0, ...rows.map(([k]) => k.length));
  return rows.map(([k, d]) => `  ${k.padEnd(width)}  ${d}`).join("\n");
}

/** Escapes text for a cell of a markdown pipe table. */
function tableCell(text: string): string {
  return text.replaceAll("|", "\\|");
}

/**
 * The markdown body of a `<!-- params:... -->` docs block: a table with
 * one row per parameter, the same words as `formatParams`.
 */
export function renderParamTable(specs: readonly ParamSpec[], magic?: string): string {
  if (specs.length === 0) return "No parameters.";
  return [
    "| parameter | description |",
    "| --- | --- |",
    ...specs.map((p) => `| \`${tableCell(paramKey(p, magic))}\` | ${tableCell(describe(p))} |`),
  ].join("\n");
}
