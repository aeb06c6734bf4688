/**
 * The fuzzer's case generators and its oracle. Each case is the exact bytes
 * to send plus the outcome the protocol prescribes for them, worked out here
 * from the specification's rules (protocol.md §3–§10), not from the
 * server's code: the reply type or error number (or the set of them the
 * spec leaves open), a clean close, or — for inputs cut short on purpose —
 * nothing but the server surviving.
 *
 * @module
 */

import * as C from "../protocol/constants.ts";

const MiB = 1024 * 1024;
const U64_MAX = (1n << 64n) - 1n;
/** The spec's longest string (names, queries). */
const MAX_STRING = 4096;
/** Option data the server reads; above it the data is skipped and refused (ERR_TOO_BIG). */
export const OPTION_READ_LIMIT = MiB;
/** Option lengths above this are treated as an attack: the connection is dropped. */
export const OPTION_HARD_LIMIT = 64 * MiB;

/** A small, fast, seedable random number generator (xorshift128+ folded to 32 bits). */
export class Rng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  /** Seeds the generator; equal seeds give equal sequences. */
  constructor(seed: number) {
    this.#a = (seed ^ 0x9e3779b9) >>> 0 || 1;
    this.#b = Math.imul(seed, 0x85ebca6b) >>> 0 || 2;
    this.#c = Math.imul(seed ^ 0x5bd1e995, 0xc2b2ae35) >>> 0 || 3;
    this.#d = 0x27d4eb2f;
    for (let i = 0; i < 16; i++) this.next();
  }

  /** A uniform 32-bit unsigned integer. */
  next(): number {
    // xoshiro128** step.
    const result = Math.imul(rotl(Math.imul(this.#b, 5), 7), 9) >>> 0;
    const t = this.#b << 9;
    this.#c ^= this.#a;
    this.#d ^= this.#b;
    this.#b ^= this.#c;
    this.#a ^= this.#d;
    this.#c ^= t;
    this.#d = rotl(this.#d, 11);
    return result;
  }

  /** A uniform integer in [0, n) for n ≤ 2^32. */
  int(n: number): number {
    if (n <= 0x1_0000_0000) return Math.floor((this.next() / 0x1_0000_0000) * n);
    return Math.floor((this.next() * 0x1_0000_0000 + this.next()) / 2 ** 64 * n);
  }

  /** An integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p;
  }

  /** One element of a list. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  /** Random bytes. */
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let i = 0;
    for (; i + 4 <= n; i += 4) {
      const x = this.next();
      out[i] = x;
      out[i + 1] = x >>> 8;
      out[i + 2] = x >>> 16;
      out[i + 3] = x >>> 24;
    }
    for (; i < n; i++) out[i] = this.next();
    return out;
  }

  /** A uniform 64-bit value. */
  u64(): bigint {
    return (BigInt(this.next()) << 32n) | BigInt(this.next());
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

function validUtf8(bytes: Uint8Array): boolean {
  try {
    strictDecoder.decode(bytes);
    return true;
  } catch {
    return false;
  }
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

function u32(n: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n >>> 0);
  return out;
}

function u16(n: number): Uint8Array {
  const out = new Uint8Array(2);
  new DataView(out.buffer).setUint16(0, n & 0xffff);
  return out;
}

/** An option request: IHAVEOPT, option, length, data (length may lie about the data). */
export function optionBytes(option: number, data: Uint8Array, length = data.length): Uint8Array {
  const out = new Uint8Array(16 + data.length);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, C.NBD_OPTS_MAGIC);
  view.setUint32(8, option >>> 0);
  view.setUint32(12, length >>> 0);
  out.set(data, 16);
  return out;
}

/** What the fuzzer knows about the export it drives. */
export interface TargetInfo {
  /** "memory" or "file". */
  kind: string;
  /** Export size in bytes. */
  size: number;
  /** Largest READ/WRITE the server accepts. */
  maxRequest: number;
  /** Bytes [0, fuzzLo) belong to the well-behaved client: fuzz writes never succeed there. */
  fuzzLo: number;
}

/** Handshake state as the client sees it. */
export interface HandshakeState {
  /** The client sent NBD_FLAG_C_FIXED_NEWSTYLE. */
  fixed: boolean;
  /** The client sent NBD_FLAG_C_NO_ZEROES. */
  noZeroes: boolean;
  /** Structured replies are on. */
  structured: boolean;
  /** Extended headers are on. */
  extended: boolean;
  /** base:allocation is selected for "" ("unknown" after a SET the spec leaves open). */
  meta: "none" | "base" | "unknown";
  /** TLS is already negotiated on this connection. */
  tls?: boolean;
}

/** The expected outcome of an option. */
export type OptionExpect =
  | {
    kind: "final";
    /** Acceptable types of the final reply (ACK or an error). */
    accept: number[];
    /** Extra checks of the whole reply list when the final reply is ACK. */
    check?: "list" | "info" | "meta-set" | "meta-list";
    /** GO: on ACK the connection enters transmission. */
    go?: boolean;
    /** State change once the final reply is known. */
    after?: (state: HandshakeState, final: number) => void;
  }
  | { kind: "export-name"; ok: boolean }
  | { kind: "close" }
  | { kind: "abrupt" };

/** One handshake-phase case. */
export interface OptionCase {
  /** The input class. */
  name: string;
  /** Bytes to send. */
  bytes: Uint8Array;
  /** Option number (for reply checks). */
  option: number;
  /** What must happen. */
  expect: OptionExpect;
  /** For meta cases: how many META_CONTEXT replies are acceptable. */
  contexts?: [number, number];
}

/** A short description of an expected outcome, for the report. */
export function describeOption(expect: OptionExpect): string {
  switch (expect.kind) {
    case "final":
      return expect.accept.map((t) => C.replyTypeName(t)).join("|") + (expect.go ? " (GO)" : "");
    case "export-name":
      return expect.ok ? "export reply" : "close";
    default:
      return expect.kind;
  }
}

const KNOWN_OPTIONS = new Set([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);

/** The spec's verdict on INFO/GO data: acceptable final reply types and why. */
export interface InfoVerdict {
  /** Acceptable final reply types. */
  accept: number[];
  /** Which rule decided (names the input class in the report). */
  reason: string;
}

/** Decodes INFO/GO data by the spec's rules (only the default export "" exists). */
export function expectInfo(data: Uint8Array): InfoVerdict {
  const invalid = (reason: string) => ({ accept: [C.NBD_REP_ERR_INVALID], reason });
  if (data.length < 6) return invalid("shorter than 6 bytes");
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 6) return invalid("name length past the data");
  if (nameLength > MAX_STRING) {
    return { accept: [C.NBD_REP_ERR_INVALID, C.NBD_REP_ERR_TOO_BIG], reason: "huge export name" };
  }
  const nameBytes = data.subarray(4, 4 + nameLength);
  const count = view.getUint16(4 + nameLength);
  if (6 + nameLength + 2 * count !== data.length) return invalid("request count mismatch");
  if (!validUtf8(nameBytes)) return invalid("name not UTF-8");
  return nameLength === 0
    ? { accept: [C.NBD_REP_ACK], reason: "default export" }
    : { accept: [C.NBD_REP_ERR_UNKNOWN], reason: "unknown export" };
}

/** Result of decoding a meta context query by the spec's rules. */
export type MetaExpect =
  | { ok: false; accept: number[] }
  | { ok: true; exportKnown: boolean; queries: string[] };

/** Decodes LIST/SET_META_CONTEXT data by the spec's rules. */
export function expectMeta(data: Uint8Array): MetaExpect {
  const invalid = { ok: false as const, accept: [C.NBD_REP_ERR_INVALID] };
  const tooBig = { ok: false as const, accept: [C.NBD_REP_ERR_INVALID, C.NBD_REP_ERR_TOO_BIG] };
  if (data.length < 8) return invalid;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 8) return invalid;
  if (nameLength > MAX_STRING) return tooBig;
  const name = data.subarray(4, 4 + nameLength);
  if (!validUtf8(name)) return invalid;
  const count = view.getUint32(4 + nameLength);
  let pos = 8 + nameLength;
  const queries: string[] = [];
  let long = false;
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return invalid;
    const length = view.getUint32(pos);
    if (length > data.length - pos - 4) return invalid;
    const q = data.subarray(pos + 4, pos + 4 + length);
    if (length > MAX_STRING) long = true;
    else if (!validUtf8(q)) return invalid;
    else queries.push(strictDecoder.decode(q));
    pos += 4 + length;
  }
  if (pos !== data.length) return invalid;
  if (long) return tooBig;
  return { ok: true, exportKnown: nameLength === 0, queries };
}

function infoData(rng: Rng): { data: Uint8Array; name: string } {
  let nameBytes: Uint8Array;
  let name = "";
  const r = rng.int(100);
  if (r < 60) nameBytes = new Uint8Array();
  else if (r < 75) {
    name = `fuzz-${rng.next().toString(36)}`;
    nameBytes = encoder.encode(name);
  } else if (r < 88) {
    // Huge export names: just above the spec's limit up to far beyond it.
    nameBytes = encoder.encode("n".repeat(rng.pick([4097, 4100, 5000, 9000, 20000, 65536])));
  } else {
    nameBytes = rng.bytes(rng.range(1, 40));
    nameBytes[0] = 0xff; // never valid UTF-8
  }
  const infos: number[] = [];
  const n = rng.chance(0.9) ? rng.int(4) : rng.range(4, 300);
  for (let i = 0; i < n; i++) infos.push(rng.chance(0.7) ? rng.int(4) : rng.int(0x10000));
  let data = concat(u32(nameBytes.length), nameBytes, u16(infos.length), ...infos.map(u16));
  if (rng.chance(0.15)) {
    // Mutations: truncate, append garbage, or overwrite a length field.
    const m = rng.int(4);
    if (m === 0) data = data.subarray(0, rng.int(data.length));
    else if (m === 1) data = concat(data, rng.bytes(rng.range(1, 9)));
    else if (m === 2) {
      new DataView(data.buffer).setUint32(0, rng.chance(0.5) ? rng.next() : rng.int(64));
    } else if (data.length >= 6 + nameBytes.length) {
      new DataView(data.buffer).setUint16(4 + nameBytes.length, rng.int(0x10000));
    }
  }
  return { data, name };
}

function metaData(rng: Rng, list: boolean): Uint8Array {
  const nameBytes = rng.chance(0.9)
    ? new Uint8Array()
    : rng.chance(0.5)
    ? encoder.encode("nope")
    : encoder.encode("e".repeat(rng.pick([4097, 6000])));
  const queries: Uint8Array[] = [];
  const many = rng.chance(0.1);
  const count = many ? rng.range(100, 3000) : rng.int(4);
  for (let i = 0; i < count; i++) {
    const r = rng.int(100);
    let q: string;
    if (r < 30) q = C.BASE_ALLOCATION;
    else if (r < 40 && list) q = "base:";
    else if (r < 60) q = `x-fuzz:${rng.next().toString(36)}`;
    else if (r < 70) q = `qemu:dirty-bitmap:${rng.int(100)}`;
    else if (r < 80) q = "nocolon";
    else if (r < 85) q = "x-long:" + "q".repeat(rng.pick([100, 4000, 4090]));
    else if (r < 88) q = "x-toolong:" + "q".repeat(4100);
    else q = `base:${rng.pick(["allocation", "allocationx", "", "other", "ALLOCATION"])}`;
    const b = encoder.encode(q);
    queries.push(concat(u32(b.length), b));
  }
  let data = concat(u32(nameBytes.length), nameBytes, u32(count), ...queries);
  if (rng.chance(0.12)) {
    const m = rng.int(4);
    if (m === 0) data = data.subarray(0, rng.int(data.length));
    else if (m === 1) data = concat(data, rng.bytes(rng.range(1, 9)));
    else if (m === 2) new DataView(data.buffer).setUint32(0, rng.next());
    else if (data.length >= 8 + nameBytes.length) {
      new DataView(data.buffer).setUint32(
        4 + nameBytes.length,
        rng.chance(0.5) ? rng.next() : count + 1,
      );
    }
  }
  return data;
}

/**
 * Generates the next option case for the current state. `terminalOk` allows
 * cases that end the connection (close, abort, abrupt disconnect).
 */
export function nextOptionCase(rng: Rng, state: HandshakeState, terminalOk: boolean): OptionCase {
  const finalCase = (
    name: string,
    option: number,
    data: Uint8Array,
    accept: number[],
    extra: Partial<Extract<OptionExpect, { kind: "final" }>> = {},
  ): OptionCase => {
    // Without fixed newstyle only EXPORT_NAME is allowed; everything else is refused.
    if (!state.fixed) accept = [C.NBD_REP_ERR_INVALID];
    return {
      name: state.fixed ? name : `${name.split(" ")[0]} without fixed newstyle`,
      option,
      bytes: optionBytes(option, data),
      expect: { kind: "final", accept, ...(state.fixed ? extra : {}) },
    };
  };
  const r = rng.int(1000);
  if (terminalOk && r < 120) return terminalOptionCase(rng, state);
  if (r < 300) {
    let option: number;
    do option = rng.chance(0.5) ? rng.range(12, 64) : rng.next(); while (KNOWN_OPTIONS.has(option));
    const size = rng.chance(0.95)
      ? rng.int(64)
      : rng.pick([4096, 65536, 1000000, OPTION_READ_LIMIT]);
    return finalCase("unknown option", option, rng.bytes(size), [C.NBD_REP_ERR_UNSUP]);
  }
  if (r < 330) {
    // Withdrawn NBD_OPT_PEEK_EXPORT: unsupported.
    return finalCase("withdrawn option 4", 4, rng.bytes(rng.int(16)), [C.NBD_REP_ERR_UNSUP]);
  }
  if (r < 400) {
    const withData = rng.chance(0.5);
    return withData
      ? finalCase("LIST with data", C.NBD_OPT_LIST, rng.bytes(rng.range(1, 64)), [
        C.NBD_REP_ERR_INVALID,
      ])
      : finalCase("LIST", C.NBD_OPT_LIST, new Uint8Array(), [C.NBD_REP_ACK], { check: "list" });
  }
  if (r < 440) {
    const withData = rng.chance(0.5);
    return withData
      ? finalCase("STARTTLS with data", C.NBD_OPT_STARTTLS, rng.bytes(rng.range(1, 64)), [
        C.NBD_REP_ERR_INVALID,
      ])
      : state.tls
      ? finalCase("STARTTLS inside TLS", C.NBD_OPT_STARTTLS, new Uint8Array(), [
        C.NBD_REP_ERR_INVALID,
      ])
      : finalCase("STARTTLS without TLS", C.NBD_OPT_STARTTLS, new Uint8Array(), [
        C.NBD_REP_ERR_POLICY,
        C.NBD_REP_ERR_UNSUP,
      ]);
  }
  if (r < 520) {
    if (rng.chance(0.3)) {
      return finalCase(
        "STRUCTURED_REPLY with data",
        C.NBD_OPT_STRUCTURED_REPLY,
        rng.bytes(rng.range(1, 32)),
        [
          C.NBD_REP_ERR_INVALID,
        ],
      );
    }
    const accept = state.extended
      ? [C.NBD_REP_ACK, C.NBD_REP_ERR_EXT_HEADER_REQD]
      : [C.NBD_REP_ACK];
    return finalCase("STRUCTURED_REPLY", C.NBD_OPT_STRUCTURED_REPLY, new Uint8Array(), accept, {
      after: (s, final) => {
        if (final === C.NBD_REP_ACK) s.structured = true;
      },
    });
  }
  if (r < 580) {
    if (rng.chance(0.3)) {
      return finalCase(
        "EXTENDED_HEADERS with data",
        C.NBD_OPT_EXTENDED_HEADERS,
        rng.bytes(rng.range(1, 32)),
        [
          C.NBD_REP_ERR_INVALID,
        ],
      );
    }
    return finalCase("EXTENDED_HEADERS", C.NBD_OPT_EXTENDED_HEADERS, new Uint8Array(), [
      C.NBD_REP_ACK,
    ], {
      after: (s, final) => {
        if (final === C.NBD_REP_ACK) {
          s.extended = true;
          s.structured = true;
        }
      },
    });
  }
  if (r < 700) {
    const { data } = infoData(rng);
    const verdict = expectInfo(data);
    return finalCase(`INFO ${verdict.reason}`, C.NBD_OPT_INFO, data, verdict.accept, {
      check: "info",
    });
  }
  // Metadata contexts.
  const set = rng.chance(0.5);
  const option = set ? C.NBD_OPT_SET_META_CONTEXT : C.NBD_OPT_LIST_META_CONTEXT;
  const data = metaData(rng, !set);
  const what = set ? "SET_META_CONTEXT" : "LIST_META_CONTEXT";
  const decoded = expectMeta(data);
  const many = decoded.ok && decoded.queries.length >= 100 ? " (many)" : "";
  const after = set
    ? (s: HandshakeState, final: number) => {
      if (final === C.NBD_REP_ACK && decoded.ok) {
        s.meta = decoded.queries.includes(C.BASE_ALLOCATION) ? "base" : "none";
      } else if (s.structured) {
        s.meta = "unknown"; // the spec does not say what a failed SET leaves selected
      } else s.meta = "none";
    }
    : undefined;
  if (!state.structured) {
    // SET before structured replies: ERR_INVALID. LIST is only informative; a server may answer it.
    const accept = set ? [C.NBD_REP_ERR_INVALID] : [
      C.NBD_REP_ERR_INVALID,
      ...(decoded.ok ? [C.NBD_REP_ACK, C.NBD_REP_ERR_UNKNOWN] : decoded.accept),
    ];
    const c = finalCase(`${what} before structured replies`, option, data, accept, {
      check: set ? undefined : "meta-list",
      after,
    });
    c.contexts = [0, 1];
    return c;
  }
  if (!decoded.ok) {
    return finalCase(`${what} malformed`, option, data, decoded.accept, { after });
  }
  if (!decoded.exportKnown) {
    return finalCase(`${what} unknown export`, option, data, [C.NBD_REP_ERR_UNKNOWN], { after });
  }
  const c = finalCase(`${what}${many}`, option, data, [C.NBD_REP_ACK], {
    check: set ? "meta-set" : "meta-list",
    after,
  });
  const selected = set
    ? decoded.queries.includes(C.BASE_ALLOCATION)
    : decoded.queries.length === 0 ||
      decoded.queries.some((q) => q === C.BASE_ALLOCATION || q === "base:");
  c.contexts = selected ? [1, 1] : [0, 0];
  return c;
}

/**
 * An option case for a server that requires TLS, sent before STARTTLS:
 * everything but ABORT and STARTTLS itself is refused with ERR_TLS_REQD
 * (after the usual checks that come first: fixed newstyle, STARTTLS data),
 * and EXPORT_NAME, which cannot be refused, closes the connection. Never
 * returns a valid STARTTLS (the caller sends that).
 */
export function preTlsOptionCase(rng: Rng, state: HandshakeState): OptionCase {
  if (rng.chance(0.05)) {
    return {
      name: "EXPORT_NAME before STARTTLS",
      bytes: optionBytes(C.NBD_OPT_EXPORT_NAME, new Uint8Array()),
      option: C.NBD_OPT_EXPORT_NAME,
      expect: { kind: "close" },
    };
  }
  while (true) {
    const c = nextOptionCase(rng, state, false);
    if (c.option === C.NBD_OPT_STARTTLS) {
      if (c.expect.kind === "final" && c.expect.accept.includes(C.NBD_REP_ERR_INVALID)) return c;
      continue; // a valid STARTTLS: the caller's job
    }
    if (!state.fixed || c.expect.kind !== "final") return c;
    return {
      name: `${c.name.split(" ")[0]} before STARTTLS`,
      bytes: c.bytes,
      option: c.option,
      expect: { kind: "final", accept: [C.NBD_REP_ERR_TLS_REQD] },
    };
  }
}

/** A case that ends the handshake: GO/EXPORT_NAME into transmission, or a close. */
export function terminalOptionCase(rng: Rng, state: HandshakeState): OptionCase {
  const r = rng.int(100);
  if (r < 12) {
    // Wrong option magic (including an NBD request sent before the handshake ended).
    let bytes: Uint8Array;
    if (rng.chance(0.5)) {
      bytes = optionBytes(C.NBD_OPT_LIST, new Uint8Array());
      bytes[rng.int(8)] ^= 1 << rng.int(8);
      return { name: "option with a wrong magic", bytes, option: 0, expect: { kind: "close" } };
    }
    bytes = new Uint8Array(28);
    const v = new DataView(bytes.buffer);
    v.setUint32(0, rng.chance(0.5) ? C.NBD_REQUEST_MAGIC : C.NBD_EXTENDED_REQUEST_MAGIC);
    v.setUint16(6, rng.int(8));
    v.setUint32(24, rng.int(4096));
    return {
      name: "request before the handshake ended",
      bytes,
      option: 0,
      expect: { kind: "close" },
    };
  }
  if (r < 20) {
    const length = rng.pick([
      OPTION_HARD_LIMIT + 1,
      0x7fffffff,
      0xffffffff,
      rng.range(OPTION_HARD_LIMIT + 1, 0xffffffff),
    ]);
    return {
      name: "option length beyond 64 MiB",
      bytes: optionBytes(
        rng.pick([C.NBD_OPT_INFO, C.NBD_OPT_GO, C.NBD_OPT_LIST, 77]),
        rng.bytes(rng.int(32)),
        length,
      ),
      option: 0,
      expect: { kind: "close" },
    };
  }
  if (r < 23) {
    // Large but bounded option data is skipped and refused (costly, so rare).
    const length = OPTION_READ_LIMIT + rng.range(1, 4096);
    const option = rng.pick([C.NBD_OPT_INFO, C.NBD_OPT_LIST, C.NBD_OPT_SET_META_CONTEXT, 99]);
    if (!state.fixed) {
      return {
        name: "oversize option data",
        bytes: optionBytes(option, new Uint8Array(length)),
        option,
        expect: { kind: "final", accept: [C.NBD_REP_ERR_INVALID, C.NBD_REP_ERR_TOO_BIG] },
      };
    }
    return {
      name: "oversize option data",
      bytes: optionBytes(option, new Uint8Array(length)),
      option,
      expect: { kind: "final", accept: [C.NBD_REP_ERR_TOO_BIG] },
    };
  }
  if (r < 33) {
    // Cut short: part of a header, or data shorter than announced, then hang up.
    const full = optionBytes(
      rng.pick([C.NBD_OPT_GO, C.NBD_OPT_INFO, 1234]),
      rng.bytes(rng.range(8, 200)),
    );
    const bytes = rng.chance(0.4)
      ? full.subarray(0, rng.range(1, 15))
      : full.subarray(0, rng.range(16, full.length - 1));
    return { name: "truncated option", bytes, option: 0, expect: { kind: "abrupt" } };
  }
  if (r < 40) {
    const bytes = rng.bytes(rng.range(16, 300));
    bytes[0] = 0; // never IHAVEOPT
    return { name: "random garbage in the handshake", bytes, option: 0, expect: { kind: "close" } };
  }
  if (r < 46) {
    const ack = state.fixed
      ? { kind: "final" as const, accept: [C.NBD_REP_ACK] }
      : { kind: "final" as const, accept: [C.NBD_REP_ERR_INVALID] };
    return {
      name: "ABORT",
      bytes: optionBytes(C.NBD_OPT_ABORT, new Uint8Array()),
      option: C.NBD_OPT_ABORT,
      expect: ack,
    };
  }
  if (r < 56) {
    // EXPORT_NAME: the name is the whole data.
    const k = rng.int(10);
    const name = k < 6
      ? new Uint8Array()
      : k < 8
      ? encoder.encode("missing")
      : encoder.encode("x".repeat(rng.pick([4097, 10000])));
    const ok = name.length === 0 && !state.extended;
    return {
      name: ok
        ? "EXPORT_NAME"
        : state.extended && name.length === 0
        ? "EXPORT_NAME after EXTENDED_HEADERS"
        : name.length > MAX_STRING
        ? "EXPORT_NAME huge name"
        : "EXPORT_NAME unknown",
      bytes: optionBytes(C.NBD_OPT_EXPORT_NAME, name),
      option: C.NBD_OPT_EXPORT_NAME,
      expect: ok ? { kind: "export-name", ok: true } : { kind: "close" },
    };
  }
  // GO: mostly valid, sometimes with mutated data.
  const mutate = rng.chance(0.1);
  const data = mutate ? infoData(rng).data : concat(u32(0), u16(1), u16(C.NBD_INFO_BLOCK_SIZE));
  const verdict = expectInfo(data);
  return {
    name: `GO ${verdict.reason}`,
    bytes: optionBytes(C.NBD_OPT_GO, data),
    option: C.NBD_OPT_GO,
    expect: {
      kind: "final",
      accept: state.fixed ? verdict.accept : [C.NBD_REP_ERR_INVALID],
      check: "info",
      go: true,
    },
  };
}

// ---------------------------------------------------------------------------
// Transmission

/** What the client knows in transmission. */
export interface TransmissionState {
  /** The export. */
  target: TargetInfo;
  /** Transmission flags from GO/EXPORT_NAME. */
  flags: number;
  /** Structured replies. */
  structured: boolean;
  /** Extended headers. */
  extended: boolean;
  /** base:allocation selected ("unknown" when the spec leaves it open). */
  meta: "none" | "base" | "unknown";
}

/** The expected outcome of a request. */
export type RequestExpect =
  | {
    kind: "reply";
    /** Acceptable error numbers (0 = success). */
    accept: number[];
  }
  | { kind: "close" }
  | { kind: "abrupt" };

/** One transmission-phase case. */
export interface RequestCase {
  /** Input class. */
  name: string;
  /** Bytes to send (header and any payload). */
  bytes: Uint8Array;
  /** Command type. */
  type: number;
  /** Command flags. */
  flags: number;
  /** 64-bit cookie. */
  cookie: bigint;
  /** Offset as sent. */
  offset: bigint;
  /** Length as sent (effect or payload length). */
  length: bigint;
  /** BLOCK_STATUS effect length from a payload, if any. */
  effectLength?: bigint;
  /** What must happen. */
  expect: RequestExpect;
}

/** A short description of an expected request outcome, for the report. */
export function describeRequest(expect: RequestExpect): string {
  if (expect.kind !== "reply") return expect.kind;
  return expect.accept.map((e) => (e === 0 ? "ok" : C.errnoName(e))).join("|");
}

function header(
  extended: boolean,
  flags: number,
  type: number,
  cookie: bigint,
  offset: bigint,
  length: bigint,
): Uint8Array {
  const out = new Uint8Array(extended ? 32 : 28);
  const v = new DataView(out.buffer);
  v.setUint32(0, extended ? C.NBD_EXTENDED_REQUEST_MAGIC : C.NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, offset & U64_MAX);
  if (extended) v.setBigUint64(24, length & U64_MAX);
  else v.setUint32(24, Number(length & 0xffffffffn));
  return out;
}

/** The command flags the spec allows for a command in this session; undefined for unknown commands. */
export function allowedFlags(s: TransmissionState, type: number): number | undefined {
  const f = s.flags;
  // FUA is accepted on every command once SEND_FUA is advertised.
  let allowed = f & C.NBD_FLAG_SEND_FUA ? C.NBD_CMD_FLAG_FUA : 0;
  switch (type) {
    case C.NBD_CMD_READ:
      if (f & C.NBD_FLAG_SEND_DF) allowed |= C.NBD_CMD_FLAG_DF;
      return allowed;
    case C.NBD_CMD_WRITE:
      if (s.extended) allowed |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
      return allowed;
    case C.NBD_CMD_WRITE_ZEROES:
      allowed |= C.NBD_CMD_FLAG_NO_HOLE;
      if (f & C.NBD_FLAG_SEND_FAST_ZERO) allowed |= C.NBD_CMD_FLAG_FAST_ZERO;
      return allowed;
    case C.NBD_CMD_BLOCK_STATUS:
      allowed |= C.NBD_CMD_FLAG_REQ_ONE;
      if (f & C.NBD_FLAG_BLOCK_STATUS_PAYLOAD) allowed |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
      return allowed;
    case C.NBD_CMD_FLUSH:
    case C.NBD_CMD_TRIM:
    case C.NBD_CMD_CACHE:
      return allowed;
    default:
      return undefined;
  }
}

/**
 * The spec's verdict on a request that reached the server intact: the set
 * of acceptable error numbers (0 = success), or "close" for inputs that
 * break a MUST so badly that the stream cannot be trusted (the documented
 * hard limits).
 */
export function judgeRequest(
  s: TransmissionState,
  type: number,
  flags: number,
  offset: bigint,
  length: bigint,
  payloadLength: bigint,
  blockStatusPayload?: Uint8Array,
): RequestExpect {
  const f = s.flags;
  const { size, maxRequest } = s.target;
  if (s.extended && type === C.NBD_CMD_WRITE && !(flags & C.NBD_CMD_FLAG_PAYLOAD_LEN)) {
    return { kind: "close" }; // a WRITE MUST carry its payload length with extended headers
  }
  if (payloadLength > BigInt(2 * maxRequest)) return { kind: "close" };
  const errors = new Set<number>();
  const allowed = allowedFlags(s, type);
  const known = allowed !== undefined;
  if (!known) return { kind: "reply", accept: [C.NBD_EINVAL] };
  if (flags & ~allowed) errors.add(C.NBD_EINVAL);
  if (payloadLength > 0n && type !== C.NBD_CMD_WRITE && type !== C.NBD_CMD_BLOCK_STATUS) {
    errors.add(C.NBD_EINVAL);
  }
  const readOnly = (f & C.NBD_FLAG_READ_ONLY) !== 0;
  let effect = length;
  let rangeChecked = true;
  switch (type) {
    case C.NBD_CMD_WRITE:
      if (readOnly) errors.add(C.NBD_EPERM);
      break;
    case C.NBD_CMD_TRIM:
      if (readOnly) errors.add(C.NBD_EPERM);
      if (!(f & C.NBD_FLAG_SEND_TRIM)) errors.add(C.NBD_EINVAL);
      break;
    case C.NBD_CMD_WRITE_ZEROES:
      if (readOnly) errors.add(C.NBD_EPERM);
      if (!(f & C.NBD_FLAG_SEND_WRITE_ZEROES)) errors.add(C.NBD_EINVAL);
      break;
    case C.NBD_CMD_FLUSH:
      if (!(f & C.NBD_FLAG_SEND_FLUSH)) errors.add(C.NBD_EINVAL);
      if (offset !== 0n || length !== 0n) errors.add(C.NBD_EINVAL);
      rangeChecked = false;
      break;
    case C.NBD_CMD_CACHE:
      if (!(f & C.NBD_FLAG_SEND_CACHE)) errors.add(C.NBD_EINVAL);
      break;
    case C.NBD_CMD_BLOCK_STATUS: {
      const ambiguous = s.meta === "unknown";
      if (s.meta === "none") errors.add(C.NBD_EINVAL);
      if (flags & C.NBD_CMD_FLAG_PAYLOAD_LEN && (f & C.NBD_FLAG_BLOCK_STATUS_PAYLOAD)) {
        const p = blockStatusPayload ?? new Uint8Array();
        if (p.length < 8 || (p.length - 8) % 4 !== 0) {
          errors.add(C.NBD_EINVAL);
          rangeChecked = false;
        } else {
          const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
          effect = v.getBigUint64(0);
          const ids: number[] = [];
          for (let i = 8; i < p.length; i += 4) ids.push(v.getUint32(i));
          // The only context the server can have selected has the id it reported (1 here).
          if (ids.some((id) => id !== 1) || new Set(ids).size !== ids.length) {
            errors.add(C.NBD_EINVAL);
          }
          if (ids.length === 0) {
            // An empty id list is not covered by the spec: accept either answer.
            const rest = judgeRange(type, offset, effect, size, maxRequest, errors);
            return { kind: "reply", accept: [...new Set([...rest, 0, C.NBD_EINVAL])] };
          }
        }
      }
      if (ambiguous) {
        const rest = rangeChecked
          ? judgeRange(type, offset, effect, size, maxRequest, new Set(errors))
          : [...errors];
        const accept = new Set(rest);
        accept.add(C.NBD_EINVAL);
        return { kind: "reply", accept: [...accept] };
      }
      break;
    }
  }
  if (!rangeChecked) return { kind: "reply", accept: errors.size ? [...errors] : [0] };
  return { kind: "reply", accept: judgeRange(type, offset, effect, size, maxRequest, errors) };
}

function judgeRange(
  type: number,
  offset: bigint,
  length: bigint,
  size: number,
  maxRequest: number,
  errors: Set<number>,
): number[] {
  const writeLike = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES;
  if (length === 0n) {
    // Zero-length requests are unspecified: EINVAL or success, never a disconnect.
    if (errors.size === 0) return [0, C.NBD_EINVAL];
    errors.add(C.NBD_EINVAL);
    return [...errors];
  }
  if (offset + length > BigInt(size)) errors.add(writeLike ? C.NBD_ENOSPC : C.NBD_EINVAL);
  if ((type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE) && length > BigInt(maxRequest)) {
    errors.add(C.NBD_EINVAL);
    if (type === C.NBD_CMD_READ) errors.add(C.NBD_EOVERFLOW);
  }
  return errors.size ? [...errors] : [0];
}

function randomOffset(rng: Rng, s: TransmissionState, length: bigint): bigint {
  const { size, fuzzLo } = s.target;
  const r = rng.int(100);
  const len = length > BigInt(size) ? BigInt(size) : length;
  if (r < 55) {
    const room = BigInt(size - fuzzLo) - len;
    return BigInt(fuzzLo) + (room > 0n ? BigInt(rng.int(Number(room) + 1)) : 0n);
  }
  if (r < 65) return BigInt(rng.int(fuzzLo)); // the checker's region: reads only succeed there
  if (r < 75) return BigInt(size) - len + BigInt(rng.range(-4, 8)); // around the end
  if (r < 80) return BigInt(size) + BigInt(rng.int(1 << 20));
  // Overflow territory: offset + length wraps 64 bits or passes 2^53.
  return rng.pick([
    U64_MAX - BigInt(rng.int(1 << 16)),
    1n << 63n,
    (1n << 53n) - BigInt(rng.int(4096)),
    (1n << 53n) + BigInt(rng.int(4096)),
    BigInt(0xffffffff),
    rng.u64(),
  ]);
}

function randomLength(rng: Rng, s: TransmissionState, type: number): bigint {
  const r = rng.int(100);
  const max = s.target.maxRequest;
  if (r < 50) return BigInt(rng.range(1, 4096));
  if (r < 72) return BigInt(rng.range(4097, 65536));
  if (r < 77) return 0n;
  if (r < 85) {
    const limit = type === C.NBD_CMD_WRITE && s.target.maxRequest > 4 * MiB ? MiB : max;
    return BigInt(rng.pick([limit, limit - 1, limit + 1, limit + rng.int(4096)]));
  }
  if (r < 90 && type !== C.NBD_CMD_WRITE) return BigInt(rng.range(65536, 8 * MiB));
  if (!s.extended || rng.chance(0.5)) return BigInt(rng.pick([0xffffffff, 0x80000000, rng.next()]));
  return rng.pick([1n << 32n, 1n << 63n, U64_MAX, rng.u64(), BigInt(rng.range(1, 4096))]);
}

function randomFlags(rng: Rng, s: TransmissionState, type: number): number {
  if (rng.chance(0.2)) return rng.chance(0.5) ? 1 << rng.int(16) : rng.int(0x10000);
  let flags = 0;
  if (s.flags & C.NBD_FLAG_SEND_FUA && rng.chance(0.2)) flags |= C.NBD_CMD_FLAG_FUA;
  if (type === C.NBD_CMD_READ && s.flags & C.NBD_FLAG_SEND_DF && rng.chance(0.2)) {
    flags |= C.NBD_CMD_FLAG_DF;
  }
  if (type === C.NBD_CMD_WRITE_ZEROES) {
    if (rng.chance(0.3)) flags |= C.NBD_CMD_FLAG_NO_HOLE;
    if (s.flags & C.NBD_FLAG_SEND_FAST_ZERO && rng.chance(0.2)) flags |= C.NBD_CMD_FLAG_FAST_ZERO;
  }
  if (type === C.NBD_CMD_BLOCK_STATUS && rng.chance(0.4)) flags |= C.NBD_CMD_FLAG_REQ_ONE;
  return flags;
}

/** Generates a request that leaves the connection usable if the server behaves (a reply is due). */
export function nextRequestCase(rng: Rng, s: TransmissionState, cookie: bigint): RequestCase {
  while (true) {
    const c = requestCase(rng, s, cookie);
    // Payloads are kept small enough to be cheap: oversize ones are tried against a small maximum.
    if (c.expect.kind === "reply" && c.bytes.length <= 3 * MiB) return c;
  }
}

function requestCase(rng: Rng, s: TransmissionState, cookie: bigint): RequestCase {
  const r = rng.int(100);
  let type: number;
  if (r < 28) type = C.NBD_CMD_READ;
  else if (r < 50) type = C.NBD_CMD_WRITE;
  else if (r < 56) type = C.NBD_CMD_FLUSH;
  else if (r < 63) type = C.NBD_CMD_TRIM;
  else if (r < 68) type = C.NBD_CMD_CACHE;
  else if (r < 76) type = C.NBD_CMD_WRITE_ZEROES;
  else if (r < 88) type = C.NBD_CMD_BLOCK_STATUS;
  else type = rng.chance(0.5) ? rng.range(8, 40) : rng.range(8, 0xffff);
  let flags = randomFlags(rng, s, type);
  let length = type === C.NBD_CMD_FLUSH && rng.chance(0.8) ? 0n : randomLength(rng, s, type);
  let offset = type === C.NBD_CMD_FLUSH && rng.chance(0.8) ? 0n : randomOffset(rng, s, length);
  let payload: Uint8Array = new Uint8Array();
  let bsPayload: Uint8Array | undefined;
  if (s.extended) {
    if (type === C.NBD_CMD_WRITE) {
      if (rng.chance(0.97)) flags |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
      else flags &= ~C.NBD_CMD_FLAG_PAYLOAD_LEN;
    } else if (type === C.NBD_CMD_BLOCK_STATUS && rng.chance(0.35)) {
      flags |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
      const ids = rng.chance(0.7)
        ? [1]
        : Array.from({ length: rng.int(4) }, () => rng.chance(0.5) ? 1 : rng.next());
      bsPayload = new Uint8Array(8 + 4 * ids.length);
      const v = new DataView(bsPayload.buffer);
      v.setBigUint64(0, BigInt(rng.range(1, 1 << 20)));
      ids.forEach((id, i) => v.setUint32(8 + 4 * i, id));
      if (rng.chance(0.1)) bsPayload = bsPayload.subarray(0, rng.int(bsPayload.length));
      length = BigInt(bsPayload.length);
      offset = randomOffset(rng, s, 4096n);
    } else if (rng.chance(0.04)) {
      // PAYLOAD_LEN on a command that takes no payload: EINVAL, and the payload is skipped.
      flags |= C.NBD_CMD_FLAG_PAYLOAD_LEN;
      length = BigInt(rng.range(1, 512));
    }
  }
  const extendedPayload = s.extended && (flags & C.NBD_CMD_FLAG_PAYLOAD_LEN) !== 0;
  let payloadLength = s.extended
    ? (extendedPayload ? length : 0n)
    : (type === C.NBD_CMD_WRITE ? length : 0n);
  let expect = judgeRequest(s, type, flags, offset, length, payloadLength, bsPayload);
  // Writes the spec lets succeed stay out of the well-behaved client's region.
  const writeLike = type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES ||
    type === C.NBD_CMD_TRIM;
  if (
    writeLike && expect.kind === "reply" && expect.accept.includes(0) &&
    offset < BigInt(s.target.fuzzLo)
  ) {
    const effect = type === C.NBD_CMD_WRITE ? length : length;
    const room = BigInt(s.target.size - s.target.fuzzLo) - effect;
    offset = BigInt(s.target.fuzzLo) + (room > 0n ? BigInt(rng.int(Number(room) + 1)) : 0n);
    expect = judgeRequest(s, type, flags, offset, length, payloadLength, bsPayload);
  }
  if (expect.kind === "reply" && payloadLength > 0n) {
    payload = bsPayload ??
      (rng.chance(0.5) ? new Uint8Array(Number(payloadLength)) : rng.bytes(Number(payloadLength)));
  }
  if (expect.kind !== "reply") payloadLength = 0n;
  const name = requestName(s, type, flags, offset, length, expect, bsPayload !== undefined);
  return {
    name,
    bytes: concat(header(s.extended, flags, type, cookie, offset, length), payload),
    type,
    flags,
    cookie,
    offset,
    length,
    effectLength: bsPayload && bsPayload.length >= 8
      ? new DataView(bsPayload.buffer, bsPayload.byteOffset).getBigUint64(0)
      : undefined,
    expect,
  };
}

function requestName(
  s: TransmissionState,
  type: number,
  flags: number,
  offset: bigint,
  length: bigint,
  expect: RequestExpect,
  bsPayload: boolean,
): string {
  const known = type <= C.NBD_CMD_BLOCK_STATUS;
  if (!known) return "unknown command";
  const cmd = C.commandName(type);
  if (expect.kind === "close") return `${cmd} oversize payload or missing PAYLOAD_LEN`;
  if (bsPayload) return "BLOCK_STATUS with id payload";
  const allowed = allowedFlags(s, type) ?? 0;
  if (flags & ~allowed & ~C.NBD_CMD_FLAG_PAYLOAD_LEN) return `${cmd} unknown or inapplicable flags`;
  if (flags & C.NBD_CMD_FLAG_PAYLOAD_LEN && !(allowed & C.NBD_CMD_FLAG_PAYLOAD_LEN)) {
    return `${cmd} with a payload it does not take`;
  }
  if (offset + length > U64_MAX) return `${cmd} offset+length overflows 64 bits`;
  if (offset + length > BigInt(s.target.size)) return `${cmd} past the end`;
  if (length === 0n && type !== C.NBD_CMD_FLUSH) return `${cmd} zero length`;
  if (
    length > BigInt(s.target.maxRequest) && (type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE)
  ) {
    return `${cmd} larger than the maximum`;
  }
  return cmd;
}

/**
 * A request case that ends the connection: a bad magic, an extended/compact
 * header mismatch, an absurd payload, DISC, garbage, or an abrupt hang-up
 * part-way through a header or payload.
 */
export function terminalRequestCase(rng: Rng, s: TransmissionState, cookie: bigint): RequestCase {
  const r = rng.int(100);
  const base = { type: 0, flags: 0, cookie, offset: 0n, length: 0n };
  if (r < 15) {
    const bytes = header(s.extended, 0, C.NBD_CMD_READ, cookie, 0n, 512n);
    bytes[rng.int(4)] ^= 1 << rng.int(8);
    return { ...base, name: "request with a wrong magic", bytes, expect: { kind: "close" } };
  }
  if (r < 30) {
    // The other header format from the one negotiated.
    const bytes = header(!s.extended, 0, C.NBD_CMD_READ, cookie, 0n, 512n);
    const padded = s.extended ? concat(bytes, new Uint8Array(4)) : bytes;
    return {
      ...base,
      name: s.extended
        ? "compact request after extended headers"
        : "extended request without extended headers",
      bytes: padded,
      expect: { kind: "close" },
    };
  }
  if (r < 40) {
    const length = s.extended
      ? rng.pick([U64_MAX, 1n << 40n, BigInt(2 * s.target.maxRequest + 1)])
      : BigInt(Math.min(0xffffffff, 2 * s.target.maxRequest + 1 + rng.int(1000)));
    const flags = s.extended ? C.NBD_CMD_FLAG_PAYLOAD_LEN : 0;
    const bytes = header(
      s.extended,
      flags,
      C.NBD_CMD_WRITE,
      cookie,
      BigInt(s.target.fuzzLo),
      length,
    );
    return {
      ...base,
      type: C.NBD_CMD_WRITE,
      flags,
      length,
      name: "WRITE payload beyond twice the maximum",
      bytes,
      expect: { kind: "close" },
    };
  }
  if (r < 47 && s.extended) {
    const bytes = header(true, 0, C.NBD_CMD_WRITE, cookie, BigInt(s.target.fuzzLo), 512n);
    return {
      ...base,
      type: C.NBD_CMD_WRITE,
      name: "extended WRITE without PAYLOAD_LEN",
      bytes,
      expect: { kind: "close" },
    };
  }
  if (r < 62) {
    return {
      ...base,
      type: C.NBD_CMD_DISC,
      name: "DISC",
      bytes: header(
        s.extended,
        rng.chance(0.8) ? 0 : rng.int(0x10000),
        C.NBD_CMD_DISC,
        cookie,
        0n,
        0n,
      ),
      expect: { kind: "close" },
    };
  }
  if (r < 72) {
    const bytes = rng.bytes(rng.range(32, 400));
    bytes[0] = 0x00; // never a request magic
    return { ...base, name: "random garbage in transmission", bytes, expect: { kind: "close" } };
  }
  if (r < 78) {
    return {
      ...base,
      name: "option after the handshake",
      bytes: concat(optionBytes(C.NBD_OPT_LIST, new Uint8Array()), new Uint8Array(16)),
      expect: { kind: "close" },
    };
  }
  if (r < 88) {
    // WRITE whose payload stops short, then the client vanishes.
    const length = BigInt(rng.range(2, 65536));
    const flags = s.extended ? C.NBD_CMD_FLAG_PAYLOAD_LEN : 0;
    const bytes = concat(
      header(s.extended, flags, C.NBD_CMD_WRITE, cookie, BigInt(s.target.fuzzLo), length),
      rng.bytes(rng.int(Number(length))),
    );
    return {
      ...base,
      type: C.NBD_CMD_WRITE,
      name: "truncated WRITE payload",
      bytes,
      expect: { kind: "abrupt" },
    };
  }
  const full = header(s.extended, 0, C.NBD_CMD_READ, cookie, 0n, 512n);
  return {
    ...base,
    name: "truncated request header",
    bytes: full.subarray(0, rng.range(1, full.length - 1)),
    expect: { kind: "abrupt" },
  };
}
