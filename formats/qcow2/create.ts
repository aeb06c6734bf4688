/**
 * Creating empty qcow2 images: the header, a refcount table and blocks
 * covering the metadata, and a zeroed L1 table.
 *
 * @module
 */

import {
  type CompressionType,
  encodeHeader,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  MAX_L1_ENTRIES,
  MAX_VIRTUAL_SIZE,
  putU64,
  Qcow2FormatError,
} from "./header.ts";

/** Options of a new image. */
export interface CreateOptions {
  /** Virtual size in bytes. */
  size: number;
  /** Cluster size (power of two, 512 B..2 MiB; default 64 KiB). */
  clusterSize?: number;
  /** 2 (compat 0.10) or 3 (compat 1.1, default). */
  version?: number;
  /** Refcount width in bits (1..64, power of two; default 16). */
  refcountBits?: number;
  /** Extended L2 entries with subclusters (version 3). */
  extendedL2?: boolean;
  /** Compression type for compressed clusters (default zlib). */
  compressionType?: CompressionType;
  /** Backing file name recorded in the header. */
  backingFile?: string;
  /** Backing file format recorded in the header. */
  backingFormat?: string;
}

/** The bytes of an empty image with the given options. */
export function createImage(options: CreateOptions): Uint8Array {
  const cs = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new Qcow2FormatError("the cluster size must be a power of two from 512 to 2M");
  }
  const version = options.version ?? 3;
  const refcountBits = options.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder > 6) {
    throw new Qcow2FormatError("refcount bits must be a power of two from 1 to 64");
  }
  if (
    version === 2 &&
    (refcountBits !== 16 || options.extendedL2 || options.compressionType === "zstd")
  ) {
    throw new Qcow2FormatError("version 2 images have 16-bit refcounts, no extended L2, zlib only");
  }
  if (!Number.isSafeInteger(options.size) || options.size < 0 || options.size > MAX_VIRTUAL_SIZE) {
    throw new Qcow2FormatError("invalid virtual size");
  }
  const l2Entries = cs / (options.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(options.size / (cs * l2Entries));
  if (l1Size > MAX_L1_ENTRIES) {
    throw new Qcow2FormatError("the virtual size needs too large an L1 table");
  }
  const l1Clusters = Math.max(1, Math.ceil(l1Size * 8 / cs));
  const perBlock = cs * 8 / refcountBits;
  // Layout: header, refcount table, refcount blocks, L1 table.
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil(needBlocks * 8 / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const total = 1 + tableClusters + blocks + l1Clusters;
  const out = new Uint8Array(total * cs);
  const view = new DataView(out.buffer);
  let incompatible = 0;
  if (options.extendedL2) incompatible |= INCOMPAT_EXTL2;
  if (options.compressionType === "zstd") incompatible |= INCOMPAT_COMPRESSION;
  out.set(encodeHeader({
    version,
    clusterBits,
    size: options.size,
    l1Size,
    l1TableOffset: (1 + tableClusters + blocks) * cs,
    refcountTableOffset: cs,
    refcountTableClusters: tableClusters,
    incompatible,
    compatible: 0,
    autoclear: 0,
    refcountOrder,
    compressionType: options.compressionType ?? "zlib",
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
  }));
  for (let b = 0; b < blocks; b++) putU64(view, cs + b * 8, (1 + tableClusters + b) * cs);
  // Every cluster so far has refcount 1.
  for (let c = 0; c < total; c++) {
    const block = Math.floor(c / perBlock);
    const base = (1 + tableClusters + block) * cs;
    const i = c % perBlock;
    const bit = i * refcountBits;
    if (refcountBits >= 8) {
      out[base + (bit >> 3) + refcountBits / 8 - 1] = 1;
    } else {
      out[base + (bit >> 3)] |= 1 << (bit & 7);
    }
  }
  return out;
}
