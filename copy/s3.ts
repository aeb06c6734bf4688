/**
 * An S3 object as a copy endpoint: `s3://BUCKET/KEY`. The endpoint comes
 * from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (else AWS), the region from
 * AWS_REGION or AWS_DEFAULT_REGION, credentials as for the s3 plugin.
 *
 * As a source, the object is read with ranged GETs, several at once. As a
 * destination it is written by one multipart upload: the copy's writes
 * fill part buffers, and each part is uploaded (several at once) as soon
 * as all its bytes are there, signed with its SHA-256 so that the service
 * checks every part's integrity. The object appears only when the upload
 * is completed at the end of a successful copy; a failed copy aborts the
 * upload, so nothing that looks complete is left behind.
 *
 * When NBD_S3_SINGLE_PUT_MAX allows it, an object up to that many bytes, to
 * a plain `http://` endpoint, is written instead by one PUT whose body is
 * streamed as the copy goes, in offset order (docs/performance.md: fewer
 * requests, no hashing, but no checksum of the body and no retry). A
 * failed copy drops its connection before the body is complete, so the
 * service stores nothing.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { UsageError } from "../util/usage_error.ts";
import { findCredentials, S3Client, S3Error, type S3Upload, sha256Hex } from "../io/s3.ts";
import { Turns } from "./turns.ts";
import { BaseEndpoint } from "./endpoint.ts";

/** Whether a copy argument names an S3 object. */
export function isS3Uri(text: string): boolean {
  return /^s3:\/\//i.test(text);
}

/** Splits `s3://BUCKET/KEY`. */
export function parseS3Uri(text: string): { bucket: string; key: string } {
  const match = /^s3:\/\/([^/]+)\/(.+)$/i.exec(text);
  if (!match) throw new UsageError(`expected s3://BUCKET/KEY, got "${text}"`);
  return { bucket: match[1]!, key: match[2]! };
}

/** A client configured from the environment, as the AWS tools configure theirs. */
export async function s3ClientFromEnvironment(connections?: number): Promise<S3Client> {
  const env = (name: string) => Deno.env.get(name) || undefined;
  return new S3Client({
    endpoint: env("AWS_ENDPOINT_URL_S3") ?? env("AWS_ENDPOINT_URL"),
    region: env("AWS_REGION") ?? env("AWS_DEFAULT_REGION") ?? "us-east-1",
    credentials: await findCredentials(),
    connections: Math.max(4, connections ?? 16),
  });
}

function plain(text: string, error: unknown): Error {
  const message = (error as Error).message;
  if (error instanceof S3Error || message.startsWith(text)) {
    return new Error(message, { cause: error });
  }
  return new Error(`${text}: ${message}`, { cause: error });
}

/** Bytes a copy keeps in flight to or from an object (four 8 MiB requests). */
export const S3_BYTES_IN_FLIGHT = 32 << 20;

/** An object read with ranged GETs. */
export class S3Source extends BaseEndpoint {
  readonly name: string;
  readonly kind = "s3";
  readonly size: number;
  readonly blockSize: BlockSize = { minimum: 1, preferred: 8 << 20, maximum: 32 << 20 };
  /**
   * A few ranges at once already keep the service busy; more only wait for
   * it, holding their buffers (docs/performance.md).
   */
  override readonly maxBytesInFlight = S3_BYTES_IN_FLIGHT;
  readonly #s3: S3Client;
  readonly #bucket: string;
  readonly #key: string;

  private constructor(name: string, s3: S3Client, bucket: string, key: string, size: number) {
    super();
    this.name = name;
    this.#s3 = s3;
    this.#bucket = bucket;
    this.#key = key;
    this.size = size;
  }

  /** Finds the object's size. */
  static async open(text: string, connections?: number): Promise<S3Source> {
    const { bucket, key } = parseS3Uri(text);
    const s3 = await s3ClientFromEnvironment(connections);
    let size: number | undefined;
    try {
      size = await s3.headObject(bucket, key);
      if (size === undefined) {
        await s3.checkBucket(bucket);
        throw new Error(`${text} does not exist`);
      }
    } catch (error) {
      throw plain(text, error);
    }
    return new S3Source(text, s3, bucket, key, size);
  }

  /** One ranged GET. */
  override async read(buf: Uint8Array, offset: number): Promise<number> {
    const n = await this.#s3.readObject(this.#bucket, this.#key, buf, offset).catch((error) => {
      throw plain(this.name, error);
    });
    if (n < buf.length) throw new Error(`${this.name} changed while it was read`);
    return n;
  }

  /** Closes the client's idle connections. */
  override close(): Promise<void> {
    this.#s3.close();
    return Promise.resolve();
  }
}

/**
 * By default no object is stored by one streamed PUT: every upload is
 * multipart, each part's SHA-256 signed and checked by the service, and a
 * failed part is sent again. A single PUT cannot be retried and its body
 * is not covered by a checksum, so it is only used when asked for.
 */
export const SINGLE_PUT_MAX = 0;

/**
 * The largest object stored by one streamed PUT: the bytes
 * NBD_S3_SINGLE_PUT_MAX gives (at most 5 GiB), else `SINGLE_PUT_MAX`.
 */
export function singlePutMax(): number {
  const text = Deno.env.get("NBD_S3_SINGLE_PUT_MAX");
  if (text === undefined || text === "") return SINGLE_PUT_MAX;
  if (!/^\d+$/.test(text)) {
    throw new UsageError(`NBD_S3_SINGLE_PUT_MAX: expected a size in bytes, got "${text}"`);
  }
  return Math.min(Number(text), 5 * 2 ** 30);
}

/** Zeroes sent for the ranges the copy zeroes. */
const ZEROES = new Uint8Array(1 << 20);

/** An object written by one PUT, its body streamed in offset order. */
export class S3PutDestination extends BaseEndpoint {
  readonly name: string;
  readonly kind = "s3";
  readonly size: number;
  /** The body goes out in order: writes wait for their turn, zero runs are sent as zeroes. */
  override readonly sequential = true;
  readonly blockSize: BlockSize = { minimum: 1, preferred: 8 << 20, maximum: 32 << 20 };
  /** Writes waiting for their turn hold their buffers: this bounds them. */
  override readonly maxBytesInFlight = S3_BYTES_IN_FLIGHT;
  readonly #s3: S3Client;
  readonly #upload: S3Upload;
  readonly #turns = new Turns();
  #failure: Error | undefined;

  /** Sends to `upload`, which stores `size` bytes of the object `name`. */
  constructor(name: string, s3: S3Client, size: number, upload: S3Upload) {
    super();
    this.name = name;
    this.#s3 = s3;
    this.size = size;
    this.#upload = upload;
  }

  async #send(offset: number, length: number, buf?: Uint8Array): Promise<void> {
    await this.#turns.wait(offset);
    if (this.#failure) throw this.#failure;
    try {
      if (buf) await this.#upload.write(buf);
      for (let done = 0; !buf && done < length;) {
        const n = Math.min(ZEROES.length, length - done);
        await this.#upload.write(ZEROES.subarray(0, n));
        done += n;
      }
    } catch (error) {
      this.#failure ??= plain(this.name, error);
      this.#turns.abort(this.#failure);
      throw this.#failure;
    }
    this.#turns.advance(offset + length);
  }

  /** Sends `buf` once everything before `offset` was sent. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.#send(offset, buf.length, buf);
  }

  /** Sends zeroes once everything before `offset` was sent. */
  override async zero(offset: number, length: number): Promise<void> {
    await this.#send(offset, length);
  }

  /** Drops the upload at once (the service keeps nothing), and wakes waiting writes. */
  override abort(reason: Error): void {
    this.#failure ??= reason;
    this.#turns.abort(reason);
    this.#upload.abort(reason);
  }

  /** Waits for the service's answer after a successful copy, else drops the upload. */
  override async close(complete: boolean): Promise<void> {
    try {
      if (!complete || this.#failure || this.#turns.position !== this.size) {
        this.#upload.abort(this.#failure ?? new Error("the copy failed"));
        if (complete) throw this.#failure ?? new Error(`${this.name}: the body is incomplete`);
        return;
      }
      await this.#upload.finish().catch((error) => {
        throw plain(this.name, error);
      });
    } finally {
      this.#s3.close();
    }
  }

  /** A failed copy cut the PUT short: the service stored nothing. */
  override incompleteNote(): string {
    return `the upload to ${this.name} was cut short; no object was written`;
  }
}

/** The smallest part S3 accepts (except the last). */
const MIN_PART = 5 << 20;
/** Part buffers kept for reuse once uploaded. */
const MAX_SPARE_PARTS = 8;
/** S3 allows at most this many parts. */
const MAX_PARTS = 10_000;

interface Part {
  /** Its bytes; absent while nothing but zeroes was accounted (no buffer is needed then). */
  bytes?: Uint8Array;
  /** Its length. */
  length: number;
  filled: number;
}

/** An object written by one multipart upload. */
export class S3Destination extends BaseEndpoint {
  readonly name: string;
  readonly kind = "s3";
  readonly size: number;
  readonly blockSize: BlockSize;
  /** As for the source: a few parts at once keep the service busy. */
  override readonly maxBytesInFlight = S3_BYTES_IN_FLIGHT;
  readonly #s3: S3Client;
  readonly #bucket: string;
  readonly #key: string;
  readonly #partSize: number;
  readonly #uploadId: string;
  readonly #parts = new Map<number, Part>();
  readonly #etags: string[] = [];
  readonly #uploading = new Set<Promise<void>>();
  /** Part buffers whose upload finished, for the next parts. */
  readonly #spare: Uint8Array[] = [];
  #failure: Error | undefined;
  /** One all-zero part (and its SHA-256), sent for every part nothing was written to. */
  #zeroPart: Promise<{ bytes: Uint8Array; hash: string }> | undefined;
  /** Whether close(false) aborted the upload (undefined until it tried). */
  #aborted: boolean | undefined;

  private constructor(
    name: string,
    s3: S3Client,
    bucket: string,
    key: string,
    size: number,
    partSize: number,
    uploadId: string,
  ) {
    super();
    this.name = name;
    this.#s3 = s3;
    this.#bucket = bucket;
    this.#key = key;
    this.size = size;
    this.#partSize = partSize;
    this.#uploadId = uploadId;
    this.blockSize = { minimum: 1, preferred: Math.min(partSize, 8 << 20), maximum: 32 << 20 };
  }

  /**
   * Opens the destination of an object of `size` bytes: one streamed PUT
   * when the size and endpoint allow it, else a multipart upload.
   */
  static async open(
    text: string,
    size: number,
    connections?: number,
  ): Promise<S3Destination | S3PutDestination> {
    const { bucket, key } = parseS3Uri(text);
    const s3 = await s3ClientFromEnvironment(connections);
    if (size > 0 && size <= singlePutMax() && s3.canStreamPut) {
      try {
        return new S3PutDestination(text, s3, size, await s3.startPut(bucket, key, size));
      } catch (error) {
        s3.close();
        throw plain(text, error);
      }
    }
    const partSize = Math.max(
      MIN_PART * 2,
      Math.ceil(size / MAX_PARTS / (1 << 20)) * (1 << 20),
    );
    try {
      const uploadId = await s3.createMultipartUpload(bucket, key);
      return new S3Destination(text, s3, bucket, key, size, partSize, uploadId);
    } catch (error) {
      throw plain(text, error);
    }
  }

  #partLength(index: number): number {
    return Math.min(this.#partSize, this.size - index * this.#partSize);
  }

  /** Accounts `length` bytes at `offset` (copying them from `buf` if given); uploads full parts. */
  async #fill(offset: number, length: number, buf?: Uint8Array): Promise<void> {
    if (this.#failure) throw this.#failure;
    const full: Promise<void>[] = [];
    for (let done = 0; done < length;) {
      const index = Math.floor((offset + done) / this.#partSize);
      const within = offset + done - index * this.#partSize;
      const n = Math.min(this.#partSize - within, length - done);
      let part = this.#parts.get(index);
      if (!part) {
        part = { length: this.#partLength(index), filled: 0 };
        this.#parts.set(index, part);
      }
      if (buf) {
        part.bytes ??= this.#partBuffer(part.length);
        part.bytes.set(buf.subarray(done, done + n), within);
      }
      part.filled += n;
      if (part.filled >= part.length) full.push(this.#upload(index, part));
      done += n;
    }
    // The write that completes a part waits for its upload: that bounds the memory held.
    await Promise.all(full);
  }

  /** A zeroed buffer for a part: one an upload finished with, else a new one. */
  #partBuffer(length: number): Uint8Array {
    const spare = length === this.#partSize ? this.#spare.pop() : undefined;
    return spare ? spare.fill(0) : new Uint8Array(length);
  }

  /** The bytes of an all-zero part of `length`, and their hash (computed once). */
  async #zeroes(length: number): Promise<{ bytes: Uint8Array; hash?: string }> {
    this.#zeroPart ??= (async () => {
      const bytes = new Uint8Array(this.#partSize);
      return { bytes, hash: await sha256Hex(bytes) };
    })();
    const zero = await this.#zeroPart;
    // Only the last part may be shorter: its hash is computed as usual.
    if (length === zero.bytes.length) return zero;
    return { bytes: zero.bytes.subarray(0, length) };
  }

  #upload(index: number, part: Part): Promise<void> {
    this.#parts.delete(index);
    const upload = (async () => {
      // A sparse source's zero runs never allocate or hash a part of their own.
      const body: { bytes: Uint8Array; hash?: string } = part.bytes
        ? { bytes: part.bytes }
        : await this.#zeroes(part.length);
      return await this.#s3.uploadPart(
        this.#bucket,
        this.#key,
        this.#uploadId,
        index + 1,
        body.bytes,
        body.hash,
      );
    })().then((etag) => {
      this.#etags[index] = etag;
      // Filling a buffer already mapped costs less than the page faults of a new one.
      if (part.bytes?.length === this.#partSize && this.#spare.length < MAX_SPARE_PARTS) {
        this.#spare.push(part.bytes);
      }
    }, (error) => {
      this.#failure ??= plain(this.name, error);
      throw this.#failure;
    });
    this.#uploading.add(upload);
    upload.finally(() => this.#uploading.delete(upload)).catch(() => {});
    return upload;
  }

  /** Copies the bytes into their part. */
  override async write(buf: Uint8Array, offset: number): Promise<void> {
    await this.#fill(offset, buf.length, buf);
  }

  /** Zeroes are already there in a new part buffer: only counted. */
  override async zero(offset: number, length: number): Promise<void> {
    await this.#fill(offset, length);
  }

  /** Completes the upload after a successful copy, else aborts it; then closes the client. */
  override async close(complete: boolean): Promise<void> {
    try {
      if (!complete || this.#failure) throw this.#failure ?? new Error("the copy failed");
      if (this.size === 0) {
        await this.#s3.abortMultipartUpload(this.#bucket, this.#key, this.#uploadId);
        return await this.#s3.putObject(this.#bucket, this.#key, new Uint8Array(0));
      }
      // Parts not wholly written (only if the copy skipped zero runs) go as they are,
      // and parts never touched at all as zeroes.
      for (const [index, part] of [...this.#parts]) this.#upload(index, part).catch(() => {});
      while (this.#uploading.size > 0) await Promise.all([...this.#uploading]);
      const count = Math.ceil(this.size / this.#partSize);
      for (let index = 0; index < count; index++) {
        if (this.#etags[index] !== undefined) continue;
        this.#upload(index, { length: this.#partLength(index), filled: 0 }).catch(() => {});
      }
      while (this.#uploading.size > 0) await Promise.all([...this.#uploading]);
      await this.#s3.completeMultipartUpload(
        this.#bucket,
        this.#key,
        this.#uploadId,
        Array.from({ length: count }, (_, i) => this.#etags[i] ?? ""),
      );
    } catch (error) {
      await Promise.allSettled([...this.#uploading]);
      try {
        await this.#s3.abortMultipartUpload(this.#bucket, this.#key, this.#uploadId);
        this.#aborted = true;
      } catch {
        this.#aborted = false;
      }
      if (complete) throw plain(this.name, error);
    } finally {
      this.#s3.close();
    }
  }

  /** A failed copy leaves no object; the upload's parts are removed when the service answers. */
  override incompleteNote(): string {
    if (this.#aborted === false) {
      return `no object was written to ${this.name}, but its multipart upload could not be ` +
        `aborted (upload id ${this.#uploadId}): the service keeps its parts until it is`;
    }
    return `the upload to ${this.name} was aborted; no object was written`;
  }
}
