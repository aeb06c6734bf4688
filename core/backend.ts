/**
 * The backend interface shared by plugins, filters and the client: one open
 * export on one connection. Plugins produce backends, filters wrap them.
 *
 * @module
 */

import type { BlockSize } from "../protocol/handshake.ts";
import type { Extent } from "../protocol/transmission.ts";
import { NbdError } from "../protocol/errors.ts";
import type { Params, ParamSpec } from "./params.ts";
import { ZERO_BUFFER } from "../util/zero_buffer.ts";

export type { BlockSize, Extent };

/** How a backend handles the FUA flag, or the CACHE command. */
export type Support = "none" | "emulate" | "native";

/**
 * How much concurrency a layer takes, strictest first:
 * - `serialize_connections`: one connection at a time (others wait to
 *   open), and its requests one at a time;
 * - `serialize_all_requests`: any number of connections, one request at a
 *   time across all of them;
 * - `serialize_requests`: one request at a time per connection;
 * - `parallel`: no limit (the default).
 */
export type ThreadModel =
  | "serialize_connections"
  | "serialize_all_requests"
  | "serialize_requests"
  | "parallel";

/** What a backend can do; the server derives the transmission flags from it. */
export interface Capabilities {
  /** Accepts pwrite (and so zero/trim when those are supported). */
  writable: boolean;
  /** FLUSH does something meaningful. */
  flush: boolean;
  /** TRIM is supported. */
  trim: boolean;
  /** WRITE_ZEROES is supported (natively or emulated by writes). */
  zero: boolean;
  /** A zero request with `fast` can succeed (otherwise it fails with ENOTSUP). */
  fastZero: boolean;
  /** FUA: "native" = the backend honours `fua`, "emulate" = flush afterwards. */
  fua: Support;
  /** CACHE: "native" = the backend handles it, "emulate" = read and discard, "none" = not advertised. */
  cache: Support;
  /** Block status is real (otherwise everything reports as allocated data). */
  extents: boolean;
  /** Safe to use from several connections at once (coherent caches). */
  multiConn: boolean;
  /** Behaves like spinning media. */
  rotational: boolean;
  /** Block-size constraints. */
  blockSize: BlockSize;
  /**
   * Writes past the end extend the store (a file): a filter that keeps an
   * image format in it (qcow2) may grow it. The export's size does not change.
   */
  extendable?: boolean;
}

/** Flags of a write. */
export interface WriteFlags {
  /** Reply only once the data is durable. */
  fua: boolean;
}

/** Flags of a zero request. */
export interface ZeroFlags extends WriteFlags {
  /** The backend may punch a hole instead of writing zeroes (no NO_HOLE flag). */
  mayTrim: boolean;
  /** Fail with ENOTSUP unless zeroing is faster than writing. */
  fast: boolean;
}

/** Flags of a block-status request. */
export interface ExtentsFlags {
  /** Return exactly one extent. */
  reqOne: boolean;
}

/**
 * A piece of a zero-copy read: stored bytes, or a number of bytes that read
 * as zero (a hole).
 */
export type ReadSegment = Uint8Array | number;

/** Where a range of an export lies in an open file (`Backend.fileRange`). */
export interface FileRange {
  /** An open file descriptor, valid until the backend is closed. */
  fd: number;
  /** Where the range starts in that file. */
  offset: number;
}

/** One open export on one connection. Offsets and lengths are already validated. */
export interface Backend {
  /** Size of the export in bytes. */
  size(): number;
  /** What the backend supports; called once per connection and cached. */
  capabilities(): Capabilities;
  /** Fills `buf` with the bytes at `offset`. */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * Optional zero-copy read: views of stored bytes and zero runs that cover
   * the range in order, valid until the reply is sent; undefined = use pread.
   */
  readView?(offset: number, length: number): ReadSegment[] | undefined;
  /**
   * Optional: where the range's bytes are those of an open file, all of
   * them in the page cache right now, that file and offset, so that the
   * server can send them to a plain socket straight from the page cache
   * (sendfile); undefined = use pread. Synchronous: it must answer from
   * what is in memory, never wait or do I/O. The server reads the file
   * when the reply's turn to be sent comes, which may be after later
   * requests have run: until the backend is closed, those bytes must stay
   * the range's, or become only what a request overlapping the range
   * (a concurrent one, as far as the client knows) makes of it.
   * Built-in layers only (the guard around a module drops it): the file
   * plugin, and the qcow2 filter, for ranges that map byte for byte to
   * plain data clusters of the image in its layer below's file (asking that
   * layer's fileRange for the host range). Other filters never forward it:
   * they may change the data or where it lies.
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
  /**
   * `pread` sets every byte of `buf` (or fails): the server may hand it a
   * reused buffer without clearing it first.
   */
  readonly preadFills?: boolean;
  /**
   * Optional in-place write: views of the storage behind the range, in
   * order and covering it exactly, into which the caller may put a WRITE's
   * bytes itself instead of calling `pwrite` (the server receives the
   * payload straight into them). Only for a store where a write is complete
   * (FUA included) once its bytes are there; concurrent reads of the range
   * may see it part-written, as they may with `pwrite`. Undefined = use
   * `pwrite`. Filters do not forward it.
   */
  writeView?(offset: number, length: number): Uint8Array[] | undefined;
  /**
   * Optional, from plugins only: where a WRITE of the
   * range may be put straight into an open file (the server then moves the
   * payload from the socket into it with splice, and calls `pwrite` for
   * what it cannot), that file and offset; undefined = use `pwrite`. Only
   * for a store where writing the file's bytes is the whole write (no FUA,
   * which the server leaves to `pwrite`). Filters never forward it.
   */
  writeTarget?(offset: number, length: number): FileRange | undefined;
  /**
   * Writes `buf` at `offset`. Once the returned promise has resolved, `buf`
   * is the caller's again (the server reuses it for the next write): what
   * an implementation keeps, it copies.
   */
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  /** Discards a range (a hint; contents become unspecified). */
  trim(offset: number, length: number, flags: WriteFlags): Promise<void>;
  /** Makes a range read as zeroes. */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  /** Allocation status from `offset`: consecutive extents covering at least one byte. */
  extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]>;
  /** Prefetch hint. */
  cache(offset: number, length: number): Promise<void>;
  /** Releases per-connection resources. */
  close(): Promise<void>;
  /**
   * Metadata contexts this export answers besides base:allocation (for
   * example `qemu:allocation-depth`); absent = none.
   */
  extraContexts?(): string[];
  /**
   * Block status in the metadata context `name` (one of `extraContexts()`):
   * consecutive extents from `offset` whose flags are that context's values.
   */
  contextExtents?(
    name: string,
    offset: number,
    length: number,
    flags: ExtentsFlags,
  ): Promise<Extent[]>;
}

/** What a plugin or filter learns when a client opens an export. */
export interface OpenContext {
  /** Export name the client asked for (after resolving the default). */
  exportName: string;
  /** The export is served read-only (`-r`). */
  readonly: boolean;
  /** The connection uses TLS. */
  tls: boolean;
  /** Connection number, unique within the server process. */
  connectionId: number;
}

/** An export as listed by NBD_OPT_LIST. */
export interface ExportInfo {
  /** Export name. */
  name: string;
  /** Optional description. */
  description?: string;
}

/** A configured plugin: shared state for all connections. */
export interface PluginInstance {
  /** Opens the export for one connection. */
  open(context: OpenContext): Promise<Backend>;
  /** Exports this plugin serves; absent = one export named by the server's `-e`. */
  listExports?(): Promise<ExportInfo[]>;
  /** Name of the export served when a client asks for "" (with listExports). */
  defaultExport?(): Promise<string>;
  /** Releases shared resources when the server stops. */
  close?(): Promise<void>;
  /** Concurrency this configured plugin takes (overrides the plugin's `threadModel`). */
  threadModel?: ThreadModel;
}

/** A plugin: a named source of backends with nbdkit-style parameters. */
export interface Plugin {
  /** Name used on the command line. */
  name: string;
  /** One-line summary. */
  summary: string;
  /** Longer help text (examples, notes). */
  description?: string;
  /** Parameters, for help and validation. */
  params: ParamSpec[];
  /** Parameter that a bare value (without `key=`) sets, e.g. "size". */
  magicParam?: string;
  /** Set when this is another name of a plugin (documented on that plugin's page). */
  aliasOf?: string;
  /** Concurrency the plugin takes (default parallel); the server enforces it. */
  threadModel?: ThreadModel;
  /** Consumes the plugin's parameters from `params` and returns the configured plugin. */
  create(params: Params): Promise<PluginInstance>;
}

/**
 * Opens the layers below a filter again, e.g. after an error (the retry
 * filter), with the given context.
 */
export type Reopen = (context: OpenContext) => Promise<Backend>;

/** A configured filter: shared state plus a per-connection wrapper. */
export interface FilterInstance {
  /**
   * Wraps the next backend for one connection. `reopen` opens a fresh copy
   * of everything below this filter; most filters ignore it.
   */
  wrap(next: Backend, context: OpenContext, reopen: Reopen): Promise<Backend>;
  /** Adjusts the export list of the layer below. */
  listExports?(next: () => Promise<ExportInfo[]>): Promise<ExportInfo[]>;
  /** Releases shared resources when the server stops. */
  close?(): Promise<void>;
  /** Concurrency this configured filter takes (overrides the filter's `threadModel`). */
  threadModel?: ThreadModel;
}

/** A filter: wraps a backend, changing some of its behaviour. */
export interface Filter {
  /** Name used with `--filter`. */
  name: string;
  /** One-line summary. */
  summary: string;
  /** Longer help text. */
  description?: string;
  /** Set when this is another name of a filter (documented on that filter's page). */
  aliasOf?: string;
  /** Parameters, for help and validation. */
  params: ParamSpec[];
  /** Concurrency the filter takes (default parallel); the server enforces it. */
  threadModel?: ThreadModel;
  /** Consumes the filter's parameters from `params`. */
  create(params: Params): Promise<FilterInstance>;
}

/**
 * The protocol's default block sizes: what the server advertises for a
 * backend that states none, and what a client assumes of a server that
 * advertises none.
 */
export const DEFAULT_BLOCK_SIZE: BlockSize = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: 32 * 1024 * 1024,
});

/**
 * Forwards every call to `next`. Filters extend it and override only what
 * they change. The zero-copy `readView` is forwarded only while `pread` is
 * not overridden, so a filter that changes data can never leak the bytes of
 * the layer below by forgetting it. `fileRange`, `writeView` and
 * `writeTarget` are never forwarded: a filter that offers one (qcow2's
 * `fileRange`) sets it itself.
 */
export class PassthroughBackend implements Backend {
  /** The backend below this one. */
  readonly next: Backend;

  /** Wraps `next`. */
  constructor(next: Backend) {
    this.next = next;
    if (
      this.pread === PassthroughBackend.prototype.pread &&
      this.readView === PassthroughBackend.prototype.readView && next.readView
    ) {
      this.readView = (offset, length) => next.readView!(offset, length);
    } else {
      this.readView = undefined;
    }
    // Likewise: a filter with a pread of its own says for itself whether it fills the buffer.
    this.preadFills = this.pread === PassthroughBackend.prototype.pread && next.preadFills === true;
    // Other metadata contexts describe the same offsets as base:allocation: they
    // are forwarded only by filters that leave block status alone.
    if (
      this.extents === PassthroughBackend.prototype.extents && next.extraContexts &&
      next.contextExtents && !this.extraContexts && !this.contextExtents
    ) {
      this.extraContexts = () => next.extraContexts!();
      this.contextExtents = (name, offset, length, flags) =>
        next.contextExtents!(name, offset, length, flags);
    }
  }
  /** Other metadata contexts, forwarded when safe (see the constructor). */
  declare extraContexts?: () => string[];
  /** Block status in another metadata context, forwarded when safe. */
  declare contextExtents?: (
    name: string,
    offset: number,
    length: number,
    flags: ExtentsFlags,
  ) => Promise<Extent[]>;
  /** `pread` sets every byte of its buffer (forwarded like `readView`). */
  preadFills: boolean;
  /** Zero-copy read, forwarded when safe (see the class comment). */
  readView?: (offset: number, length: number) => ReadSegment[] | undefined;
  /** Size of the export. */
  size(): number {
    return this.next.size();
  }
  /** Capabilities of the export. */
  capabilities(): Capabilities {
    return this.next.capabilities();
  }
  /** Reads. */
  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.pread(buf, offset);
  }
  /** Writes. */
  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.next.pwrite(buf, offset, flags);
  }
  /** Flushes. */
  flush(): Promise<void> {
    return this.next.flush();
  }
  /** Trims. */
  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.next.trim(offset, length, flags);
  }
  /** Zeroes. */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, flags);
  }
  /** Block status. */
  extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.next.extents(offset, length, flags);
  }
  /** Prefetch. */
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }
  /** Closes this layer and the layers below. */
  close(): Promise<void> {
    return this.next.close();
  }
}

/**
 * What a plugin implements: size and pread are required, everything else is
 * optional and gets a default from `completeBackend`.
 */
export interface PluginBackend {
  /** Size of the export. */
  size(): number;
  /** Capabilities that differ from the defaults. */
  capabilities?(): Partial<Capabilities>;
  /** Reads. */
  pread(buf: Uint8Array, offset: number): Promise<void>;
  /** Zero-copy read. */
  readView?(offset: number, length: number): ReadSegment[] | undefined;
  /** The range in an open file, all in the page cache (see `Backend.fileRange`). */
  fileRange?(offset: number, length: number): FileRange | undefined;
  /** `pread` sets every byte of its buffer (or fails). */
  preadFills?: boolean;
  /** In-place write (see `Backend.writeView`); only with `pwrite`. */
  writeView?(offset: number, length: number): Uint8Array[] | undefined;
  /** Where a write may go straight into a file (see `Backend.writeTarget`); only with `pwrite`. */
  writeTarget?(offset: number, length: number): FileRange | undefined;
  /** Writes; absent = read-only. `buf` is the caller's again once the promise resolves. */
  pwrite?(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void>;
  /** Flush; absent = FLUSH not advertised. */
  flush?(): Promise<void>;
  /** Trim; absent = TRIM not advertised. */
  trim?(offset: number, length: number, flags: WriteFlags): Promise<void>;
  /** Zero; absent = emulated by writing zeroes. May throw ENOTSUP to fall back. */
  zero?(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  /** Block status; absent = everything is allocated data. */
  extents?(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]>;
  /** Prefetch; absent = no-op. */
  cache?(offset: number, length: number): Promise<void>;
  /** Per-connection clean-up. */
  close?(): Promise<void>;
}

/**
 * Supplies the defaults a plugin does not implement, in one place: zero by
 * writing zeroes, FUA by flushing, extents as all data, cache as a no-op.
 */
export function completeBackend(plugin: PluginBackend): Backend {
  const declared = plugin.capabilities?.() ?? {};
  const writable = declared.writable ?? plugin.pwrite !== undefined;
  const flush = declared.flush ?? plugin.flush !== undefined;
  const capabilities: Capabilities = {
    writable,
    flush,
    trim: writable && (declared.trim ?? plugin.trim !== undefined),
    zero: writable && (declared.zero ?? true),
    fastZero: writable && (declared.fastZero ?? plugin.zero !== undefined),
    fua: writable ? (declared.fua ?? (flush ? "emulate" : "none")) : "none",
    cache: declared.cache ?? (plugin.cache ? "native" : "emulate"),
    extents: declared.extents ?? plugin.extents !== undefined,
    multiConn: declared.multiConn ?? false,
    rotational: declared.rotational ?? false,
    blockSize: declared.blockSize ?? DEFAULT_BLOCK_SIZE,
  };
  if (writable && declared.extendable) capabilities.extendable = true;
  const afterWrite = async (fua: boolean) => {
    if (fua && capabilities.fua === "emulate") await plugin.flush!();
  };
  const writeZeroes = async (offset: number, length: number, fua: boolean) => {
    for (let done = 0; done < length;) {
      const n = Math.min(ZERO_BUFFER.length, length - done);
      await plugin.pwrite!(ZERO_BUFFER.subarray(0, n), offset + done, { fua: false });
      done += n;
    }
    await afterWrite(fua);
  };
  const backend: Backend = {
    size: () => plugin.size(),
    capabilities: () => capabilities,
    pread: (buf, offset) => plugin.pread(buf, offset),
    preadFills: plugin.preadFills === true,
    async pwrite(buf, offset, flags) {
      if (!plugin.pwrite) throw new NbdError("EPERM", "the export is read-only");
      await plugin.pwrite(buf, offset, { fua: flags.fua && capabilities.fua === "native" });
      await afterWrite(flags.fua);
    },
    async flush() {
      if (plugin.flush) await plugin.flush();
    },
    async trim(offset, length, flags) {
      if (!plugin.trim) return; // trim is a hint
      await plugin.trim(offset, length, { fua: flags.fua && capabilities.fua === "native" });
      await afterWrite(flags.fua);
    },
    async zero(offset, length, flags) {
      if (!plugin.pwrite) throw new NbdError("EPERM", "the export is read-only");
      if (plugin.zero) {
        try {
          await plugin.zero(offset, length, {
            ...flags,
            fua: flags.fua && capabilities.fua === "native",
          });
          await afterWrite(flags.fua);
          return;
        } catch (error) {
          if (!(error instanceof NbdError && error.errno === "ENOTSUP") || flags.fast) throw error;
        }
      } else if (flags.fast) {
        throw new NbdError("ENOTSUP", "zeroing is emulated by writes, so it is not fast");
      }
      await writeZeroes(offset, length, flags.fua);
    },
    extents: plugin.extents
      ? (offset, length, flags) => plugin.extents!(offset, length, flags)
      : (_offset, length) => Promise.resolve([{ length, flags: 0 }]),
    cache: async (offset, length) => {
      if (plugin.cache) return await plugin.cache(offset, length);
      if (capabilities.cache !== "emulate") return;
      // Emulated prefetch: read the range and discard it, a chunk at a time.
      const scratch = new Uint8Array(Math.min(length, 1024 * 1024));
      for (let done = 0; done < length; done += scratch.length) {
        const n = Math.min(scratch.length, length - done);
        await plugin.pread(scratch.subarray(0, n), offset + done);
      }
    },
    close: async () => {
      if (plugin.close) await plugin.close();
    },
  };
  if (plugin.readView) backend.readView = (offset, length) => plugin.readView!(offset, length);
  if (plugin.fileRange) backend.fileRange = (offset, length) => plugin.fileRange!(offset, length);
  if (plugin.writeTarget && plugin.pwrite) {
    backend.writeTarget = (offset, length) => plugin.writeTarget!(offset, length);
  }
  // Emulated FUA needs a flush after the write, which bytes put in place would skip.
  if (plugin.writeView && plugin.pwrite && capabilities.fua !== "emulate") {
    backend.writeView = (offset, length) => plugin.writeView!(offset, length);
  }
  return backend;
}
