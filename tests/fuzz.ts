/**
 * Protocol fuzzer for `nbd serve`. Two server subprocesses (a memory export
 * with a small payload limit, and a file export with the default limits)
 * are driven on many connections at once with random and mutated
 * handshakes, options and requests, while a well-behaved client on each
 * server keeps writing and reading back verified data. Every case carries
 * the outcome the protocol prescribes (see fuzz_cases.ts) and the reply or
 * close actually seen is checked against it.
 *
 *   deno task fuzz                          # 20,000 cases or 60 s, whichever comes first
 *   deno task fuzz --cases 200000 --seconds 600 --seed 7
 *
 * Prints the case count, the input and outcome classes, spec violations,
 * the well-behaved client's integrity errors and the servers' peak RSS;
 * exits 1 on any violation, integrity error, crash or unclean exit.
 *
 * @module
 */

import { parseArgs } from "node:util";
import * as C from "../protocol/constants.ts";
import { BufferedReader } from "../io/buffered_reader.ts";
import { type ByteStream, writeAll } from "../io/byte_stream.ts";
import {
  describeOption,
  describeRequest,
  type HandshakeState,
  nextOptionCase,
  nextRequestCase,
  type OptionCase,
  type RequestCase,
  Rng,
  type TargetInfo,
  terminalOptionCase,
  terminalRequestCase,
  type TransmissionState,
} from "./fuzz_cases.ts";
import { type ServerProcess, startNbdServe, tempDir } from "./helpers.ts";
import { PipelinedClient } from "./pipelined_client.ts";
import { formatKiB, peakRssKiB, rssKiB } from "./proc_stats.ts";
import { emptyStats, type IoStats, mergeStats, VerifiedWorker } from "./verified_io.ts";

const MiB = 1024 * 1024;
/** Seconds a connection may take to answer a batch before it counts as a hang. */
const STEP_TIMEOUT_MS = 20_000;
/** Largest reply payload the fuzzer accepts before calling the stream broken. */
const MAX_CHUNK = 64 * MiB + 4096;

/** Options of a fuzz run. */
export interface FuzzOptions {
  /** Stop after this many cases (default 20,000). */
  cases?: number;
  /** Stop after this many seconds (default 60). */
  seconds?: number;
  /** Random seed (default: time based). */
  seed?: number;
  /** Fuzzing connections running at once per server (default 4). */
  workers?: number;
  /** Progress and report lines (default: none). */
  log?: (line: string) => void;
}

/** Per-server figures. */
export interface ServerReport {
  /** "memory" or "file". */
  kind: string;
  /** Peak RSS over the run (KiB). */
  peakRssKiB: number | undefined;
  /** RSS right after start-up (KiB), for comparison. */
  startRssKiB: number | undefined;
  /** RSS sampled over the run: [seconds, KiB] pairs (a few evenly spaced ones). */
  rssTimeline: Array<[number, number]>;
  /** The process was still running when the fuzzing ended. */
  survived: boolean;
  /** Exit status after SIGTERM (0 = clean shutdown). */
  exitCode: number | undefined;
  /** Log lines that show an internal error (uncaught exceptions, stack traces). */
  internalErrors: string[];
  /** Lines the server logged. */
  logLines: number;
  /** The most frequent kinds of log line (numbers masked) with their counts. */
  logKinds: Array<[string, number]>;
}

/** The outcome of a fuzz run. */
export interface FuzzReport {
  /** The seed used. */
  seed: number;
  /** Cases run. */
  cases: number;
  /** Seconds taken. */
  seconds: number;
  /** Cases per input class and expected outcome ("class → outcome"). */
  classes: Map<string, number>;
  /** Cases per expected outcome kind. */
  outcomes: Map<string, number>;
  /** Cases whose reply or close differed from the spec's. */
  violations: number;
  /** The first violations, described. */
  violationSamples: string[];
  /** The well-behaved clients' figures (merged). */
  checker: IoStats;
  /** Checker errors plus mismatches: must be 0. */
  integrityErrors: number;
  /** Per-server figures. */
  servers: ServerReport[];
}

/** A server being fuzzed. */
export interface Target extends TargetInfo {
  /** The server process. */
  server: ServerProcess;
  /** Its Unix socket. */
  socket: string;
}

/** Counts cases and violations. */
export class Tally {
  cases = 0;
  readonly classes = new Map<string, number>();
  readonly outcomes = new Map<string, number>();
  violations = 0;
  readonly samples: string[] = [];

  record(target: Target, name: string, expected: string, outcome: string): void {
    this.cases++;
    const key = `${name} → ${expected}`;
    this.classes.set(key, (this.classes.get(key) ?? 0) + 1);
    const kind = `${outcome} (${target.kind})`;
    this.outcomes.set(kind, (this.outcomes.get(kind) ?? 0) + 1);
  }

  violation(target: Target, message: string): void {
    this.violations++;
    if (this.samples.length < 20) this.samples.push(`${target.kind}: ${message}`);
  }
}

/** A connection to the server being fuzzed, with a deadline per step. */
export class Wire {
  /** The byte stream (a socket, or TLS over one). */
  readonly conn: ByteStream;
  /** Buffered reads from `conn`. */
  readonly reader: BufferedReader;
  /** The step deadline expired and closed the connection. */
  timedOut = false;
  #closed = false;
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** Wraps an open stream. */
  constructor(conn: ByteStream) {
    this.conn = conn;
    this.reader = new BufferedReader(conn, 64 * 1024);
  }

  /** Connects to a Unix socket. */
  static async open(path: string): Promise<Wire> {
    return new Wire(await Deno.connect({ transport: "unix", path }));
  }

  /** Starts the deadline for the next step: on expiry the connection is closed. */
  arm(ms = STEP_TIMEOUT_MS): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.timedOut = true;
      this.close();
    }, ms);
  }

  /** Cancels the step deadline. */
  disarm(): void {
    clearTimeout(this.#timer);
  }

  /** Sends bytes; false if the server has already closed. */
  async send(bytes: Uint8Array): Promise<boolean> {
    try {
      await writeAll(this.conn, bytes);
      return true;
    } catch {
      return false;
    }
  }

  /** Reads exactly n bytes. */
  read(n: number): Promise<Uint8Array> {
    return this.reader.readExact(n, "a reply");
  }

  /** Waits for the server to close: "eof", "data" (bytes arrived instead) or "timeout". */
  async eof(): Promise<"eof" | "data" | "timeout"> {
    this.arm();
    try {
      if (this.reader.buffered > 0) return "data";
      const buf = new Uint8Array(4096);
      while (true) {
        let n: number | null;
        try {
          n = await this.conn.read(buf);
        } catch {
          return this.timedOut ? "timeout" : "eof"; // reset by the server counts as closed
        }
        if (n === null) return "eof";
        if (n > 0) return "data";
      }
    } finally {
      this.disarm();
    }
  }

  /** Closes the connection (idempotent). */
  close(): void {
    this.disarm();
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

/** Thrown inside a connection when the stream cannot be followed any more. */
export class Desync extends Error {}

function u64(view: DataView, pos: number): bigint {
  return view.getBigUint64(pos);
}

/** Fuzzes one connection from connect to close. Never throws. */
async function fuzzConnection(
  target: Target,
  rng: Rng,
  tally: Tally,
  stop: () => boolean,
): Promise<void> {
  let wire: Wire;
  try {
    wire = await Wire.open(target.socket);
  } catch (error) {
    tally.violation(target, `cannot connect: ${(error as Error).message}`);
    await new Promise((r) => setTimeout(r, 100));
    return;
  }
  try {
    await drive(wire, target, rng, tally, stop);
  } catch (error) {
    if (error instanceof Desync) tally.violation(target, error.message);
    else if (wire.timedOut) tally.violation(target, "the server stopped answering (timeout)");
    else tally.violation(target, `connection failed unexpectedly: ${(error as Error).message}`);
  } finally {
    wire.close();
  }
}

async function drive(
  wire: Wire,
  target: Target,
  rng: Rng,
  tally: Tally,
  stop: () => boolean,
): Promise<void> {
  if (rng.chance(0.01)) {
    tally.record(target, "hang-up before the greeting", "abrupt", "abrupt");
    return;
  }
  wire.arm();
  const greeting = await wire.read(18);
  const g = new DataView(greeting.buffer);
  if (g.getBigUint64(0) !== C.NBD_INIT_MAGIC || g.getBigUint64(8) !== C.NBD_OPTS_MAGIC) {
    throw new Desync("bad greeting magic");
  }
  if (g.getUint16(16) !== (C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES)) {
    throw new Desync(`unexpected handshake flags 0x${g.getUint16(16).toString(16)}`);
  }
  // Client flags: mostly fixed newstyle, sometimes old clients, sometimes nonsense.
  let clientFlags: number;
  const r = rng.int(100);
  if (r < 90) {
    clientFlags = C.NBD_FLAG_C_FIXED_NEWSTYLE | (rng.chance(0.8) ? C.NBD_FLAG_C_NO_ZEROES : 0);
  } else if (r < 94) clientFlags = rng.chance(0.5) ? C.NBD_FLAG_C_NO_ZEROES : 0;
  else clientFlags = rng.chance(0.5) ? 1 << rng.range(2, 31) : rng.next();
  const flagBytes = new Uint8Array(4);
  new DataView(flagBytes.buffer).setUint32(0, clientFlags);
  if (clientFlags & ~3) {
    await wire.send(flagBytes);
    const closed = await wire.eof();
    tally.record(target, "unknown client flags", "close", "close");
    if (closed !== "eof") {
      tally.violation(target, `unknown client flags: expected a close, got ${closed}`);
    }
    return;
  }
  if (rng.chance(0.01)) {
    await wire.send(flagBytes.subarray(0, rng.range(1, 3)));
    tally.record(target, "client flags cut short", "abrupt", "abrupt");
    return;
  }
  const state: HandshakeState = {
    fixed: (clientFlags & C.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0,
    noZeroes: (clientFlags & C.NBD_FLAG_C_NO_ZEROES) !== 0,
    structured: false,
    extended: false,
    meta: "none",
  };
  await haggle(wire, target, rng, tally, stop, state, flagBytes);
}

/** How many request batches a session sends before its ending, at most. */
export interface SessionShape {
  /** Most pipelined request batches per session (default 6). */
  maxBatches?: number;
}

/**
 * Option haggling from `state` until a case ends the handshake, then
 * transmission. `pendingFlags` (the client flags) go out with the first batch.
 */
export async function haggle(
  wire: Wire,
  target: Target,
  rng: Rng,
  tally: Tally,
  stop: () => boolean,
  state: HandshakeState,
  pendingFlags: Uint8Array | undefined,
  shape: SessionShape = {},
): Promise<void> {
  // Option haggling in pipelined batches until a case ends the handshake.
  for (let round = 0; !stop(); round++) {
    const batch: OptionCase[] = [];
    const sim: HandshakeState = { ...state };
    const count = rng.range(1, 6);
    // Each case is generated for the state the server will be in when it gets there.
    const predict = (c: OptionCase) => {
      if (c.expect.kind === "final") c.expect.after?.(sim, c.expect.accept[0]!);
    };
    for (let i = 0; i < count; i++) {
      const c = nextOptionCase(rng, sim, false);
      predict(c);
      batch.push(c);
    }
    let goPipelined: RequestCase[] = [];
    if (round >= 3 || rng.chance(0.4)) {
      const last = terminalOptionCase(rng, sim);
      batch.push(last);
      // Requests sent right behind a GO, before its reply: valid ones must be served.
      if (
        last.expect.kind === "final" && last.expect.go &&
        last.expect.accept.includes(C.NBD_REP_ACK) && rng.chance(0.2)
      ) {
        goPipelined = Array.from(
          { length: rng.range(1, 4) },
          (_, i) => simpleValidRequest(rng, target, sim, BigInt(i + 1)),
        );
      }
    }
    const bytes = concatAll([
      ...(pendingFlags ? [pendingFlags] : []),
      ...batch.map((c) => c.bytes),
      ...goPipelined.map((c) => c.bytes),
    ]);
    pendingFlags = undefined;
    const sending = wire.send(bytes);
    const outcome = await readOptionReplies(wire, target, batch, state, tally);
    await sending;
    if (outcome.kind === "continue") continue;
    if (outcome.kind === "done") return;
    // Transmission.
    const tx: TransmissionState = {
      target,
      flags: outcome.flags,
      structured: state.structured || state.extended,
      extended: state.extended,
      meta: state.meta,
    };
    if (tx.extended) {
      tx.meta = outcome.flags & C.NBD_FLAG_BLOCK_STATUS_PAYLOAD
        ? "base"
        : (state.meta === "unknown" ? "none" : state.meta);
    }
    if (outcome.viaExportName && !tx.extended) {
      // The spec ties contexts to the export later chosen by GO or EXPORT_NAME; allow either reading.
      if (tx.meta === "base") tx.meta = "unknown";
    }
    if (goPipelined.length > 0) {
      await readRequestReplies(wire, tx, goPipelined, tally);
    }
    await transmission(wire, tx, rng, tally, stop, goPipelined.length + 1, shape.maxBatches ?? 6);
    return;
  }
}

/** A request that is valid whatever the export's flags: READ or WRITE inside the fuzz region. */
function simpleValidRequest(
  rng: Rng,
  target: Target,
  sim: HandshakeState,
  cookie: bigint,
): RequestCase {
  const write = rng.chance(0.5);
  const length = rng.range(1, 8192);
  const offset = target.fuzzLo + rng.int(target.size - target.fuzzLo - length);
  const extended = sim.extended;
  const payload = write ? rng.bytes(length) : new Uint8Array();
  const out = new Uint8Array((extended ? 32 : 28) + payload.length);
  const v = new DataView(out.buffer);
  const flags = write && extended ? C.NBD_CMD_FLAG_PAYLOAD_LEN : 0;
  const type = write ? C.NBD_CMD_WRITE : C.NBD_CMD_READ;
  v.setUint32(0, extended ? C.NBD_EXTENDED_REQUEST_MAGIC : C.NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, BigInt(offset));
  if (extended) v.setBigUint64(24, BigInt(length));
  else v.setUint32(24, length);
  out.set(payload, extended ? 32 : 28);
  return {
    name: `${write ? "WRITE" : "READ"} pipelined behind GO`,
    bytes: out,
    type,
    flags,
    cookie,
    offset: BigInt(offset),
    length: BigInt(length),
    expect: { kind: "reply", accept: [0] },
  };
}

/** Concatenates byte arrays. */
export function concatAll(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

type OptionOutcome =
  | { kind: "continue" }
  | { kind: "done" }
  | { kind: "transmission"; flags: number; viaExportName: boolean };

/** Reads and checks the replies to a batch of option cases, in order. */
async function readOptionReplies(
  wire: Wire,
  target: Target,
  batch: OptionCase[],
  state: HandshakeState,
  tally: Tally,
): Promise<OptionOutcome> {
  for (const c of batch) {
    try {
      const outcome = await readOptionReply(wire, target, c, state, tally);
      if (outcome) return outcome;
    } catch (error) {
      if (error instanceof Desync || wire.timedOut) throw error;
      throw new Desync(`${c.name}: ${(error as Error).message}`);
    }
  }
  return { kind: "continue" };
}

/** Reads and checks the reply to one option case; returns how the connection goes on, if it changed. */
async function readOptionReply(
  wire: Wire,
  target: Target,
  c: OptionCase,
  state: HandshakeState,
  tally: Tally,
): Promise<OptionOutcome | undefined> {
  {
    const expected = describeOption(c.expect);
    const e = c.expect;
    if (e.kind === "abrupt") {
      tally.record(target, c.name, expected, "abrupt");
      return { kind: "done" };
    }
    if (e.kind === "close") {
      const closed = await wire.eof();
      tally.record(target, c.name, expected, "close");
      if (closed !== "eof") tally.violation(target, `${c.name}: expected a close, got ${closed}`);
      return { kind: "done" };
    }
    wire.arm();
    if (e.kind === "export-name") {
      const reply = await wire.read(state.noZeroes ? 10 : 134);
      const v = new DataView(reply.buffer);
      tally.record(target, c.name, expected, "export reply");
      if (Number(u64(v, 0)) !== target.size) {
        tally.violation(target, `${c.name}: size ${u64(v, 0)}`);
      }
      if (!state.noZeroes && reply.subarray(10).some((b) => b !== 0)) {
        tally.violation(target, `${c.name}: the 124 padding bytes are not zero`);
      }
      return { kind: "transmission", flags: v.getUint16(8), viaExportName: true };
    }
    // A final reply (ACK or error), possibly after informational ones.
    const replies: Array<{ type: number; data: Uint8Array }> = [];
    while (true) {
      const h = await wire.read(20);
      const v = new DataView(h.buffer);
      if (u64(v, 0) !== C.NBD_REP_MAGIC) throw new Desync(`${c.name}: bad option reply magic`);
      const option = v.getUint32(8);
      const type = v.getUint32(12);
      const length = v.getUint32(16);
      if (length > MAX_CHUNK) throw new Desync(`${c.name}: option reply of ${length} bytes`);
      const data = await wire.read(length);
      if (option !== (c.option >>> 0)) {
        throw new Desync(`${c.name}: reply names option ${option}, expected ${c.option >>> 0}`);
      }
      replies.push({ type, data });
      if (type === C.NBD_REP_ACK || type & C.NBD_REP_FLAG_ERROR) break;
      if (replies.length > 100) throw new Desync(`${c.name}: more than 100 replies`);
    }
    wire.disarm();
    const final = replies[replies.length - 1]!.type;
    tally.record(target, c.name, expected, final === C.NBD_REP_ACK ? "ACK" : "option error");
    if (!e.accept.includes(final)) {
      tally.violation(target, `${c.name}: expected ${expected}, got ${C.replyTypeName(final)}`);
    }
    const informational = replies.slice(0, -1);
    if (final !== C.NBD_REP_ACK && informational.length > 0) {
      tally.violation(target, `${c.name}: informational replies before an error`);
    }
    let exportFlags = -1;
    if (final === C.NBD_REP_ACK) {
      const problem = checkOptionReplies(c, informational, target, (flags) => exportFlags = flags);
      if (problem) tally.violation(target, `${c.name}: ${problem}`);
    }
    e.after?.(state, final);
    if (c.option === C.NBD_OPT_ABORT && final === C.NBD_REP_ACK) {
      const closed = await wire.eof();
      if (closed !== "eof") {
        tally.violation(target, `ABORT: expected a close after the ACK, got ${closed}`);
      }
      return { kind: "done" };
    }
    if (e.go && final === C.NBD_REP_ACK) {
      if (exportFlags < 0) throw new Desync("GO: no NBD_INFO_EXPORT");
      return { kind: "transmission", flags: exportFlags, viaExportName: false };
    }
    if (e.go) return { kind: "done" }; // a failed GO: start again on a new connection
  }
  return undefined;
}

function checkOptionReplies(
  c: OptionCase,
  replies: Array<{ type: number; data: Uint8Array }>,
  target: Target,
  setFlags: (flags: number) => void,
): string | undefined {
  if (c.expect.kind !== "final") return undefined;
  switch (c.expect.check) {
    case "list": {
      if (replies.length !== 1 || replies[0]!.type !== C.NBD_REP_SERVER) {
        return `expected one NBD_REP_SERVER, got ${replies.length} replies`;
      }
      const d = replies[0]!.data;
      if (d.length < 4 || new DataView(d.buffer, d.byteOffset).getUint32(0) !== 0) {
        return "the listed export is not the default export";
      }
      return undefined;
    }
    case "info": {
      let sawExport = false;
      for (const r of replies) {
        if (r.type !== C.NBD_REP_INFO) return `unexpected ${C.replyTypeName(r.type)} in INFO/GO`;
        if (r.data.length < 2) return "NBD_REP_INFO shorter than 2 bytes";
        const v = new DataView(r.data.buffer, r.data.byteOffset, r.data.byteLength);
        if (v.getUint16(0) === C.NBD_INFO_EXPORT) {
          if (r.data.length !== 12) return "NBD_INFO_EXPORT is not 12 bytes";
          if (Number(v.getBigUint64(2)) !== target.size) return `export size ${v.getBigUint64(2)}`;
          setFlags(v.getUint16(10));
          sawExport = true;
        }
      }
      return sawExport ? undefined : "no NBD_INFO_EXPORT before the ACK";
    }
    case "meta-set":
    case "meta-list": {
      const [min, max] = c.contexts ?? [0, 1];
      if (replies.some((r) => r.type !== C.NBD_REP_META_CONTEXT)) return "unexpected reply type";
      if (replies.length < min || replies.length > max) {
        return `${replies.length} contexts, expected ${min}..${max}`;
      }
      for (const r of replies) {
        const name = new TextDecoder().decode(r.data.subarray(4));
        if (name !== C.BASE_ALLOCATION) return `unexpected context "${name.slice(0, 40)}"`;
        const id = new DataView(r.data.buffer, r.data.byteOffset).getUint32(0);
        if (c.expect.check === "meta-set" && id !== 1) return `context id ${id}`;
      }
      return undefined;
    }
  }
  return undefined;
}

/** Transmission: pipelined batches of requests, then an ending. */
async function transmission(
  wire: Wire,
  tx: TransmissionState,
  rng: Rng,
  tally: Tally,
  stop: () => boolean,
  firstCookie: number,
  maxBatches: number,
): Promise<void> {
  let cookie = BigInt(firstCookie) | (BigInt(rng.next()) << 32n);
  const batches = rng.range(1, maxBatches);
  for (let b = 0; b < batches && !stop(); b++) {
    const n = rng.range(1, 16);
    const cases: RequestCase[] = [];
    for (let i = 0; i < n; i++) cases.push(nextRequestCase(rng, tx, cookie++));
    const sending = wire.send(concatAll(cases.map((c) => c.bytes)));
    await readRequestReplies(wire, tx, cases, tally);
    await sending;
  }
  const target = tx.target as Target;
  const end = rng.int(100);
  if (end < 70) {
    const c = terminalRequestCase(rng, tx, cookie);
    await wire.send(c.bytes);
    const expected = describeRequest(c.expect);
    if (c.expect.kind === "close") {
      const closed = await wire.eof();
      tally.record(target, c.name, expected, "close");
      if (closed !== "eof") tally.violation(target, `${c.name}: expected a close, got ${closed}`);
    } else {
      tally.record(target, c.name, expected, "abrupt");
    }
  } else {
    tally.record(target, "hang-up between requests", "abrupt", "abrupt");
  }
}

interface PendingReply {
  c: RequestCase;
  errno: number;
  covered: bigint;
  statusChunks: number;
  dataChunks: number;
  holeChunks: number;
}

/** Reads the replies to a batch of requests (any order) and checks each against its case. */
async function readRequestReplies(
  wire: Wire,
  tx: TransmissionState,
  cases: RequestCase[],
  tally: Tally,
): Promise<void> {
  const pending = new Map<bigint, PendingReply>();
  for (const c of cases) {
    pending.set(c.cookie, {
      c,
      errno: 0,
      covered: 0n,
      statusChunks: 0,
      dataChunks: 0,
      holeChunks: 0,
    });
  }
  wire.arm();
  try {
    await readReplies(wire, tx, pending, tally);
  } catch (error) {
    if (error instanceof Desync || wire.timedOut) throw error;
    const waiting = [...pending.values()].map((p) => p.c.name).slice(0, 5).join(", ");
    throw new Desync(`${(error as Error).message} (waiting for: ${waiting})`);
  }
  wire.disarm();
}

async function readReplies(
  wire: Wire,
  tx: TransmissionState,
  pending: Map<bigint, PendingReply>,
  tally: Tally,
): Promise<void> {
  while (pending.size > 0) {
    const magicBytes = await wire.read(4);
    const magic = new DataView(magicBytes.buffer).getUint32(0);
    if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
      if (tx.extended) throw new Desync("simple reply after extended headers");
      const h = new DataView((await wire.read(12)).buffer);
      const errno = h.getUint32(0);
      const cookie = h.getBigUint64(4);
      const p = pending.get(cookie);
      if (!p) throw new Desync(`simple reply for unknown cookie ${cookie}`);
      if (tx.structured && (p.c.type === C.NBD_CMD_READ || p.c.type === C.NBD_CMD_BLOCK_STATUS)) {
        throw new Desync(
          `${p.c.name}: simple reply to ${C.commandName(p.c.type)} after structured replies`,
        );
      }
      p.errno = errno;
      if (errno === 0 && p.c.type === C.NBD_CMD_READ) {
        if (p.c.length > BigInt(MAX_CHUNK)) {
          throw new Desync(`${p.c.name}: success for an absurd READ`);
        }
        await wire.read(Number(p.c.length));
        p.covered = p.c.length;
      }
      finish(p, tx, tally);
      pending.delete(cookie);
      continue;
    }
    let flags: number, type: number, cookie: bigint, length: number;
    if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) {
      if (!tx.structured || tx.extended) throw new Desync("structured chunk in the wrong mode");
      const h = new DataView((await wire.read(16)).buffer);
      flags = h.getUint16(0);
      type = h.getUint16(2);
      cookie = h.getBigUint64(4);
      length = h.getUint32(12);
    } else if (magic === C.NBD_EXTENDED_REPLY_MAGIC) {
      if (!tx.extended) throw new Desync("extended chunk without extended headers");
      const h = new DataView((await wire.read(28)).buffer);
      flags = h.getUint16(0);
      type = h.getUint16(2);
      cookie = h.getBigUint64(4);
      const offset = h.getBigUint64(12);
      const big = h.getBigUint64(20);
      if (big > BigInt(MAX_CHUNK)) throw new Desync(`chunk of ${big} bytes`);
      length = Number(big);
      const p = pending.get(cookie);
      if (p && offset !== (p.c.offset & ((1n << 64n) - 1n))) {
        throw new Desync(
          `${p.c.name}: extended reply offset ${offset} does not echo ${p.c.offset}`,
        );
      }
    } else {
      throw new Desync(`bad reply magic 0x${magic.toString(16)}`);
    }
    if (length > MAX_CHUNK) throw new Desync(`chunk of ${length} bytes`);
    const p = pending.get(cookie);
    if (!p) throw new Desync(`chunk for unknown cookie ${cookie}`);
    const payload = await wire.read(length);
    const problem = chunk(p, tx, type, payload);
    if (problem) throw new Desync(`${p.c.name}: ${problem}`);
    if (flags & C.NBD_REPLY_FLAG_DONE) {
      finish(p, tx, tally);
      pending.delete(cookie);
    }
  }
}

function chunk(
  p: PendingReply,
  tx: TransmissionState,
  type: number,
  payload: Uint8Array,
): string | undefined {
  const v = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const c = p.c;
  if (type & C.NBD_REPLY_TYPE_ERROR_BIT) {
    if (payload.length < 6) return "error chunk shorter than 6 bytes";
    const errno = v.getUint32(0);
    const msg = v.getUint16(4);
    if (errno === 0) return "error chunk with errno 0";
    if (msg > payload.length - 6) return "error message runs past the chunk";
    if (p.errno === 0) p.errno = errno;
    return undefined;
  }
  const start = c.offset;
  const end = c.offset + c.length;
  switch (type) {
    case C.NBD_REPLY_TYPE_NONE:
      return payload.length === 0 ? undefined : "NONE chunk with a payload";
    case C.NBD_REPLY_TYPE_OFFSET_DATA: {
      if (c.type !== C.NBD_CMD_READ) return "data chunk for a non-READ";
      if (payload.length < 9) return "data chunk shorter than 9 bytes";
      const at = v.getBigUint64(0);
      const n = BigInt(payload.length - 8);
      if (at < start || at + n > end) return `data chunk ${at}+${n} outside the request`;
      p.covered += n;
      p.dataChunks++;
      return undefined;
    }
    case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
      if (c.type !== C.NBD_CMD_READ) return "hole chunk for a non-READ";
      if (payload.length !== 12) return "hole chunk is not 12 bytes";
      const at = v.getBigUint64(0);
      const n = BigInt(v.getUint32(8));
      if (n === 0n || at < start || at + n > end) {
        return `hole chunk ${at}+${n} outside the request`;
      }
      p.covered += n;
      p.holeChunks++;
      return undefined;
    }
    case C.NBD_REPLY_TYPE_BLOCK_STATUS:
    case C.NBD_REPLY_TYPE_BLOCK_STATUS_EXT: {
      if (c.type !== C.NBD_CMD_BLOCK_STATUS) return "block status chunk for another command";
      const ext = type === C.NBD_REPLY_TYPE_BLOCK_STATUS_EXT;
      if (ext !== tx.extended) return "block status chunk type does not match the header mode";
      const head = ext ? 8 : 4;
      const size = ext ? 16 : 8;
      if (payload.length < head + size || (payload.length - head) % size !== 0) {
        return `block status chunk of ${payload.length} bytes`;
      }
      if (v.getUint32(0) !== 1) return `block status for context ${v.getUint32(0)}`;
      const count = (payload.length - head) / size;
      if (ext && v.getUint32(4) !== count) return "block status count does not match the chunk";
      const lengths: bigint[] = [];
      for (let i = 0; i < count; i++) {
        const pos = head + i * size;
        const len = ext ? v.getBigUint64(pos) : BigInt(v.getUint32(pos));
        if (len === 0n) return "zero-length extent";
        lengths.push(len);
      }
      const want = c.effectLength ?? c.length;
      if (c.flags & C.NBD_CMD_FLAG_REQ_ONE && (count !== 1 || lengths[0]! > want)) {
        return `REQ_ONE gave ${count} extents (first ${lengths[0]}) for ${want} bytes`;
      }
      const allButLast = lengths.slice(0, -1).reduce((a, b) => a + b, 0n);
      if (allButLast >= want) return "extents continue past the requested length";
      p.statusChunks++;
      return undefined;
    }
    default:
      return `unexpected chunk type ${type}`;
  }
}

function finish(p: PendingReply, tx: TransmissionState, tally: Tally): void {
  const c = p.c;
  const target = tx.target as Target;
  const expected = describeRequest(c.expect);
  tally.record(target, c.name, expected, p.errno === 0 ? "ok" : "error reply");
  if (c.expect.kind !== "reply") return;
  if (!c.expect.accept.includes(p.errno)) {
    tally.violation(
      target,
      `${c.name} (type ${c.type} flags 0x${
        c.flags.toString(16)
      } offset ${c.offset} length ${c.length}): expected ${expected}, got ${
        p.errno === 0 ? "ok" : C.errnoName(p.errno)
      }`,
    );
    return;
  }
  if (p.errno !== 0) return;
  if (c.type === C.NBD_CMD_READ) {
    if (p.covered !== c.length) {
      tally.violation(target, `${c.name}: READ reply covered ${p.covered} of ${c.length}`);
    }
    if (c.flags & C.NBD_CMD_FLAG_DF && p.dataChunks + p.holeChunks > 1) {
      tally.violation(
        target,
        `${c.name}: DF READ answered in ${p.dataChunks + p.holeChunks} chunks`,
      );
    }
  }
  if (c.type === C.NBD_CMD_BLOCK_STATUS && p.statusChunks !== 1) {
    tally.violation(target, `${c.name}: ${p.statusChunks} status chunks`);
  }
}

/** Occasionally: many connections at once that read the greeting and vanish. */
async function storm(target: Target, rng: Rng, tally: Tally): Promise<void> {
  const n = rng.range(8, 32);
  const wires = await Promise.allSettled(Array.from({ length: n }, () => Wire.open(target.socket)));
  await Promise.all(wires.map(async (w) => {
    if (w.status !== "fulfilled") {
      tally.violation(target, `connection storm: cannot connect: ${w.reason}`);
      return;
    }
    try {
      if (rng.chance(0.5)) {
        w.value.arm();
        await w.value.read(18);
      }
    } catch {
      tally.violation(target, "connection storm: no greeting");
    } finally {
      w.value.close();
      tally.record(target, "connection storm: hang-up after connect", "abrupt", "abrupt");
    }
  }));
}

/** Log lines that show an internal error in the server. */
export const CRASH_PATTERN =
  /Uncaught|panicked|RangeError|TypeError|ReferenceError|SyntaxError|^\s+at /;

/** Runs the fuzzer and returns its report. */
export async function runFuzz(options: FuzzOptions = {}): Promise<FuzzReport> {
  const maxCases = options.cases ?? 20_000;
  const seconds = options.seconds ?? 60;
  const seed = options.seed ?? (Date.now() % 1_000_000);
  const workersPerServer = options.workers ?? 4;
  const log = options.log ?? (() => {});
  await using dir = await tempDir("nbd-fuzz");
  const image = `${dir.path}/disk.img`;
  {
    const f = await Deno.open(image, { create: true, write: true, truncate: true });
    await f.truncate(16 * MiB);
    f.close();
  }
  const checkerBytes = 4 * MiB;
  const memory = await startNbdServe(["--max-payload", "1M", "memory", "64M"]);
  const file = await startNbdServe(["file", image]).catch(async (e) => {
    await memory[Symbol.asyncDispose]();
    throw e;
  });
  const targets: Target[] = [
    {
      kind: "memory",
      size: 64 * MiB,
      maxRequest: MiB,
      fuzzLo: checkerBytes,
      server: memory,
      socket: memory.socket!,
    },
    {
      kind: "file",
      size: 16 * MiB,
      maxRequest: 64 * MiB,
      fuzzLo: checkerBytes,
      server: file,
      socket: file.socket!,
    },
  ];
  const tally = new Tally();
  const checker = emptyStats();
  const servers: ServerReport[] = [];
  const started = performance.now();
  const watch = new ServerWatch(targets, started);
  const deadline = started + seconds * 1000;
  let stopping = false;
  const stop = () => stopping || tally.cases >= maxCases || performance.now() >= deadline;
  let elapsed = 0;
  try {
    // The well-behaved clients: structured replies on one server, extended headers on the other.
    const checkers = await Promise.all(targets.map(async (t, i) => {
      const client = await PipelinedClient.connect(t.socket, { extended: i === 1 });
      const worker = new VerifiedWorker(client, {
        id: 100 + i,
        regionStart: 0,
        regionBlocks: checkerBytes / 4096,
        blockSize: 4096,
        inFlight: 8,
        seed: seed + i,
      });
      return { client, worker };
    }));
    const checkerRuns = checkers.map(({ worker }) => worker.run(() => stopping));
    log(
      `fuzz: seed ${seed}, up to ${maxCases} cases or ${seconds} s, ${workersPerServer} connections per server`,
    );
    let lastReport = performance.now();
    const fuzzers = targets.flatMap((t, ti) =>
      Array.from({ length: workersPerServer }, async (_, wi) => {
        const rng = new Rng(seed * 1000 + ti * 100 + wi);
        while (!stop()) {
          if (rng.chance(0.005)) await storm(t, rng, tally);
          else await fuzzConnection(t, rng, tally, stop);
          if (wi === 0 && ti === 0 && performance.now() - lastReport > 5000) {
            lastReport = performance.now();
            log(
              `fuzz: ${tally.cases} cases, ${tally.violations} violations, ${
                ((lastReport - started) / 1000).toFixed(0)
              } s`,
            );
          }
        }
      })
    );
    try {
      await Promise.all(fuzzers);
    } finally {
      watch.stop();
      elapsed = (performance.now() - started) / 1000;
      stopping = true;
      await Promise.all(checkerRuns);
    }
    for (const { client, worker } of checkers) {
      await worker.sweep();
      mergeStats(checker, worker.stats);
      await client.disconnect().catch(() => {});
    }
  } finally {
    stopping = true;
    servers.push(...await watch.finish());
  }
  const report: FuzzReport = {
    seed,
    cases: tally.cases,
    seconds: elapsed,
    classes: tally.classes,
    outcomes: tally.outcomes,
    violations: tally.violations,
    violationSamples: tally.samples,
    checker,
    integrityErrors: checker.errors + checker.mismatches,
    servers,
  };
  return report;
}

/**
 * Samples the fuzzed servers' memory every half second while a run goes
 * on, then stops them and reports how each one ended.
 */
export class ServerWatch {
  readonly #targets: Target[];
  readonly #started: number;
  readonly #startRss: Array<number | undefined>;
  readonly #peaks: Array<number | undefined>;
  readonly #timelines: Array<Array<[number, number]>>;
  #timer: ReturnType<typeof setInterval> | undefined;

  /** Starts sampling `targets`; times are counted from `started` (performance.now()). */
  constructor(targets: Target[], started: number) {
    this.#targets = targets;
    this.#started = started;
    this.#startRss = targets.map((t) => rssKiB(t.server.child.pid));
    this.#peaks = targets.map(() => undefined);
    this.#timelines = targets.map(() => []);
    this.#timer = setInterval(() => this.#sample(), 500);
  }

  #sample(): void {
    const at = (performance.now() - this.#started) / 1000;
    this.#targets.forEach((t, i) => {
      this.#peak(i);
      const rss = rssKiB(t.server.child.pid);
      if (rss !== undefined) this.#timelines[i]!.push([at, rss]);
    });
  }

  #peak(i: number): void {
    const peak = peakRssKiB(this.#targets[i]!.server.child.pid);
    if (peak !== undefined) this.#peaks[i] = Math.max(this.#peaks[i] ?? 0, peak);
  }

  /** Stops sampling. */
  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** Stops sampling and the servers; what each one did. */
  async finish(): Promise<ServerReport[]> {
    this.stop();
    const reports: ServerReport[] = [];
    for (const [i, t] of this.#targets.entries()) {
      const exited = await Promise.race([
        t.server.child.status.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), 0)),
      ]);
      this.#peak(i);
      await t.server[Symbol.asyncDispose]();
      const status = await t.server.child.status;
      const lines = t.server.stderr().split("\n").filter((l) => l.length > 0);
      reports.push({
        kind: t.kind,
        peakRssKiB: this.#peaks[i],
        startRssKiB: this.#startRss[i],
        rssTimeline: thin(this.#timelines[i]!, 6),
        survived: !exited,
        exitCode: status.code,
        internalErrors: lines.filter((l) => CRASH_PATTERN.test(l)).slice(0, 20),
        logLines: lines.length,
        logKinds: logKinds(lines),
      });
    }
    return reports;
  }
}

/** Keeps about n evenly spaced samples, always including the last. */
export function thin<T>(samples: T[], n: number): T[] {
  if (samples.length <= n) return samples;
  const out: T[] = [];
  for (let i = 1; i <= n; i++) out.push(samples[Math.round((i * samples.length) / n) - 1]!);
  return out;
}

/** The most frequent kinds of log line (numbers masked) with their counts. */
export function logKinds(lines: string[]): Array<[string, number]> {
  const kinds = new Map<string, number>();
  for (const line of lines) {
    const kind = line.replace(/\d+/g, "N").replace(/"[^"]*"/g, '"…"').slice(0, 120);
    kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
  }
  return [...kinds].sort((a, b) => b[1] - a[1]).slice(0, 12);
}

/** Whether a report shows a clean run. */
export function fuzzPassed(r: FuzzReport): boolean {
  return r.violations === 0 && r.integrityErrors === 0 &&
    r.servers.every((s) => s.survived && s.exitCode === 0 && s.internalErrors.length === 0);
}

/** A human-readable report; `brief` leaves out the per-class table. */
export function formatFuzzReport(r: FuzzReport, brief = false): string {
  const lines: string[] = [];
  lines.push(
    `fuzz: seed ${r.seed}: ${r.cases} cases in ${r.seconds.toFixed(1)} s (${
      Math.round(r.cases / r.seconds)
    } cases/s)`,
  );
  lines.push("outcomes seen:");
  for (const [k, n] of [...r.outcomes].sort((a, b) => b[1] - a[1])) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push(`input classes (→ outcome the spec prescribes): ${r.classes.size}`);
  for (const [k, n] of brief ? [] : [...r.classes].sort((a, b) => a[0].localeCompare(b[0]))) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push(`spec violations: ${r.violations}`);
  for (const s of r.violationSamples) lines.push(`  ${s}`);
  const c = r.checker;
  lines.push(
    `well-behaved clients: ${c.requests} requests (${c.reads} reads, ${c.writes} writes, ${c.flushes} flushes), ` +
      `errors ${c.errors}, mismatches ${c.mismatches} → integrity errors ${r.integrityErrors}`,
  );
  for (const p of c.problems.slice(0, 5)) lines.push(`  ${p}`);
  for (const s of r.servers) {
    lines.push(
      `server ${s.kind}: peak RSS ${formatKiB(s.peakRssKiB)} (at start ${
        formatKiB(s.startRssKiB)
      }), ` +
        `${s.survived ? "survived" : "DIED"}, exit ${
          s.exitCode === 0 ? "clean" : `status ${s.exitCode}`
        }, ` +
        `${s.logLines} log lines, internal errors ${s.internalErrors.length}`,
    );
    if (s.rssTimeline.length > 0) {
      lines.push(
        `  RSS over time: ${
          s.rssTimeline.map(([t, kib]) => `${t.toFixed(0)} s ${formatKiB(kib)}`).join(", ")
        }`,
      );
    }
    for (const e of s.internalErrors.slice(0, 10)) lines.push(`  ${e}`);
    for (const [kind, n] of s.logKinds) lines.push(`  ${String(n).padStart(6)} × ${kind}`);
  }
  lines.push(fuzzPassed(r) ? "fuzz: OK" : "fuzz: FAILED");
  return lines.join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      cases: { type: "string", short: "n" },
      seconds: { type: "string", short: "s" },
      seed: { type: "string" },
      workers: { type: "string", short: "w" },
      tls: { type: "boolean" },
      qcow2: { type: "boolean" },
      served: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(
      "Usage: deno task fuzz [--tls | --qcow2 [--served N]] [--cases N] [--seconds S] [--seed N] [--workers N]\n" +
        "  --tls      fuzz TLS sessions and the STARTTLS edge instead of plaintext connections\n" +
        "  --qcow2    fuzz the qcow2 format code with mutated images (in process, served\n" +
        "             through --filter=qcow2 (--served N images), nbd info/copy, backing chains)",
    );
    return 0;
  }
  const number = (text: string | undefined, name: string): number | undefined => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!Number.isInteger(n) || n < 0) {
      console.error(`fuzz: ${name}: expected a non-negative integer, got "${text}"`);
      Deno.exit(2);
    }
    return n;
  };
  if (values.qcow2) {
    const { formatQcow2FuzzReport, qcow2FuzzPassed, runQcow2Fuzz } = await import(
      "./fuzz_qcow2.ts"
    );
    const report = await runQcow2Fuzz({
      cases: number(values.cases, "--cases"),
      seconds: number(values.seconds, "--seconds"),
      seed: number(values.seed, "--seed"),
      workers: number(values.workers, "--workers"),
      served: number(values.served, "--served"),
      log: (line) => console.log(line),
    });
    console.log(formatQcow2FuzzReport(report));
    return qcow2FuzzPassed(report) ? 0 : 1;
  }
  if (values.tls) {
    const { formatTlsFuzzReport, runTlsFuzz, tlsFuzzPassed } = await import("./fuzz_tls.ts");
    const report = await runTlsFuzz({
      cases: number(values.cases, "--cases"),
      seconds: number(values.seconds, "--seconds"),
      seed: number(values.seed, "--seed"),
      workers: number(values.workers, "--workers"),
      log: (line) => console.log(line),
    });
    console.log(formatTlsFuzzReport(report));
    return tlsFuzzPassed(report) ? 0 : 1;
  }
  const report = await runFuzz({
    cases: number(values.cases, "--cases"),
    seconds: number(values.seconds, "--seconds"),
    seed: number(values.seed, "--seed"),
    workers: number(values.workers, "--workers"),
    log: (line) => console.log(line),
  });
  console.log(formatFuzzReport(report));
  return fuzzPassed(report) ? 0 : 1;
}

// No top-level await: fuzz_tls.ts imports this module, and main() imports that one.
if (import.meta.main) main().then((code) => Deno.exit(code));
