/**
 * Reading the `log` filter's files (see filters/log.ts for the writer): one
 * line per event,
 *
 * ```
 * 2026-01-02T03:04:05.123456Z connection=1 Open export="" tls=0 readonly=0 size=1048576 ...
 * 2026-01-02T03:04:05.123501Z connection=1 Write id=1 offset=0 count=512 fua=0 elapsed=0.000012 return=0
 * 2026-01-02T03:04:05.124001Z connection=1 Close transactions=1
 * ```
 *
 * a UTC timestamp with up to microseconds, then `key=value` fields (strings
 * in double quotes with JSON escapes) around one bare word, the action. All
 * knowledge of the format lives in this module, so a change to the writer
 * is a change here only.
 *
 * @module
 */

/** One parsed line. */
export interface LogLine {
  /** Wall-clock time in milliseconds since the epoch (fractional: microseconds kept). */
  time: number;
  /** The action word: Open, Read, Write, Zero, Trim, Flush, Extents, Cache, Close. */
  action: string;
  /** The `key=value` fields, strings unquoted. */
  fields: Record<string, string>;
}

const TIMESTAMP = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$/;

/** Parses a timestamp such as 2026-01-02T03:04:05.123456Z; NaN when it is not one. */
export function parseTimestamp(text: string): number {
  const m = TIMESTAMP.exec(text);
  if (!m) return NaN;
  const whole = Date.parse(`${m[1]}Z`);
  const fraction = m[2] ? Number(`0.${m[2]}`) * 1000 : 0;
  return whole + fraction;
}

/**
 * Parses one line; undefined when it is not a log filter line (blank, or
 * other text in a file the filter appended to).
 *
 * @example
 * ```ts
 * parseLogLine('2026-01-02T03:04:05.000001Z connection=1 Trim id=4 offset=0 count=4096 return=0');
 * // { time: 1767323045000.001, action: "Trim", fields: { connection: "1", id: "4", ... } }
 * ```
 */
export function parseLogLine(line: string): LogLine | undefined {
  const space = line.indexOf(" ");
  if (space < 0) return undefined;
  const time = parseTimestamp(line.slice(0, space));
  if (Number.isNaN(time)) return undefined;
  const fields: Record<string, string> = {};
  let action: string | undefined;
  let i = space + 1;
  const n = line.length;
  while (i < n) {
    while (i < n && line[i] === " ") i++;
    if (i >= n) break;
    let end = i;
    while (end < n && line[end] !== " " && line[end] !== "=") end++;
    if (line[end] !== "=") {
      // A bare word: the action (only one is allowed).
      if (action !== undefined) return undefined;
      action = line.slice(i, end);
      i = end;
      continue;
    }
    const key = line.slice(i, end);
    i = end + 1;
    if (line[i] === '"') {
      let close = i + 1;
      while (close < n && line[close] !== '"') close += line[close] === "\\" ? 2 : 1;
      if (close >= n) return undefined;
      try {
        fields[key] = JSON.parse(line.slice(i, close + 1));
      } catch {
        return undefined;
      }
      i = close + 1;
    } else {
      let stop = i;
      while (stop < n && line[stop] !== " ") stop++;
      fields[key] = line.slice(i, stop);
      i = stop;
    }
  }
  if (action === undefined || fields.connection === undefined) return undefined;
  return { time, action, fields };
}

/** Splits a stream of text into lines (without their line ends). */
export async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    rest += chunk;
    let start = 0;
    let nl: number;
    while ((nl = rest.indexOf("\n", start)) >= 0) {
      yield rest.slice(start, nl).replace(/\r$/, "");
      start = nl + 1;
    }
    rest = rest.slice(start);
  }
  if (rest.length) yield rest;
}
