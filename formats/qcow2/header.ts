/**
 * The qcow2 header (versions 2 and 3) and its extensions: parsing with
 * checks against absurd or hostile values, and encoding for writers.
 *
 * @module
 */

/** The magic "QFI\xfb" at the start of every qcow2 file. */
export const QCOW2_MAGIC = 0x514649fb;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1;
/** The image is corrupt: it may only be opened read-only. */
export const INCOMPAT_CORRUPT = 2;
/** Guest data lives in an external data file. */
export const INCOMPAT_DATA_FILE = 4;
/** The compression type field is valid (not zlib). */
export const INCOMPAT_COMPRESSION = 8;
/** L2 entries are 128 bits with subcluster bitmaps. */
export const INCOMPAT_EXTL2 = 16;
/** Every incompatible bit this implementation understands. */
export const INCOMPAT_KNOWN = 31;

/** Compatible feature bit: lazy refcounts. */
export const COMPAT_LAZY_REFCOUNTS = 1;
/** Autoclear bit: the bitmaps extension is consistent. */
export const AUTOCLEAR_BITMAPS = 1;
/** Autoclear bit: the external data file is a valid raw image. */
export const AUTOCLEAR_DATA_FILE_RAW = 2;

/** Header extension types. */
export const EXT_END = 0;
/** Backing file format name. */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Feature name table. */
export const EXT_FEATURE_NAMES = 0x6803f857;
/** Bitmaps. */
export const EXT_BITMAPS = 0x23852875;
/** Full disk encryption header pointer. */
export const EXT_ENCRYPTION = 0x0537be77;
/** External data file name. */
export const EXT_DATA_FILE = 0x44415441;

/** The largest virtual size accepted: offsets stay exact JavaScript numbers. */
export const MAX_VIRTUAL_SIZE = 2 ** 53 - 2 ** 30;
/** The largest L1 table accepted (qemu's limit: 32 MiB). */
export const MAX_L1_ENTRIES = 32 * 1024 * 1024 / 8;
/** The largest refcount table accepted, in clusters (qemu's limit: 8 MiB of entries). */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024 * 8;

/** The compression types qcow2 knows. */
export type CompressionType = "zlib" | "zstd";

/** A named feature from the feature name table. */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  /** Bit number. */
  bit: number;
  /** Name. */
  name: string;
}

/** The bitmaps extension. */
export interface BitmapsExtension {
  /** Number of bitmaps. */
  count: number;
  /** Size of the bitmap directory. */
  directorySize: number;
  /** Offset of the bitmap directory. */
  directoryOffset: number;
}

/** A parsed qcow2 header. */
export interface Qcow2Header {
  /** 2 or 3. */
  version: number;
  /** Offset of the backing file name (0 = none). */
  backingFileOffset: number;
  /** Length of the backing file name. */
  backingFileSize: number;
  /** The backing file name, when there is one. */
  backingFile?: string;
  /** The backing format from the header extension. */
  backingFormat?: string;
  /** log2 of the cluster size (9..21). */
  clusterBits: number;
  /** Cluster size in bytes. */
  clusterSize: number;
  /** Guest-visible size. */
  size: number;
  /** 0 none, 1 AES, 2 LUKS. */
  cryptMethod: number;
  /** Entries in the active L1 table. */
  l1Size: number;
  /** Offset of the active L1 table. */
  l1TableOffset: number;
  /** Offset of the refcount table. */
  refcountTableOffset: number;
  /** Clusters of the refcount table. */
  refcountTableClusters: number;
  /** Internal snapshots. */
  nbSnapshots: number;
  /** Offset of the snapshot table. */
  snapshotsOffset: number;
  /** Incompatible feature bits (low 32 bits; the high ones must be 0). */
  incompatible: number;
  /** Compatible feature bits (low 32 bits). */
  compatible: number;
  /** Autoclear feature bits (low 32 bits). */
  autoclear: number;
  /** log2 of the refcount width (0..6). */
  refcountOrder: number;
  /** Header length (72 for version 2). */
  headerLength: number;
  /** Compression type. */
  compressionType: CompressionType;
  /** Feature names from the extension. */
  featureNames: FeatureName[];
  /** The bitmaps extension, if any. */
  bitmaps?: BitmapsExtension;
  /** The external data file name, if any. */
  dataFile?: string;
  /** An encryption header extension was present. */
  encryptionExtension: boolean;
  /** Bytes of header and extensions (where the writer may not put anything else). */
  extensionsEnd: number;
  /** Extensions this parser does not know, kept verbatim for rewriting. */
  unknownExtensions: { type: number; data: Uint8Array }[];
}

/** A malformed or unsupported image: the message is one line for the user. */
export class Qcow2FormatError extends Error {
  /** Wraps a message. */
  constructor(message: string) {
    super(message);
    this.name = "Qcow2FormatError";
  }
}

/** Reads an unsigned 64-bit big-endian value, failing when it is not an exact number. */
export function u64(view: DataView, at: number, what: string): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi >= 0x200000) throw new Qcow2FormatError(`${what} is too large`);
  return hi * 2 ** 32 + lo;
}

/** Writes an unsigned 64-bit big-endian value. */
export function putU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 2 ** 32));
  view.setUint32(at + 4, value >>> 0);
}

/** Whether the first bytes of a file are a qcow2 magic. */
export function isQcow2(bytes: Uint8Array): boolean {
  return bytes.length >= 4 &&
    new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0) === QCOW2_MAGIC;
}

/** Names of the known incompatible bits, for messages. */
const INCOMPAT_NAMES = [
  "dirty",
  "corrupt",
  "external data file",
  "compression type",
  "extended L2",
];

/**
 * Parses the header in `bytes` (the file's first cluster, or at least
 * its first 64 KiB; shorter when the file is). `fileSize` bounds offsets.
 */
export function parseHeader(bytes: Uint8Array, fileSize: number): Qcow2Header {
  if (bytes.length < 72) throw new Qcow2FormatError("not a qcow2 image: the file is too short");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) {
    throw new Qcow2FormatError("not a qcow2 image (bad magic)");
  }
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2FormatError(`qcow2 version ${version} is not supported (only 2 and 3)`);
  }
  const clusterBits = view.getUint32(20);
  if (clusterBits < 9 || clusterBits > 21) {
    throw new Qcow2FormatError(`cluster_bits ${clusterBits} is out of range (9..21)`);
  }
  const clusterSize = 2 ** clusterBits;
  const backingFileOffset = u64(view, 8, "backing file offset");
  const backingFileSize = view.getUint32(16);
  const size = u64(view, 24, "virtual size");
  if (size > MAX_VIRTUAL_SIZE) throw new Qcow2FormatError("virtual size is too large");
  const cryptMethod = view.getUint32(32);
  const l1Size = view.getUint32(36);
  const l1TableOffset = u64(view, 40, "L1 table offset");
  const refcountTableOffset = u64(view, 48, "refcount table offset");
  const refcountTableClusters = view.getUint32(56);
  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = u64(view, 64, "snapshot table offset");
  let incompatible = 0;
  let compatible = 0;
  let autoclear = 0;
  let refcountOrder = 4;
  let headerLength = 72;
  let compressionType: CompressionType = "zlib";
  if (version === 3) {
    if (bytes.length < 104) throw new Qcow2FormatError("truncated qcow2 version 3 header");
    if (view.getUint32(72) !== 0) {
      throw new Qcow2FormatError("unknown incompatible features (high bits) are set");
    }
    incompatible = view.getUint32(76);
    compatible = view.getUint32(84);
    autoclear = view.getUint32(92);
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < 104 || headerLength > bytes.length || headerLength % 8 !== 0) {
      throw new Qcow2FormatError(`header length ${headerLength} is invalid`);
    }
    if (headerLength > 104) {
      const type = bytes[104]!;
      if (type === 1) compressionType = "zstd";
      else if (type !== 0) throw new Qcow2FormatError(`unknown compression type ${type}`);
    }
    if ((incompatible & INCOMPAT_COMPRESSION) === 0 && compressionType !== "zlib") {
      throw new Qcow2FormatError("compression type is set without its incompatible feature bit");
    }
  }
  if (refcountOrder > 6) {
    throw new Qcow2FormatError(`refcount_order ${refcountOrder} is out of range`);
  }

  // Header extensions.
  const featureNames: FeatureName[] = [];
  const unknownExtensions: { type: number; data: Uint8Array }[] = [];
  let backingFormat: string | undefined;
  let bitmaps: BitmapsExtension | undefined;
  let dataFile: string | undefined;
  let encryptionExtension = false;
  let at = headerLength;
  const limit = Math.min(bytes.length, clusterSize);
  const decoder = new TextDecoder("utf-8", { fatal: false });
  for (let count = 0;; count++) {
    if (at + 8 > limit) throw new Qcow2FormatError("header extensions run past the first cluster");
    if (count > 1024) throw new Qcow2FormatError("too many header extensions");
    const type = view.getUint32(at);
    const length = view.getUint32(at + 4);
    if (type === EXT_END) {
      at += 8;
      break;
    }
    const dataAt = at + 8;
    if (length > limit - dataAt) {
      throw new Qcow2FormatError("a header extension runs past the first cluster");
    }
    const data = bytes.subarray(dataAt, dataAt + length);
    switch (type) {
      case EXT_BACKING_FORMAT:
        backingFormat = decoder.decode(data);
        break;
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= data.length; i += 48) {
          const nameBytes = data.subarray(i + 2, i + 48);
          const end = nameBytes.indexOf(0);
          featureNames.push({
            type: data[i]!,
            bit: data[i + 1]!,
            name: decoder.decode(end < 0 ? nameBytes : nameBytes.subarray(0, end)),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (length < 24) throw new Qcow2FormatError("the bitmaps extension is too short");
        const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
        bitmaps = {
          count: v.getUint32(0),
          directorySize: u64(v, 8, "bitmap directory size"),
          directoryOffset: u64(v, 16, "bitmap directory offset"),
        };
        break;
      }
      case EXT_DATA_FILE:
        dataFile = decoder.decode(data);
        break;
      case EXT_ENCRYPTION:
        encryptionExtension = true;
        break;
      default:
        unknownExtensions.push({ type, data: data.slice() });
    }
    at = dataAt + Math.ceil(length / 8) * 8;
  }

  const unknown = incompatible & ~INCOMPAT_KNOWN;
  if (unknown !== 0) {
    const names: string[] = [];
    for (let bit = 0; bit < 32; bit++) {
      if (!(unknown & (1 << bit))) continue;
      const named = featureNames.find((f) => f.type === 0 && f.bit === bit);
      names.push(named ? `"${named.name}"` : `bit ${bit}`);
    }
    throw new Qcow2FormatError(`unsupported incompatible qcow2 features: ${names.join(", ")}`);
  }
  if ((incompatible & INCOMPAT_DATA_FILE) && dataFile === undefined) {
    throw new Qcow2FormatError("the image uses an external data file but does not name it");
  }

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > 1023 || backingFileSize === 0) {
      throw new Qcow2FormatError("the backing file name has an invalid length");
    }
    if (backingFileOffset + backingFileSize > limit) {
      throw new Qcow2FormatError("the backing file name lies outside the first cluster");
    }
    backingFile = decoder.decode(
      bytes.subarray(backingFileOffset, backingFileOffset + backingFileSize),
    );
    at = Math.max(at, backingFileOffset + backingFileSize);
  }

  // Metadata positions.
  const checkRange = (offset: number, length: number, what: string) => {
    if (offset % clusterSize !== 0) throw new Qcow2FormatError(`${what} is not cluster-aligned`);
    if (offset === 0) throw new Qcow2FormatError(`${what} overlaps the header`);
    if (offset + length > fileSize) {
      throw new Qcow2FormatError(`${what} lies past the end of the file`);
    }
  };
  const l2Entries = clusterSize / ((incompatible & INCOMPAT_EXTL2) ? 16 : 8);
  const needL1 = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < needL1) throw new Qcow2FormatError("the L1 table is too small for the virtual size");
  if (l1Size > MAX_L1_ENTRIES) throw new Qcow2FormatError("the L1 table is too large");
  if (l1Size > 0) checkRange(l1TableOffset, l1Size * 8, "the L1 table");
  if (refcountTableClusters === 0) throw new Qcow2FormatError("the image has no refcount table");
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw new Qcow2FormatError("the refcount table is too large");
  }
  checkRange(refcountTableOffset, refcountTableClusters * clusterSize, "the refcount table");
  if (
    l1Size > 0 && l1TableOffset < refcountTableOffset + refcountTableClusters * clusterSize &&
    refcountTableOffset < l1TableOffset + l1Size * 8
  ) {
    throw new Qcow2FormatError("the L1 table overlaps the refcount table");
  }

  return {
    version,
    backingFileOffset,
    backingFileSize,
    backingFile,
    backingFormat,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    featureNames,
    bitmaps,
    dataFile,
    encryptionExtension,
    extensionsEnd: at,
    unknownExtensions,
  };
}

/** A description of the known bits set in `incompatible`, for messages. */
export function describeIncompatible(incompatible: number): string[] {
  return INCOMPAT_NAMES.filter((_, bit) => incompatible & (1 << bit));
}

/** Options of a header written by `encodeHeader`. */
export interface HeaderFields {
  /** 2 or 3. */
  version: number;
  /** log2 cluster size. */
  clusterBits: number;
  /** Virtual size. */
  size: number;
  /** L1 entries. */
  l1Size: number;
  /** L1 offset. */
  l1TableOffset: number;
  /** Refcount table offset. */
  refcountTableOffset: number;
  /** Refcount table clusters. */
  refcountTableClusters: number;
  /** Incompatible bits. */
  incompatible: number;
  /** Compatible bits. */
  compatible: number;
  /** Autoclear bits. */
  autoclear: number;
  /** log2 refcount width. */
  refcountOrder: number;
  /** Compression type. */
  compressionType: CompressionType;
  /** Backing file name. */
  backingFile?: string;
  /** Backing format. */
  backingFormat?: string;
  /** Snapshots (kept from the original). */
  nbSnapshots?: number;
  /** Snapshot table offset (kept from the original). */
  snapshotsOffset?: number;
  /** Extensions to keep verbatim. */
  extraExtensions?: { type: number; data: Uint8Array }[];
}

/** Encodes a header with its extensions into one cluster; fails if it does not fit. */
export function encodeHeader(fields: HeaderFields): Uint8Array {
  const clusterSize = 2 ** fields.clusterBits;
  const out = new Uint8Array(clusterSize);
  const view = new DataView(out.buffer);
  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, fields.version);
  view.setUint32(20, fields.clusterBits);
  putU64(view, 24, fields.size);
  view.setUint32(36, fields.l1Size);
  putU64(view, 40, fields.l1TableOffset);
  putU64(view, 48, fields.refcountTableOffset);
  view.setUint32(56, fields.refcountTableClusters);
  view.setUint32(60, fields.nbSnapshots ?? 0);
  putU64(view, 64, fields.snapshotsOffset ?? 0);
  let at = 72;
  if (fields.version === 3) {
    view.setUint32(76, fields.incompatible);
    view.setUint32(84, fields.compatible);
    view.setUint32(92, fields.autoclear);
    view.setUint32(96, fields.refcountOrder);
    view.setUint32(100, 112);
    out[104] = fields.compressionType === "zstd" ? 1 : 0;
    at = 112;
  }
  const encoder = new TextEncoder();
  const ext = (type: number, data: Uint8Array) => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (at + 8 + padded + 8 > clusterSize) {
      throw new Qcow2FormatError("the header extensions do not fit in one cluster");
    }
    view.setUint32(at, type);
    view.setUint32(at + 4, data.length);
    out.set(data, at + 8);
    at += 8 + padded;
  };
  if (fields.backingFormat !== undefined) {
    ext(EXT_BACKING_FORMAT, encoder.encode(fields.backingFormat));
  }
  if (fields.version === 3) {
    const names: [number, number, string][] = [
      [0, 0, "dirty bit"],
      [0, 1, "corrupt bit"],
      [0, 2, "external data file"],
      [0, 3, "compression type"],
      [0, 4, "extended L2 entries"],
      [1, 0, "lazy refcounts"],
      [2, 0, "bitmaps"],
      [2, 1, "raw external data"],
    ];
    const table = new Uint8Array(48 * names.length);
    names.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(encoder.encode(name), i * 48 + 2);
    });
    ext(EXT_FEATURE_NAMES, table);
  }
  for (const e of fields.extraExtensions ?? []) ext(e.type, e.data);
  at += 8; // end marker (zeroes)
  if (fields.backingFile !== undefined) {
    const name = encoder.encode(fields.backingFile);
    if (name.length > 1023 || at + name.length > clusterSize) {
      throw new Qcow2FormatError("the backing file name is too long");
    }
    out.set(name, at);
    putU64(view, 8, at);
    view.setUint32(16, name.length);
    at += name.length;
  }
  return out;
}
