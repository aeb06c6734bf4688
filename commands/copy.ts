/**
 * `nbd copy SOURCE DESTINATION`: copies a disk image between files, block
 * devices, NBD exports, http(s) URLs (source), pipes, `null:` and servers
 * started for the copy (`[ CMD ARGS ... ]`), skipping holes, with progress
 * reports for people and for programs. The work is done by copy/.
 *
 * @module
 */

import { describeSpec, type Endpoint, type EndpointSpec, parseEndpoint } from "../copy/endpoint.ts";
import { openDestination, openSource } from "../copy/open.ts";
import {
  fdOutput,
  Progress,
  type ProgressOptions,
  type ProgressOutput,
  stderrOutput,
} from "../copy/progress.ts";
import {
  defaultConnections,
  localConnections,
  NbdEndpoint,
  onThisMachine,
  onUnixSocket,
} from "../copy/nbd.ts";
import {
  CopyError,
  copyImage,
  type CopyOptions,
  type CopyStats,
  describeCause,
  type ImagePart,
  planSizes,
} from "../copy/scheduler.ts";
import {
  Checkpointer,
  type CopyState,
  finishedCopy,
  FlushPacer,
  identify,
  RangeSet,
  readState,
  refusal,
  STATE_VERSION,
  StateError,
} from "../copy/resume.ts";
import { copyShared, shareableThreads } from "../copy/shares.ts";
import { Interrupted, terminationSignal } from "../util/signals.ts";
import { CLIENT_OPTIONS, type ClientTimeouts, clientTimeouts } from "./client_options.ts";
import { type ChecksumAlgorithm, parseAlgorithm } from "../copy/checksum_names.ts";
import { parseSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { lazyImport } from "../util/lazy_import.ts";
import { absolutePath } from "../util/absolute_path.ts";
import { type Command, formatOptions, parseOptions, printError } from "./command.ts";
import { writeStdout } from "./output.ts";
import type { ImageFormat, Qcow2WriteOptions } from "../copy/qcow2.ts";

const OPTIONS = {
  connections: {
    type: "string",
    short: "C",
    value: "N",
    help: "connections per NBD endpoint when the server allows multi-conn, and threads (see below)",
  },
  requests: {
    type: "string",
    short: "R",
    value: "N",
    help: "requests in flight in total (default 64; 32 with servers on this machine only)",
  },
  "request-size": {
    type: "string",
    value: "SIZE",
    help:
      "largest read or write (default 256K, 1M into a plain qcow2 file; a power of two from 512 to 32M, adjusted to the servers' block sizes)",
  },
  sparse: {
    type: "string",
    short: "S",
    value: "SIZE",
    help:
      "detect all-zero blocks of SIZE in the data read and skip or zero them (default 4K; 0 = off)",
  },
  allocated: { type: "boolean", help: "write zero runs as allocated zeroes, never holes" },
  "destination-is-zero": {
    type: "boolean",
    help: "the destination already reads as zeroes: skip zero runs",
  },
  "target-is-zero": { type: "boolean", aliasOf: "destination-is-zero" },
  "no-extents": { type: "boolean", help: "read everything (ignore holes the source reports)" },
  flush: { type: "boolean", help: "flush the destination at the end" },
  synchronous: {
    type: "boolean",
    help: "one connection and one request at a time (debugging)",
  },
  progress: {
    type: "boolean",
    short: "p",
    value: "FD",
    optionalValue: "joined",
    help:
      'progress bar on stderr (plain lines when not a terminal); with =FD, "N/100" lines to descriptor FD',
  },
  "progress-json": {
    type: "boolean",
    value: "FD",
    optionalValue: "joined",
    help:
      "a JSON object per update (bytes, total, percent, rate, elapsed, eta, state) to stderr or FD",
  },
  checksum: {
    type: "boolean",
    value: "ALGO",
    optionalValue: "joined",
    help:
      "print the checksum line of what was copied, as nbd checksum does, hashed on the way (sha256, the default, or blkhash); the copy then runs on one thread",
  },
  "checksum-file": {
    type: "string",
    value: "FILE",
    path: true,
    help: "write that line to FILE instead of stdout",
  },
  "source-format": {
    type: "string",
    short: "f",
    value: "FORMAT",
    help:
      "read the source as raw (the default), qcow2, or auto (qcow2 when its first bytes say so); backing files named in a source are never followed",
  },
  "destination-format": {
    type: "string",
    short: "O",
    value: "FORMAT",
    help: "write the destination as raw (the default) or as a new qcow2 image",
  },
  compress: {
    type: "boolean",
    short: "c",
    help: "qcow2 destination: store clusters compressed (on a thread per processor, or -C)",
  },
  "compression-type": {
    type: "string",
    value: "TYPE",
    help: "qcow2 destination: zlib (the default) or zstd",
  },
  "cluster-size": {
    type: "string",
    value: "SIZE",
    help: "qcow2 destination: cluster size, a power of two from 512 to 2M (default 64K)",
  },
  backing: {
    type: "string",
    value: "FILE",
    path: true,
    help:
      "qcow2 destination: an overlay over FILE (raw or qcow2; relative to the destination's directory), holding only what differs from it",
  },
  state: {
    type: "string",
    value: "FILE",
    path: true,
    help:
      "keep the progress in FILE (flushed and saved every second) so that a stopped copy can be resumed; removed when the copy succeeds",
  },
  resume: {
    type: "boolean",
    help:
      "continue the copy that --state=FILE describes, without copying its done ranges again; refused when either end or an option changed",
  },
  retry: {
    type: "boolean",
    value: "N",
    optionalValue: "joined",
    help:
      "reconnect to an NBD endpoint that lost its connection and send the unanswered requests again, up to N attempts in a row (default 10): at once, then after 0.25 s, twice as long each time up to 10 s",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
  ...CLIENT_OPTIONS,
} as const;

const USAGE = `Usage: nbd copy [OPTIONS] SOURCE DESTINATION

Copy a disk image. Holes in the source are not read, and zero runs are
skipped or written as zero requests, so sparse images copy fast and stay
sparse.

SOURCE and DESTINATION are each one of:
  FILE                   a file or block device (a FIFO or character device is a stream)
  nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH (any NBD URI)
  http://URL, https://URL (source only) read with Range requests, or in
                         order when the server ignores them
  -                      stdin (source) or stdout (destination), in order
  null:                  (destination only) discard the data
  [ CMD ARGS ... ]       an NBD server started for the copy by socket
                         activation on a private socket, stopped afterwards,
                         e.g. [ nbdkit memory 1G ] or [ qemu-nbd -f qcow2 disk.qcow2 ]

With -O qcow2 the destination becomes a new qcow2 image (version 3) holding
only the allocated, non-zero clusters of the source; -f qcow2 reads the guest
view of a qcow2 image in a file, an NBD export or at a URL, reading only the
clusters it needs. An image with a backing file is refused as a source.

A new destination file is written under a temporary name and renamed into
place only when the copy succeeds. An existing file is resized to the
source size and written in place. A block device or NBD export must be at
least as large as the source.

Options:
${formatOptions(OPTIONS)}

--connections, by default: over TCP 4, and as many threads; to a server on
this machine (Unix socket, [ CMD ], TCP to a loopback or local address) half
the processors as threads, all but one to null:, one connection each (4 from
TCP into a file); one thread into a file or block device; for files alone a
thread per processor, at most 4.

With --state=FILE the progress is saved (flushed first) every second, a
new file's temporary file is kept when the copy stops, and the same command
with --resume copies only what is left; --retry reconnects NBD endpoints
after a lost connection. See the nbd-copy page for what each guarantees.

Exit status: 0 on success, 1 when the copy failed (the message names the
endpoint, the offset and the error), 2 on usage errors, 128+N when stopped
by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP). The first signal stops
the copy within 5 s (requests unanswered by then are abandoned); a second
one stops at once.

Examples:
  nbd copy nbd://server/disk disk.img
  nbd copy disk.img nbd+unix:///?socket=/tmp/nbd.sock --flush
  nbd copy [ qemu-nbd -f qcow2 disk.qcow2 ] disk.raw
  nbd copy https://example.com/disk.img - | sha256sum
  nbd copy --progress-json=3 nbd://server/disk disk.img 3>progress.log
  nbd copy --retry --state=disk.state nbd://server/disk disk.img
  nbd copy --retry --state=disk.state --resume nbd://server/disk disk.img
  nbd copy -f qcow2 https://example.com/disk.qcow2 disk.raw
  nbd copy -O qcow2 --compress --compression-type=zstd disk.raw disk.qcow2
  nbd copy -O qcow2 --backing=base.qcow2 new.raw overlay.qcow2
`;

/** Everything `nbd copy` was asked to do. */
export interface CopyCommandConfig {
  /** The source. */
  source: EndpointSpec;
  /** The destination. */
  destination: EndpointSpec;
  /** Connections per NBD endpoint; undefined = each endpoint's default. */
  connections: number | undefined;
  /** Requests in flight. */
  requests: number;
  /** Largest request. */
  requestSize: number;
  /** Zero detection block size (0 = off). */
  sparseSize: number;
  /** Write zero runs allocated. */
  allocated: boolean;
  /** The destination is known to be zero. */
  destinationIsZero: boolean;
  /** Use the source's extents. */
  extents: boolean;
  /** Flush at the end. */
  flush: boolean;
  /** `-p`: human progress. */
  progress: boolean;
  /** `--progress=FD`. */
  progressFd?: number;
  /** `--progress-json`: undefined = off, "stderr" or a descriptor. */
  progressJson?: number | "stderr";
  /** `--checksum[=ALGO]`: hash what is copied. */
  checksum?: ChecksumAlgorithm;
  /** `--checksum-file`: where the checksum line goes instead of stdout. */
  checksumFile?: string;
  /** `-f`: how the source is read. */
  sourceFormat: ImageFormat;
  /** `-O`: how the destination is written. */
  destinationFormat: "raw" | "qcow2";
  /** Options of a qcow2 destination. */
  qcow2: Qcow2WriteOptions;
  /** `--help`. */
  help: boolean;
  /** `--timeout`, `--request-timeout`. */
  timeouts: ClientTimeouts;
  /** `--state=FILE`: where the progress is kept. */
  state?: string;
  /** `--resume`: continue from the state file. */
  resume: boolean;
  /** `--retry[=N]`: reconnection attempts (0 = off). */
  retry: number;
}

/** Reconnection attempts of a bare `--retry`. */
export const DEFAULT_RETRIES = 10;

function positiveInteger(text: string, what: string, max = 1 << 20): number {
  if (!/^\d+$/.test(text) || Number(text) < 1 || Number(text) > max) {
    throw new UsageError(`${what} must be a whole number from 1 to ${max}, got "${text}"`);
  }
  return Number(text);
}

function descriptor(text: string, what: string): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`${what}: "${text}" is not a file descriptor`);
  return Number(text);
}

/**
 * Parses the arguments of `nbd copy`. `[ CMD ARGS ... ]` groups are taken
 * out first (their words are the server's, not ours), as are the options
 * whose value is optional, which node's parseArgs cannot express.
 */
export function parseCopyArgs(argv: string[]): CopyCommandConfig {
  const groups: string[][] = [];
  const rest: string[] = [];
  let progress = false;
  let progressFd: number | undefined;
  let progressJson: number | "stderr" | undefined;
  let checksum: ChecksumAlgorithm | undefined;
  let retry = 0;
  let afterDashes = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "[") {
      const close = argv.indexOf("]", i + 1);
      if (close < 0) throw new UsageError('"[" without a matching "]"');
      groups.push(argv.slice(i + 1, close));
      // A placeholder no option can look like; replaced by the group below.
      rest.push(`\0group:${groups.length - 1}`);
      i = close;
    } else if (afterDashes) {
      rest.push(arg);
    } else if (arg === "--") {
      afterDashes = true;
      rest.push(arg);
    } else if (arg === "-p" || arg === "--progress") {
      progress = true;
    } else if (arg.startsWith("--progress=")) {
      progressFd = descriptor(arg.slice("--progress=".length), "--progress");
    } else if (arg === "--progress-json") {
      progressJson = "stderr";
    } else if (arg.startsWith("--progress-json=")) {
      progressJson = descriptor(arg.slice("--progress-json=".length), "--progress-json");
    } else if (arg === "--retry") {
      retry = DEFAULT_RETRIES;
    } else if (arg.startsWith("--retry=")) {
      retry = positiveInteger(arg.slice("--retry=".length), "--retry", 1000);
    } else if (arg === "--checksum") {
      checksum = "sha256";
    } else if (arg.startsWith("--checksum=")) {
      checksum = parseAlgorithm(arg.slice("--checksum=".length), "--checksum");
    } else {
      rest.push(arg);
    }
  }
  const { values, positionals } = parseOptions(rest, OPTIONS);
  const specs = positionals.map((p) => {
    const group = /^\0group:(\d+)$/.exec(p);
    return group ? { kind: "command" as const, argv: groups[Number(group[1])]! } : parseEndpoint(p);
  });
  const help = values.help ?? false;
  if (!help && specs.length !== 2) {
    throw new UsageError("copy needs a SOURCE and a DESTINATION (see nbd copy --help)");
  }
  const synchronous = values.synchronous ?? false;
  let requestSize = 256 * 1024;
  if (values["request-size"] !== undefined) {
    requestSize = parseSize(values["request-size"], "--request-size");
    if (requestSize < 512 || requestSize > 32 << 20 || (requestSize & (requestSize - 1)) !== 0) {
      throw new UsageError(
        `--request-size must be a power of two from 512 to 32M, got "${values["request-size"]}"`,
      );
    }
  }
  let sparseSize = 4096;
  if (values.sparse !== undefined) {
    sparseSize = parseSize(values.sparse, "--sparse");
    if (sparseSize !== 0 && (sparseSize % 512 !== 0 || sparseSize > 32 << 20)) {
      throw new UsageError(
        `--sparse must be 0 or a multiple of 512 up to 32M, got "${values.sparse}"`,
      );
    }
  }
  const formats = parseFormats(values);
  const checksumFile = values["checksum-file"];
  if (checksumFile !== undefined && checksum === undefined) checksum = "sha256";
  if (checksum && checksumFile === undefined && specs[1]?.kind === "stdio") {
    throw new UsageError("--checksum with stdout as the destination needs --checksum-file");
  }
  const state = values.state;
  const resume = values.resume ?? false;
  if (resume && state === undefined) throw new UsageError("--resume needs --state=FILE");
  if (state !== undefined) {
    if (state === "") throw new UsageError("--state: expected a file name");
    const keeps = (spec: EndpointSpec | undefined) =>
      spec?.kind === "path" || spec?.kind === "nbd" || spec?.kind === "command";
    if (!help && (!keeps(specs[0]) || !keeps(specs[1]))) {
      throw new UsageError(
        "--state needs a source and a destination with random access: files, block devices or NBD exports",
      );
    }
    if (formats.sourceFormat !== "raw" || formats.destinationFormat !== "raw") {
      throw new UsageError("--state works with raw images only (not with -f or -O qcow2)");
    }
  }
  return {
    state,
    resume,
    retry,
    checksum,
    checksumFile,
    source: specs[0] ?? { kind: "null" },
    destination: specs[1] ?? { kind: "null" },
    connections: synchronous
      ? 1
      : values.connections === undefined
      ? undefined
      : positiveInteger(values.connections, "--connections", 64),
    requests: synchronous
      ? 1
      : values.requests === undefined
      ? defaultRequests(specs[0] ?? { kind: "null" }, specs[1] ?? { kind: "null" })
      : positiveInteger(values.requests, "--requests", 4096),
    requestSize,
    sparseSize,
    allocated: values.allocated ?? false,
    destinationIsZero: (values["destination-is-zero"] || values["target-is-zero"]) ?? false,
    extents: !(values["no-extents"] ?? false),
    flush: values.flush ?? false,
    progress,
    progressFd,
    progressJson,
    ...formats,
    help,
    timeouts: clientTimeouts(values),
  };
}

/** The image format options of `nbd copy`. */
function parseFormats(
  values: {
    "source-format"?: string;
    "destination-format"?: string;
    compress?: boolean;
    "compression-type"?: string;
    "cluster-size"?: string;
    backing?: string;
    connections?: string;
  },
): Pick<CopyCommandConfig, "sourceFormat" | "destinationFormat" | "qcow2"> {
  const sourceFormat = values["source-format"] ?? "raw";
  if (sourceFormat !== "raw" && sourceFormat !== "qcow2" && sourceFormat !== "auto") {
    throw new UsageError(`--source-format must be raw, qcow2 or auto, got "${sourceFormat}"`);
  }
  const destinationFormat = values["destination-format"] ?? "raw";
  if (destinationFormat !== "raw" && destinationFormat !== "qcow2") {
    throw new UsageError(`--destination-format must be raw or qcow2, got "${destinationFormat}"`);
  }
  const qcow2: Qcow2WriteOptions = {};
  const type = values["compression-type"];
  if (type !== undefined && type !== "zlib" && type !== "zstd") {
    throw new UsageError(`--compression-type must be zlib or zstd, got "${type}"`);
  }
  if (values["cluster-size"] !== undefined) {
    const cs = parseSize(values["cluster-size"], "--cluster-size");
    if (cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) !== 0) {
      throw new UsageError(
        `--cluster-size must be a power of two from 512 to 2M, got "${values["cluster-size"]}"`,
      );
    }
    qcow2.clusterSize = cs;
  }
  if (type !== undefined) qcow2.compressionType = type;
  if (values.compress) qcow2.compress = type ?? "zlib";
  if (values.connections !== undefined && /^\d+$/.test(values.connections)) {
    qcow2.threads = Number(values.connections);
  }
  if (values.backing !== undefined) {
    if (values.backing === "") throw new UsageError("--backing: expected a file name");
    // Resolved next to the destination when the copy opens it, as qemu resolves it.
    qcow2.backing = { name: values.backing, path: values.backing };
  }
  const qcow2Only = values.compress || type !== undefined || values["cluster-size"] !== undefined ||
    values.backing !== undefined;
  if (qcow2Only && destinationFormat !== "qcow2") {
    throw new UsageError(
      "--compress, --compression-type, --cluster-size and --backing need --destination-format=qcow2",
    );
  }
  return { sourceFormat, destinationFormat, qcow2 };
}

function progressOptions(config: CopyCommandConfig): ProgressOptions {
  const options: ProgressOptions = {};
  const open = (fd: number, what: string): ProgressOutput => {
    try {
      return fdOutput(fd);
    } catch (error) {
      throw new UsageError(`${what}: ${(error as Error).message}`);
    }
  };
  if (config.progress) {
    options.human = { output: stderrOutput, terminal: Deno.stderr.isTerminal() };
  }
  if (config.progressFd !== undefined) options.percent = open(config.progressFd, "--progress");
  if (config.progressJson !== undefined) {
    options.json = config.progressJson === "stderr"
      ? stderrOutput
      : open(config.progressJson, "--progress-json");
  }
  return options;
}

/** Opens an endpoint, prefixing failures with its role (usage errors pass through). */
async function opening<T>(role: string, open: () => Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (error) {
    if (error instanceof UsageError || error instanceof Interrupted) throw error;
    throw new Error(`${role}: ${(error as Error).message}`, { cause: error });
  }
}

/** Whether threads can share a copy from or to this kind of endpoint. */
function canShare(spec: EndpointSpec): boolean {
  return spec.kind === "nbd" || spec.kind === "command" || spec.kind === "path" ||
    spec.kind === "null";
}

/** An NBD server on this machine: one started for the copy, or on a local socket or address. */
function isLocalServer(spec: EndpointSpec): boolean {
  return spec.kind === "command" || (spec.kind === "nbd" && onThisMachine(spec.uri));
}

/**
 * Requests in flight when `-R` is not given: nbdcopy's 64, or 32 when a
 * server on this machine is involved and nothing is across a network. There
 * no round trip needs hiding, so half as many buffers copy as fast and the
 * process holds 8 MiB less (figures in docs/performance.md).
 */
export function defaultRequests(source: EndpointSpec, destination: EndpointSpec): number {
  const here = (spec: EndpointSpec) =>
    isLocalServer(spec) || spec.kind === "path" || spec.kind === "null" || spec.kind === "stdio";
  const local = isLocalServer(source) || isLocalServer(destination);
  return local && here(source) && here(destination) ? 32 : 64;
}

/**
 * Threads (one connection each) when `-C` is not given. Into a file or
 * block device: one. With a server on this machine: half the processors
 * (at least one), or all but one of them to `null:`. Otherwise what the
 * NBD endpoints would use as connections, and for files alone the number
 * of processors, at most 4.
 */
export function defaultThreads(source: EndpointSpec, destination: EndpointSpec): number {
  const processors = localConnections();
  // Writes into one file take turns in the kernel, so more threads add only their own
  // cost (figures in docs/performance.md).
  if (destination.kind === "path") return 1;
  // A server on this machine (on a Unix socket, as one started for the copy, or over
  // TCP at a loopback or local address) needs processors of its own to read or write
  // the data and to move it through its socket. To null: only receiving is left here,
  // and one processor is enough for the server (figures in docs/performance.md).
  if (isLocalServer(source) || isLocalServer(destination)) {
    return destination.kind === "null"
      ? Math.max(1, processors - 1)
      : Math.max(1, Math.floor(processors / 2));
  }
  // Only exports over TCP are left: as many threads as connections to one.
  for (const spec of [source, destination]) {
    if (spec.kind === "nbd") return defaultConnections(spec.uri);
  }
  return processors;
}

/**
 * Connections to an NBD source when `-C` is not given, where they differ
 * from the endpoint's own default: 4 over TCP into a file or block device,
 * even from a server on this machine. There one TCP connection made the
 * file writes far more costly, where over a Unix socket one connection was
 * as fast as four (docs/performance.md).
 */
export function defaultSourceConnections(
  source: EndpointSpec,
  destination: EndpointSpec,
): number | undefined {
  if (source.kind === "nbd" && !onUnixSocket(source.uri) && destination.kind === "path") return 4;
  return undefined;
}

/**
 * The endpoints of a copy that hashes what it copies: the source wrapped
 * so that its reads are hashed in order, or, into `null:` (whose reads all
 * share one buffer), a destination that hashes instead. `digest` checks
 * that every byte was hashed.
 */
async function hashCopy(algorithm: ChecksumAlgorithm, source: Endpoint, destination: Endpoint) {
  const { createHasher, HashingSource, HashSink } = await lazyImport<
    typeof import("../copy/checksum.ts")
  >(new URL("../copy/checksum.ts", import.meta.url));
  const hasher = createHasher(algorithm);
  const sink = destination.discards ? new HashSink(hasher) : undefined;
  const wrapped = sink ? undefined : new HashingSource(source, hasher);
  const feed = (sink ?? wrapped)!.feed;
  return {
    source: wrapped ?? source,
    destination: sink ?? destination,
    digest(size: number): string {
      if (feed.hashed !== size) throw new Error(`hashed ${feed.hashed} bytes of ${size}`);
      return hasher.digest();
    },
  };
}

/**
 * The checksum of the first `size` bytes of `spec`, read back after a
 * resumed copy: the ranges copied before it stopped were never hashed on
 * the way, so the result itself is hashed instead.
 */
async function checksumOfResult(
  spec: EndpointSpec,
  size: number,
  algorithm: ChecksumAlgorithm,
  options: { signal: AbortSignal; timeouts: ClientTimeouts; extents: boolean },
): Promise<string> {
  const { createHasher, HashSink } = await lazyImport<typeof import("../copy/checksum.ts")>(
    new URL("../copy/checksum.ts", import.meta.url),
  );
  const hasher = createHasher(algorithm);
  const sink = new HashSink(hasher);
  const result = await openSource(spec, { signal: options.signal, timeouts: options.timeouts });
  try {
    let part: ImagePart | undefined = { offset: 0, end: size };
    await copyImage(result, sink, {
      requests: 16,
      requestSize: 1 << 20,
      sparseSize: 0,
      allocated: false,
      destinationIsZero: false,
      extents: options.extents,
      signal: options.signal,
      claim: () => [part, part = undefined][0],
    });
  } finally {
    await result.close(true).catch(() => {});
  }
  if (sink.feed.hashed !== size) throw new Error(`hashed ${sink.feed.hashed} bytes of ${size}`);
  return hasher.digest();
}

/** Refuses a destination smaller than the source. */
function checkRoom(source: Endpoint, destination: Endpoint): void {
  if (
    destination.size !== undefined && source.size !== undefined &&
    destination.size < source.size
  ) {
    throw new Error(
      `the destination ${destination.name} (${destination.size} bytes) is smaller than ` +
        `the source ${source.name} (${source.size} bytes)`,
    );
  }
}

/** The state of a resumable copy: the saved one (`--resume`) or none, checked before opening. */
async function loadState(config: CopyCommandConfig): Promise<CopyState | undefined> {
  if (config.state === undefined) return undefined;
  if (config.resume) return await readState(config.state);
  let exists = false;
  try {
    await Deno.lstat(config.state);
    exists = true;
  } catch { /* a new state file */ }
  if (exists) {
    throw new StateError(
      `${config.state} holds the progress of an earlier copy: add --resume to continue it, or remove it`,
    );
  }
  return undefined;
}

/** Runs a copy as configured; resolves to the exit status. */
async function runCopy(config: CopyCommandConfig): Promise<number> {
  const progressConfig = progressOptions(config);
  // The process's stop signal (util/signals.ts), aborted by the first SIGINT,
  // SIGTERM or SIGHUP whatever the copy is doing: connecting, in a handshake,
  // copying. A second signal stops at once, after the registered clean-ups
  // (servers started for the copy, a temporary destination file).
  const stop = terminationSignal();
  let saved: CopyState | undefined;
  try {
    saved = await loadState(config);
  } catch (error) {
    if (!(error instanceof StateError)) throw error;
    printError(`copy: ${error.message}`);
    return 1;
  }
  if (saved && await finishedCopy(saved)) {
    // Stopped after renaming the finished copy into place, before removing the state.
    await Deno.remove(config.state!).catch(() => {});
    printError(
      `copy: ${config.state} records a finished copy: ${saved.destination.argument} is complete`,
    );
    return 0;
  }
  // Endpoints that threads can share are opened with one connection here: each
  // thread then adds its own (see copy/shares.ts). A resumable or retrying copy
  // keeps its bookkeeping in this thread, and so runs on it alone.
  const formatted = config.sourceFormat !== "raw" || config.destinationFormat !== "raw";
  const shareable = config.connections !== 1 && canShare(config.source) &&
    canShare(config.destination) && config.checksum === undefined && !formatted &&
    config.state === undefined && config.retry === 0;
  const openOptions = {
    connections: shareable ? 1 : config.connections,
    signal: stop,
    timeouts: config.timeouts,
    retry: config.retry > 0 ? { attempts: config.retry } : undefined,
  };
  let source: Endpoint | undefined;
  let destination: Endpoint | undefined;
  let progress: Progress | undefined;
  let checkpoints: Checkpointer | undefined;
  // Until the copy starts nothing was written, so a failure needs no note about the destination.
  let started = false;
  try {
    const sourceConnections = config.connections ??
      defaultSourceConnections(config.source, config.destination);
    const qcow2 = formatted
      ? await lazyImport<typeof import("../copy/qcow2.ts")>(
        new URL("../copy/qcow2.ts", import.meta.url),
      )
      : undefined;
    source = await opening(
      "source",
      () => {
        const options = { ...openOptions, connections: shareable ? 1 : sourceConnections };
        return qcow2
          ? qcow2.openFormattedSource(config.source, config.sourceFormat, options)
          : openSource(config.source, options);
      },
    );
    const from = source;
    const partial = config.state === undefined ? undefined : { resume: saved?.destination.partial };
    destination = await opening(
      "destination",
      () =>
        qcow2
          ? qcow2.openFormattedDestination(
            config.destination,
            from,
            config.destinationFormat,
            openOptions,
            config.qcow2,
          )
          : openDestination(config.destination, from, { ...openOptions, partial }),
    );
    if (stop.aborted) throw stop.reason;
    let done: RangeSet | undefined;
    if (config.state !== undefined) {
      const to = destination;
      const current = {
        version: STATE_VERSION,
        source: await identify(config.source, source, "source"),
        destination: await identify(config.destination, destination, "destination"),
        options: {
          sparse: config.sparseSize,
          allocated: config.allocated,
          destinationIsZero: config.destinationIsZero,
          extents: config.extents,
        },
      };
      const partialPath = (destination as { partialPath?: string }).partialPath;
      if (partialPath !== undefined) {
        // Absolute, so that a copy resumed from another directory finds it.
        current.destination.partial = absolutePath(partialPath);
      }
      if (saved) {
        const why = refusal(saved, current);
        if (why) throw new StateError(`cannot resume from ${config.state}: ${why}`);
      }
      checkRoom(source, destination);
      done = new RangeSet(saved?.done ?? []);
      const lost = destination instanceof NbdEndpoint ? destination.lost : undefined;
      const checkpointer = new Checkpointer(
        config.state,
        current,
        done,
        () => to.flush(),
        undefined,
        lost ? () => lost : undefined,
      );
      // Saved before anything is written, so that even a copy killed at once can be resumed.
      try {
        await checkpointer.saveNow();
      } catch (error) {
        throw new StateError(`cannot write ${config.state}: ${describeCause(error)}`);
      }
      checkpoints = checkpointer;
    }
    if (config.state === undefined) checkRoom(source, destination);
    const resumed = done !== undefined && done.bytes > 0;
    // Ranges copied before the copy stopped are not read again: the checksum is then
    // taken of the result, read back at the end.
    const hashed = config.checksum && !resumed
      ? await hashCopy(config.checksum, source, destination)
      : undefined;
    // What the copy reads from without hashing, to write lost ranges again.
    const unhashed = source;
    if (hashed) [source, destination] = [hashed.source, hashed.destination];
    progress = new Progress(source.size, progressConfig);
    started = true;
    const shown = progress;
    const threads = shareable
      ? shareableThreads(
        source,
        destination,
        config.connections ?? defaultThreads(config.source, config.destination),
      )
      : 1;
    if (shareable && threads === 1) {
      // Not shared after all: each NBD endpoint gets its connections as it would alone.
      await source.useConnections(sourceConnections);
      await destination.useConnections(config.connections);
    }
    const copy = threads > 1
      ? (s: Endpoint, d: Endpoint, o: CopyOptions) => copyShared(s, d, o, threads)
      : copyImage;
    let claim: (() => ImagePart | undefined) | undefined;
    let already = 0;
    if (done && resumed) {
      const { align } = planSizes(source, destination, config.requestSize, config.sparseSize);
      const parts = done.gaps(source.size!, align);
      already = source.size! - parts.reduce((n, p) => n + p.end - p.offset, 0);
      claim = () => parts.shift();
    }
    // A destination that reconnects keeps what its lost connections acknowledged
    // without a flush (copy/nbd.ts): that is written again, and flushes are paced so
    // that it stays small.
    const tracked = destination instanceof NbdEndpoint && destination.tracksUnflushed
      ? destination
      : undefined;
    const to = destination;
    const saveOrFlush = checkpoints ? () => checkpoints!.save() : () => to.flush();
    const pacer = tracked
      ? new FlushPacer(saveOrFlush, tracked.lost, config.requestSize)
      : undefined;
    if (pacer) pacer.start();
    else checkpoints?.start();
    const copyOptions: CopyOptions = {
      requests: config.requests,
      requestSize: config.requestSize,
      sparseSize: config.sparseSize,
      allocated: config.allocated,
      destinationIsZero: config.destinationIsZero,
      extents: config.extents,
      signal: stop,
      claim,
      onDone: checkpoints || pacer
        ? (offset, length) => {
          checkpoints?.record(offset, length);
          pacer?.done(length);
        }
        : undefined,
      onProgress: shown.active ? (n) => shown.update(already + n) : undefined,
    };
    let stats: CopyStats;
    try {
      stats = await copy(source, destination, copyOptions);
    } finally {
      await pacer?.stop();
    }
    const size = claim ? source.size! : stats.size;
    await checkpoints?.stop();
    const flushDestination = async (endpoint: Endpoint) => {
      try {
        await endpoint.flush();
      } catch (error) {
        throw new CopyError("destination", endpoint.name, "flush", 0, error);
      }
    };
    if (config.flush || checkpoints || tracked) await flushDestination(destination);
    if (tracked) {
      const { align } = planSizes(unhashed, tracked, config.requestSize, config.sparseSize);
      for (let round = 1;; round++) {
        const lost = new RangeSet(tracked.takeLost());
        if (lost.count === 0) break;
        if (round > 4 * config.retry) {
          throw new CopyError(
            "destination",
            tracked.name,
            "write",
            lost.toArray()[0]![0],
            new Error("what lost connections had acknowledged could not be written again"),
          );
        }
        printError(
          `${tracked.name}: writing again ${lost.bytes} bytes acknowledged by a lost connection before a flush`,
        );
        const parts = lost.aligned(size, align);
        await copyImage(unhashed, tracked, {
          ...copyOptions,
          claim: () => parts.shift(),
          onProgress: undefined,
          onDone: (offset, length) => checkpoints?.record(offset, length),
        });
        await flushDestination(tracked);
      }
    }
    await checkpoints?.markComplete(size);
    const finished = destination;
    destination = undefined;
    await finished.close(true);
    const opened = source;
    source = undefined;
    await opened.close(true);
    await checkpoints?.remove();
    checkpoints = undefined;
    progress.finish(true, size);
    if (config.checksum) {
      const { reportChecksum } = await lazyImport<typeof import("./checksum.ts")>(
        new URL("./checksum.ts", import.meta.url),
      );
      const digest = hashed ? hashed.digest(stats.size) : await checksumOfResult(
        config.destination,
        size,
        config.checksum,
        { signal: stop, timeouts: config.timeouts, extents: config.extents },
      );
      return await reportChecksum(
        digest,
        describeSpec(config.source),
        config.checksumFile,
        undefined,
      );
    }
    return 0;
  } catch (error) {
    progress?.finish(false);
    let kept: string | undefined;
    if (checkpoints) {
      await checkpoints.stop();
      // What was written and flushed now is saved; when the destination cannot flush,
      // the last checkpoint stays.
      const flushed = await checkpoints.save().then(() => true, () => false);
      kept = flushed ? "saved" : "as of the last checkpoint";
    }
    // A partial copy whose state was never saved could not be resumed: it goes.
    const orphan = checkpoints || saved
      ? undefined
      : (destination as { partialPath?: string } | undefined)?.partialPath;
    await destination?.close(false).catch(() => {});
    if (orphan !== undefined) await Deno.remove(orphan).catch(() => {});
    // After close: what a failure leaves may depend on how the clean-up went.
    let note = started ? destination?.incompleteNote() : undefined;
    if (kept !== undefined) {
      note = `${note ? `${note}; ` : ""}progress ${kept} in ${config.state}: ` +
        `run the same command with --resume to continue`;
    }
    await source?.close(false).catch(() => {});
    const suffix = note ? `; ${note}` : "";
    if (error instanceof Interrupted) {
      printError(`copy ${error.message}${suffix}`);
      return error.exitCode;
    }
    if (error instanceof CopyError) {
      printError(`copy failed: ${error.message}${suffix}`);
      return 1;
    }
    if (error instanceof StateError) {
      printError(`copy: ${error.message}`);
      return 1;
    }
    if (error instanceof UsageError) throw error;
    printError(`${describeCause(error)}${suffix}`);
    return 1;
  }
}

/** The `nbd copy` command. */
export const copyCommand: Command = {
  name: "copy",
  summary: "copy a disk image between files, NBD exports, URLs and pipes (like nbdcopy)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const config = parseCopyArgs(argv);
    if (config.help) {
      await writeStdout(USAGE);
      return 0;
    }
    return await runCopy(config);
  },
};
