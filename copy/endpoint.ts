/**
 * The interface every kind of copy endpoint implements (file, block device,
 * NBD, http, pipe, null, subprocess server), and the parsing of the
 * SOURCE/DESTINATION arguments into a description of which kind to open.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import { isNbdUri } from "../protocol/uri.ts";
import { DEFAULT_BLOCK_SIZE } from "../core/backend.ts";

/** A run of the source: allocated data, or bytes known to read as zero. */
export interface CopyExtent {
  /** Offset of the run. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** The run reads as zeroes (a hole or a zeroed range), so it need not be read. */
  zero: boolean;
}

/**
 * Block sizes of the endpoints that take any offset and length (files,
 * http, null): 4 KiB is the page size the kernel likes, and a request may
 * be larger than the protocol's default maximum.
 */
export const COPY_BLOCK_SIZE: BlockSize = Object.freeze({
  ...DEFAULT_BLOCK_SIZE,
  maximum: 64 << 20,
});

/** Which side of the copy an endpoint is. */
export type Role = "source" | "destination";

/**
 * One side of a copy. A source implements `read` (and `extents` when it can
 * describe its allocation); a destination implements `write`, `zero` and
 * `flush`. Offsets and lengths the scheduler passes are aligned to
 * `blockSize.minimum` except at the end of the image.
 */
export interface Endpoint {
  /** The argument as given on the command line, for messages. */
  readonly name: string;
  /** Kind, for messages and decisions: "file", "block device", "nbd", "http", "pipe", "null". */
  readonly kind: string;
  /** Size in bytes; undefined for a stream whose length is known only at its end. */
  readonly size: number | undefined;
  /** Reads or writes must happen in offset order (pipes); the endpoint enforces the order. */
  readonly sequential: boolean;
  /** Request-size limits and preference. */
  readonly blockSize: BlockSize;
  /** The source can describe which ranges are holes or zeroes. */
  readonly canExtents: boolean;
  /** The destination reads as zeroes before the copy starts (so zero runs can be skipped). */
  readonly isZero: boolean;
  /** The destination keeps nothing (`null:`), so looking for zeroes in the data is wasted. */
  readonly discards: boolean;
  /**
   * Reads and writes do their work before they return (files, `null:`):
   * more than one of them in flight gains nothing.
   */
  readonly synchronous: boolean;
  /**
   * Reads worth having in flight at once from this source; more would only
   * wait for one of them, each holding a buffer. Undefined: no limit.
   */
  readonly maxReads?: number;
  /**
   * Bytes worth having in flight at once to or from this endpoint, all
   * requests together; beyond it more requests only cost memory (and the
   * page faults of filling it). Undefined: no limit.
   */
  readonly maxBytesInFlight?: number;
  /**
   * Fills `buf` from `offset`; resolves to the bytes read, which is less than
   * `buf.length` only at the end of a stream.
   */
  read(buf: Uint8Array, offset: number): Promise<number>;
  /** Allocation from `offset`: consecutive runs covering at least one byte of the range. */
  extents(offset: number, length: number): Promise<CopyExtent[]>;
  /**
   * Writes `buf` at `offset`. With `headroom`, the `WRITE_HEADROOM` bytes
   * before `buf` in its buffer may be overwritten (an NBD endpoint puts the
   * request header there, to send header and data in one piece). `sent`, if
   * the endpoint calls it, says that `buf` is no longer needed before the
   * promise settles (an NBD endpoint: handed to the socket, the reply still
   * to come); otherwise it is free once the promise has resolved.
   */
  write(buf: Uint8Array, offset: number, headroom?: boolean, sent?: () => void): Promise<void>;
  /** Makes a range read as zeroes; `allocate` asks for it to stay allocated (no hole). */
  zero(offset: number, length: number, allocate: boolean): Promise<void>;
  /**
   * Memory for `count` read buffers of `bytes` each, laid end to end, that
   * a destination writes from more cheaply than from other memory (a file
   * written by a thread of its own: no copy between the threads); undefined
   * when it has none to offer. Asked once, before a copy of `total` bytes
   * (undefined for a stream) starts.
   */
  sharedBuffers?(count: number, bytes: number, total?: number): SharedArrayBuffer | undefined;
  /** Makes what was written durable. */
  flush(): Promise<void>;
  /** Destination of a stream of unknown length: called once with the final size. */
  finish(size: number): Promise<void>;
  /** Stops waiting for turns (sequential endpoints) after a failure elsewhere. */
  abort(reason: Error): void;
  /**
   * Releases everything. `complete` is false after a failed copy; a
   * destination then undoes what it can (a new file is removed).
   */
  close(complete: boolean): Promise<void>;
  /** What a failed copy left at this destination, for the error message. */
  incompleteNote(): string;
  /**
   * How another thread opens this same endpoint for its share of the copy
   * (shares.ts); undefined when it cannot (streams, http). `threads`, once
   * the copy is about to be shared, lets the endpoint divide what it must
   * between them.
   */
  shareSpec(threads?: number): ShareSpec | undefined;
  /**
   * Opens up to `connections` connections (undefined: the default) where the
   * endpoint was opened with fewer, expecting to share the copy between threads.
   */
  useConnections(connections?: number): Promise<void>;
  /**
   * On the main thread of a shared copy: a message a worker's share of
   * this endpoint sent (`ShareReport` "endpoint").
   */
  acceptShareMessage?(payload: unknown): void;
}

/** Timeouts of NBD connections, in seconds (0 = none): connect and handshake, and requests. */
export interface NbdTimeouts {
  /** Connecting and each step of the handshake. */
  timeout?: number;
  /** Requests left unanswered. */
  requestTimeout?: number;
}

/**
 * An opened endpoint as another thread reopens it: plain data, so that it
 * can be posted to a worker.
 */
export type ShareSpec =
  /** The same export, over one more connection. */
  | { kind: "nbd"; name: string; uri: string; timeouts?: NbdTimeouts }
  /** The same file or block device, read with its own descriptor. */
  | { kind: "file-source"; path: string }
  /**
   * The file being written (for a new file, its temporary name), written
   * with its own descriptor and never resized, created or removed.
   */
  | {
    kind: "file-destination";
    name: string;
    path: string;
    size: number | undefined;
    isZero: boolean;
    /** This thread's share of the dirty data the copy may leave behind. */
    writeBehindBudget: number;
    /** Int32 [locked]: the threads writing the file take turns. */
    writeLock?: SharedArrayBuffer;
  }
  /** Discards everything. */
  | { kind: "null" }
  /** Hashes blocks for blkhash, reporting digests to the main thread (blkhash_shared.ts). */
  | { kind: "blkhash"; blockSize: number; size: number };

/** A parsed SOURCE or DESTINATION argument. */
export type EndpointSpec =
  | { kind: "path"; path: string }
  | { kind: "nbd"; uri: string }
  | { kind: "http"; url: string }
  | { kind: "stdio" }
  | { kind: "null" }
  | { kind: "command"; argv: string[] }
  | { kind: "rbd"; image: string }
  | { kind: "s3"; url: string };

/** Classifies one positional argument (not a `[ CMD ]` group, which the caller splits out). */
export function parseEndpoint(text: string): EndpointSpec {
  if (text === "-") return { kind: "stdio" };
  if (text === "null:") return { kind: "null" };
  if (isNbdUri(text)) return { kind: "nbd", uri: text };
  if (/^https?:\/\//i.test(text)) return { kind: "http", url: text };
  if (text.startsWith("rbd:")) return { kind: "rbd", image: text };
  if (/^s3:\/\//i.test(text)) return { kind: "s3", url: text };
  return { kind: "path", path: text };
}

/** How an endpoint is named in messages. */
export function describeSpec(spec: EndpointSpec): string {
  switch (spec.kind) {
    case "path":
      return spec.path;
    case "nbd":
      return spec.uri;
    case "http":
      return spec.url;
    case "stdio":
      return "-";
    case "null":
      return "null:";
    case "command":
      return `[ ${spec.argv.join(" ")} ]`;
    case "rbd":
      return spec.image;
    case "s3":
      return spec.url;
  }
}

/** Defaults for the optional members, so each endpoint states only what it does. */
export abstract class BaseEndpoint implements Endpoint {
  abstract readonly name: string;
  abstract readonly kind: string;
  abstract readonly size: number | undefined;
  abstract readonly blockSize: BlockSize;
  /** Random access unless a subclass says otherwise. */
  readonly sequential: boolean = false;
  /** No allocation information unless a subclass has it. */
  readonly canExtents: boolean = false;
  /** Not known to be zero unless a subclass knows better. */
  readonly isZero: boolean = false;
  /** Keeps what it is given unless a subclass says otherwise. */
  readonly discards: boolean = false;
  /** Requests complete asynchronously unless a subclass says otherwise. */
  readonly synchronous: boolean = false;
  /** No limit on the bytes in flight unless a subclass sets one. */
  readonly maxBytesInFlight: number | undefined = undefined;

  /** Not a source unless overridden. */
  read(_buf: Uint8Array, _offset: number): Promise<number> {
    return Promise.reject(new Error(`${this.name} cannot be read`));
  }
  /** Everything is data unless overridden. */
  extents(offset: number, length: number): Promise<CopyExtent[]> {
    return Promise.resolve([{ offset, length, zero: false }]);
  }
  /** Not a destination unless overridden. */
  write(_buf: Uint8Array, _offset: number, _headroom?: boolean): Promise<void> {
    return Promise.reject(new Error(`${this.name} cannot be written`));
  }
  /** Not a destination unless overridden. */
  zero(_offset: number, _length: number, _allocate: boolean): Promise<void> {
    return Promise.reject(new Error(`${this.name} cannot be written`));
  }
  /** Nothing to make durable. */
  flush(): Promise<void> {
    return Promise.resolve();
  }
  /** Nothing to do. */
  finish(_size: number): Promise<void> {
    return Promise.resolve();
  }
  /** Nothing waits. */
  abort(_reason: Error): void {}
  /** Nothing to release. */
  close(_complete: boolean): Promise<void> {
    return Promise.resolve();
  }
  /** The generic note. */
  incompleteNote(): string {
    return `${this.name} is incomplete`;
  }
  /** Not shared unless a subclass can be reopened. */
  shareSpec(_threads?: number): ShareSpec | undefined {
    return undefined;
  }
  /** One connection or none: nothing to open. */
  useConnections(_connections?: number): Promise<void> {
    return Promise.resolve();
  }
  /** Shares of most endpoints send nothing. */
  acceptShareMessage(_payload: unknown): void {}
}
