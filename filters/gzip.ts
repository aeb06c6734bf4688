/**
 * The `gzip` filter: serves the uncompressed contents of a gzip file read
 * from the layer below, read-only. gzip cannot be read at random, so the
 * whole stream is decompressed once (with node:zlib, which handles
 * concatenated members), when the first client connects, into
 * a temporary file in `$TMPDIR` (deleted at once; memory use stays small
 * whatever the size). Concatenated gzip members are decoded in turn.
 *
 * ```
 * nbd serve --filter=gzip split file=disk.img.gz
 * ```
 *
 * Parameters: none.
 *
 * @module
 */

import { once } from "node:events";
import { open as openFile } from "node:fs/promises";
import zlib from "node:zlib";
import type { FileHandle } from "node:fs/promises";
import { NbdError } from "../protocol/errors.ts";
import type { Backend, Capabilities, Filter } from "../core/backend.ts";
import { PassthroughBackend } from "../core/backend.ts";

const CHUNK = 1 << 20;

/** The decompressed image, in a deleted temporary file. */
class GunzippedImage {
  readonly file: FileHandle;
  readonly size: number;
  constructor(file: FileHandle, size: number) {
    this.file = file;
    this.size = size;
  }
}

/** Decompresses the whole gzip stream of `below` into a temporary file. */
async function gunzip(below: Backend): Promise<GunzippedImage> {
  const path = await Deno.makeTempFile({ prefix: "nbd-gzip-" });
  const file = await openFile(path, "r+");
  await Deno.remove(path);
  // node:zlib decodes concatenated gzip members; DecompressionStream stops after the first.
  const inflater = zlib.createGunzip();
  const producer = (async () => {
    const size = below.size();
    for (let offset = 0; offset < size;) {
      const chunk = new Uint8Array(Math.min(CHUNK, size - offset));
      await below.pread(chunk, offset);
      offset += chunk.length;
      if (!inflater.write(chunk)) await once(inflater, "drain");
    }
    inflater.end();
  })().catch((error) => inflater.destroy(error));
  let size = 0;
  try {
    for await (const chunk of inflater as AsyncIterable<Uint8Array>) {
      let done = 0;
      while (done < chunk.length) {
        const { bytesWritten } = await file.write(chunk, done, chunk.length - done, size + done);
        done += bytesWritten;
      }
      size += chunk.length;
    }
    await producer;
  } catch (error) {
    await file.close();
    throw new NbdError("EINVAL", `cannot decompress the gzip stream: ${(error as Error).message}`);
  }
  return new GunzippedImage(file, size);
}

class GzipBackend extends PassthroughBackend {
  readonly #image: GunzippedImage;
  constructor(next: Backend, image: GunzippedImage) {
    super(next);
    this.#image = image;
  }
  override size(): number {
    return this.#image.size;
  }
  override capabilities(): Capabilities {
    return {
      ...this.next.capabilities(),
      writable: false,
      trim: false,
      zero: false,
      fastZero: false,
      fua: "none",
      extents: false,
      cache: "none",
    };
  }
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.#image.file.read(
        buf,
        done,
        buf.length - done,
        offset + done,
      );
      if (bytesRead === 0) throw new NbdError("EIO", "the decompressed file ended early");
      done += bytesRead;
    }
  }
  override pwrite(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the gzip filter is read-only"));
  }
  override trim(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the gzip filter is read-only"));
  }
  override zero(): Promise<void> {
    return Promise.reject(new NbdError("EPERM", "the gzip filter is read-only"));
  }
  override extents(_offset: number, length: number) {
    return Promise.resolve([{ length, flags: 0 }]);
  }
  override cache(): Promise<void> {
    return Promise.resolve();
  }
}

/** The gzip filter. */
export const gzipFilter: Filter = {
  name: "gzip",
  summary: "serve the uncompressed contents of a gzip file (decoded once to a temp file)",
  description: "Example:\n  nbd serve --filter=gzip split file=disk.img.gz",
  params: [],
  create() {
    let image: Promise<GunzippedImage> | undefined;
    return Promise.resolve({
      async wrap(next) {
        image ??= gunzip(next).catch((error) => {
          image = undefined;
          throw error;
        });
        return new GzipBackend(next, await image);
      },
      async close() {
        if (image) await (await image.catch(() => undefined))?.file.close();
      },
    });
  },
};
