/**
 * Random reads of a disk for the analyses in this folder (partition
 * tables, filesystems), with a small cache of aligned chunks so walking
 * metadata a few bytes at a time does not cost a round trip per read.
 *
 * @module
 */

/** What an analysis reads from: any byte range of a disk of `size` bytes. */
export interface DiskReader {
  /** Size of the disk in bytes. */
  readonly size: number;
  /** The bytes at [offset, offset + length); a range past the end is an error. */
  read(offset: number, length: number): Promise<Uint8Array>;
}

const CHUNK = 64 * 1024;
const CHUNKS_KEPT = 512; // 32 MiB at most

/** Wraps a `pread`-style function in a DiskReader with a chunk cache. */
export class CachedReader implements DiskReader {
  readonly size: number;
  readonly #pread: (buf: Uint8Array, offset: number) => Promise<void>;
  readonly #chunks = new Map<number, Uint8Array>();

  constructor(size: number, pread: (buf: Uint8Array, offset: number) => Promise<void>) {
    this.size = size;
    this.#pread = pread;
  }

  async #chunk(index: number): Promise<Uint8Array> {
    const cached = this.#chunks.get(index);
    if (cached) {
      this.#chunks.delete(index); // most recently used goes last
      this.#chunks.set(index, cached);
      return cached;
    }
    const start = index * CHUNK;
    const buf = new Uint8Array(Math.min(CHUNK, this.size - start));
    await this.#pread(buf, start);
    this.#chunks.set(index, buf);
    if (this.#chunks.size > CHUNKS_KEPT) {
      this.#chunks.delete(this.#chunks.keys().next().value!);
    }
    return buf;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`read of ${length} bytes at ${offset} is past the end (${this.size})`);
    }
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const at = offset + done;
      const chunk = await this.#chunk(Math.floor(at / CHUNK));
      const within = at % CHUNK;
      const n = Math.min(chunk.length - within, length - done);
      out.set(chunk.subarray(within, within + n), done);
      done += n;
    }
    return out;
  }
}

/** A reader of the part of `reader` from `start`, `size` bytes long (a partition). */
export function sliceReader(reader: DiskReader, start: number, size: number): DiskReader {
  return {
    size,
    read(offset, length) {
      if (offset < 0 || offset + length > size) {
        return Promise.reject(
          new RangeError(`read of ${length} bytes at ${offset} is past the end`),
        );
      }
      return reader.read(start + offset, length);
    },
  };
}
