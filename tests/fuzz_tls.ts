/**
 * The protocol fuzzer over TLS. Two `nbd serve --tls=require` processes
 * (memory exports; the second with a 2 s handshake limit) are driven on
 * many connections at once:
 *
 * - sessions: a plaintext prelude (client flags, options that must be
 *   refused with ERR_TLS_REQD, STARTTLS), the TLS handshake, then the same
 *   option and request fuzzing as the plaintext fuzzer (fuzz.ts), with many
 *   request batches per session so that one handshake carries hundreds of
 *   cases. Each option or request counts as one case.
 * - the STARTTLS edge: plaintext data right behind STARTTLS, plaintext
 *   instead of a ClientHello, a second STARTTLS inside TLS, a TLS
 *   ClientHello before STARTTLS, stalled handshakes (dropped after the
 *   server's limit), renegotiation and key-update attempts (openssl
 *   s_client), truncated and garbage TLS records, close_notify in the middle
 *   of a request. Each counts as one case.
 *
 * Meanwhile a well-behaved TLS client on each server keeps writing and
 * reading back verified data, and after every edge batch a fresh TLS client
 * must connect and read.
 *
 *   deno task fuzz --tls                       # 20,000 cases or 60 s
 *   deno task fuzz --tls --cases 200000 --seconds 600 --seed 7
 *
 * @module
 */

import * as net from "node:net";
import * as tls from "node:tls";
import { Duplex } from "node:stream";
import * as C from "../protocol/constants.ts";
import { fromNodeSocket } from "../io/byte_stream.ts";
import { NbdClient } from "../client/client.ts";
import { makeCertificates } from "./certs.ts";
import {
  concatAll,
  Desync,
  haggle,
  type ServerReport,
  ServerWatch,
  Tally,
  type Target,
  Wire,
} from "./fuzz.ts";
import { type HandshakeState, optionBytes, preTlsOptionCase, Rng } from "./fuzz_cases.ts";
import { hasCommand, startNbdServe, tempDir } from "./helpers.ts";
import { formatKiB } from "./proc_stats.ts";
import { emptyStats, type IoStats, mergeStats, VerifiedWorker } from "./verified_io.ts";

const MiB = 1024 * 1024;
/** The edge server's handshake limit (seconds): stalled handshakes must be dropped after it. */
const EDGE_HANDSHAKE_LIMIT = 2;
/** How long a close may take after an input that must end the connection. */
const CLOSE_WITHIN_MS = 10_000;

/** Options of a TLS fuzz run. */
export interface TlsFuzzOptions {
  /** Stop after this many cases (default 20,000). */
  cases?: number;
  /** Stop after this many seconds (default 60). */
  seconds?: number;
  /** Random seed (default: time based). */
  seed?: number;
  /** Fuzzing TLS sessions running at once (default 8). */
  workers?: number;
  /** Run the STARTTLS-edge batches (default true). */
  edge?: boolean;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

/** The outcome of a TLS fuzz run. */
export interface TlsFuzzReport {
  /** The seed used. */
  seed: number;
  /** Cases run (options, requests and edge cases). */
  cases: number;
  /** Seconds taken. */
  seconds: number;
  /** TLS sessions established by the fuzzing connections. */
  sessions: number;
  /** Edge cases run. */
  edgeCases: number;
  /** Fresh well-behaved TLS clients that connected and read after edge batches. */
  probes: number;
  /** Probes that failed (must be 0). */
  probeFailures: string[];
  /** Cases per input class and expected outcome. */
  classes: Map<string, number>;
  /** Cases per outcome kind. */
  outcomes: Map<string, number>;
  /** Cases whose reply or close differed from what the protocol prescribes. */
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

interface TlsTarget extends Target {
  /** PEM of the test CA. */
  ca: string;
  /** Directory of the test certificates. */
  certificates: string;
}

/** A plaintext connection whose socket can later carry TLS, and whose raw bytes stay reachable. */
interface RawConnection {
  /** The plaintext wire. */
  wire: Wire;
  /** The socket under it. */
  socket: net.Socket;
}

async function connectRaw(path: string): Promise<RawConnection> {
  const socket = net.connect({ path });
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  socket.on("error", () => {}); // failures surface through reads
  return { wire: new Wire(fromNodeSocket(socket)), socket };
}

/** A TLS session over a raw socket that the fuzzer can still write to directly. */
interface TlsSession {
  /** The wire carrying TLS. */
  wire: Wire;
  /** The TLS socket. */
  secure: tls.TLSSocket;
  /** The raw socket under TLS (writes bypass TLS). */
  raw: net.Socket;
}

/**
 * Starts TLS on a connection whose STARTTLS was just acknowledged. The TLS
 * layer talks to a shim stream that forwards to the raw socket, so that
 * bytes can be injected under TLS.
 */
async function startTls(conn: RawConnection, ca: string): Promise<TlsSession> {
  const stream = conn.wire.conn;
  if (conn.wire.reader.buffered > 0) {
    throw new Desync("the server sent data after its STARTTLS reply");
  }
  const { socket: raw, unread } = stream.detach!();
  if (unread.length > 0) throw new Desync("the server sent data after its STARTTLS reply");
  const shim = new Duplex({
    read() {
      if (raw.isPaused()) raw.resume();
    },
    write(chunk, _encoding, done) {
      if (raw.destroyed) done(new Error("the connection is closed"));
      else raw.write(chunk, done);
    },
    final(done) {
      raw.end();
      done();
    },
    destroy(error, done) {
      raw.destroy();
      done(error);
    },
  });
  raw.on("data", (d) => {
    if (!shim.push(d)) raw.pause();
  });
  raw.on("end", () => shim.push(null));
  raw.on("close", () => shim.destroy());
  raw.resume();
  const secure = tls.connect({
    socket: shim as unknown as net.Socket,
    ca,
    servername: "localhost",
    minVersion: "TLSv1.2",
  });
  secure.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Desync("TLS handshake timed out")), 20_000);
    secure.once("secureConnect", () => {
      clearTimeout(timer);
      resolve();
    });
    secure.once("error", (e) => {
      clearTimeout(timer);
      reject(new Desync(`TLS handshake failed: ${e.message}`));
    });
  });
  return { wire: new Wire(fromNodeSocket(secure)), secure, raw };
}

/** Reads the 18-byte greeting and checks it. */
async function greeting(wire: Wire): Promise<void> {
  wire.arm();
  const g = await wire.read(18);
  wire.disarm();
  const v = new DataView(g.buffer);
  if (v.getBigUint64(0) !== C.NBD_INIT_MAGIC || v.getBigUint64(8) !== C.NBD_OPTS_MAGIC) {
    throw new Desync("bad greeting magic");
  }
}

/** Reads one option reply (header and data). */
async function optionReply(
  wire: Wire,
): Promise<{ option: number; type: number; data: Uint8Array }> {
  wire.arm();
  const h = await wire.read(20);
  const v = new DataView(h.buffer);
  if (v.getBigUint64(0) !== C.NBD_REP_MAGIC) throw new Desync("bad option reply magic");
  const length = v.getUint32(16);
  if (length > MiB) throw new Desync(`option reply of ${length} bytes`);
  const data = await wire.read(length);
  wire.disarm();
  return { option: v.getUint32(8), type: v.getUint32(12), data };
}

/**
 * Waits for the server to end the connection, reading (and discarding) what
 * it still sends: "eof", or "timeout" when it stays open.
 */
async function drainToClose(wire: Wire, ms = CLOSE_WITHIN_MS): Promise<"eof" | "timeout"> {
  wire.arm(ms);
  const buf = new Uint8Array(64 * 1024);
  try {
    while (true) {
      let n: number | null;
      try {
        n = await wire.conn.read(buf);
      } catch {
        return wire.timedOut ? "timeout" : "eof";
      }
      if (n === null) return "eof";
    }
  } finally {
    wire.disarm();
  }
}

const FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;

function u32(n: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n);
  return out;
}

/** The plaintext prelude: client flags, options refused for want of TLS, STARTTLS and its ACK. */
async function prelude(
  conn: RawConnection,
  target: TlsTarget,
  rng: Rng,
  tally: Tally,
): Promise<boolean> {
  await greeting(conn.wire);
  const state: HandshakeState = {
    fixed: true,
    noZeroes: true,
    structured: false,
    extended: false,
    meta: "none",
  };
  const refused = Array.from(
    { length: rng.chance(0.5) ? rng.int(4) : 0 },
    () => preTlsOptionCase(rng, state),
  );
  const closing = refused.findIndex((c) => c.expect.kind === "close");
  const cases = closing >= 0 ? refused.slice(0, closing + 1) : refused;
  const starttls = optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array());
  await conn.wire.send(
    concatAll([u32(FLAGS), ...cases.map((c) => c.bytes), ...(closing >= 0 ? [] : [starttls])]),
  );
  for (const c of cases) {
    if (c.expect.kind === "close") {
      const closed = await drainToClose(conn.wire);
      tally.record(target, c.name, "close", "close");
      if (closed !== "eof") tally.violation(target, `${c.name}: expected a close, got ${closed}`);
      return false;
    }
    const r = await optionReply(conn.wire);
    if (r.option !== c.option >>> 0) throw new Desync(`${c.name}: reply for option ${r.option}`);
    const accept = c.expect.kind === "final" ? c.expect.accept : [];
    tally.record(
      target,
      c.name,
      accept.map((t) => C.replyTypeName(t)).join("|"),
      r.type === C.NBD_REP_ACK ? "ACK" : "option error",
    );
    if (!accept.includes(r.type)) {
      tally.violation(target, `${c.name}: got ${C.replyTypeName(r.type)}`);
    }
  }
  const ack = await optionReply(conn.wire);
  tally.record(target, "STARTTLS", "ACK", ack.type === C.NBD_REP_ACK ? "ACK" : "option error");
  if (ack.option !== C.NBD_OPT_STARTTLS || ack.type !== C.NBD_REP_ACK) {
    tally.violation(target, `STARTTLS: got ${C.replyTypeName(ack.type)}`);
    return false;
  }
  return true;
}

/** One fuzzing session: prelude, TLS, then option and request fuzzing inside TLS. */
async function fuzzSession(
  target: TlsTarget,
  rng: Rng,
  tally: Tally,
  stop: () => boolean,
  counts: { sessions: number },
): Promise<void> {
  let conn: RawConnection | undefined;
  let session: TlsSession | undefined;
  try {
    conn = await connectRaw(target.socket);
    if (!(await prelude(conn, target, rng, tally))) return;
    session = await startTls(conn, target.ca);
    counts.sessions++;
    const state: HandshakeState = {
      fixed: true,
      noZeroes: true,
      structured: false,
      extended: false,
      meta: "none",
      tls: true,
    };
    await haggle(session.wire, target, rng, tally, stop, state, undefined, { maxBatches: 150 });
  } catch (error) {
    const wire = session?.wire ?? conn?.wire;
    if (error instanceof Desync) tally.violation(target, error.message);
    else if (wire?.timedOut) tally.violation(target, "the server stopped answering (timeout)");
    else tally.violation(target, `connection failed unexpectedly: ${(error as Error).message}`);
  } finally {
    session?.wire.close();
    session?.raw.destroy();
    conn?.wire.close();
    conn?.socket.destroy();
  }
}

/** A GO for the default export; returns the transmission flags after its ACK. */
async function go(wire: Wire): Promise<number> {
  const data = concatAll([u32(0), new Uint8Array(2)]);
  await wire.send(optionBytes(C.NBD_OPT_GO, data));
  let flags = -1;
  while (true) {
    const r = await optionReply(wire);
    if (r.type === C.NBD_REP_INFO && r.data.length >= 12) {
      const v = new DataView(r.data.buffer, r.data.byteOffset);
      if (v.getUint16(0) === C.NBD_INFO_EXPORT) flags = v.getUint16(10);
    }
    if (r.type === C.NBD_REP_ACK) break;
    if (r.type & C.NBD_REP_FLAG_ERROR) throw new Desync(`GO failed: ${C.replyTypeName(r.type)}`);
  }
  if (flags < 0) throw new Desync("GO: no NBD_INFO_EXPORT");
  return flags;
}

function request(type: number, cookie: bigint, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(28);
  const v = new DataView(out.buffer);
  v.setUint32(0, C.NBD_REQUEST_MAGIC);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return out;
}

/** The STARTTLS-edge case kinds. */
const EDGE_KINDS = [
  "plaintext option right behind STARTTLS",
  "plaintext option instead of the ClientHello",
  "second STARTTLS inside TLS",
  "ClientHello instead of client flags",
  "ClientHello instead of an option",
  "garbage TLS record",
  "TLS record with a bad MAC",
  "oversized TLS record",
  "truncated TLS record, then hang-up",
  "truncated ClientHello, then hang-up",
  "close_notify in the middle of a WRITE",
  "close_notify with requests in flight",
] as const;
type EdgeKind = typeof EDGE_KINDS[number];

/** Stall kinds: run against the server with the short handshake limit. */
const STALL_KINDS = [
  "stall before client flags",
  "stall after STARTTLS ACK (no ClientHello)",
  "stall in the middle of the ClientHello",
] as const;
type StallKind = typeof STALL_KINDS[number];

/** A captured ClientHello record, as a client sends it first. */
let clientHello: Uint8Array | undefined;

/** Captures the first flight of a TLS client (its ClientHello). */
async function captureClientHello(ca: string): Promise<Uint8Array> {
  if (clientHello) return clientHello;
  const captured = await new Promise<Uint8Array>((resolve) => {
    const shim = new Duplex({
      read() {},
      write(chunk, _encoding, done) {
        resolve(new Uint8Array(chunk));
        done();
      },
    });
    const secure = tls.connect({ socket: shim as unknown as net.Socket, ca });
    secure.on("error", () => {});
    setTimeout(() => secure.destroy(), 2000);
  });
  clientHello = captured;
  return captured;
}

/** Opens a session up to TLS (no options after STARTTLS yet). */
async function openTls(target: TlsTarget): Promise<{ conn: RawConnection; session: TlsSession }> {
  const conn = await connectRaw(target.socket);
  await greeting(conn.wire);
  await conn.wire.send(concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array())]));
  const ack = await optionReply(conn.wire);
  if (ack.type !== C.NBD_REP_ACK) throw new Desync(`STARTTLS: ${C.replyTypeName(ack.type)}`);
  return { conn, session: await startTls(conn, target.ca) };
}

/** Runs one STARTTLS-edge case; returns its outcome kind. Violations go to the tally. */
async function edgeCase(target: TlsTarget, kind: EdgeKind, rng: Rng, tally: Tally): Promise<void> {
  const hello = await captureClientHello(target.ca);
  const mustClose = async (wire: Wire, what: string) => {
    const closed = await drainToClose(wire);
    tally.record(target, what, "close", closed === "eof" ? "close" : "open");
    if (closed !== "eof") tally.violation(target, `${what}: expected a close, got ${closed}`);
  };
  const list = optionBytes(C.NBD_OPT_LIST, new Uint8Array());
  const sockets: Array<{ destroy(): void }> = [];
  try {
    switch (kind) {
      case "plaintext option right behind STARTTLS": {
        const conn = await connectRaw(target.socket);
        sockets.push(conn.socket);
        await greeting(conn.wire);
        await conn.wire.send(
          concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array()), list]),
        );
        // Either no ACK at all or the ACK and then a failed handshake: both end in a close.
        await mustClose(conn.wire, kind);
        return;
      }
      case "plaintext option instead of the ClientHello": {
        const conn = await connectRaw(target.socket);
        sockets.push(conn.socket);
        await greeting(conn.wire);
        await conn.wire.send(
          concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array())]),
        );
        const ack = await optionReply(conn.wire);
        if (ack.type !== C.NBD_REP_ACK) throw new Desync("STARTTLS refused");
        await conn.wire.send(list);
        await mustClose(conn.wire, kind);
        return;
      }
      case "ClientHello instead of client flags": {
        const conn = await connectRaw(target.socket);
        sockets.push(conn.socket);
        await greeting(conn.wire);
        await conn.wire.send(hello);
        await mustClose(conn.wire, kind);
        return;
      }
      case "ClientHello instead of an option": {
        const conn = await connectRaw(target.socket);
        sockets.push(conn.socket);
        await greeting(conn.wire);
        await conn.wire.send(concatAll([u32(FLAGS), hello]));
        await mustClose(conn.wire, kind);
        return;
      }
      case "truncated ClientHello, then hang-up": {
        const conn = await connectRaw(target.socket);
        sockets.push(conn.socket);
        await greeting(conn.wire);
        await conn.wire.send(
          concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array())]),
        );
        await optionReply(conn.wire);
        await conn.wire.send(hello.subarray(0, rng.range(1, hello.length - 1)));
        tally.record(target, kind, "abrupt", "abrupt");
        return;
      }
      default:
        break;
    }
    // The remaining kinds start inside a TLS session.
    const { conn, session } = await openTls(target);
    sockets.push(conn.socket, session.raw, session.secure);
    const wire = session.wire;
    switch (kind) {
      case "second STARTTLS inside TLS": {
        await wire.send(optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array()));
        const r = await optionReply(wire);
        tally.record(
          target,
          kind,
          "ERR_INVALID",
          r.type === C.NBD_REP_ACK ? "ACK" : "option error",
        );
        if (r.type !== C.NBD_REP_ERR_INVALID) {
          tally.violation(target, `${kind}: got ${C.replyTypeName(r.type)}`);
        }
        // The session still works afterwards.
        await wire.send(list);
        while (true) {
          const l = await optionReply(wire);
          if (l.type === C.NBD_REP_ACK) break;
          if (l.type !== C.NBD_REP_SERVER) {
            tally.violation(target, `${kind}: LIST afterwards gave ${C.replyTypeName(l.type)}`);
            break;
          }
        }
        return;
      }
      case "garbage TLS record":
        if (rng.chance(0.5)) await go(wire);
        session.raw.write(rng.bytes(rng.range(1, 600)));
        await mustClose(wire, kind);
        return;
      case "TLS record with a bad MAC": {
        if (rng.chance(0.5)) await go(wire);
        const body = rng.bytes(rng.range(17, 300));
        session.raw.write(
          concatAll([Uint8Array.of(0x17, 3, 3, body.length >> 8, body.length), body]),
        );
        await mustClose(wire, kind);
        return;
      }
      case "oversized TLS record": {
        const length = rng.range(18433, 0xffff);
        session.raw.write(
          concatAll([Uint8Array.of(0x17, 3, 3, length >> 8, length & 0xff), rng.bytes(64)]),
        );
        await mustClose(wire, kind);
        return;
      }
      case "truncated TLS record, then hang-up": {
        if (rng.chance(0.5)) await go(wire);
        session.raw.write(Uint8Array.of(0x17, 3, 3, 0x40, 0x00, ...rng.bytes(rng.int(200))));
        session.raw.end();
        tally.record(target, kind, "abrupt", "abrupt");
        return;
      }
      case "close_notify in the middle of a WRITE": {
        await go(wire);
        const length = rng.range(512, 65536);
        const header = request(C.NBD_CMD_WRITE, 1n, target.fuzzLo, length);
        await wire.send(concatAll([header, rng.bytes(rng.int(length))]));
        session.secure.end(); // close_notify, then the write side closes
        await mustClose(wire, kind);
        return;
      }
      case "close_notify with requests in flight": {
        await go(wire);
        const reads = Array.from(
          { length: rng.range(1, 16) },
          (_, i) => request(C.NBD_CMD_READ, BigInt(i + 1), target.fuzzLo, 4096),
        );
        await wire.send(concatAll(reads));
        session.secure.end();
        await mustClose(wire, kind);
        return;
      }
    }
  } catch (error) {
    if (error instanceof Desync) tally.violation(target, `${kind}: ${error.message}`);
    else tally.violation(target, `${kind}: ${(error as Error).message}`);
  } finally {
    for (const s of sockets) s.destroy();
  }
}

/** A stalled handshake: the server must close it once its handshake limit has passed. */
async function stallCase(
  target: TlsTarget,
  kind: StallKind,
  rng: Rng,
  tally: Tally,
): Promise<void> {
  const hello = await captureClientHello(target.ca);
  let conn: RawConnection | undefined;
  try {
    conn = await connectRaw(target.socket);
    const started = performance.now();
    await greeting(conn.wire);
    if (kind !== "stall before client flags") {
      await conn.wire.send(
        concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array())]),
      );
      await optionReply(conn.wire);
      if (kind === "stall in the middle of the ClientHello") {
        await conn.wire.send(hello.subarray(0, rng.range(1, hello.length - 1)));
      }
    }
    const closed = await drainToClose(conn.wire, EDGE_HANDSHAKE_LIMIT * 1000 + CLOSE_WITHIN_MS);
    const after = (performance.now() - started) / 1000;
    tally.record(
      target,
      kind,
      "close after the handshake limit",
      closed === "eof" ? "close" : "open",
    );
    if (closed !== "eof") {
      tally.violation(target, `${kind}: still open after ${after.toFixed(1)} s`);
    } else if (after < EDGE_HANDSHAKE_LIMIT - 0.2) {
      tally.violation(target, `${kind}: closed after ${after.toFixed(2)} s, before the limit`);
    }
  } catch (error) {
    tally.violation(target, `${kind}: ${(error as Error).message}`);
  } finally {
    conn?.socket.destroy();
  }
}

/**
 * Renegotiation (TLS 1.2, "R") or a key update (TLS 1.3, "K") from openssl
 * s_client, relayed through a local socket after the plaintext prelude.
 * Afterwards an NBD_OPT_LIST must be answered, or the server must have
 * closed the connection; it must not hang.
 */
async function opensslCase(
  target: TlsTarget,
  kind: "renegotiation attempt (TLS 1.2)" | "key update (TLS 1.3)",
  tally: Tally,
  dir: string,
): Promise<void> {
  const relayPath = `${dir}/relay-${Math.random().toString(36).slice(2)}.sock`;
  const relay = net.createServer();
  let upstream: RawConnection | undefined;
  const ready = new Promise<void>((resolve, reject) => {
    relay.once("connection", async (client: net.Socket) => {
      try {
        client.pause();
        upstream = await connectRaw(target.socket);
        await greeting(upstream.wire);
        await upstream.wire.send(
          concatAll([u32(FLAGS), optionBytes(C.NBD_OPT_STARTTLS, new Uint8Array())]),
        );
        const ack = await optionReply(upstream.wire);
        if (ack.type !== C.NBD_REP_ACK) throw new Desync("STARTTLS refused");
        const { socket } = upstream.wire.conn.detach!();
        socket.pipe(client);
        client.pipe(socket);
        socket.on("error", () => client.destroy());
        client.on("error", () => socket.destroy());
        socket.resume();
        client.resume();
        resolve();
      } catch (error) {
        client.destroy();
        reject(error);
      }
    });
  });
  await new Promise<void>((resolve) => relay.listen(relayPath, resolve));
  const tls12 = kind.startsWith("renegotiation");
  const child = new Deno.Command("openssl", {
    args: [
      "s_client",
      "-unix",
      relayPath,
      tls12 ? "-tls1_2" : "-tls1_3",
      "-CAfile",
      `${target.certificates}/ca-cert.pem`,
      "-servername",
      "localhost",
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const out: Uint8Array[] = [];
  let outText = "";
  const reading = (async () => {
    for await (const chunk of child.stdout) {
      out.push(chunk);
      outText += new TextDecoder().decode(chunk);
    }
  })();
  const stderr = new Response(child.stderr).text();
  const writer = child.stdin.getWriter();
  const waitFor = async (test: () => boolean, ms: number) => {
    const deadline = performance.now() + ms;
    while (!test() && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return test();
  };
  let exited = false;
  child.status.then(() => exited = true);
  try {
    await ready;
    if (
      !(await waitFor(
        () => outText.includes("---\n") && /Verify return code|SSL-Session/.test(outText) || exited,
        15_000,
      ))
    ) {
      throw new Desync("s_client: no TLS session");
    }
    // Writes fail once the server has closed and s_client has exited: that is an outcome too.
    await writer.write(new TextEncoder().encode(tls12 ? "R\n" : "K\n")).catch(() => {});
    await new Promise((r) => setTimeout(r, 200));
    // LIST starts with "IHAVEOPT": not one of s_client's command letters.
    await writer.write(list()).catch(() => {});
    const replyMagic = "\x00\x03\xe8\x89\x04\x55\x65\xa9";
    const answered = () => {
      const all = concatAll(out);
      const text = String.fromCharCode(...all.subarray(Math.max(0, all.length - 4096)));
      return text.includes(replyMagic);
    };
    const settled = await waitFor(() => answered() || exited, CLOSE_WITHIN_MS);
    const outcome = answered() ? "answered" : exited ? "close" : "hang";
    tally.record(target, kind, "answered|close", `${outcome} after ${kind}`);
    if (!settled) tally.violation(target, `${kind}: neither answered nor closed`);
  } catch (error) {
    tally.violation(target, `${kind}: ${(error as Error).message}`);
  } finally {
    await writer.close().catch(() => {});
    try {
      child.kill("SIGTERM");
    } catch { /* exited */ }
    await child.status;
    await reading.catch(() => {});
    await stderr.catch(() => "");
    upstream?.socket.destroy();
    relay.close();
  }
}

function list(): Uint8Array {
  return optionBytes(C.NBD_OPT_LIST, new Uint8Array());
}

/** A fresh well-behaved TLS client connects, writes, flushes and reads back. */
async function probe(target: TlsTarget, rng: Rng): Promise<string | undefined> {
  const uri = `nbds+unix:///?socket=${target.socket}&tls-certificates=${target.certificates}`;
  let client: NbdClient | undefined;
  try {
    client = await NbdClient.connect(uri);
    const offset = target.fuzzLo - 8192;
    const data = rng.bytes(4096);
    // The probe's block lies just below the fuzz region, beside the checker's blocks.
    await client.pwrite(data, offset);
    await client.flush();
    const back = new Uint8Array(4096);
    await client.pread(back, offset);
    if (back.some((b, i) => b !== data[i])) return `${target.kind}: probe read back other data`;
    return undefined;
  } catch (error) {
    return `${target.kind}: probe failed: ${(error as Error).message}`;
  } finally {
    await client?.close().catch(() => {});
  }
}

/** Runs the TLS fuzzer and returns its report. */
export async function runTlsFuzz(options: TlsFuzzOptions = {}): Promise<TlsFuzzReport> {
  const maxCases = options.cases ?? 20_000;
  const seconds = options.seconds ?? 60;
  const seed = options.seed ?? (Date.now() % 1_000_000);
  const workers = options.workers ?? 8;
  const log = options.log ?? (() => {});
  if (!hasCommand("openssl")) throw new Error("the TLS fuzzer needs openssl (test certificates)");
  await using dir = await tempDir("nbd-fuzz-tls");
  const certificates = `${dir.path}/pki`;
  await Deno.mkdir(certificates);
  await makeCertificates(certificates);
  const ca = await Deno.readTextFile(`${certificates}/ca-cert.pem`);
  const tlsArgs = ["--tls=require", `--tls-certificates=${certificates}`];
  const checkerBytes = 4 * MiB;
  const main = await startNbdServe([...tlsArgs, "--max-payload", "1M", "memory", "64M"]);
  const edge = await startNbdServe([
    ...tlsArgs,
    `--handshake-timeout=${EDGE_HANDSHAKE_LIMIT}`,
    "memory",
    "16M",
  ]).catch(async (e) => {
    await main[Symbol.asyncDispose]();
    throw e;
  });
  const targets: TlsTarget[] = [
    {
      kind: "memory-tls",
      size: 64 * MiB,
      maxRequest: MiB,
      fuzzLo: checkerBytes,
      server: main,
      socket: main.socket!,
      ca,
      certificates,
    },
    {
      kind: "memory-tls-edge",
      size: 16 * MiB,
      maxRequest: 32 * MiB,
      fuzzLo: checkerBytes,
      server: edge,
      socket: edge.socket!,
      ca,
      certificates,
    },
  ];
  const tally = new Tally();
  const checker = emptyStats();
  const servers: ServerReport[] = [];
  const counts = { sessions: 0, edge: 0, probes: 0 };
  const probeFailures: string[] = [];
  const started = performance.now();
  const watch = new ServerWatch(targets, started);
  const deadline = started + seconds * 1000;
  let stopping = false;
  const stop = () => stopping || tally.cases >= maxCases || performance.now() >= deadline;
  let elapsed = 0;
  const openssl = hasCommand("openssl");
  try {
    const checkers = await Promise.all(targets.map(async (t, i) => {
      const client = await NbdClient.connect(
        `nbds+unix:///?socket=${t.socket}&tls-certificates=${certificates}`,
      );
      const worker = new VerifiedWorker({
        read: async (offset, length) => {
          const buf = new Uint8Array(length);
          await client.pread(buf, offset);
          return buf;
        },
        write: (data, offset, fua = false) => client.pwrite(data, offset, { fua }),
        flush: () => client.flush(),
      }, {
        id: 200 + i,
        regionStart: 0,
        regionBlocks: (checkerBytes - 16384) / 4096,
        blockSize: 4096,
        inFlight: 2,
        seed: seed + i,
      });
      return { client, worker };
    }));
    const checkerRuns = checkers.map(({ worker }) => worker.run(() => stopping));
    log(`fuzz --tls: seed ${seed}, up to ${maxCases} cases or ${seconds} s`);
    let lastReport = performance.now();
    const progress = () => {
      if (performance.now() - lastReport > 5000) {
        lastReport = performance.now();
        log(
          `fuzz --tls: ${tally.cases} cases, ${counts.sessions} TLS sessions, ${counts.edge} edge cases, ${tally.violations} violations`,
        );
      }
    };
    // Sessions only on the main server: the edge server's short handshake limit is for stalls.
    const fuzzers = Array.from({ length: workers }, async (_, wi) => {
      const rng = new Rng(seed * 1000 + wi + 50);
      while (!stop()) {
        await fuzzSession(targets[0]!, rng, tally, stop, counts);
        progress();
      }
    });
    // Edge batches: every kind once per batch on both servers, then a fresh client on each.
    const edgeRunner = (async () => {
      const rng = new Rng(seed * 1000 + 999);
      let batch = 0;
      while (options.edge !== false && !stop()) {
        const jobs: Array<Promise<void>> = [];
        for (const kind of EDGE_KINDS) jobs.push(edgeCase(targets[0]!, kind, rng, tally));
        if (batch % 2 === 0) {
          for (const kind of STALL_KINDS) jobs.push(stallCase(targets[1]!, kind, rng, tally));
        }
        if (openssl && batch % 3 === 0) {
          jobs.push(opensslCase(targets[0]!, "renegotiation attempt (TLS 1.2)", tally, dir.path));
          jobs.push(opensslCase(targets[0]!, "key update (TLS 1.3)", tally, dir.path));
        }
        counts.edge += jobs.length;
        await Promise.all(jobs);
        for (const t of targets) {
          counts.probes++;
          const problem = await probe(t, rng);
          if (problem) probeFailures.push(problem);
        }
        batch++;
      }
    })();
    try {
      await Promise.all([...fuzzers, edgeRunner]);
    } finally {
      watch.stop();
      elapsed = (performance.now() - started) / 1000;
      stopping = true;
      await Promise.all(checkerRuns);
    }
    for (const { client, worker } of checkers) {
      await worker.sweep();
      mergeStats(checker, worker.stats);
      await client.close().catch(() => {});
    }
  } finally {
    stopping = true;
    servers.push(...await watch.finish());
  }
  return {
    seed,
    cases: tally.cases,
    seconds: elapsed,
    sessions: counts.sessions,
    edgeCases: counts.edge,
    probes: counts.probes,
    probeFailures,
    classes: tally.classes,
    outcomes: tally.outcomes,
    violations: tally.violations,
    violationSamples: tally.samples,
    checker,
    integrityErrors: checker.errors + checker.mismatches,
    servers,
  };
}

/** Whether a TLS fuzz report shows a clean run. */
export function tlsFuzzPassed(r: TlsFuzzReport): boolean {
  return r.violations === 0 && r.integrityErrors === 0 && r.probeFailures.length === 0 &&
    r.servers.every((s) => s.survived && s.exitCode === 0 && s.internalErrors.length === 0);
}

/** A human-readable report; `brief` leaves out the per-class table. */
export function formatTlsFuzzReport(r: TlsFuzzReport, brief = false): string {
  const lines: string[] = [];
  lines.push(
    `fuzz --tls: seed ${r.seed}: ${r.cases} cases in ${r.seconds.toFixed(1)} s (${
      Math.round(r.cases / r.seconds)
    } cases/s), ${r.sessions} TLS sessions (${
      (r.cases / Math.max(1, r.sessions)).toFixed(0)
    } cases each on average), ${r.edgeCases} STARTTLS-edge cases`,
  );
  lines.push(
    `fresh TLS clients after edge batches: ${r.probes}, failures ${r.probeFailures.length}`,
  );
  for (const p of r.probeFailures.slice(0, 5)) lines.push(`  ${p}`);
  lines.push("outcomes seen:");
  for (const [k, n] of [...r.outcomes].sort((a, b) => b[1] - a[1])) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push(`input classes: ${r.classes.size}`);
  for (const [k, n] of brief ? [] : [...r.classes].sort((a, b) => a[0].localeCompare(b[0]))) {
    lines.push(`  ${String(n).padStart(8)}  ${k}`);
  }
  lines.push(`spec violations: ${r.violations}`);
  for (const s of r.violationSamples) lines.push(`  ${s}`);
  const c = r.checker;
  lines.push(
    `well-behaved TLS clients: ${c.requests} requests (${c.reads} reads, ${c.writes} writes), ` +
      `errors ${c.errors}, mismatches ${c.mismatches} → integrity errors ${r.integrityErrors}`,
  );
  for (const s of r.servers) {
    lines.push(
      `server ${s.kind}: peak RSS ${formatKiB(s.peakRssKiB)} (at start ${
        formatKiB(s.startRssKiB)
      }), ` +
        `${s.survived ? "survived" : "DIED"}, exit ${
          s.exitCode === 0 ? "clean" : `status ${s.exitCode}`
        }, ` +
        `internal errors ${s.internalErrors.length}`,
    );
    for (const e of s.internalErrors.slice(0, 10)) lines.push(`  ${e}`);
    for (const [kind, n] of s.logKinds) lines.push(`  ${String(n).padStart(6)} × ${kind}`);
  }
  lines.push(tlsFuzzPassed(r) ? "fuzz --tls: OK" : "fuzz --tls: FAILED");
  return lines.join("\n");
}
