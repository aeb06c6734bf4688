/**
 * The `rbd` plugin: a Ceph RBD image (or a snapshot of one, read-only)
 * through librbd, Ceph's own client library. Every connection shares one
 * open image, so one librbd cache and one exclusive lock serve them all:
 * a flush on any connection covers every write any of them completed,
 * which is what multi-conn promises.
 *
 * ```
 * nbd serve rbd rbd/disk
 * nbd serve rbd pool/disk@snap conf=/etc/ceph/ceph.conf id=admin
 * ```
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import { type ErrnoName, NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  completeBackend,
  type Extent,
  type OpenContext,
  type Plugin,
  type PluginBackend,
} from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import {
  CephError,
  LibraryMissingError,
  RadosCluster,
  type RadosIoContext,
  RbdImage,
} from "../io/librbd.ts";

/** Where an image is: pool, optional namespace, image name, optional snapshot. */
export interface RbdSpec {
  /** Pool name. */
  pool: string;
  /** Namespace within the pool ("" = the default one). */
  namespace: string;
  /** Image name. */
  image: string;
  /** Snapshot name, if any. */
  snapshot?: string;
}

/**
 * Parses `[POOL/[NAMESPACE/]]IMAGE[@SNAPSHOT]` the way the rbd tool does
 * (the pool defaults to "rbd").
 */
export function parseRbdSpec(text: string): RbdSpec {
  let rest = text;
  let snapshot: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    snapshot = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (snapshot === "") throw new UsageError(`rbd: empty snapshot name in "${text}"`);
  }
  const parts = rest.split("/");
  if (parts.length > 3 || parts.some((p) => p === "")) {
    throw new UsageError(`rbd: expected POOL/[NAMESPACE/]IMAGE[@SNAPSHOT], got "${text}"`);
  }
  const image = parts.pop()!;
  const pool = parts.length > 0 ? parts.shift()! : "rbd";
  const namespace = parts.shift() ?? "";
  return { pool, namespace, image, snapshot };
}

/** Maps a librbd errno to the NBD error to send. */
function wireError(error: unknown): unknown {
  if (!(error instanceof CephError)) return error;
  const names: Record<number, ErrnoName> = {
    1: "EPERM",
    13: "EPERM",
    30: "EPERM",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    122: "ENOSPC",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
  };
  return new NbdError(names[error.errno] ?? "EIO", error.message);
}

async function mapped<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (error) {
    throw wireError(error);
  }
}

/** Block status reports at most this much per request, to bound the work of one answer. */
const MAX_EXTENTS_SPAN = 4 * 1024 * 1024 * 1024;

/** A backend over the shared image for one connection. */
function rbdBackend(image: RbdImage, readonly: boolean): PluginBackend {
  const writable = !readonly && !image.readonly;
  const backend: PluginBackend = {
    size: () => image.size,
    capabilities: () => ({
      writable,
      fua: writable ? "emulate" : "none",
      // One image handle (one cache, one lock) serves every connection.
      multiConn: true,
      extents: true,
      fastZero: writable && image.canWriteZeroes,
      blockSize: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
    }),
    pread: (buf, offset) => mapped(image.read(buf, offset)),
    flush: () => mapped(image.flush()),
    async extents(offset, length, flags) {
      const span = Math.min(length, flags.reqOne ? image.objectSize : MAX_EXTENTS_SPAN);
      const end = offset + span;
      const allocated = await mapped(image.allocated(offset, span, image.fastDiff));
      const out: Extent[] = [];
      let pos = offset;
      for (const extent of allocated) {
        const start = Math.max(extent.offset, pos);
        const stop = Math.min(extent.offset + extent.length, end);
        if (stop <= start) continue;
        if (start > pos) out.push({ length: start - pos, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
        out.push({ length: stop - start, flags: 0 });
        pos = stop;
      }
      if (pos < end) out.push({ length: end - pos, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
      // Neighbours with the same flags read better as one extent.
      const merged: Extent[] = [];
      for (const extent of out) {
        const last = merged[merged.length - 1];
        if (last && last.flags === extent.flags) last.length += extent.length;
        else merged.push({ ...extent });
      }
      return flags.reqOne ? merged.slice(0, 1) : merged;
    },
  };
  if (writable) {
    backend.pwrite = (buf, offset) => mapped(image.write(buf, offset));
    backend.trim = (offset, length) => mapped(image.discard(offset, length));
    backend.zero = async (offset, length, flags) => {
      if (image.canWriteZeroes) {
        // Without NO_HOLE, librbd deallocates whole objects and zeroes the edges: fast.
        // With it, thick provisioning writes zeroes, which is not fast.
        if (flags.fast && !flags.mayTrim) {
          throw new NbdError("ENOTSUP", "allocated zeroes are written, not fast");
        }
        return await mapped(image.writeZeroes(offset, length, !flags.mayTrim));
      }
      if (flags.mayTrim) {
        // Older librbd: discard, then check that the range now reads as a hole
        // (a discard of part of an object may leave data behind).
        await mapped(image.discard(offset, length));
        const left = await mapped(image.allocated(offset, length, false));
        if (left.length === 0) return;
      }
      throw new NbdError("ENOTSUP", "this librbd cannot zero ranges");
    };
  }
  return backend;
}

/** The rbd plugin. */
export const rbdPlugin: Plugin = {
  name: "rbd",
  summary: "a Ceph RBD image or snapshot through librbd",
  description: "Examples:\n  nbd serve rbd rbd/disk\n" +
    "  nbd serve rbd pool/disk@snap conf=/etc/ceph/ceph.conf id=admin",
  params: [
    {
      name: "image",
      value: "[POOL/[NAMESPACE/]]IMAGE[@SNAPSHOT]",
      type: "string",
      description: "the image (pool rbd by default); a snapshot is served read-only",
      required: true,
    },
    {
      name: "conf",
      value: "FILE",
      type: "path",
      description: "ceph.conf to read (when not given: $CEPH_CONF, then /etc/ceph/ceph.conf)",
    },
    {
      name: "id",
      value: "NAME",
      type: "string",
      default: "admin",
      description: "client id, without client.",
    },
    {
      name: "keyring",
      value: "FILE",
      type: "path",
      description: "keyring holding the client's key",
    },
    { name: "namespace", value: "NAME", type: "string", description: "namespace within the pool" },
  ],
  magicParam: "image",
  async create(params) {
    const spec = parseRbdSpec(params.take("image")!);
    const namespace = params.take("namespace");
    if (namespace !== undefined) {
      if (spec.namespace !== "" && spec.namespace !== namespace) {
        throw new UsageError("rbd: the namespace is given twice, differently");
      }
      spec.namespace = namespace;
    }
    const conf = params.take("conf");
    const id = params.take("id");
    const keyring = params.take("keyring");
    let cluster: RadosCluster | undefined;
    let io: RadosIoContext | undefined;
    let image: RbdImage;
    try {
      cluster = await RadosCluster.connect({ conf, id, keyring });
      io = cluster.ioContext(spec.pool, spec.namespace);
      const label = [spec.pool, spec.namespace, spec.image].filter(Boolean).join("/");
      image = await RbdImage.open(io, spec.image, { snapshot: spec.snapshot, label });
    } catch (error) {
      io?.destroy();
      await cluster?.shutdown();
      if (error instanceof LibraryMissingError || error instanceof CephError) {
        throw new Error(`rbd: ${error.message}`);
      }
      throw error;
    }
    return {
      open: (context: OpenContext) =>
        Promise.resolve(completeBackend(rbdBackend(image, context.readonly))),
      async close() {
        try {
          await image.close();
        } finally {
          io!.destroy();
          await cluster!.shutdown();
        }
      },
    };
  },
};
