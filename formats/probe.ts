/**
 * Recognising an image's format from its first bytes, for `nbd info` and
 * `--source-format=auto`: qcow2 by its magic and header, raw otherwise.
 * Nothing the image names (a backing file, a data file) is ever opened.
 *
 * @module
 */

import {
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  isQcow2,
  parseHeader,
} from "./qcow2/header.ts";

/** What the qcow2 header says, as `nbd info` reports it. */
export interface Qcow2Info {
  /** 2 or 3. */
  version: number;
  /** qemu's name for the version: "0.10" or "1.1". */
  compat: string;
  /** Guest size in bytes. */
  virtualSize: number;
  /** Cluster size in bytes. */
  clusterSize: number;
  /** The backing file name recorded in the header (never followed). */
  backingFile?: string;
  /** The backing format recorded in the header. */
  backingFormat?: string;
  /** Compression type of compressed clusters. */
  compressionType: string;
  /** Refcount width in bits. */
  refcountBits: number;
  /** Extended L2 entries (subclusters). */
  extendedL2: boolean;
  /** Lazy refcounts. */
  lazyRefcounts: boolean;
  /** The dirty bit is set. */
  dirty: boolean;
  /** The corrupt bit is set. */
  corrupt: boolean;
  /** "none", "aes" or "luks". */
  encryption: string;
  /** Internal snapshots. */
  snapshots: number;
  /** The external data file name, if any (never opened). */
  dataFile?: string;
}

/** The format of an image. */
export interface FormatInfo {
  /** "qcow2" or "raw". */
  format: "qcow2" | "raw";
  /** Guest size: the qcow2 virtual size, or the size of a raw image. */
  virtualSize: number;
  /** The qcow2 header, when it could be parsed. */
  qcow2?: Qcow2Info;
  /** Why a qcow2 header could not be parsed. */
  error?: string;
}

/** How many bytes of an image `probeFormat` wants (the header and its extensions). */
export const PROBE_HEADER_BYTES = 2 * 1024 * 1024;

/**
 * The format of an image whose first bytes are `head` (up to the first
 * cluster, at most 2 MiB; shorter when the image is) and whose size is `size`.
 */
export function probeFormat(head: Uint8Array, size: number): FormatInfo {
  if (!isQcow2(head)) return { format: "raw", virtualSize: size };
  let header;
  try {
    header = parseHeader(head, size);
  } catch (error) {
    return { format: "qcow2", virtualSize: 0, error: (error as Error).message };
  }
  const info: Qcow2Info = {
    version: header.version,
    compat: header.version === 2 ? "0.10" : "1.1",
    virtualSize: header.size,
    clusterSize: header.clusterSize,
    compressionType: header.compressionType,
    refcountBits: 2 ** header.refcountOrder,
    extendedL2: (header.incompatible & INCOMPAT_EXTL2) !== 0,
    lazyRefcounts: (header.compatible & COMPAT_LAZY_REFCOUNTS) !== 0,
    dirty: (header.incompatible & INCOMPAT_DIRTY) !== 0,
    corrupt: (header.incompatible & INCOMPAT_CORRUPT) !== 0,
    encryption: header.cryptMethod === 1
      ? "aes"
      : header.cryptMethod === 2 || header.encryptionExtension
      ? "luks"
      : "none",
    snapshots: header.nbSnapshots,
  };
  if (header.backingFile !== undefined) info.backingFile = header.backingFile;
  if (header.backingFormat !== undefined) info.backingFormat = header.backingFormat;
  if (header.dataFile !== undefined) info.dataFile = header.dataFile;
  return { format: "qcow2", virtualSize: header.size, qcow2: info };
}

/** Reads the head of an image through `read` and recognises its format. */
export async function probeImage(
  read: (buf: Uint8Array, offset: number) => Promise<unknown>,
  size: number,
): Promise<FormatInfo> {
  const magic = new Uint8Array(Math.min(size, 4));
  if (magic.length > 0) await read(magic, 0);
  if (!isQcow2(magic)) return { format: "raw", virtualSize: size };
  const head = new Uint8Array(Math.min(size, PROBE_HEADER_BYTES));
  await read(head, 0);
  return probeFormat(head, size);
}

/** The lines `nbd info` prints about a format (without indentation). */
export function formatInfoLines(info: FormatInfo): string[] {
  const lines = [`format: ${info.format}`];
  if (info.error !== undefined) {
    lines.push(`format-error: ${info.error}`);
    return lines;
  }
  const q = info.qcow2;
  if (!q) return lines;
  lines.push(`qcow2-version: ${q.version} (compat ${q.compat})`);
  lines.push(`virtual-size: ${q.virtualSize}`);
  lines.push(`cluster-size: ${q.clusterSize}`);
  if (q.backingFile !== undefined) {
    lines.push(`backing-file: ${JSON.stringify(q.backingFile)} (not followed)`);
  }
  if (q.backingFormat !== undefined) lines.push(`backing-format: ${q.backingFormat}`);
  if (q.dataFile !== undefined) lines.push(`data-file: ${JSON.stringify(q.dataFile)}`);
  lines.push(`compression-type: ${q.compressionType}`);
  lines.push(`refcount-bits: ${q.refcountBits}`);
  lines.push(`extended-l2: ${q.extendedL2}`);
  lines.push(`lazy-refcounts: ${q.lazyRefcounts}`);
  lines.push(`encryption: ${q.encryption}`);
  if (q.snapshots) lines.push(`snapshots: ${q.snapshots}`);
  lines.push(`dirty: ${q.dirty}`);
  lines.push(`corrupt: ${q.corrupt}`);
  return lines;
}

/** The JSON fields `nbd info --json` adds about a format. */
export function formatInfoJson(info: FormatInfo): Record<string, unknown> {
  const out: Record<string, unknown> = { format: info.format };
  if (info.error !== undefined) out["format-error"] = info.error;
  const q = info.qcow2;
  if (!q) return out;
  const fields: Record<string, unknown> = {
    version: q.version,
    compat: q.compat,
    "virtual-size": q.virtualSize,
    "cluster-size": q.clusterSize,
  };
  if (q.backingFile !== undefined) fields["backing-file"] = q.backingFile;
  if (q.backingFormat !== undefined) fields["backing-format"] = q.backingFormat;
  if (q.dataFile !== undefined) fields["data-file"] = q.dataFile;
  Object.assign(fields, {
    "compression-type": q.compressionType,
    "refcount-bits": q.refcountBits,
    "extended-l2": q.extendedL2,
    "lazy-refcounts": q.lazyRefcounts,
    encryption: q.encryption,
    snapshots: q.snapshots,
    dirty: q.dirty,
    corrupt: q.corrupt,
  });
  out.qcow2 = fields;
  return out;
}
