/**
 * Compressed qcow2 clusters: zlib (raw deflate) and zstd, both through the
 * runtime's node:zlib. A compressed cluster's stored bytes run to a sector
 * boundary, so whatever follows the compressed stream is ignored.
 *
 * node:zlib is loaded by `loadCompression`, not when this module is: the
 * first `node:` module starts the runtime's Node compatibility layer, which
 * a copy of plain clusters never needs (docs/performance.md).
 *
 * @module
 */

import type * as Zlib from "node:zlib";
import type { CompressionType } from "./header.ts";
import { Qcow2FormatError } from "./header.ts";

const ZSTD_MAGIC = 0xfd2fb528;

let zlibModule: typeof Zlib | undefined;
let loading: Promise<typeof Zlib> | undefined;

/**
 * Loads node:zlib; `decompressCluster`, `compressCluster` and
 * `hasZstdCompression` need it loaded first. Cheap once done.
 */
export async function loadCompression(): Promise<void> {
  if (zlibModule) return;
  loading ??= import("node:zlib");
  zlibModule = await loading;
}

/** Whether node:zlib was loaded (`loadCompression` need not be awaited again). */
export function compressionLoaded(): boolean {
  return zlibModule !== undefined;
}

function zlib(): typeof Zlib {
  if (!zlibModule) throw new Error("node:zlib is not loaded (loadCompression)");
  return zlibModule;
}

/** Whether the runtime's node:zlib compresses zstd (after `loadCompression`). */
export function hasZstdCompression(): boolean {
  return "zstdCompressSync" in zlib();
}

/**
 * The length of the zstd frame at the start of `data` (walking its block
 * headers), or -1 when it is not a complete frame.
 */
export function zstdFrameLength(data: Uint8Array): number {
  if (data.length < 6) return -1;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const magic = view.getUint32(0, true);
  if ((magic & 0xfffffff0) === 0x184d2a50) {
    // A skippable frame.
    const n = 8 + view.getUint32(4, true);
    return n <= data.length ? n : -1;
  }
  if (magic !== ZSTD_MAGIC) return -1;
  const descriptor = data[4]!;
  const fcsFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const checksum = (descriptor >> 2) & 1;
  const dictFlag = descriptor & 3;
  let at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictFlag]! +
    [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (at + 3 > data.length) return -1;
    const header = data[at]! | (data[at + 1]! << 8) | (data[at + 2]! << 16);
    at += 3;
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === 3) return -1;
    at += type === 1 ? 1 : size;
    if (last) break;
  }
  at += checksum ? 4 : 0;
  return at <= data.length ? at : -1;
}

/** The native raw-deflate state behind a node:zlib stream, driven directly. */
interface RawInflater {
  handle: {
    writeSync(
      flush: number,
      input: Uint8Array,
      inOffset: number,
      inLength: number,
      output: Uint8Array,
      outOffset: number,
      outLength: number,
    ): void;
    reset(): void;
    onerror: (message: string, errno: number) => void;
  };
  /** After a write: the output bytes left unused, the input bytes left unread. */
  state: Uint32Array;
  error: string | undefined;
}

let rawInflater: RawInflater | null | undefined;

/**
 * One inflate state, reused and writing straight into the caller's buffer:
 * `inflateRawSync` builds a stream and two output buffers for every call,
 * which cost ten times the inflating itself. null when the runtime's
 * node:zlib does not have this shape (then `inflateRawSync` is used).
 */
function inflater(): RawInflater | null {
  if (rawInflater !== undefined) return rawInflater;
  rawInflater = null;
  try {
    const stream = zlib().createInflateRaw() as unknown as {
      _handle?: RawInflater["handle"];
      _writeState?: unknown;
    };
    const handle = stream._handle;
    const state = stream._writeState;
    if (
      handle && typeof handle.writeSync === "function" && typeof handle.reset === "function" &&
      state instanceof Uint32Array && state.length >= 2
    ) {
      const made: RawInflater = { handle, state, error: undefined };
      // Errors arrive through this callback (not as exceptions), and no longer reach the stream.
      handle.onerror = (message) => made.error = message;
      rawInflater = made;
    }
  } catch {
    // The fallback below.
  }
  return rawInflater;
}

/** Inflates raw deflate `data` into `out`: the bytes produced. */
function inflateRawInto(data: Uint8Array, out: Uint8Array): number {
  const z = zlib();
  const raw = inflater();
  if (!raw) {
    const result = z.inflateRawSync(data, {
      finishFlush: z.constants.Z_SYNC_FLUSH,
      chunkSize: out.length,
      maxOutputLength: out.length,
    });
    out.set(result);
    return result.length;
  }
  raw.error = undefined;
  raw.handle.reset();
  raw.handle.writeSync(z.constants.Z_SYNC_FLUSH, data, 0, data.length, out, 0, out.length);
  if (raw.error !== undefined) throw new Error(raw.error);
  return out.length - raw.state[0]!;
}

/**
 * Inflates one compressed cluster into `out` (exactly one cluster). Throws
 * a Qcow2FormatError when the data does not inflate to a whole cluster.
 */
export function decompressCluster(
  type: CompressionType,
  data: Uint8Array,
  out: Uint8Array,
): void {
  let produced = 0;
  try {
    if (type === "zlib") {
      produced = inflateRawInto(data, out);
    } else {
      let at = 0;
      while (produced < out.length && at < data.length) {
        const n = zstdFrameLength(data.subarray(at));
        if (n < 0) break;
        const result = zlib().zstdDecompressSync(data.subarray(at, at + n), {
          chunkSize: out.length - produced,
          maxOutputLength: out.length - produced,
        });
        out.set(result, produced);
        produced += result.length;
        at += n;
      }
    }
  } catch (error) {
    throw new Qcow2FormatError(
      `a compressed cluster does not inflate: ${(error as Error).message}`,
    );
  }
  if (produced !== out.length) {
    throw new Qcow2FormatError(
      `a compressed cluster inflates to ${produced} bytes instead of ${out.length}`,
    );
  }
}

/** Compresses one cluster; undefined when compression would not save space. */
export function compressCluster(type: CompressionType, data: Uint8Array): Uint8Array | undefined {
  const result = type === "zlib"
    ? zlib().deflateRawSync(data, { level: 6, windowBits: 12 })
    : zlib().zstdCompressSync(data);
  const bytes = new Uint8Array(result.buffer, result.byteOffset, result.byteLength);
  return bytes.length < data.length - 512 ? bytes : undefined;
}
