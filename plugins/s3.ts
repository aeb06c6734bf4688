/**
 * The `s3` plugin: a disk in S3-compatible object storage, with the
 * parameters of nbdkit's S3 plugin.
 *
 * With `size=`, the disk is stored as fixed-size objects named
 * `KEY/%016x` (the object number in 16 hexadecimal digits, as nbdkit
 * names them). A missing object reads as zeroes; a write of a whole object
 * stores it (or deletes it when it is all zeroes), a write of part of one
 * reads, patches and stores it under a per-object lock; TRIM and zeroing
 * delete the objects they cover (and zeroing patches the edges); block
 * status comes from listing the objects.
 *
 * Without `size=`, the single existing object KEY is served read-only
 * through Range requests.
 *
 * ```
 * nbd serve s3 bucket=images key=disk size=10G endpoint-url=http://127.0.0.1:7480
 * nbd serve s3 bucket=images key=debian.raw
 * ```
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  completeBackend,
  type Extent,
  type OpenContext,
  type Plugin,
  type PluginBackend,
} from "../core/backend.ts";
import type { Params, ParamSpec } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { KeyedLocks } from "../util/locks.ts";
import { findCredentials, S3Client, type S3Credentials, S3Error } from "../io/s3.ts";

/** The name of object `index` of a disk stored under `prefix`. */
export function objectName(prefix: string, index: number): string {
  return `${prefix}/${index.toString(16).padStart(16, "0")}`;
}

function isZero(bytes: Uint8Array): boolean {
  let i = 0;
  if (bytes.byteOffset % 8 === 0) {
    const words = new BigUint64Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 3);
    for (const w of words) if (w !== 0n) return false;
    i = words.length * 8;
  }
  for (; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

function wireError(error: unknown): unknown {
  if (error instanceof S3Error) {
    const errno = error.status === 403 ? "EPERM" : "EIO";
    return new NbdError(errno, error.message);
  }
  return error;
}

async function mapped<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (error) {
    throw wireError(error);
  }
}

/** Block status lists at most this many objects per request. */
const MAX_LISTED_OBJECTS = 1000;

/** A disk stored as objects of `objectSize` under `prefix`; shared by all connections. */
class ObjectDisk {
  readonly #s3: S3Client;
  readonly #bucket: string;
  readonly #prefix: string;
  readonly size: number;
  readonly objectSize: number;
  readonly #locks = new KeyedLocks();

  constructor(s3: S3Client, bucket: string, prefix: string, size: number, objectSize: number) {
    this.#s3 = s3;
    this.#bucket = bucket;
    this.#prefix = prefix;
    this.size = size;
    this.objectSize = objectSize;
  }

  /** Calls `fn` for each object piece of [offset, offset+length), all at once. */
  async #pieces(
    offset: number,
    length: number,
    fn: (index: number, within: number, n: number, done: number) => Promise<void>,
  ): Promise<void> {
    const work: Promise<void>[] = [];
    for (let done = 0; done < length;) {
      const position = offset + done;
      const index = Math.floor(position / this.objectSize);
      const within = position - index * this.objectSize;
      const n = Math.min(this.objectSize - within, length - done);
      work.push(fn(index, within, n, done));
      done += n;
    }
    await Promise.all(work);
  }

  /** The bytes of object `index` (zeroes where it is missing or short). */
  async #load(index: number, into: Uint8Array, within: number): Promise<void> {
    const n = await this.#s3.readObject(
      this.#bucket,
      objectName(this.#prefix, index),
      into,
      within,
    );
    if (n < 0) into.fill(0);
    else if (n < into.length) into.fill(0, n);
  }

  /** The length of object `index` (the last one may be shorter). */
  #objectLength(index: number): number {
    return Math.min(this.objectSize, this.size - index * this.objectSize);
  }

  async #store(index: number, bytes: Uint8Array): Promise<void> {
    const name = objectName(this.#prefix, index);
    if (isZero(bytes)) await this.#s3.deleteObject(this.#bucket, name);
    else await this.#s3.putObject(this.#bucket, name, bytes);
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.#pieces(offset, buf.length, (index, within, n, done) =>
      // Reads wait for a read-modify-write of the object in progress, so they see it whole.
      this.#locks.run(index, () => this.#load(index, buf.subarray(done, done + n), within)));
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.#pieces(
      offset,
      buf.length,
      (index, within, n, done) =>
        this.#locks.run(index, async () => {
          const length = this.#objectLength(index);
          if (within === 0 && n === length) {
            // The caller gets its buffer back once we resolve: fetch sends from a copy.
            return await this.#store(index, buf.slice(done, done + n));
          }
          const object = new Uint8Array(length);
          await this.#load(index, object, 0);
          object.set(buf.subarray(done, done + n), within);
          await this.#store(index, object);
        }),
    );
  }

  /** Deletes the objects wholly inside the range; with `zeroEdges`, zeroes the partial ones. */
  discard(offset: number, length: number, zeroEdges: boolean): Promise<void> {
    return this.#pieces(offset, length, (index, within, n) =>
      this.#locks.run(index, async () => {
        const objectLength = this.#objectLength(index);
        if (within === 0 && n === objectLength) {
          return await this.#s3.deleteObject(this.#bucket, objectName(this.#prefix, index));
        }
        if (!zeroEdges) return;
        const object = new Uint8Array(objectLength);
        const got = await this.#s3.readObject(
          this.#bucket,
          objectName(this.#prefix, index),
          object,
          0,
        );
        if (got < 0) return; // missing: already zero
        object.fill(0, got);
        object.fill(0, within, within + n);
        await this.#store(index, object);
      }));
  }

  async extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
    const first = Math.floor(offset / this.objectSize);
    const limit = reqOne ? 1 : MAX_LISTED_OBJECTS;
    const last = Math.min(
      Math.floor((offset + length - 1) / this.objectSize),
      first + limit - 1,
    );
    const present = new Set<number>();
    const startAfter = first > 0 ? objectName(this.#prefix, first - 1) : undefined;
    for await (const object of this.#s3.list(this.#bucket, `${this.#prefix}/`, startAfter)) {
      const tail = object.key.slice(this.#prefix.length + 1);
      if (!/^[0-9a-f]{16}$/.test(tail)) continue;
      const index = parseInt(tail, 16);
      if (index > last) break;
      if (index >= first) present.add(index);
    }
    const end = Math.min(offset + length, (last + 1) * this.objectSize, this.size);
    const out: Extent[] = [];
    for (let index = first; index <= last; index++) {
      const start = Math.max(offset, index * this.objectSize);
      const stop = Math.min(end, (index + 1) * this.objectSize);
      if (stop <= start) break;
      const flags = present.has(index) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;
      const previous = out[out.length - 1];
      if (previous && previous.flags === flags) previous.length += stop - start;
      else out.push({ length: stop - start, flags });
    }
    return out;
  }
}

function objectDiskBackend(disk: ObjectDisk, readonly: boolean): PluginBackend {
  const backend: PluginBackend = {
    size: () => disk.size,
    capabilities: () => ({
      writable: !readonly,
      // A PUT is durable once acknowledged: nothing is ever held back.
      fua: readonly ? "none" : "native",
      multiConn: true,
      extents: true,
      fastZero: !readonly,
      blockSize: { minimum: 1, preferred: Math.min(disk.objectSize, 32 << 20), maximum: 32 << 20 },
    }),
    pread: (buf, offset) => mapped(disk.read(buf, offset)),
    flush: () => Promise.resolve(),
    extents: (offset, length, flags) => mapped(disk.extents(offset, length, flags.reqOne)),
  };
  if (!readonly) {
    backend.pwrite = (buf, offset) => mapped(disk.write(buf, offset));
    backend.trim = (offset, length) => mapped(disk.discard(offset, length, false));
    backend.zero = (offset, length) => mapped(disk.discard(offset, length, true));
  }
  return backend;
}

function singleObjectBackend(s3: S3Client, bucket: string, key: string, size: number) {
  return completeBackend({
    size: () => size,
    capabilities: () => ({ multiConn: true }),
    async pread(buf, offset) {
      const n = await mapped(s3.readObject(bucket, key, buf, offset));
      if (n < buf.length) {
        throw new NbdError("EIO", `s3://${bucket}/${key} is shorter than it was (${size} bytes)`);
      }
    },
  });
}

/** Reads the client settings shared by the s3 plugin and the s3 copy endpoint. */
export async function s3ClientFromParams(params: Params): Promise<S3Client> {
  const endpoint = params.take("endpoint-url");
  if (endpoint !== undefined && !/^https?:\/\/[^/]/i.test(endpoint)) {
    throw new UsageError("s3: endpoint-url must be an http:// or https:// URL");
  }
  const region = params.take("region") ?? Deno.env.get("AWS_REGION") ??
    Deno.env.get("AWS_DEFAULT_REGION") ?? "us-east-1";
  const profile = params.take("profile");
  const accessKey = params.take("access-key");
  const secretKey = params.take("secret-key");
  const sessionToken = params.take("session-token");
  let credentials: S3Credentials | undefined;
  if ((accessKey === undefined) !== (secretKey === undefined)) {
    throw new UsageError("s3: give access-key= and secret-key= together");
  }
  if (accessKey !== undefined) {
    credentials = {
      accessKeyId: accessKey,
      secretAccessKey: secretKey!,
      sessionToken,
      source: "the command line",
    };
  } else {
    try {
      credentials = await findCredentials(profile);
    } catch (error) {
      throw new UsageError(`s3: ${(error as Error).message}`);
    }
  }
  return new S3Client({
    endpoint,
    region,
    credentials,
    connections: params.takeInteger("connections", 1, 256) ?? 16,
  });
}

/** The params shared by the s3 plugin and the s3 copy endpoint. */
const S3_CLIENT_PARAMS: ParamSpec[] = [
  {
    name: "endpoint-url",
    value: "URL",
    type: "string",
    description: "S3-compatible endpoint (when not given: AWS in the region)",
  },
  {
    name: "region",
    value: "REGION",
    type: "string",
    description: "region for signatures (when not given: $AWS_REGION, else us-east-1)",
  },
  {
    name: "profile",
    value: "NAME",
    type: "string",
    description: "section of ~/.aws/credentials (when not given: $AWS_PROFILE, else default)",
  },
  {
    name: "access-key",
    value: "ID",
    type: "string",
    description: "access key id (prefer the environment or ~/.aws/credentials)",
  },
  {
    name: "secret-key",
    value: "SECRET",
    type: "string",
    description: "secret access key (visible in ps)",
  },
  { name: "session-token", value: "TOKEN", type: "string", description: "session token" },
  {
    name: "connections",
    value: "N",
    type: "integer",
    default: "16",
    description: "requests in flight at once (1 to 256)",
  },
];

/** The s3 plugin. */
export const s3Plugin: Plugin = {
  name: "s3",
  summary: "a disk stored as objects in S3-compatible storage (or one object, read-only)",
  description: "Examples:\n" +
    "  nbd serve s3 bucket=images key=disk size=10G endpoint-url=http://127.0.0.1:7480\n" +
    "  nbd serve s3 bucket=images key=debian.raw",
  params: [
    { name: "bucket", value: "BUCKET", type: "string", description: "the bucket", required: true },
    {
      name: "key",
      value: "KEY",
      type: "string",
      description: "object prefix of the disk (with size=), else the object to serve",
      required: true,
    },
    {
      name: "size",
      value: "SIZE",
      type: "size",
      description: "disk size: store the disk as objects KEY/%016x (read-write)",
    },
    {
      name: "object-size",
      value: "SIZE",
      type: "size",
      default: "4M",
      description: "size of each object",
    },
    ...S3_CLIENT_PARAMS,
  ],
  async create(params) {
    const bucket = params.take("bucket")!;
    const key = params.take("key")!;
    const size = params.takeSize("size");
    const objectSize = params.takeSize("object-size");
    if (objectSize !== undefined && size === undefined) {
      throw new UsageError("s3: object-size= needs size=");
    }
    if (objectSize !== undefined && (objectSize < 512 || objectSize > 5 * 1024 ** 3)) {
      throw new UsageError("s3: object-size must be from 512 bytes to 5G");
    }
    const s3 = await s3ClientFromParams(params);
    try {
      if (size !== undefined) {
        await s3.checkBucket(bucket);
        const disk = new ObjectDisk(
          s3,
          bucket,
          key.replace(/\/+$/, ""),
          size,
          objectSize ?? 4 << 20,
        );
        return {
          open: (context: OpenContext) =>
            Promise.resolve(completeBackend(objectDiskBackend(disk, context.readonly))),
        };
      }
      const length = await s3.headObject(bucket, key);
      if (length === undefined) {
        await s3.checkBucket(bucket);
        throw new Error(`s3://${bucket}/${key} does not exist (give size= to create a disk)`);
      }
      return { open: () => Promise.resolve(singleObjectBackend(s3, bucket, key, length)) };
    } catch (error) {
      if (error instanceof S3Error || !(error instanceof UsageError)) {
        throw new Error(`s3: ${(error as Error).message}`);
      }
      throw error;
    }
  },
};
