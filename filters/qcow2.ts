/**
 * The `qcow2` filter (alias `qcow2dec`): serves the guest view of a qcow2
 * image read from the layer below, read-write unless the server is
 * read-only. All connections share one image state (mapping caches,
 * allocation, refcounts), so several connections may write at once; each
 * request does its I/O through its own connection's layer below. Multi-conn
 * is not offered, so that clients keep to one connection. Over the file
 * plugin, READs of plain data clusters are offered to the server as ranges
 * of the image file (`fileRange`), which it sends with sendfile.
 *
 * ```
 * nbd serve --filter=qcow2 file disk.qcow2
 * nbd serve -r --filter=qcow2 http https://host/disk.qcow2
 * nbd serve --filter=qcow2 file overlay.qcow2 qcow2-follow-backing=true
 * ```
 *
 * Parameters:
 * - `qcow2-backing=PATH`: the backing file to use (raw or qcow2).
 * - `qcow2-follow-backing=BOOL`: follow the backing names recorded in the
 *   images, resolved next to each image and never outside its directory.
 *
 * @module
 */

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Capabilities,
  type Extent,
  type ExtentsFlags,
  type FileRange,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { Qcow2FormatError } from "../formats/qcow2/header.ts";
import {
  type ImageStore,
  type Layer,
  Qcow2Image,
  Qcow2IoError,
  readHeader,
} from "../formats/qcow2/image.ts";
import { backingRefusal, openLayer, openRecordedBacking } from "../formats/qcow2/chain.ts";

/** The metadata context telling which layer of the chain holds each range (as qemu-nbd's). */
const ALLOCATION_DEPTH = "qemu:allocation-depth";

/** A store over a backend, with writes only where the backend takes them. */
function storeOf(next: Backend): ImageStore {
  const caps = next.capabilities();
  return {
    size: () => next.size(),
    pread: (buf, offset) => next.pread(buf, offset),
    pwrite: caps.writable ? (buf, offset, flags) => next.pwrite(buf, offset, flags) : undefined,
    flush: caps.flush ? () => next.flush() : undefined,
    trim: caps.trim ? (offset, length, flags) => next.trim(offset, length, flags) : undefined,
  };
}

/** Runs an image operation, turning format problems into EIO with their message. */
async function guarded<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof Qcow2IoError || error instanceof Qcow2FormatError) {
      throw new NbdError("EIO", `qcow2: ${error.message}`);
    }
    throw error;
  }
}

class Qcow2Backend extends PassthroughBackend {
  readonly #image: Qcow2Image;
  readonly #store: ImageStore;
  /**
   * Where a guest range's bytes lie in the layer below's open file: only
   * for plain data clusters mapped byte for byte into the image file (the
   * one the layer below serves: external data files are refused at open),
   * and only where the layer below offers its own ranges (the file plugin).
   */
  fileRange?: (offset: number, length: number) => FileRange | undefined;

  constructor(next: Backend, image: Qcow2Image) {
    super(next);
    this.#image = image;
    this.#store = storeOf(next);
    // Every byte of a read comes from a data cluster, an inflated one, zeroes or the
    // backing file, or the read fails: a reused reply buffer needs no clearing.
    this.preadFills = true;
    if (next.fileRange) {
      // Clusters allocated since the layer below was opened lie past its size: read as usual.
      const below = next.size();
      this.fileRange = (offset, length) => {
        const host = image.hostRange(offset, length);
        return host === undefined || host + length > below
          ? undefined
          : next.fileRange!(host, length);
      };
    }
  }
  override size(): number {
    return this.#image.size;
  }
  override capabilities(): Capabilities {
    const caps = this.next.capabilities();
    const writable = this.#image.writable;
    return {
      ...caps,
      writable,
      flush: writable,
      trim: writable,
      zero: writable,
      fastZero: false,
      fua: writable ? "native" : "none",
      extents: true,
      cache: "emulate",
      // Not offered: the format's work (lookups, inflating, allocation) runs on the
      // server's one thread, so more connections add no parallelism, and a client
      // that opens one per processor (nbdcopy: 4) then takes processor time from
      // the server (docs/performance.md, "qcow2").
      multiConn: false,
    };
  }
  override pread(buf: Uint8Array, offset: number): Promise<void> {
    return guarded(() => this.#image.read(this.#store, buf, offset));
  }
  override pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return guarded(async () => {
      await this.#image.write(this.#store, buf, offset);
      if (flags.fua) await this.#image.flush(this.#store);
    });
  }
  override flush(): Promise<void> {
    return guarded(() => this.#image.flush(this.#store));
  }
  override trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return guarded(async () => {
      await this.#image.discard(this.#store, offset, length);
      if (flags.fua) await this.#image.flush(this.#store);
    });
  }
  override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fast) {
      return Promise.reject(new NbdError("ENOTSUP", "qcow2: zeroing is not always fast"));
    }
    return guarded(async () => {
      await this.#image.zero(this.#store, offset, length, flags.mayTrim);
      if (flags.fua) await this.#image.flush(this.#store);
    });
  }
  override extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return guarded(async () => {
      const runs = await this.#image.status(this.#store, offset, length);
      const out = runs.map((r) => ({
        length: r.length,
        flags: r.data ? 0 : NBD_STATE_HOLE | (r.zero ? NBD_STATE_ZERO : 0),
      }));
      return flags.reqOne ? out.slice(0, 1) : out;
    });
  }
  override extraContexts = (): string[] => [ALLOCATION_DEPTH];
  override contextExtents = (
    name: string,
    offset: number,
    length: number,
    flags: ExtentsFlags,
  ): Promise<Extent[]> => {
    if (name !== ALLOCATION_DEPTH) {
      return Promise.reject(new NbdError("EINVAL", `qcow2: no metadata context ${name}`));
    }
    return guarded(async () => {
      const runs = await this.#image.depth(this.#store, offset, length);
      const out = runs.map((r) => ({ length: r.length, flags: r.depth }));
      return flags.reqOne ? out.slice(0, 1) : out;
    });
  };
  override cache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }
  override async close(): Promise<void> {
    try {
      if (this.#image.dirty) await this.#image.flush(this.#store);
    } finally {
      await this.next.close();
    }
  }
}

/** Options of the qcow2 filter. */
interface Qcow2Options {
  backing?: string;
  follow: boolean;
  imagePath?: string;
}

/** Opens the image and the backing chain the options allow. */
async function openImage(next: Backend, readonly: boolean, options: Qcow2Options): Promise<{
  image: Qcow2Image;
  backing?: Layer;
}> {
  const store = storeOf(next);
  const header = await readHeader(store);
  const policy = { follow: options.follow };
  let backing: Layer | undefined;
  const seen = new Set<string>();
  if (options.imagePath) {
    try {
      seen.add(await Deno.realPath(options.imagePath));
    } catch { /* not a local file after all */ }
  }
  if (options.backing !== undefined) {
    backing = await openLayer(options.backing, header.backingFormat, policy, seen);
  } else if (header.backingFile !== undefined) {
    if (!options.follow) throw new Qcow2FormatError(backingRefusal(header.backingFile));
    if (!options.imagePath) {
      throw new Qcow2FormatError(
        "qcow2-follow-backing needs the image to be a local file (file=PATH); " +
          "name the backing file with qcow2-backing=PATH",
      );
    }
    backing = await openRecordedBacking(
      options.imagePath,
      header.backingFile,
      header.backingFormat,
      policy,
      seen,
    );
  }
  try {
    const image = await Qcow2Image.open(store, {
      writable: !readonly && next.capabilities().writable,
      backing,
      warn: (message) => console.error(`nbd: ${message}`),
    });
    return { image, backing };
  } catch (error) {
    await backing?.close();
    throw error;
  }
}

/** The qcow2 filter. */
export const qcow2Filter: Filter = {
  name: "qcow2",
  summary: "serve the guest view of a qcow2 image (read-write; backing files only when allowed)",
  description: "Versions 2 and 3, compressed (zlib, zstd) and extended-L2 images.\n" +
    "A backing file is used only when named (qcow2-backing=PATH) or when\n" +
    "qcow2-follow-backing=true allows the names recorded in the images\n" +
    "(resolved next to each image, never outside its directory).\n\n" +
    "Examples:\n  nbd serve --filter=qcow2 file disk.qcow2\n" +
    "  nbd serve -r --filter=qcow2 http https://host/disk.qcow2\n" +
    "  nbd serve --filter=qcow2 file top.qcow2 qcow2-follow-backing=true",
  params: [
    {
      name: "qcow2-backing",
      value: "PATH",
      type: "path",
      description: "backing file to use (raw or qcow2), instead of the name in the image",
    },
    {
      name: "qcow2-follow-backing",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "follow backing names recorded in the images (inside their directories only)",
    },
  ],
  create(params) {
    const options: Qcow2Options = {
      backing: params.take("qcow2-backing"),
      follow: params.takeBoolean("qcow2-follow-backing") ?? false,
      imagePath: params.peek("file"),
    };
    if (options.backing === "") throw new UsageError("qcow2-backing: expected a path");
    // One image state per export: a plugin with several exports (file dir=...) has one image each.
    const opened = new Map<string, Promise<{ image: Qcow2Image; backing?: Layer }>>();
    return Promise.resolve({
      async wrap(next, context) {
        const key = context.exportName;
        let state = opened.get(key);
        if (!state) {
          state = openImage(next, context.readonly, options).catch((error) => {
            opened.delete(key); // let the next connection try again
            if (error instanceof Qcow2FormatError || error instanceof Qcow2IoError) {
              throw new NbdError("EINVAL", `qcow2: ${error.message}`);
            }
            throw error;
          });
          opened.set(key, state);
        }
        const { image } = await state;
        return new Qcow2Backend(next, image);
      },
      async close() {
        for (const state of opened.values()) {
          await (await state.catch(() => undefined))?.backing?.close();
        }
      },
    });
  },
};

/** The nbdkit-compatible name of the qcow2 filter. */
export const qcow2decFilter: Filter = { ...qcow2Filter, name: "qcow2dec", aliasOf: "qcow2" };
