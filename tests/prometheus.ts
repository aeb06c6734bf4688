/**
 * A strict reader of the Prometheus text exposition format (0.0.4) for
 * tests: it rejects anything a Prometheus server would reject and a few
 * things it merely frowns on (counters without `_total`, families split
 * apart, histograms whose buckets are not cumulative).
 *
 * @module
 */

/** One sample line. */
export interface Sample {
  /** Metric name as written (with `_bucket`, `_sum`, `_count` for histograms). */
  name: string;
  /** Labels. */
  labels: Record<string, string>;
  /** Value. */
  value: number;
}

/** A metric family: its TYPE, HELP and samples. */
export interface Family {
  /** counter, gauge, histogram, summary or untyped. */
  type: string;
  /** HELP text (unescaped). */
  help: string;
  /** Samples in order. */
  samples: Sample[];
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(["counter", "gauge", "histogram", "summary", "untyped"]);

function fail(lineNo: number, line: string, why: string): never {
  throw new SyntaxError(`metrics line ${lineNo}: ${why}: ${JSON.stringify(line)}`);
}

/** Parses a sample value; undefined when it is not a valid float. */
function parseValue(text: string): number | undefined {
  if (text === "NaN") return NaN;
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (!/^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)$/.test(text)) return undefined;
  return Number(text);
}

function familyOf(name: string, families: Map<string, Family>): string | undefined {
  if (families.has(name)) return name;
  for (const suffix of ["_bucket", "_sum", "_count"]) {
    if (name.endsWith(suffix)) {
      const base = name.slice(0, -suffix.length);
      const f = families.get(base);
      if (f && (f.type === "histogram" || f.type === "summary")) return base;
    }
  }
  return undefined;
}

/** Parses exposition text strictly; throws SyntaxError on any violation. */
export function parsePrometheus(text: string): Map<string, Family> {
  if (!text.endsWith("\n")) throw new SyntaxError("metrics text must end with a newline");
  const families = new Map<string, Family>();
  const seen = new Set<string>();
  const closed = new Set<string>();
  let current: string | undefined;
  const lines = text.slice(0, -1).split("\n");
  lines.forEach((line, i) => {
    const n = i + 1;
    if (line === "") fail(n, line, "empty line");
    if (line.startsWith("#")) {
      const m = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line);
      if (!m) return; // a plain comment
      const [, kind, name, rest] = m as unknown as [string, string, string, string];
      if (!NAME.test(name)) fail(n, line, "bad metric name");
      let family = families.get(name);
      if (!family) {
        if (closed.has(name)) fail(n, line, "family appears twice");
        family = { type: "untyped", help: "", samples: [] };
        families.set(name, family);
      }
      const f = family as Family & { typed?: boolean; helped?: boolean };
      if (f.samples.length) fail(n, line, `${kind} after samples`);
      if (kind === "TYPE") {
        if (f.typed) fail(n, line, "second TYPE");
        if (!TYPES.has(rest)) fail(n, line, "unknown type");
        f.type = rest;
        f.typed = true;
      } else {
        if (f.helped) fail(n, line, "second HELP");
        if (/\\[^\\n]/.test(rest.replace(/\\\\/g, ""))) fail(n, line, "bad escape in HELP");
        f.help = rest.replace(/\\(\\|n)/g, (_, c) => c === "n" ? "\n" : "\\");
        f.helped = true;
      }
      if (current !== undefined && current !== name) closed.add(current);
      current = name;
      return;
    }
    // name{labels} value [timestamp]
    const nameEnd = line.search(/[{ ]/);
    if (nameEnd <= 0) fail(n, line, "no value");
    const name = line.slice(0, nameEnd);
    if (!NAME.test(name)) fail(n, line, "bad metric name");
    let pos = nameEnd;
    const labels: Record<string, string> = {};
    if (line[pos] === "{") {
      pos++;
      while (line[pos] !== "}") {
        const eq = line.indexOf("=", pos);
        if (eq < 0) fail(n, line, "label without =");
        const label = line.slice(pos, eq);
        if (!LABEL_NAME.test(label)) fail(n, line, `bad label name ${label}`);
        if (label in labels) fail(n, line, `label ${label} twice`);
        if (line[eq + 1] !== '"') fail(n, line, "label value not quoted");
        let value = "";
        let j = eq + 2;
        for (;; j++) {
          if (j >= line.length) fail(n, line, "unterminated label value");
          const c = line[j]!;
          if (c === '"') break;
          if (c === "\\") {
            const e = line[++j];
            if (e === "\\") value += "\\";
            else if (e === '"') value += '"';
            else if (e === "n") value += "\n";
            else fail(n, line, "bad escape in label value");
          } else {
            value += c;
          }
        }
        labels[label] = value;
        pos = j + 1;
        if (line[pos] === ",") pos++;
        else if (line[pos] !== "}") fail(n, line, "expected , or }");
      }
      pos++;
    }
    if (line[pos] !== " ") fail(n, line, "expected a space before the value");
    const parts = line.slice(pos + 1).split(" ");
    if (parts.length > 2 || parts[0] === "") fail(n, line, "bad value field");
    const value = parseValue(parts[0]!);
    if (value === undefined) fail(n, line, "bad value");
    if (parts[1] !== undefined && !/^-?\d+$/.test(parts[1])) fail(n, line, "bad timestamp");
    const familyName = familyOf(name, families) ?? name;
    let family = families.get(familyName);
    if (!family) {
      if (closed.has(familyName)) fail(n, line, "family appears twice");
      family = { type: "untyped", help: "", samples: [] };
      families.set(familyName, family);
    }
    if (current !== undefined && current !== familyName) {
      closed.add(current);
      if (closed.has(familyName)) fail(n, line, "samples of a family are not together");
    }
    current = familyName;
    const key = name + JSON.stringify(Object.entries(labels).sort());
    if (seen.has(key)) fail(n, line, "duplicate series");
    seen.add(key);
    if (family.type === "histogram" && name === familyName) {
      fail(n, line, "histogram sample without _bucket/_sum/_count");
    }
    if (family.type === "histogram" && name.endsWith("_bucket") && !("le" in labels)) {
      fail(n, line, "bucket without le");
    }
    family.samples.push({ name, labels, value });
  });
  for (const [name, family] of families) checkFamily(name, family);
  return families;
}

function checkFamily(name: string, family: Family): void {
  if (family.type === "counter") {
    if (!name.endsWith("_total")) throw new SyntaxError(`counter ${name} does not end in _total`);
    for (const s of family.samples) {
      if (!(s.value >= 0)) throw new SyntaxError(`counter ${name} is negative or NaN`);
    }
  }
  if (family.type !== "histogram") return;
  const series = new Map<string, Sample[]>();
  for (const s of family.samples) {
    const { le: _le, ...rest } = s.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    series.set(key, [...(series.get(key) ?? []), s]);
  }
  for (const [key, samples] of series) {
    const buckets = samples.filter((s) => s.name === `${name}_bucket`);
    const count = samples.find((s) => s.name === `${name}_count`);
    const sum = samples.find((s) => s.name === `${name}_sum`);
    if (!count || !sum || !buckets.length) {
      throw new SyntaxError(`histogram ${name} ${key} lacks _bucket, _sum or _count`);
    }
    let le = -Infinity;
    let cumulative = 0;
    for (const b of buckets) {
      const bound = parseValue(b.labels.le!);
      if (bound === undefined || !(bound > le)) {
        throw new SyntaxError(`histogram ${name} ${key}: le not increasing`);
      }
      if (b.value < cumulative) throw new SyntaxError(`histogram ${name} ${key}: not cumulative`);
      le = bound;
      cumulative = b.value;
    }
    if (le !== Infinity) throw new SyntaxError(`histogram ${name} ${key}: no +Inf bucket`);
    if (cumulative !== count.value) {
      throw new SyntaxError(`histogram ${name} ${key}: +Inf bucket differs from _count`);
    }
  }
}

/** The value of the one sample of `name` whose labels include `labels`; throws unless exactly one. */
export function sampleValue(
  families: Map<string, Family>,
  name: string,
  labels: Record<string, string> = {},
): number {
  const family = families.get(familyOf(name, families) ?? name);
  const matches = (family?.samples ?? []).filter((s) =>
    s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)
  );
  if (matches.length !== 1) {
    throw new Error(
      `expected one sample ${name}${JSON.stringify(labels)}, found ${matches.length}`,
    );
  }
  return matches[0]!.value;
}
