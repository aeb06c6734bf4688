/**
 * Ceph RBD images through librbd and librados (Ceph's own C client
 * libraries), bound with FFI only when first used: nothing else in the
 * program loads them, and a machine without them fails here with one line
 * naming the package to install.
 *
 * I/O goes through the asynchronous calls (rbd_aio_read, rbd_aio_write,
 * rbd_aio_discard, rbd_aio_write_zeroes, rbd_aio_flush): a request is
 * submitted on the event-loop thread, so librbd sees requests in arrival
 * order, and its completion is awaited with rbd_aio_wait_for_complete on
 * the runtime's FFI thread pool. No librbd thread ever calls into
 * JavaScript for I/O, so no librbd lock can wait on the event loop. The
 * calls that may block on the network (connect, open, close, diff) run on
 * that pool too.
 *
 * @module
 */

import { lazyLibc } from "./ffi.ts";

/** The Debian package that provides librbd.so.1 and librados.so.2. */
export const LIBRBD_PACKAGE = "librbd1";

/** Image feature bits (rbd/features.h). */
export const RBD_FEATURE_EXCLUSIVE_LOCK = 1n << 2n;
/** The object map tracks which objects exist. */
export const RBD_FEATURE_OBJECT_MAP = 1n << 3n;
/** The object map also tracks which objects changed since a snapshot. */
export const RBD_FEATURE_FAST_DIFF = 1n << 4n;
/** Image flags (librbd.h): the object map or fast-diff data cannot be trusted. */
const RBD_FLAG_OBJECT_MAP_INVALID = 1n << 0n;
const RBD_FLAG_FAST_DIFF_INVALID = 1n << 1n;
/** rbd_write_zeroes flag: allocate the zeroed range instead of deallocating it. */
const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1;

const RADOS = {
  rados_create: { parameters: ["buffer", "buffer"], result: "i32" },
  rados_conf_read_file: { parameters: ["pointer", "buffer"], result: "i32" },
  rados_conf_parse_env: { parameters: ["pointer", "pointer"], result: "i32" },
  rados_conf_set: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_connect: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rados_shutdown: { parameters: ["pointer"], result: "void", nonblocking: true },
  rados_ioctx_create: { parameters: ["pointer", "buffer", "buffer"], result: "i32" },
  rados_ioctx_destroy: { parameters: ["pointer"], result: "void" },
  rados_ioctx_set_namespace: { parameters: ["pointer", "buffer"], result: "void" },
} as const;

const RBD = {
  rbd_open: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  rbd_open_read_only: {
    parameters: ["pointer", "buffer", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  rbd_close: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rbd_create: {
    parameters: ["pointer", "buffer", "u64", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  rbd_remove: { parameters: ["pointer", "buffer"], result: "i32", nonblocking: true },
  rbd_get_size: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_get_features: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_get_flags: { parameters: ["pointer", "buffer"], result: "i32" },
  rbd_stat: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  rbd_aio_create_completion: { parameters: ["pointer", "pointer", "buffer"], result: "i32" },
  rbd_aio_read: { parameters: ["pointer", "u64", "usize", "buffer", "pointer"], result: "i32" },
  rbd_aio_write: { parameters: ["pointer", "u64", "usize", "buffer", "pointer"], result: "i32" },
  rbd_aio_discard: { parameters: ["pointer", "u64", "u64", "pointer"], result: "i32" },
  rbd_aio_flush: { parameters: ["pointer", "pointer"], result: "i32" },
  rbd_aio_wait_for_complete: { parameters: ["pointer"], result: "i32", nonblocking: true },
  rbd_aio_get_return_value: { parameters: ["pointer"], result: "isize" },
  rbd_aio_release: { parameters: ["pointer"], result: "void" },
  rbd_set_image_notification: { parameters: ["pointer", "i32", "i32"], result: "i32" },
  rbd_poll_io_events: { parameters: ["pointer", "buffer", "i32"], result: "i32" },
  rbd_diff_iterate2: {
    parameters: ["pointer", "pointer", "u64", "u64", "u8", "u8", "function", "pointer"],
    result: "i32",
    nonblocking: true,
  },
} as const;

/** Added in Ceph 15 (Octopus); bound separately so older libraries still load. */
const RBD_WRITE_ZEROES = {
  rbd_aio_write_zeroes: {
    parameters: ["pointer", "u64", "usize", "pointer", "i32", "i32"],
    result: "i32",
  },
} as const;

/** The callback of rbd_diff_iterate2: (offset, length, exists, arg) → 0 to go on. */
const DIFF_CALLBACK = { parameters: ["u64", "usize", "i32", "pointer"], result: "i32" } as const;

interface Libraries {
  rados: Deno.DynamicLibrary<typeof RADOS>["symbols"];
  rbd: Deno.DynamicLibrary<typeof RBD>["symbols"];
  writeZeroes?: Deno.DynamicLibrary<typeof RBD_WRITE_ZEROES>["symbols"]["rbd_aio_write_zeroes"];
}

let libraries: Libraries | undefined;

/** Thrown when librbd or librados cannot be loaded; the message is one line. */
export class LibraryMissingError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "LibraryMissingError";
  }
}

/** Loads librados and librbd (once); throws LibraryMissingError naming the package. */
function load(): Libraries {
  if (libraries) return libraries;
  let rados, rbd;
  try {
    rados = Deno.dlopen("librados.so.2", RADOS).symbols;
    rbd = Deno.dlopen("librbd.so.1", RBD).symbols;
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      throw new LibraryMissingError("librbd needs FFI: run with --allow-ffi");
    }
    throw new LibraryMissingError(
      `librbd is not installed (install the Debian package ${LIBRBD_PACKAGE})`,
    );
  }
  let writeZeroes: Libraries["writeZeroes"];
  try {
    writeZeroes = Deno.dlopen("librbd.so.1", RBD_WRITE_ZEROES).symbols.rbd_aio_write_zeroes;
  } catch {
    writeZeroes = undefined;
  }
  libraries = { rados, rbd, writeZeroes };
  return libraries;
}

const libc = lazyLibc(
  {
    strerror: { parameters: ["i32"], result: "pointer" },
    eventfd: { parameters: ["u32", "i32"], result: "i32" },
    close: { parameters: ["i32"], result: "i32" },
  } as const,
);
/** The blocking read of the completion eventfd, on the FFI thread pool. */
const eventLibc = lazyLibc(
  {
    read: { parameters: ["i32", "buffer", "usize"], result: "isize", nonblocking: true },
  } as const,
);
/** rbd_set_image_notification type: an eventfd. */
const EVENT_TYPE_EVENTFD = 2;
const EFD_CLOEXEC = 0o2000000;
/** Completions collected per rbd_poll_io_events call. */
const POLL_BATCH = 64;

/** The system's text for a (negative) errno returned by librados or librbd. */
export function errnoText(code: number): string {
  const text = libc()?.symbols.strerror(Math.abs(code));
  return text ? new Deno.UnsafePointerView(text).getCString() : `error ${Math.abs(code)}`;
}

/** An error from a librados or librbd call, carrying the (positive) errno. */
export class CephError extends Error {
  /** The errno (positive), e.g. 2 for ENOENT. */
  readonly errno: number;
  /** Creates the error for `call`, which returned `-errno`. */
  constructor(what: string, code: number) {
    super(`${what}: ${errnoText(code)}`);
    this.name = "CephError";
    this.errno = Math.abs(code);
  }
}

function cString(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}

/** Scratch for the out-parameters of synchronous calls (used before any await). */
const OUT = new BigUint64Array(1);

function outPointer(): Deno.PointerValue {
  return Deno.UnsafePointer.create(OUT[0]!);
}

/** How to reach a cluster. */
export interface RadosOptions {
  /** Path of ceph.conf; absent = Ceph's default search ($CEPH_CONF, /etc/ceph/ceph.conf, ...). */
  conf?: string;
  /** Client id without "client." (default "admin"). */
  id?: string;
  /** Keyring file. */
  keyring?: string;
}

/** A connected cluster handle. */
export class RadosCluster {
  #handle: Deno.PointerValue;
  #lib: Libraries;
  #closed = false;

  private constructor(handle: Deno.PointerValue, lib: Libraries) {
    this.#handle = handle;
    this.#lib = lib;
  }

  /** Connects to the cluster; throws LibraryMissingError or CephError. */
  static async connect(options: RadosOptions): Promise<RadosCluster> {
    const lib = load();
    const r = lib.rados.rados_create(OUT, cString(options.id ?? "admin"));
    if (r < 0) throw new CephError("cannot create a cluster handle", r);
    const cluster = new RadosCluster(outPointer(), lib);
    try {
      const read = lib.rados.rados_conf_read_file(
        cluster.#handle,
        options.conf === undefined ? null : cString(options.conf),
      );
      if (read < 0) {
        throw new CephError(
          options.conf === undefined
            ? "no Ceph configuration found (give conf=FILE or set CEPH_CONF)"
            : `cannot read ${options.conf}`,
          read,
        );
      }
      lib.rados.rados_conf_parse_env(cluster.#handle, null);
      if (options.keyring !== undefined) {
        const set = lib.rados.rados_conf_set(
          cluster.#handle,
          cString("keyring"),
          cString(options.keyring),
        );
        if (set < 0) throw new CephError(`cannot use the keyring ${options.keyring}`, set);
      }
      const connected = await lib.rados.rados_connect(cluster.#handle);
      if (connected < 0) throw new CephError("cannot connect to the Ceph cluster", connected);
      return cluster;
    } catch (error) {
      await cluster.shutdown();
      throw error;
    }
  }

  /** An I/O context for `pool` (and a namespace in it). */
  ioContext(pool: string, namespace?: string): RadosIoContext {
    if (this.#closed) throw new Error("the cluster handle is closed");
    const r = this.#lib.rados.rados_ioctx_create(this.#handle, cString(pool), OUT);
    if (r < 0) throw new CephError(`cannot open pool ${pool}`, r);
    const io = outPointer();
    if (namespace) this.#lib.rados.rados_ioctx_set_namespace(io, cString(namespace));
    return new RadosIoContext(io, this.#lib);
  }

  /** Disconnects. */
  async shutdown(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#lib.rados.rados_shutdown(this.#handle);
  }
}

/** A pool (and namespace) of a cluster. */
export class RadosIoContext {
  /** The native handle. */
  readonly handle: Deno.PointerValue;
  #lib: Libraries;
  #destroyed = false;

  /** Wraps a native handle; use `RadosCluster.ioContext`. */
  constructor(handle: Deno.PointerValue, lib: Libraries) {
    this.handle = handle;
    this.#lib = lib;
  }

  /** Releases the context (after every image opened in it is closed). */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.#lib.rados.rados_ioctx_destroy(this.handle);
  }
}

/** Creates an image of `size` bytes with the cluster's default format and features. */
export async function createImage(io: RadosIoContext, name: string, size: number): Promise<void> {
  const order = new Int32Array(1); // 0: the default object size
  const r = await load().rbd.rbd_create(io.handle, cString(name), BigInt(size), order);
  if (r < 0) throw new CephError(`cannot create image ${name}`, r);
}

/** Removes an image (with no snapshots). */
export async function removeImage(io: RadosIoContext, name: string): Promise<void> {
  const r = await load().rbd.rbd_remove(io.handle, cString(name));
  if (r < 0) throw new CephError(`cannot remove image ${name}`, r);
}

/** An allocated range reported by `RbdImage.allocated`. */
export interface RbdExtent {
  /** Offset in the image. */
  offset: number;
  /** Length in bytes. */
  length: number;
}

/** An open RBD image (or snapshot of one). */
export class RbdImage {
  #handle: Deno.PointerValue;
  #lib: Libraries;
  #inFlight = new Set<Promise<unknown>>();
  #closed = false;
  #diffCallback: Deno.UnsafeCallback<typeof DIFF_CALLBACK> | undefined;
  #diffs = new Map<number, RbdExtent[]>();
  #nextDiff = 1;
  /** The eventfd librbd signals completions on (-1: each request waits on its own). */
  #eventFd = -1;
  /** Requests waiting for their completion, by completion pointer. */
  #waiting = new Map<bigint, () => void>();
  #polling = false;
  #polled = new BigUint64Array(POLL_BATCH);
  #counter = new BigUint64Array(1);
  /** Size in bytes. */
  readonly size: number;
  /** Object size in bytes. */
  readonly objectSize: number;
  /** Feature bits. */
  readonly features: bigint;
  /** Opened read-only (a snapshot, or asked for). */
  readonly readonly: boolean;
  /** The image's object map can answer block status per whole object. */
  readonly fastDiff: boolean;

  private constructor(
    handle: Deno.PointerValue,
    lib: Libraries,
    readonly: boolean,
  ) {
    this.#handle = handle;
    this.#lib = lib;
    this.readonly = readonly;
    const size = new BigUint64Array(1);
    let r = lib.rbd.rbd_get_size(handle, size);
    if (r < 0) throw new CephError("cannot get the image size", r);
    this.size = Number(size[0]);
    const info = new Uint8Array(256);
    r = lib.rbd.rbd_stat(handle, info, BigInt(info.length));
    this.objectSize = r < 0 ? 4 << 20 : Number(new DataView(info.buffer).getBigUint64(8, true));
    r = lib.rbd.rbd_get_features(handle, size);
    this.features = r < 0 ? 0n : size[0]!;
    r = lib.rbd.rbd_get_flags(handle, size);
    const flags = r < 0 ? RBD_FLAG_FAST_DIFF_INVALID : size[0]!;
    this.fastDiff = (this.features & RBD_FEATURE_FAST_DIFF) !== 0n &&
      (flags & (RBD_FLAG_FAST_DIFF_INVALID | RBD_FLAG_OBJECT_MAP_INVALID)) === 0n;
    this.#eventFd = this.#notifyOnEventFd();
  }

  /**
   * Asks librbd to signal completions on an eventfd, so that one wait on
   * the FFI thread pool collects every completion instead of one blocked
   * thread per request in flight. -1 when that is not possible.
   */
  #notifyOnEventFd(): number {
    const c = libc();
    if (!c || !eventLibc()) return -1;
    const fd = c.symbols.eventfd(0, EFD_CLOEXEC);
    if (fd < 0) return -1;
    if (this.#lib.rbd.rbd_set_image_notification(this.#handle, fd, EVENT_TYPE_EVENTFD) < 0) {
      c.symbols.close(fd);
      return -1;
    }
    return fd;
  }

  /** Waits on the eventfd and wakes the requests whose completions librbd reports. */
  async #poll(): Promise<void> {
    this.#polling = true;
    try {
      while (this.#waiting.size > 0) {
        const n = await eventLibc()!.symbols.read(this.#eventFd, this.#counter, 8n);
        if (n < 0) throw new Error("reading the completion eventfd failed");
        for (;;) {
          const count = this.#lib.rbd.rbd_poll_io_events(this.#handle, this.#polled, POLL_BATCH);
          for (let i = 0; i < count; i++) {
            const wake = this.#waiting.get(this.#polled[i]!);
            this.#waiting.delete(this.#polled[i]!);
            wake?.();
          }
          if (count < POLL_BATCH) break;
        }
      }
    } finally {
      this.#polling = false;
    }
  }

  /** Resolves once librbd has completed `completion`. */
  #completed(completion: Deno.PointerValue): Promise<unknown> {
    if (this.#eventFd < 0) return this.#lib.rbd.rbd_aio_wait_for_complete(completion);
    const done = new Promise<void>((resolve) => {
      this.#waiting.set(BigInt(Deno.UnsafePointer.value(completion)), resolve);
    });
    if (!this.#polling) {
      this.#poll().catch(() => {
        // The eventfd failed: fall back to waiting on each completion.
        this.#eventFd = -1;
        for (const [pointer, wake] of this.#waiting) {
          this.#lib.rbd.rbd_aio_wait_for_complete(Deno.UnsafePointer.create(pointer)).then(wake);
        }
        this.#waiting.clear();
      });
    }
    return done;
  }

  /**
   * Opens `name` in `io`, at `snapshot` if given (always read-only then),
   * read-only if asked; `label` names the image in errors.
   */
  static async open(
    io: RadosIoContext,
    name: string,
    options: { snapshot?: string; readonly?: boolean; label?: string } = {},
  ): Promise<RbdImage> {
    const lib = load();
    const readonly = options.readonly === true || options.snapshot !== undefined;
    const out = new BigUint64Array(1);
    const open = readonly ? lib.rbd.rbd_open_read_only : lib.rbd.rbd_open;
    const r = await open(
      io.handle,
      cString(name),
      out,
      options.snapshot === undefined ? null : cString(options.snapshot),
    );
    if (r < 0) {
      const label = options.label ?? name;
      const what = options.snapshot === undefined ? label : `${label}@${options.snapshot}`;
      throw new CephError(`cannot open image ${what}`, r);
    }
    const handle = Deno.UnsafePointer.create(out[0]!);
    try {
      return new RbdImage(handle, lib, readonly);
    } catch (error) {
      await lib.rbd.rbd_close(handle);
      throw error;
    }
  }

  /** Submits one asynchronous request and waits for it on the FFI thread pool. */
  async #aio(what: string, submit: (completion: Deno.PointerValue) => number): Promise<number> {
    if (this.#closed) throw new Error("the image is closed");
    const lib = this.#lib.rbd;
    let r = lib.rbd_aio_create_completion(null, null, OUT);
    if (r < 0) throw new CephError(`${what}: cannot create a completion`, r);
    const completion = outPointer();
    r = submit(completion);
    if (r < 0) {
      lib.rbd_aio_release(completion);
      throw new CephError(what, r);
    }
    const wait = this.#completed(completion);
    this.#inFlight.add(wait);
    try {
      await wait;
    } finally {
      this.#inFlight.delete(wait);
    }
    const result = Number(lib.rbd_aio_get_return_value(completion));
    lib.rbd_aio_release(completion);
    if (result < 0) throw new CephError(what, result);
    return result;
  }

  /** Fills `buf` from `offset` (rbd_aio_read). */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return;
    const n = await this.#aio(
      "read",
      (c) => this.#lib.rbd.rbd_aio_read(this.#handle, BigInt(offset), BigInt(buf.length), buf, c),
    );
    // librbd reads past the end of the image as short; the caller checked the range.
    if (n < buf.length) buf.fill(0, n);
  }

  /** Writes `buf` at `offset` (rbd_aio_write). */
  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return;
    await this.#aio(
      "write",
      (c) => this.#lib.rbd.rbd_aio_write(this.#handle, BigInt(offset), BigInt(buf.length), buf, c),
    );
  }

  /** Discards a range (rbd_aio_discard): whole objects are removed, parts zeroed. */
  async discard(offset: number, length: number): Promise<void> {
    await this.#aio(
      "discard",
      (c) => this.#lib.rbd.rbd_aio_discard(this.#handle, BigInt(offset), BigInt(length), c),
    );
  }

  /** Whether the library has rbd_aio_write_zeroes (Ceph 15 and later). */
  get canWriteZeroes(): boolean {
    return this.#lib.writeZeroes !== undefined;
  }

  /**
   * Zeroes a range (rbd_aio_write_zeroes): deallocating where whole objects
   * are covered, unless `allocate` asks for thick provisioning.
   */
  async writeZeroes(offset: number, length: number, allocate: boolean): Promise<void> {
    const writeZeroes = this.#lib.writeZeroes;
    if (!writeZeroes) throw new Error("rbd_aio_write_zeroes is not available");
    await this.#aio(
      "write zeroes",
      (c) =>
        writeZeroes(
          this.#handle,
          BigInt(offset),
          BigInt(length),
          c,
          allocate ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0,
          0,
        ),
    );
  }

  /** Makes completed writes durable (rbd_aio_flush). */
  async flush(): Promise<void> {
    await this.#aio("flush", (c) => this.#lib.rbd.rbd_aio_flush(this.#handle, c));
  }

  /**
   * The allocated ranges within [offset, offset+length) (rbd_diff_iterate2
   * from the beginning of time, parents included), rounded to whole objects
   * when `wholeObject` (answered from the object map with fast-diff).
   */
  async allocated(offset: number, length: number, wholeObject: boolean): Promise<RbdExtent[]> {
    if (this.#closed) throw new Error("the image is closed");
    if (!this.#diffCallback) {
      // Called from whichever thread librbd reports on: the call blocks that thread until
      // the event loop has run it, and the event loop only awaits the diff meanwhile.
      this.#diffCallback = Deno.UnsafeCallback.threadSafe(
        DIFF_CALLBACK,
        (off, len, exists, arg) => {
          const list = this.#diffs.get(Number(Deno.UnsafePointer.value(arg)));
          if (list && exists) list.push({ offset: Number(off), length: Number(len) });
          return 0;
        },
      );
      this.#diffCallback.unref();
    }
    const id = this.#nextDiff++;
    const list: RbdExtent[] = [];
    this.#diffs.set(id, list);
    const call = this.#lib.rbd.rbd_diff_iterate2(
      this.#handle,
      null,
      BigInt(offset),
      BigInt(length),
      1,
      wholeObject ? 1 : 0,
      this.#diffCallback.pointer,
      Deno.UnsafePointer.create(BigInt(id)),
    );
    this.#inFlight.add(call);
    let r: number;
    try {
      r = await call;
    } finally {
      this.#inFlight.delete(call);
      this.#diffs.delete(id);
    }
    if (r < 0) throw new CephError("block status (diff iterate)", r);
    list.sort((a, b) => a.offset - b.offset);
    return list;
  }

  /** Waits for requests in flight, then closes the image. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    while (this.#inFlight.size > 0) await Promise.allSettled([...this.#inFlight]);
    const r = await this.#lib.rbd.rbd_close(this.#handle);
    if (this.#eventFd >= 0) libc()?.symbols.close(this.#eventFd);
    this.#eventFd = -1;
    this.#diffCallback?.close();
    if (r < 0) throw new CephError("close", r);
  }
}
