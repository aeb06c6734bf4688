/**
 * The `data` plugin: a small disk whose contents are written on the command
 * line, then served like the memory plugin (writable, sparse). Three ways to
 * give the contents:
 *
 * - `data='...'`: an expression of bytes and moves, nbdkit's data format:
 *   `0 1 0x55 0377` bytes (decimal, hex, octal); `"text\n"` strings;
 *   `@N` move to offset N, `@+N` / `@-N` move relative, `@^N` align;
 *   `( ... )` groups; `X*N` repeats X N times; `le16:N` `be32:N` `le64:N`
 *   ... little/big-endian words; `<FILE` inserts a file; `#` comments.
 * - `raw=STRING`: the bytes of the string.
 * - `base64=TEXT`: base64-encoded bytes.
 *
 * `size=` sets the disk size (default: the end of the last byte written).
 *
 * ```
 * nbd serve data data='1 2 3 @1M 4' size=2M
 * nbd serve data data='"Hello" @^512 (0x55 0xaa)*256'
 * ```
 *
 * @module
 */

import { completeBackend, type Plugin } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { storeBackend } from "./memory.ts";
import { SparseStore } from "./sparse_store.ts";

type Node =
  | { kind: "bytes"; bytes: Uint8Array }
  | { kind: "seek"; mode: "abs" | "rel" | "align"; value: number }
  | { kind: "group"; nodes: Node[] }
  | { kind: "repeat"; node: Node; count: number };

const encoder = new TextEncoder();
/** Repeats are materialised up to this size; larger ones are written piece by piece. */
const MAX_MATERIALISED = 64 * 1024 * 1024;

function parseInteger(text: string, what: string): number {
  let value: number;
  if (/^0[xX][0-9a-fA-F]+$/.test(text)) value = parseInt(text.slice(2), 16);
  else if (/^0[0-7]+$/.test(text)) value = parseInt(text.slice(1), 8);
  else if (/^\d+$/.test(text)) value = Number(text);
  else throw new UsageError(`data: cannot parse ${what} "${text}"`);
  if (!Number.isSafeInteger(value)) throw new UsageError(`data: ${what} "${text}" is too large`);
  return value;
}

/** Integer with an optional size suffix (k, M, G...): used after @ and *. */
function parseCount(text: string, what: string): number {
  const match = /^(0[xX][0-9a-fA-F]+|\d+)([kKmMgGtT]?)$/.exec(text);
  if (!match) throw new UsageError(`data: cannot parse ${what} "${text}"`);
  const scale = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[match[2]!.toLowerCase()]!;
  const value = parseInteger(match[1]!, what) * scale;
  if (!Number.isSafeInteger(value)) throw new UsageError(`data: ${what} "${text}" is too large`);
  return value;
}

function encodeWord(spec: string, value: string): Uint8Array {
  const match = /^(le|be)(16|32|64)$/.exec(spec);
  if (!match) {
    throw new UsageError(`data: unknown word type "${spec}:" (use le16: be32: le64: ...)`);
  }
  const bits = Number(match[2]);
  let n: bigint;
  try {
    n = BigInt(value.startsWith("-") ? value : value.replace(/^0(?=[0-7])/, "0o"));
  } catch {
    throw new UsageError(`data: cannot parse the number in "${spec}:${value}"`);
  }
  if (n < 0n) n += 1n << BigInt(bits);
  if (n < 0n || n >= 1n << BigInt(bits)) {
    throw new UsageError(`data: ${value} does not fit in ${bits} bits`);
  }
  const out = new Uint8Array(bits / 8);
  for (let i = 0; i < out.length; i++) {
    const byte = Number((n >> BigInt(8 * i)) & 0xffn);
    out[match[1] === "le" ? i : out.length - 1 - i] = byte;
  }
  return out;
}

function parseString(text: string, start: number): [Uint8Array, number] {
  const bytes: number[] = [];
  let i = start + 1;
  while (true) {
    if (i >= text.length) throw new UsageError("data: unterminated string");
    const c = text[i]!;
    if (c === '"') return [new Uint8Array(bytes), i + 1];
    if (c !== "\\") {
      bytes.push(...encoder.encode(c));
      i++;
      continue;
    }
    const e = text[i + 1];
    i += 2;
    switch (e) {
      case "n":
        bytes.push(10);
        break;
      case "t":
        bytes.push(9);
        break;
      case "r":
        bytes.push(13);
        break;
      case "0":
        bytes.push(0);
        break;
      case "\\":
      case '"':
        bytes.push(e.charCodeAt(0));
        break;
      case "x": {
        const hex = text.slice(i, i + 2);
        if (!/^[0-9a-fA-F]{2}$/.test(hex)) throw new UsageError("data: \\x needs two hex digits");
        bytes.push(parseInt(hex, 16));
        i += 2;
        break;
      }
      default:
        throw new UsageError(`data: unknown escape \\${e ?? ""} in a string`);
    }
  }
}

/** Parses a data expression into nodes. */
export function parseDataExpression(text: string): Node[] {
  let pos = 0;
  const parseSequence = (closing: boolean): Node[] => {
    const nodes: Node[] = [];
    while (true) {
      while (pos < text.length && /\s/.test(text[pos]!)) pos++;
      if (pos >= text.length) {
        if (closing) throw new UsageError("data: missing )");
        return nodes;
      }
      const c = text[pos]!;
      if (c === "#") {
        while (pos < text.length && text[pos] !== "\n") pos++;
        continue;
      }
      if (c === ")") {
        if (!closing) throw new UsageError("data: unexpected )");
        pos++;
        return nodes;
      }
      if (c === "(") {
        pos++;
        nodes.push({ kind: "group", nodes: parseSequence(true) });
        continue;
      }
      if (c === '"') {
        const [bytes, next] = parseString(text, pos);
        nodes.push({ kind: "bytes", bytes });
        pos = next;
        continue;
      }
      const word = /^\*?[^\s()"#*]+/.exec(text.slice(pos))?.[0];
      if (!word) throw new UsageError(`data: unexpected "${c}"`);
      pos += word.length;
      if (word.startsWith("*")) {
        const previous = nodes.pop();
        if (!previous) throw new UsageError("data: * must follow something to repeat");
        nodes.push({
          kind: "repeat",
          node: previous,
          count: parseCount(word.slice(1), "repeat count"),
        });
      } else if (word.startsWith("@")) {
        const rest = word.slice(1);
        if (rest.startsWith("+")) {
          nodes.push({ kind: "seek", mode: "rel", value: parseCount(rest.slice(1), "offset") });
        } else if (rest.startsWith("-")) {
          nodes.push({ kind: "seek", mode: "rel", value: -parseCount(rest.slice(1), "offset") });
        } else if (rest.startsWith("^")) {
          const align = parseCount(rest.slice(1), "alignment");
          if (align === 0) throw new UsageError("data: @^ alignment must be positive");
          nodes.push({ kind: "seek", mode: "align", value: align });
        } else nodes.push({ kind: "seek", mode: "abs", value: parseCount(rest, "offset") });
      } else if (word.startsWith("<")) {
        const file = word.slice(1);
        if (!file) throw new UsageError("data: < needs a file name");
        try {
          nodes.push({ kind: "bytes", bytes: Deno.readFileSync(file) });
        } catch (error) {
          throw new UsageError(`data: cannot read ${file}: ${(error as Error).message}`);
        }
      } else if (word.includes(":")) {
        const [spec, value] = [word.slice(0, word.indexOf(":")), word.slice(word.indexOf(":") + 1)];
        nodes.push({ kind: "bytes", bytes: encodeWord(spec, value) });
      } else {
        const value = parseInteger(word, "byte");
        if (value > 255) throw new UsageError(`data: byte ${word} is larger than 255`);
        nodes.push({ kind: "bytes", bytes: new Uint8Array([value]) });
      }
    }
  };
  return parseSequence(false);
}

function isPure(node: Node): boolean {
  switch (node.kind) {
    case "bytes":
      return true;
    case "seek":
      return false;
    case "group":
      return node.nodes.every(isPure);
    case "repeat":
      return isPure(node.node);
  }
}

function pureLength(node: Node): number {
  switch (node.kind) {
    case "bytes":
      return node.bytes.length;
    case "seek":
      return 0;
    case "group":
      return node.nodes.reduce((n, c) => n + pureLength(c), 0);
    case "repeat":
      return pureLength(node.node) * node.count;
  }
}

function materialise(node: Node, out: Uint8Array, at: number): number {
  switch (node.kind) {
    case "bytes":
      out.set(node.bytes, at);
      return at + node.bytes.length;
    case "seek":
      return at;
    case "group":
      for (const child of node.nodes) at = materialise(child, out, at);
      return at;
    case "repeat": {
      const start = at;
      const one = materialise(node.node, out, at) - start;
      if (node.count === 0) return start;
      // Double the copied region until the repeat is filled.
      let filled = one;
      const total = one * node.count;
      while (filled < total) {
        const n = Math.min(filled, total - filled);
        out.copyWithin(start + filled, start, start + n);
        filled += n;
      }
      return start + total;
    }
  }
}

/** Writes the expression into a store growing as needed; returns the highest offset written. */
export function evaluateData(
  nodes: Node[],
  write: (bytes: Uint8Array, offset: number) => void,
): number {
  let offset = 0;
  let end = 0;
  const emit = (bytes: Uint8Array) => {
    if (bytes.length === 0) return;
    write(bytes, offset);
    offset += bytes.length;
    end = Math.max(end, offset);
  };
  const run = (node: Node) => {
    if (node.kind === "seek") {
      if (node.mode === "abs") offset = node.value;
      else if (node.mode === "rel") offset += node.value;
      else offset = Math.ceil(offset / node.value) * node.value;
      if (offset < 0) throw new UsageError("data: @- moved before offset 0");
      return;
    }
    if (isPure(node)) {
      const length = pureLength(node);
      if (!Number.isSafeInteger(length)) throw new UsageError("data: the expression is too large");
      if (length <= MAX_MATERIALISED) {
        const bytes = new Uint8Array(length);
        materialise(node, bytes, 0);
        emit(bytes);
        return;
      }
    }
    if (node.kind === "group") node.nodes.forEach(run);
    else if (node.kind === "repeat") { for (let i = 0; i < node.count; i++) run(node.node); }
    else if (node.kind === "bytes") emit(node.bytes);
  };
  nodes.forEach(run);
  return end;
}

/** The data plugin. */
export const dataPlugin: Plugin = {
  name: "data",
  summary: "small writable disk with contents given on the command line",
  description: `Data expressions (data=):
  0 1 0x55 0377      bytes (decimal, hex, octal)
  "text\\n"           a string (escapes \\n \\t \\r \\0 \\\\ \\" \\xHH)
  @N @+N @-N @^N     move to offset N, forward, back, align up to N
  ( ... )*N          repeat a group N times; X*N repeats one item
  le16:N be32:N ...  little/big-endian 16/32/64-bit words
  <FILE              the contents of FILE
  # comment          to the end of the line
Examples:
  nbd serve data data='1 2 3 @1M 4' size=2M
  nbd serve data raw='hello world'`,
  params: [
    {
      name: "data",
      value: "EXPRESSION",
      type: "string",
      description: "contents as a data expression",
    },
    {
      name: "raw",
      value: "STRING",
      type: "string",
      description: "contents as the bytes of STRING",
    },
    { name: "base64", value: "TEXT", type: "string", description: "contents as base64" },
    {
      name: "size",
      value: "SIZE",
      type: "size",
      default: "the end of the data",
      description: "disk size",
    },
    {
      name: "allocator",
      value: "ALLOCATOR",
      type: "enum",
      choices: ["sparse"],
      default: "sparse",
      description: "allocation strategy",
    },
  ],
  magicParam: "data",
  create(params) {
    const data = params.take("data");
    const raw = params.take("raw");
    const base64 = params.take("base64");
    const size = params.takeSize("size");
    const allocator = params.take("allocator");
    if (allocator !== undefined && allocator !== "sparse") {
      throw new UsageError(`data: allocator=${allocator} is not supported (only sparse)`);
    }
    const given = [data, raw, base64].filter((x) => x !== undefined).length;
    if (given !== 1) throw new UsageError("data: give exactly one of data=, raw= or base64=");
    const store = new SparseStore(2 ** 53 - 2 ** 16);
    let end: number;
    if (data !== undefined) {
      end = evaluateData(parseDataExpression(data), (bytes, offset) => store.write(bytes, offset));
    } else {
      let bytes: Uint8Array;
      if (raw !== undefined) bytes = encoder.encode(raw);
      else {
        try {
          bytes = Uint8Array.from(atob(base64!.replace(/\s+/g, "")), (c) => c.charCodeAt(0));
        } catch {
          throw new UsageError("data: base64= is not valid base64");
        }
      }
      store.write(bytes, 0);
      end = bytes.length;
    }
    store.resize(size ?? end);
    return Promise.resolve({ open: () => Promise.resolve(completeBackend(storeBackend(store))) });
  },
};
