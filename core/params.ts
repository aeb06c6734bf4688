/**
 * Plugin and filter parameters (`key=value` on the command line): their
 * declarations, the one source of help text and docs, and the bag of
 * values each plugin or filter takes its own from.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";
import { parseBoolean, parseDuration, parseSize } from "../util/parse.ts";

/** Description of one parameter, for help text and validation. */
export interface ParamSpec {
  /** Parameter name (`name=value`). */
  name: string;
  /** Placeholder for the value in help, e.g. "SIZE". */
  value: string;
  /** One-line description. */
  description: string;
  /** Must be given. */
  required?: boolean;
  /** May be given more than once. */
  repeatable?: boolean;
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

  /** Takes a required key. */
  require(key: string, owner: string): string {
    const value = this.take(key);
    if (value === undefined) throw new UsageError(`${owner}: missing required parameter ${key}=`);
    return value;
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

/** Formats parameter specs as help lines. */
export function formatParams(params: readonly ParamSpec[], magic?: string): string {
  const rows = params.map((p) => {
    const key = p.name === magic ? `[${p.name}=]${p.value}` : `${p.name}=${p.value}`;
    const notes = [p.required ? "required" : "", p.repeatable ? "repeatable" : ""].filter(Boolean)
      .join(", ");
    return [key, p.description + (notes ? ` (${notes})` : "")] as const;
  });
  const width = Math.max(0, ...rows.map(([k]) => k.length));
  return rows.map(([k, d]) => `  ${k.padEnd(width)}  ${d}`).join("\n");
}
