/**
 * Plugin and filter parameters (`key=value` on the command line), sizes
 * with binary suffixes, and the usage error they raise.
 *
 * @module
 */

/** A bad command line: reported as `nbd: message` with exit status 2. */
export class UsageError extends Error {
  /** Creates a usage error. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

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

const SIZE_SUFFIXES: Record<string, number> = {
  "": 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * Parses a size such as `1024`, `512K`, `64M`, `1G`, `2T` (binary
 * multiples, optional `B`/`iB`). Throws `UsageError` naming `what`.
 *
 * @example
 * ```ts
 * parseSize("64M"); // 67108864
 * ```
 */
export function parseSize(text: string, what = "size"): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?\s*$/.exec(text);
  if (!match) {
    throw new UsageError(`${what}: cannot parse "${text}" as a size (e.g. 1024, 512K, 64M, 1G)`);
  }
  const value = Number(match[1]) * SIZE_SUFFIXES[match[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new UsageError(`${what}: "${text}" is not a whole number of bytes below 2^53`);
  }
  return value;
}

/** Parses a boolean parameter (true/false, on/off, yes/no, 1/0). */
export function parseBoolean(text: string, what: string): boolean {
  const v = text.toLowerCase();
  if (["1", "true", "yes", "on"].includes(v)) return true;
  if (["0", "false", "no", "off"].includes(v)) return false;
  throw new UsageError(`${what}: expected true or false, got "${text}"`);
}

/**
 * Parses a duration as nbdkit does: a bare number is seconds, `NNms` is
 * milliseconds (`NNs` and fractions are accepted too). Returns milliseconds.
 *
 * @example
 * ```ts
 * parseDuration("100ms", "rdelay"); // 100
 * parseDuration("2", "retry-delay"); // 2000
 * ```
 */
export function parseDuration(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(text);
  if (!match) {
    throw new UsageError(`${what}: cannot parse "${text}" as a duration (e.g. 2, 0.5s, 100ms)`);
  }
  const value = Number(match[1]) * (match[2] === "ms" ? 1 : 1000);
  if (!Number.isFinite(value) || value > 2 ** 31) {
    throw new UsageError(`${what}: duration "${text}" is too long`);
  }
  return value;
}

/** Formats a byte count the way people read it: 1048576 → "1M". */
export function formatSize(bytes: number): string {
  for (
    const [suffix, unit] of [["E", 2 ** 60], ["P", 2 ** 50], ["T", 2 ** 40], ["G", 2 ** 30], [
      "M",
      2 ** 20,
    ], [
      "K",
      2 ** 10,
    ]] as const
  ) {
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return `${bytes}`;
}

/**
 * The `key=value` parameters of a plugin and its filters. Each plugin or
 * filter takes the keys it owns; whatever is left at the end is an error.
 */
export class Params {
  #values = new Map<string, string[]>();

  /** Builds parameters from `key=value` words; a bare word sets `magic` if given. */
  static parse(words: string[], magic?: string): Params {
    const params = new Params();
    for (const word of words) {
      const eq = word.indexOf("=");
      if (eq > 0 && /^[A-Za-z_][A-Za-z0-9_.-]*$/.test(word.slice(0, eq))) {
        params.add(word.slice(0, eq), word.slice(eq + 1));
      } else if (magic !== undefined && !params.has(magic)) {
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
