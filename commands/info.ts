/**
 * `nbd info URI`: what a server and an export look like, in the format
 * nbdinfo uses (human-readable, or `--json` with nbdinfo's field names),
 * plus `--size`, `--list`, `--map` and the `--can`/`--is` tests.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { NbdOptionError } from "../client/errors.ts";
import { type ExportReport, inspectServer, type ServerReport } from "../client/inspect.ts";
import {
  BASE_ALLOCATION,
  NBD_DEFAULT_PORT,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REP_ERR_UNKNOWN,
} from "../protocol/constants.ts";
import { formatNbdUri, type NbdUri, parseNbdUri } from "../protocol/uri.ts";
import { UsageError } from "../util/usage_error.ts";
import { TLS_OPTIONS, TLS_USAGE, withTlsFlags } from "./tls_options.ts";
import {
  CLIENT_OPTIONS,
  CLIENT_USAGE,
  type ClientTimeouts,
  clientTimeouts,
} from "./client_options.ts";
import { withUriArgument } from "./uri_argument.ts";
import { type Command, formatOptions, parseOptions, printError } from "./command.ts";
import { showMap } from "./map.ts";
import { writeStdout } from "./output.ts";
import { isNbdUri } from "../protocol/uri.ts";
import {
  type FormatInfo,
  formatInfoJson,
  formatInfoLines,
  probeFormat,
  probeImage,
} from "../formats/probe.ts";

const OWN_OPTIONS = {
  json: { type: "boolean", help: "print JSON (nbdinfo's field names)" },
  size: { type: "boolean", help: "print only the size in bytes" },
  list: { type: "boolean", short: "L", help: "show every export the server lists" },
  map: {
    type: "string",
    value: "CONTEXT",
    optionalValue: "joined",
    help: 'print the allocation map (see "nbd map"); --totals sums it',
  },
  totals: { type: "boolean", help: "with --map: bytes per type instead of the runs" },
  content: { type: "boolean", help: "probe the content with file(1) (default unless --list)" },
  "no-content": { type: "boolean", help: "do not read any data" },
  can: {
    type: "string",
    value: "FEATURE",
    help: "exit 0 if the export can FEATURE, 2 if not (FEATURE as listed below)",
  },
  is: {
    type: "string",
    value: "PROPERTY",
    help: "exit 0 if true, 2 if not: read-only, rotational, tls",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...OWN_OPTIONS, ...CLIENT_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd info [OPTIONS] URI
       nbd info [OPTIONS] FILE
       nbd info [OPTIONS] rbd:POOL/IMAGE[:conf=FILE] | s3://BUCKET/KEY

Show what an NBD server says about an export: size, flags, block sizes,
metadata contexts and (by default) what the first bytes look like. When
those bytes are a qcow2 image, its format, version, virtual size, cluster
size, backing file (named, never followed), compression type and dirty and
corrupt bits follow. For a local FILE, an RBD image or an S3 object (named
as nbd copy names them), its size and format are shown.

Options:
${formatOptions(OWN_OPTIONS)}

FEATURE is one of connect, read, write, flush, fua, trim, zero, fast-zero, df,
multi-conn, cache, structured-reply, extended-headers, block-status.

URI may also be a server command, started for the command by socket activation
and stopped afterwards: nbd info [OPTIONS] -- [ CMD ARGS ... ]

${CLIENT_USAGE}

${TLS_USAGE}

Examples:
  nbd info nbd://localhost/disk
  nbd info --json "nbd+unix:///?socket=/tmp/nbd.sock"
  nbd info --can trim nbd://localhost || echo "no trim"
  nbd info --json disk.qcow2
`;

/** How many bytes the content probe reads (as nbdinfo does). */
const PROBE_BYTES = 8192;

/**
 * A size in the largest binary unit that divides it exactly ("1M",
 * "2075312K"), and whether a unit applied.
 */
export function humanSize(bytes: number): { text: string; scaled: boolean } {
  const units = ["", "K", "M", "G", "T", "P", "E"];
  let value = bytes;
  let unit = 0;
  while (value !== 0 && value % 1024 === 0 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return { text: `${value}${units[unit]}`, scaled: unit > 0 };
}

/** The URI of one export of the server `uri` points at, spelled as libnbd spells it. */
export function exportUri(uri: NbdUri, name: string): string {
  const text = formatNbdUri({ ...uri, exportName: name });
  if (uri.transport !== "tcp" || (uri.port ?? NBD_DEFAULT_PORT) !== NBD_DEFAULT_PORT) return text;
  // libnbd always writes the port out; do the same so outputs compare equal.
  const match = /^([a-z+]+:\/\/[^/]*)(\/.*)$/.exec(text);
  return match ? `${match[1]}:${NBD_DEFAULT_PORT}${match[2]}` : text;
}

/** The boolean facts of an export, under nbdinfo's names and in its order. */
function exportFacts(flags: number): Array<[string, boolean]> {
  return [
    ["is_rotational", (flags & NBD_FLAG_ROTATIONAL) !== 0],
    ["is_read_only", (flags & NBD_FLAG_READ_ONLY) !== 0],
    ["can_cache", (flags & NBD_FLAG_SEND_CACHE) !== 0],
    ["can_df", (flags & NBD_FLAG_SEND_DF) !== 0],
    ["can_fast_zero", (flags & NBD_FLAG_SEND_FAST_ZERO) !== 0],
    ["can_flush", (flags & NBD_FLAG_SEND_FLUSH) !== 0],
    ["can_fua", (flags & NBD_FLAG_SEND_FUA) !== 0],
    ["can_multi_conn", (flags & NBD_FLAG_CAN_MULTI_CONN) !== 0],
    ["can_trim", (flags & NBD_FLAG_SEND_TRIM) !== 0],
    ["can_zero", (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0],
  ];
}

function packets(report: ServerReport): string {
  if (report.extendedHeaders) return "extended";
  return report.structuredReplies ? "structured" : "simple";
}

/** Formats a report as nbdinfo's human-readable output, with the formats found by name. */
export function formatReport(
  report: ServerReport,
  uri: NbdUri,
  formats?: Map<string, FormatInfo>,
): string {
  const lines = [
    `protocol: ${report.protocol} ${report.tls ? "with" : "without"} TLS, using ${
      packets(report)
    } packets`,
  ];
  for (const e of report.exports) {
    lines.push(`export=${JSON.stringify(e.name)}:`);
    if (e.description) lines.push(`\tdescription: ${e.description}`);
    const human = humanSize(e.size);
    lines.push(`\texport-size: ${e.size}${human.scaled ? ` (${human.text})` : ""}`);
    if (e.content !== undefined) lines.push(`\tcontent: ${e.content}`);
    const format = formats?.get(e.requestedName);
    if (format) { for (const line of formatInfoLines(format)) lines.push(`\t${line}`); }
    lines.push(`\turi: ${exportUri(uri, e.requestedName)}`);
    if (e.contexts) {
      lines.push("\tcontexts:");
      for (const context of e.contexts) lines.push(`\t\t${context}`);
    }
    for (const [name, value] of exportFacts(e.flags)) lines.push(`\t${name}: ${value}`);
    if (e.blockSize) {
      lines.push(`\tblock_size_minimum: ${e.blockSize.minimum}`);
      lines.push(`\tblock_size_preferred: ${e.blockSize.preferred}`);
      lines.push(`\tblock_size_maximum: ${e.blockSize.maximum}`);
    }
  }
  return lines.join("\n") + "\n";
}

/** The JSON form of one export, with nbdinfo's field names (and its format, if known). */
export function exportJson(
  e: ExportReport,
  uri: NbdUri,
  format?: FormatInfo,
): Record<string, unknown> {
  const out: Record<string, unknown> = { "export-name": e.name };
  if (e.description) out.description = e.description;
  if (e.content !== undefined) out.content = e.content;
  if (format) Object.assign(out, formatInfoJson(format));
  out.uri = exportUri(uri, e.requestedName);
  if (e.contexts) out.contexts = e.contexts;
  for (const [name, value] of exportFacts(e.flags)) out[name] = value;
  if (e.blockSize) {
    out.block_size_minimum = e.blockSize.minimum;
    out.block_size_preferred = e.blockSize.preferred;
    out.block_size_maximum = e.blockSize.maximum;
  }
  out["export-size"] = e.size;
  out["export-size-str"] = humanSize(e.size).text;
  return out;
}

/** Formats a report as JSON, with nbdinfo's field names (and the formats found, by name). */
export function formatReportJson(
  report: ServerReport,
  uri: NbdUri,
  formats?: Map<string, FormatInfo>,
): string {
  const out = {
    protocol: report.protocol,
    TLS: report.tls,
    structured: report.structuredReplies,
    extended: report.extendedHeaders,
    exports: report.exports.map((e) => exportJson(e, uri, formats?.get(e.requestedName))),
  };
  return JSON.stringify(out, null, 2) + "\n";
}

/**
 * Reads the first bytes of an export and asks file(1) what they are.
 * Best effort: any failure (no `file`, a read error) means no answer.
 */
async function probeContent(client: NbdClient): Promise<string | undefined> {
  const size = client.size();
  const minimum = client.blockSize.minimum;
  // Read whole blocks: the probe must respect the server's minimum block size.
  const wanted = Math.min(size, Math.ceil(PROBE_BYTES / minimum) * minimum);
  const buf = new Uint8Array(wanted);
  try {
    await client.pread(buf, 0);
  } catch {
    return undefined;
  }
  let path: string | undefined;
  try {
    path = await Deno.makeTempFile({ prefix: "nbd-content" });
    await Deno.writeFile(path, buf.subarray(0, Math.min(wanted, PROBE_BYTES)));
    const out = await new Deno.Command("file", {
      args: ["-b", path],
      stdout: "piped",
      stderr: "null",
    }).output();
    if (!out.success) return undefined;
    const line = new TextDecoder().decode(out.stdout).split("\n")[0]!.trim();
    return line === "" ? undefined : line;
  } catch {
    return undefined;
  } finally {
    if (path) await Deno.remove(path).catch(() => {});
  }
}

/**
 * The image format of an export when its first bytes are a qcow2 header
 * (undefined for anything else, or when it cannot be read). Reads whole
 * blocks of the server's minimum size; follows nothing the header names.
 */
export async function probeExportFormat(client: NbdClient): Promise<FormatInfo | undefined> {
  const size = client.size();
  const minimum = client.blockSize.minimum;
  const whole = (n: number) => Math.min(size, Math.ceil(n / minimum) * minimum);
  try {
    const info = await probeImage(async (buf, offset) => {
      const wanted = whole(offset + buf.length);
      if (wanted === buf.length && offset === 0) return await client.pread(buf, 0);
      const block = new Uint8Array(wanted);
      await client.pread(block, 0);
      buf.set(block.subarray(offset, offset + buf.length));
    }, size);
    return info.format === "qcow2" ? info : undefined;
  } catch {
    return undefined;
  }
}

/** Features `--can` knows, and how to test each on a connected client. */
const CAN: Record<string, (c: NbdClient) => boolean> = {
  "connect": () => true,
  "read": () => true,
  "write": (c) => !c.readOnly,
  "flush": (c) => c.canFlush,
  "fua": (c) => c.canFua,
  "trim": (c) => c.canTrim,
  "zero": (c) => c.canZero,
  "fast-zero": (c) => c.canFastZero,
  "df": (c) => c.canDf,
  "multi-conn": (c) => c.canMultiConn,
  "cache": (c) => c.canCache,
  "structured-reply": (c) => c.structuredReplies,
  "extended-headers": (c) => c.extendedHeaders,
  "block-status": (c) => c.canMetaContext(BASE_ALLOCATION),
};

/** Properties `--is` knows. */
const IS: Record<string, (c: NbdClient) => boolean> = {
  "read-only": (c) => c.readOnly,
  "rotational": (c) => c.isRotational,
  "tls": (c) => c.tls,
};

async function testFeature(
  uri: string,
  kind: "can" | "is",
  feature: string,
  timeouts: ClientTimeouts,
): Promise<number> {
  const table = kind === "can" ? CAN : IS;
  const test = table[feature];
  if (!test) {
    throw new UsageError(
      `--${kind}: unknown ${kind === "can" ? "feature" : "property"} "${feature}" (one of: ${
        Object.keys(table).join(", ")
      })`,
    );
  }
  const metaContexts = feature === "block-status" ? [BASE_ALLOCATION] : [];
  await using client = await NbdClient.connect(uri, { metaContexts, ...timeouts });
  return test(client) ? 0 : 2;
}

/** Options of `showInfo`. */
export interface InfoOptions {
  /** Print JSON. */
  json: boolean;
  /** Show every export. */
  list: boolean;
  /** Probe the content with file(1). */
  content: boolean;
  /** Connect, handshake and request timeouts (defaults when absent). */
  timeouts?: ClientTimeouts;
}

/** Adds a hint to the "no such export" error. */
function withHint(error: unknown): unknown {
  if (error instanceof NbdOptionError && error.replyType === NBD_REP_ERR_UNKNOWN) {
    error.message += ` (use "nbd list URI" to see the exports)`;
  }
  return error;
}

/** Connects, gathers the report and prints it; resolves to the exit status. */
export async function showInfo(uriText: string, options: InfoOptions): Promise<number> {
  const uri = parseNbdUri(uriText);
  let report: ServerReport;
  const formats = new Map<string, FormatInfo>();
  const probe = async (client: NbdClient) => {
    const content = await probeContent(client);
    const format = await probeExportFormat(client);
    if (format) formats.set(client.exportName, format);
    return content;
  };
  try {
    report = await inspectServer(uri, {
      list: options.list,
      probe: options.content ? probe : undefined,
      ...options.timeouts,
    });
  } catch (error) {
    throw withHint(error);
  }
  await writeStdout(
    options.json ? formatReportJson(report, uri, formats) : formatReport(report, uri, formats),
  );
  for (const failure of report.failures) {
    printError(`cannot query export "${failure.name}": ${failure.error.message}`);
  }
  return report.failures.length > 0 ? 1 : 0;
}

/** Splits `--map=CONTEXT` (an optional value, which parseArgs cannot express) off argv. */
function extractMapContext(argv: string[]): { argv: string[]; map?: string } {
  let map: string | undefined;
  const rest: string[] = [];
  for (const arg of argv) {
    if (arg === "--") {
      rest.push(...argv.slice(argv.indexOf(arg)));
      break;
    }
    if (arg === "--map") map ??= BASE_ALLOCATION;
    else if (arg.startsWith("--map=")) map = arg.slice("--map=".length) || BASE_ALLOCATION;
    else rest.push(arg);
  }
  return { argv: rest, map };
}

/** The `nbd info` command. */
export const infoCommand: Command = {
  name: "info",
  summary: "show information about an export or a server (like nbdinfo)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const extracted = extractMapContext(argv);
    const { values, positionals } = parseOptions(extracted.argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const modes = [values.list, extracted.map !== undefined, values.size, values.can, values.is]
      .filter(Boolean).length;
    if (modes > 1) {
      throw new UsageError("--list, --map, --size, --can and --is cannot be combined");
    }
    if (values.content && values["no-content"]) {
      throw new UsageError("--content and --no-content cannot be combined");
    }
    if (values.totals && extracted.map === undefined) {
      throw new UsageError("--totals only makes sense with --map");
    }
    const remote = remoteImage(positionals);
    if (remote !== undefined) return await runRemoteInfo(remote, values, extracted.map);
    const file = await localFile(positionals);
    if (file !== undefined) return await runLocalInfo(file, values, extracted.map);
    return await withUriArgument(positionals, "info", (uriText) => {
      const uri = withTlsFlags(uriText, values);
      return runInfo(uri, values, extracted.map, clientTimeouts(values));
    });
  },
};

/** The body of `nbd info` once the URI is known. */
async function runInfo(
  uri: string,
  values: {
    can?: string;
    is?: string;
    size?: boolean;
    list?: boolean;
    json?: boolean;
    totals?: boolean;
    content?: boolean;
    "no-content"?: boolean;
  },
  map: string | undefined,
  timeouts: ClientTimeouts,
): Promise<number> {
  if (values.can !== undefined) return await testFeature(uri, "can", values.can, timeouts);
  if (values.is !== undefined) return await testFeature(uri, "is", values.is, timeouts);
  if (map !== undefined) {
    return await showMap(uri, {
      context: map,
      totals: values.totals ?? false,
      json: values.json ?? false,
      timeouts,
    });
  }
  if (values.size) {
    await using client = await NbdClient.connect(uri, { metaContexts: [], ...timeouts });
    await writeStdout(`${client.size()}\n`);
    return 0;
  }
  const list = values.list ?? false;
  return await showInfo(uri, {
    json: values.json ?? false,
    list,
    content: values["no-content"] ? false : (values.content ?? !list),
    timeouts,
  });
}

/**
 * The local file the positional arguments name, when they are one path
 * (not an NBD URI) of an existing regular file or block device.
 */
export async function localFile(positionals: string[]): Promise<string | undefined> {
  if (positionals.length !== 1) return undefined;
  const path = positionals[0]!;
  if (path === "[" || isNbdUri(path)) return undefined;
  try {
    const info = await Deno.stat(path);
    return info.isFile || info.isBlockDevice ? path : undefined;
  } catch {
    return undefined;
  }
}

/** The `rbd:` image or `s3://` object the positional arguments name, if they name one. */
export function remoteImage(positionals: string[]): string | undefined {
  if (positionals.length !== 1) return undefined;
  const text = positionals[0]!;
  return text.startsWith("rbd:") || /^s3:\/\//i.test(text) ? text : undefined;
}

/** How many bytes the format probe reads from the head of an image. */
const FORMAT_PROBE_BYTES = 2 * 1024 * 1024;

/**
 * `nbd info rbd:...` or `nbd info s3://...`: the size and format of an RBD
 * image or S3 object, read through the copy endpoints (`--map` maps it as
 * `nbd map` does).
 */
async function runRemoteInfo(
  text: string,
  values: InfoValues,
  map: string | undefined,
): Promise<number> {
  rejectServerOnly(values);
  const { parseEndpoint } = await import("../copy/endpoint.ts");
  if (map !== undefined) {
    if (map !== BASE_ALLOCATION) throw new UsageError(`--map=${map} needs an NBD URI`);
    const { showImageMap } = await import("./map.ts");
    return await showImageMap(text, "raw", {
      context: map,
      totals: values.totals ?? false,
      json: values.json ?? false,
    });
  }
  const { openSource } = await import("../copy/open.ts");
  const source = await openSource(parseEndpoint(text), {});
  let size: number;
  let format: FormatInfo;
  try {
    size = source.size!;
    const head = new Uint8Array(Math.min(size, FORMAT_PROBE_BYTES));
    if (head.length > 0) await source.read(head, 0);
    format = probeFormat(head, size);
  } finally {
    await source.close(true);
  }
  return await printImageInfo(
    text.startsWith("rbd:") ? "image" : "object",
    text,
    size,
    format,
    values,
  );
}

/** The flags only a server can answer; a local file or remote image refuses them. */
function rejectServerOnly(values: InfoValues): void {
  for (
    const [flag, given] of [["--can", values.can], ["--is", values.is], ["--list", values.list]]
  ) {
    if (given !== undefined && given !== false) {
      throw new UsageError(`${flag} needs an NBD URI, not a local file or image`);
    }
  }
}

/** Reads the head of a local file (or block device) and recognises its format. */
export async function localFormat(path: string): Promise<{ size: number; format: FormatInfo }> {
  using file = await Deno.open(path, { read: true });
  const size = await file.seek(0, Deno.SeekMode.End);
  const head = new Uint8Array(Math.min(size, 2 * 1024 * 1024));
  await file.seek(0, Deno.SeekMode.Start);
  let done = 0;
  while (done < head.length) {
    const n = await file.read(head.subarray(done));
    if (n === null) break;
    done += n;
  }
  return { size, format: probeFormat(head.subarray(0, done), size) };
}

/** The option values `nbd info FILE` and `nbd info rbd:|s3://` look at. */
interface InfoValues {
  can?: string;
  is?: string;
  size?: boolean;
  list?: boolean;
  json?: boolean;
  totals?: boolean;
}

/** `nbd info FILE`: the format of a local image (nothing it names is opened). */
async function runLocalInfo(
  path: string,
  values: InfoValues,
  map: string | undefined,
): Promise<number> {
  rejectServerOnly(values);
  if (map !== undefined) {
    throw new UsageError("--map needs an NBD URI, not a local file (see nbd map)");
  }
  const { size, format } = await localFormat(path);
  return await printImageInfo("file", path, size, format, values);
}

/** Prints the size and format of a file (`kind` "file") or a remote image or object. */
async function printImageInfo(
  kind: "file" | "image" | "object",
  name: string,
  size: number,
  format: FormatInfo,
  values: InfoValues,
): Promise<number> {
  if (values.size) {
    await writeStdout(`${format.virtualSize}\n`);
    return 0;
  }
  if (values.json) {
    const { qcow2, ...rest } = formatInfoJson(format);
    const out: Record<string, unknown> = { [kind]: name, [`${kind}-size`]: size, ...rest };
    if (format.error === undefined) out["virtual-size"] = format.virtualSize;
    if (qcow2 !== undefined) out.qcow2 = qcow2;
    await writeStdout(JSON.stringify(out, null, 2) + "\n");
    return format.error !== undefined ? 1 : 0;
  }
  const human = humanSize(size);
  const lines = [
    `${kind}: ${name}`,
    `\t${kind}-size: ${size}${human.scaled ? ` (${human.text})` : ""}`,
    ...formatInfoLines(format).map((line) => `\t${line}`),
  ];
  if (format.format === "raw") lines.push(`\tvirtual-size: ${size}`);
  await writeStdout(lines.join("\n") + "\n");
  return format.error !== undefined ? 1 : 0;
}
