/**
 * `nbd map URI`: the allocation map of an export (block status of a
 * metadata context, `base:allocation` by default), like `nbdinfo --map`,
 * with `--totals` for a summary per type and `--json` for scripts.
 *
 * @module
 */

import { BASE_ALLOCATION } from "../protocol/constants.ts";
import { NbdClient } from "../client/client.ts";
import { TLS_OPTIONS, TLS_USAGE, withTlsFlags } from "./tls_options.ts";
import {
  CLIENT_OPTIONS,
  CLIENT_USAGE,
  type ClientTimeouts,
  clientTimeouts,
} from "./client_options.ts";
import { withUriArgument } from "./uri_argument.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { writeStdout } from "./output.ts";
import { UsageError } from "../util/usage_error.ts";
import { isNbdUri } from "../protocol/uri.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { CachedReader } from "../formats/disk_reader.ts";
import { type BlockOwners, blockOwners } from "../formats/block_owners.ts";

const OWN_OPTIONS = {
  context: {
    type: "string",
    value: "NAME",
    help:
      `metadata context to map (default ${BASE_ALLOCATION}), e.g. qemu:allocation-depth or qemu:dirty-bitmap:NAME`,
  },
  totals: { type: "boolean", help: "sum the bytes of each type instead (with percentages)" },
  files: {
    type: "boolean",
    help:
      "name the owner of each extent: file, directory or metadata (ext2/3/4, FAT; in GPT/MBR partitions too)",
  },
  json: { type: "boolean", help: "print JSON" },
  "source-format": {
    type: "string",
    short: "f",
    value: "FORMAT",
    help:
      "map the guest view of the image: raw (the default), qcow2, or auto (qcow2 when its first bytes say so); also for a local FILE",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...OWN_OPTIONS, ...CLIENT_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd map [OPTIONS] URI
       nbd map [OPTIONS] FILE
       nbd map [OPTIONS] rbd:POOL/IMAGE[:conf=FILE] | s3://BUCKET/KEY

Print which parts of an export are allocated, holes or zeroes: one line
per run of extents with the same type (offset, length, type, description).
With --files, print instead which file, directory or filesystem structure
owns each extent (offset, length, kind, owner), read from the filesystem's
own structures (ext2/3/4, FAT12/16/32; on the whole disk or in GPT/MBR
partitions). Nothing is mounted or written.

Options:
${formatOptions(OWN_OPTIONS)}

With --source-format=qcow2 the export's (or FILE's, or an http URL's) content
is read as a qcow2 image and the map shows the guest's allocation, from the
L2 tables: data (type 0), or hole,zero (3) for unallocated and zero clusters.
A local FILE without it is mapped raw: its holes (SEEK_HOLE) are hole,zero.
An RBD image is mapped from librbd's allocation (objects never written are
hole,zero), an S3 object as data (the same forms as nbd copy's endpoints).

URI may also be a server command, started for the command by socket activation
and stopped afterwards: nbd map [OPTIONS] -- [ CMD ARGS ... ]

${CLIENT_USAGE}

${TLS_USAGE}

Examples:
  nbd map nbd://localhost/disk
  nbd map --totals --json "nbd+unix:///?socket=/tmp/nbd.sock"
  nbd map --source-format=qcow2 disk.qcow2
  nbd map --files nbd://localhost/disk
`;

/** A run of the map: consecutive bytes of one type. */
export interface MapEntry {
  /** Offset of the run. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** The context's status value. */
  type: number;
}

/** Options of `showMap`. */
export interface MapOptions {
  /** Metadata context to map. */
  context: string;
  /** Print totals per type instead of the runs. */
  totals: boolean;
  /** Print JSON. */
  json: boolean;
  /** Connect, handshake and request timeouts (defaults when absent). */
  timeouts?: ClientTimeouts;
}

/** Human description of a status value, for the contexts whose meaning is known. */
export function extentDescription(context: string, type: number): string | undefined {
  if (context === BASE_ALLOCATION) {
    return ["data", "hole", "zero", "hole,zero"][type];
  }
  if (context.startsWith("qemu:dirty-bitmap:")) return ["clean", "dirty"][type];
  if (context === "qemu:allocation-depth") {
    if (type === 0) return "absent";
    if (type === 1) return "local";
    return `backing depth ${type}`;
  }
  return undefined;
}

/** Appends an extent to a map, merging it into the last run when the type is the same. */
export function appendExtent(entries: MapEntry[], entry: MapEntry): void {
  const last = entries[entries.length - 1];
  if (last && last.type === entry.type && last.offset + last.length === entry.offset) {
    last.length += entry.length;
  } else {
    entries.push({ ...entry });
  }
}

function jsonDescription(context: string, type: number): string {
  const description = extentDescription(context, type);
  return description === undefined ? "" : `, "description": ${JSON.stringify(description)}`;
}

/** Formats the runs: a table like nbdinfo's, or a JSON array. */
export function formatMap(entries: MapEntry[], context: string, json: boolean): string {
  if (json) {
    const lines = entries.map((e) =>
      `{ "offset": ${e.offset}, "length": ${e.length}, "type": ${e.type}${
        jsonDescription(context, e.type)
      } }`
    );
    return lines.length === 0 ? "[]\n" : `[\n${lines.join(",\n")}\n]\n`;
  }
  return entries.map((e) => {
    const description = extentDescription(context, e.type);
    return `${String(e.offset).padStart(10)}  ${String(e.length).padStart(10)}  ${
      String(e.type).padStart(3)
    }${description === undefined ? "" : `  ${description}`}\n`;
  }).join("");
}

/** Formats the bytes per type (ascending type) with their share of `size`. */
export function formatTotals(
  entries: MapEntry[],
  size: number,
  context: string,
  json: boolean,
): string {
  const totals = new Map<number, number>();
  for (const e of entries) totals.set(e.type, (totals.get(e.type) ?? 0) + e.length);
  const types = [...totals.keys()].sort((a, b) => a - b);
  if (size === 0) return json ? "[]\n" : "";
  const lines = types.map((type) => {
    const bytes = totals.get(type)!;
    const percent = 100 * bytes / size;
    if (json) {
      // Six significant digits, as C's %g prints them.
      const shown = Number(percent.toPrecision(6));
      return `{ "size": ${bytes}, "percent": ${shown}, "type": ${type}${
        jsonDescription(context, type)
      } }`;
    }
    const description = extentDescription(context, type);
    return `${String(bytes).padStart(10)} ${percent.toFixed(1).padStart(5)}% ${
      String(type).padStart(3)
    }${description === undefined ? "" : ` ${description}`}`;
  });
  if (json) return lines.length === 0 ? "[]\n" : `[\n${lines.join(",\n")}\n]\n`;
  return lines.map((line) => `${line}\n`).join("");
}

/** Formats the owners of a disk: a table (offset, length, kind, owner) or JSON. */
export function formatOwners(owners: BlockOwners, json: boolean): string {
  if (json) return JSON.stringify(owners, null, 2) + "\n";
  const lines = owners.filesystems.map((f) =>
    `# ${
      f.partition ? `partition ${f.partition}` : "whole disk"
    }: ${f.type} at ${f.offset}, ${f.length} bytes${f.error ? ` (incomplete: ${f.error})` : ""}\n`
  );
  for (const e of owners.extents) {
    lines.push(
      `${String(e.offset).padStart(12)}  ${String(e.length).padStart(12)}  ${
        e.kind.padEnd(9)
      }  ${e.owner}\n`,
    );
  }
  return lines.join("");
}

/** Connects, names the owner of each extent and prints them; resolves to the exit status. */
export async function showFileMap(uri: string, json: boolean): Promise<number> {
  await using client = await NbdClient.connect(uri);
  const reader = new CachedReader(client.size(), (buf, offset) => client.pread(buf, offset));
  const owners = await blockOwners(reader);
  if (owners.filesystems.length === 0) {
    throw new Error("no ext2/3/4 or FAT filesystem found (on the disk or in a GPT/MBR partition)");
  }
  await writeStdout(formatOwners(owners, json));
  return 0;
}

/** Connects, maps the whole export and prints the result; resolves to the exit status. */
export async function showMap(uri: string, options: MapOptions): Promise<number> {
  await using client = await NbdClient.connect(uri, {
    metaContexts: [options.context],
    ...options.timeouts,
  });
  if (!client.canMetaContext(options.context)) {
    throw new Error(`the server does not support metadata context "${options.context}"`);
  }
  const entries: MapEntry[] = [];
  for await (const extent of client.iterateExtents(0, client.size(), options.context)) {
    appendExtent(entries, { offset: extent.offset, length: extent.length, type: extent.flags });
  }
  const text = options.totals
    ? formatTotals(entries, client.size(), options.context, options.json)
    : formatMap(entries, options.context, options.json);
  await writeStdout(text);
  return 0;
}

/** The `nbd map` command. */
export const mapCommand: Command = {
  name: "map",
  summary: "print the allocation map of an export (like nbdinfo --map)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    if (values.files && (values.totals || values.context !== undefined)) {
      throw new UsageError("--files cannot be combined with --totals or --context");
    }
    if (values.files) {
      return await withUriArgument(
        positionals,
        "map",
        (uri) => showFileMap(withTlsFlags(uri, values), values.json ?? false),
      );
    }
    const format = values["source-format"];
    if (format !== undefined && format !== "raw" && format !== "qcow2" && format !== "auto") {
      throw new UsageError(`--source-format must be raw, qcow2 or auto, got "${format}"`);
    }
    const options = {
      context: values.context ?? BASE_ALLOCATION,
      totals: values.totals ?? false,
      json: values.json ?? false,
      timeouts: clientTimeouts(values),
    };
    const remote = positionals.length === 1 &&
      (positionals[0]!.startsWith("rbd:") || /^s3:\/\//i.test(positionals[0]!));
    const local = remote || await isLocalFile(positionals);
    if (format !== undefined || local) {
      if (options.context !== BASE_ALLOCATION) {
        throw new UsageError(
          `--context ${options.context} needs an NBD URI and no --source-format`,
        );
      }
      if (positionals.length === 1 && positionals[0] !== "[") {
        return await showImageMap(positionals[0]!, format ?? "raw", options);
      }
    }
    return await withUriArgument(
      positionals,
      "map",
      (uri) => showMap(withTlsFlags(uri, values), options),
    );
  },
};

/** Whether the positional arguments are one path of an existing file or block device. */
async function isLocalFile(positionals: string[]): Promise<boolean> {
  if (positionals.length !== 1) return false;
  const path = positionals[0]!;
  if (path === "[" || isNbdUri(path) || /^https?:\/\//i.test(path)) return false;
  try {
    const info = await Deno.stat(path);
    return info.isFile || info.isBlockDevice === true;
  } catch {
    return false;
  }
}

/**
 * Maps an image read as `format` through the copy engine's sources (a
 * file, an NBD URI or an http URL): data is type 0, and what reads as
 * zeroes without being stored (holes, unallocated and zero clusters) is
 * hole,zero (3), as the qcow2 filter reports it.
 */
export async function showImageMap(
  argument: string,
  format: "raw" | "qcow2" | "auto",
  options: MapOptions,
): Promise<number> {
  const { parseEndpoint } = await import("../copy/endpoint.ts");
  const { openFormattedSource } = await import("../copy/qcow2.ts");
  const source = await openFormattedSource(parseEndpoint(argument), format, {});
  try {
    const size = source.size;
    if (size === undefined) throw new UsageError(`${argument}: a stream has no map`);
    const entries: MapEntry[] = [];
    for (let at = 0; at < size;) {
      const extents = await source.extents(at, Math.min(size - at, 1 << 30));
      if (extents.length === 0) throw new Error(`${argument}: no allocation information at ${at}`);
      for (const e of extents) {
        const start = Math.max(e.offset, at);
        const end = Math.min(e.offset + e.length, size);
        if (end <= start) continue;
        const type = e.zero ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
        appendExtent(entries, { offset: start, length: end - start, type });
        at = end;
      }
    }
    const text = options.totals
      ? formatTotals(entries, size, options.context, options.json)
      : formatMap(entries, options.context, options.json);
    await writeStdout(text);
    return 0;
  } finally {
    await source.close(true);
  }
}
