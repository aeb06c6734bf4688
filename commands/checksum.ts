/**
 * `nbd checksum SOURCE`: the SHA-256 or blkhash of any source `nbd copy`
 * reads (file, block device, NBD URI, http(s), `[ CMD ]`, stdin), read by
 * the copy engine into a destination that hashes (copy/checksum.ts).
 *
 * @module
 */

import {
  type ChecksumAlgorithm,
  createHasher,
  HashSink,
  parseAlgorithm,
} from "../copy/checksum.ts";
import { ParallelBlkHasher } from "../copy/blkhash_parallel.ts";
import { BlkhashSink } from "../copy/blkhash_shared.ts";
import { BLKHASH_BLOCK_SIZE } from "../copy/checksum.ts";
import { copyShared, shareableThreads } from "../copy/shares.ts";
import { describeSpec, type Endpoint, type EndpointSpec, parseEndpoint } from "../copy/endpoint.ts";
import { openSource } from "../copy/open.ts";
import { CopyError, copyImage, describeCause } from "../copy/scheduler.ts";
import { Interrupted, terminationSignal } from "../util/signals.ts";
import { CLIENT_OPTIONS, type ClientTimeouts, clientTimeouts } from "./client_options.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions, printError } from "./command.ts";
import { writeStdout } from "./output.ts";

const OPTIONS = {
  algorithm: {
    type: "string",
    short: "a",
    value: "ALGO",
    help:
      "sha256 (default: the SHA-256 of the raw bytes, as sha256sum) or blkhash (SHA-256 of 64 KiB blocks)",
  },
  "checksum-file": {
    type: "string",
    value: "FILE",
    path: true,
    help: "write the line to FILE instead of stdout",
  },
  verify: {
    type: "string",
    value: "DIGEST",
    help: "compare with DIGEST: exit 1 with one line if it differs",
  },
  connections: {
    type: "string",
    short: "C",
    value: "N",
    help: "connections to an NBD source (default: its own)",
  },
  requests: { type: "string", short: "R", value: "N", help: "reads in flight (default 16)" },
  "no-extents": { type: "boolean", help: "read everything (ignore the holes the source reports)" },
  threads: {
    type: "string",
    short: "T",
    value: "N",
    help:
      "blkhash: read and hash on N threads (default: one per CPU, at most 8; 1 = the main thread alone)",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
  ...CLIENT_OPTIONS,
} as const;

const USAGE = `Usage: nbd checksum [OPTIONS] SOURCE

Print the checksum of a disk image as "DIGEST  SOURCE", like sha256sum.
Holes the source reports are hashed without being read.

SOURCE is anything nbd copy reads: a file or block device, an NBD URI,
an http(s) URL, an RBD image (rbd:POOL/IMAGE[:conf=FILE]), an S3 object
(s3://BUCKET/KEY), - for stdin, or [ CMD ARGS ... ] (an NBD server
started for the occasion by socket activation).

Options:
${formatOptions(OPTIONS)}

Exit status: 0 on success (and a match with --verify), 1 on a read failure
or a mismatch, 2 on usage errors, 128+N when stopped by signal N (130 SIGINT,
143 SIGTERM, 129 SIGHUP).

Examples:
  nbd checksum disk.img
  nbd checksum -a blkhash nbd://server/disk
  nbd checksum --verify=5f0c...e1 https://example.com/disk.img
  nbd checksum [ qemu-nbd -r -f qcow2 disk.qcow2 ]
`;

/** What `nbd checksum` was asked to do. */
export interface ChecksumConfig {
  /** The source. */
  source: EndpointSpec;
  /** The algorithm. */
  algorithm: ChecksumAlgorithm;
  /** Where the line goes instead of stdout. */
  checksumFile?: string;
  /** The expected digest (lower-case hex). */
  verify?: string;
  /** Connections to an NBD source. */
  connections?: number;
  /** Reads in flight. */
  requests: number;
  /** Use the source's extents. */
  extents: boolean;
  /** blkhash workers (1 = none). */
  threads: number;
  /** `--help`. */
  help: boolean;
  /** `--timeout`, `--request-timeout`. */
  timeouts?: ClientTimeouts;
}

function count(text: string, what: string, max: number): number {
  if (!/^\d+$/.test(text) || Number(text) < 1 || Number(text) > max) {
    throw new UsageError(`${what} must be a whole number from 1 to ${max}, got "${text}"`);
  }
  return Number(text);
}

/** Below this size a source read by one thread is hashed on that thread alone. */
const PARALLEL_MINIMUM = 64 << 20;

/** One thread per CPU, at most 8. */
function defaultThreads(): number {
  return Math.min(8, Math.max(1, navigator.hardwareConcurrency || 1));
}

/** Sources that threads can each open for their share of the reading. */
function canShare(spec: EndpointSpec): boolean {
  return spec.kind === "path" || spec.kind === "nbd" || spec.kind === "command";
}

/** Parses the arguments of `nbd checksum`; a `[ CMD ]` group is the source. */
function parseChecksumArgs(argv: string[]): ChecksumConfig {
  let group: string[] | undefined;
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "[") {
      const close = argv.indexOf("]", i + 1);
      if (close < 0) throw new UsageError('"[" without a matching "]"');
      if (group) throw new UsageError("checksum takes one SOURCE");
      group = argv.slice(i + 1, close);
      i = close;
    } else rest.push(argv[i]!);
  }
  const { values, positionals } = parseOptions(rest, OPTIONS);
  const help = values.help ?? false;
  const sources = positionals.map(parseEndpoint);
  if (group) sources.push({ kind: "command", argv: group });
  if (!help && sources.length !== 1) {
    throw new UsageError("checksum needs one SOURCE (see nbd checksum --help)");
  }
  const source = sources[0] ?? { kind: "null" };
  if (source.kind === "null") {
    if (!help) throw new UsageError('"null:" cannot be checksummed');
  }
  const verify = values.verify?.toLowerCase();
  if (verify !== undefined && !/^[0-9a-f]{64}$/.test(verify)) {
    throw new UsageError(`--verify: "${values.verify}" is not a 64-digit hex digest`);
  }
  return {
    source,
    algorithm: parseAlgorithm(values.algorithm ?? "sha256"),
    checksumFile: values["checksum-file"],
    verify,
    connections: values.connections === undefined
      ? undefined
      : count(values.connections, "--connections", 64),
    requests: values.requests === undefined ? 16 : count(values.requests, "--requests", 1024),
    extents: !(values["no-extents"] ?? false),
    threads: values.threads === undefined
      ? defaultThreads()
      : count(values.threads, "--threads", 64),
    help,
    timeouts: clientTimeouts(values),
  };
}

/** How `nbd checksum` reads: reads in flight, holes, threads. */
interface ChecksumOptions {
  requests: number;
  extents: boolean;
  threads?: number;
  signal?: AbortSignal;
  /** The source was opened with one connection for threads to share it; the count otherwise. */
  sharedConnections?: { connections: number | undefined };
}

/**
 * The checksum of `source` by the copy engine, and the length hashed.
 * blkhash of a source every thread can open is read and hashed by all of
 * them (blkhash_shared.ts); otherwise one thread reads, and blkhash's
 * blocks are hashed on `threads - 1` workers.
 */
async function checksumEndpoint(
  source: Endpoint,
  algorithm: ChecksumAlgorithm,
  options: ChecksumOptions,
): Promise<{ digest: string; size: number }> {
  const threads = options.threads ?? 1;
  if (algorithm === "blkhash" && threads > 1 && source.size !== undefined) {
    const sink = new BlkhashSink(BLKHASH_BLOCK_SIZE, source.size);
    const shared = shareableThreads(source, sink, threads);
    if (shared > 1) {
      await copyShared(source, sink, copyOptions(options), shared);
      return { digest: sink.collector!.digest(), size: source.size };
    }
  }
  if (options.sharedConnections) {
    // Not shared after all: the source gets its connections as it would alone.
    await source.useConnections(options.sharedConnections.connections);
  }
  // Hashing workers for a source one thread reads, unless it is known to be
  // small: starting a worker costs more than hashing a few tens of MiB.
  const parallel = algorithm === "blkhash" && threads > 1 && !source.shareSpec() &&
      (source.size === undefined || source.size >= PARALLEL_MINIMUM)
    ? new ParallelBlkHasher(threads - 1)
    : undefined;
  const hasher = parallel ?? createHasher(algorithm);
  try {
    return await checksumWith(hasher, source, options);
  } finally {
    parallel?.close();
  }
}

/** The copy engine's options for reading a whole source into a hashing sink. */
function copyOptions(options: ChecksumOptions) {
  return {
    requests: options.requests,
    requestSize: 1 << 20,
    sparseSize: 0,
    allocated: false,
    destinationIsZero: false,
    extents: options.extents,
    signal: options.signal,
  };
}

async function checksumWith(
  hasher: ReturnType<typeof createHasher>,
  source: Endpoint,
  options: ChecksumOptions,
): Promise<{ digest: string; size: number }> {
  const sink = new HashSink(hasher);
  const stats = await copyImage(source, sink, copyOptions(options));
  if (sink.feed.hashed !== stats.size) {
    throw new Error(`hashed ${sink.feed.hashed} bytes of ${stats.size}`);
  }
  await hasher.settle?.();
  return { digest: hasher.digest(), size: stats.size };
}

/** Writes `DIGEST  NAME` to stdout or FILE; checks against `verify`. Resolves to the status. */
export async function reportChecksum(
  digest: string,
  name: string,
  checksumFile: string | undefined,
  verify: string | undefined,
): Promise<number> {
  const line = `${digest}  ${name}\n`;
  if (checksumFile !== undefined) {
    try {
      await Deno.writeTextFile(checksumFile, line);
    } catch (error) {
      printError(`cannot write ${checksumFile}: ${describeCause(error)}`);
      return 1;
    }
  } else await writeStdout(line);
  if (verify !== undefined && verify !== digest) {
    printError(`checksum mismatch: ${name} has ${digest}, expected ${verify}`);
    return 1;
  }
  return 0;
}

/** Runs `nbd checksum` as configured; resolves to the exit status. */
async function runChecksum(config: ChecksumConfig): Promise<number> {
  // Aborted by the process's first stop signal (util/signals.ts), in any state.
  const stop = terminationSignal();
  let source: Endpoint | undefined;
  // Threads that share the reading each open the source once: the main thread too.
  const shareable = config.algorithm === "blkhash" && config.threads > 1 &&
    config.connections !== 1 && canShare(config.source);
  try {
    try {
      source = await openSource(config.source, {
        connections: shareable ? 1 : config.connections,
        signal: stop,
        timeouts: config.timeouts,
      });
    } catch (error) {
      if (error instanceof UsageError || error instanceof Interrupted) throw error;
      const name = describeSpec(config.source);
      const cause = describeCause(error);
      // Endpoints that name themselves in their messages are not named twice.
      printError(cause.startsWith(name) ? cause : `${name}: ${cause}`);
      return 1;
    }
    const { digest } = await checksumEndpoint(source, config.algorithm, {
      requests: config.requests,
      extents: config.extents,
      threads: config.threads,
      signal: stop,
      sharedConnections: shareable ? { connections: config.connections } : undefined,
    });
    return await reportChecksum(
      digest,
      describeSpec(config.source),
      config.checksumFile,
      config.verify,
    );
  } catch (error) {
    if (error instanceof UsageError) throw error;
    if (error instanceof Interrupted) {
      printError(`checksum ${error.message}`);
      return error.exitCode;
    }
    if (error instanceof CopyError) {
      printError(`checksum failed: ${error.message}`);
      return 1;
    }
    printError(describeCause(error));
    return 1;
  } finally {
    await source?.close(true).catch(() => {});
  }
}

/** The `nbd checksum` command. */
export const checksumCommand: Command = {
  name: "checksum",
  summary: "print the sha256 or blkhash of a disk image (file, NBD, http, [ CMD ])",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const config = parseChecksumArgs(argv);
    if (config.help) {
      await writeStdout(USAGE);
      return 0;
    }
    return await runChecksum(config);
  },
};
