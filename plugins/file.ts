/**
 * The `file` plugin: serve a file or block device with positional I/O.
 * FLUSH is fsync; TRIM and zeroing punch holes (or zero ranges) where the
 * filesystem can (on Linux); block status comes from SEEK_DATA/SEEK_HOLE
 * where the platform has them. With `dir=` every regular file in a
 * directory is a named export. `cache=none` keeps the data out of the page
 * cache (io/uncached_io.ts) and `fadvise=` sets the readahead policy. Block
 * devices are sized, discarded and zeroed with their ioctls, and served
 * read-only when the kernel marks them so. Ranges all in the page cache
 * are offered to the server as ranges of the file (`fileRange`), which it
 * sends with sendfile, and WRITE payloads can be moved from a plain socket
 * into the file with splice (`writeTarget`). On the portable paths (io/platform.ts) reads and
 * writes go through node:fs alone.
 *
 * ```
 * nbd serve file disk.img
 * nbd serve -r file /dev/sdb
 * nbd serve file dir=/var/images
 * ```
 *
 * @module
 */

import * as fs from "node:fs";
import { NbdError } from "../protocol/errors.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import {
  completeBackend,
  type ExportInfo,
  type Extent,
  type OpenContext,
  type Plugin,
  type PluginBackend,
} from "../core/backend.ts";
import type { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import {
  adviseFile,
  blockDeviceInfo,
  discardRange,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  type FileAdvice,
  O_DIRECT,
  preadCached,
  preadOnThread,
  pwrite,
  pwriteOnThread,
  rangeCached,
  seekData,
  zeroOutRange,
} from "../io/libc.ts";
import { directAligned, PageCacheEviction, readDirect, writeDirect } from "../io/uncached_io.ts";
import { fileExtents } from "../io/file_extents.ts";
import { fileIo } from "../io/file_io.ts";
import { linuxOnly, platform } from "../io/platform.ts";

function readAt(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buf, 0, buf.length, position, (error, n) => error ? reject(error) : resolve(n))
  );
}

function writeAt(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.write(fd, buf, 0, buf.length, position, (error, n) => error ? reject(error) : resolve(n))
  );
}

function fsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.fsync(fd, (error) => error ? reject(error) : resolve())
  );
}

/** How the file plugin uses the page cache and advises the kernel (its cache= and fadvise=). */
export interface FileOptions {
  /** "none": O_DIRECT where allowed, else evict what was read or written. */
  cache: "default" | "none";
  /** posix_fadvise for the whole file, when given. */
  fadvise?: FileAdvice;
}

const DEFAULT_OPTIONS: FileOptions = { cache: "default" };

/**
 * Writes up to this size go into the page cache from the event loop's
 * thread; larger ones on a runtime thread, so that a long copy does not
 * hold up the other requests. nbdcopy's 256 KiB writes are below it: the
 * two thread wake-ups of a hand-off cost more than the copy (docs/performance.md).
 */
const SMALL_WRITE = 1024 * 1024;

/** Opens a file read-write when allowed, read-only otherwise (or when asked). */
function openFile(
  path: string,
  readonly: boolean,
  extraFlags = 0,
): { fd: number; writable: boolean } {
  if (!readonly) {
    try {
      return { fd: fs.openSync(path, fs.constants.O_RDWR | extraFlags), writable: true };
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code !== "EACCES" && code !== "EROFS" && code !== "EPERM") throw error;
    }
  }
  return { fd: fs.openSync(path, fs.constants.O_RDONLY | extraFlags), writable: false };
}

/** A second descriptor of `path` with O_DIRECT, or undefined where the filesystem refuses it. */
function openDirect(path: string, writable: boolean): number | undefined {
  try {
    return fs.openSync(path, (writable ? fs.constants.O_RDWR : fs.constants.O_RDONLY) | O_DIRECT);
  } catch {
    return undefined;
  }
}

/** Allocation of a file range as block status; all data where SEEK_DATA is unsupported. */
function extentsOf(fd: number, offset: number, length: number): Extent[] {
  const runs = fileExtents(fd, offset, length);
  if (!runs?.length) return [{ length, flags: 0 }];
  return runs.map((run) => ({
    length: run.length,
    flags: run.zero ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0,
  }));
}

/** Whether `path` is a block device that refuses writes (on the Linux fast paths). */
function readOnlyDevice(path: string): boolean {
  if (!platform().linuxFast) return false;
  let fd: number;
  try {
    fd = fs.openSync(path, fs.constants.O_RDONLY);
  } catch {
    return false;
  }
  try {
    return fs.fstatSync(fd).isBlockDevice() && blockDeviceInfo(fd)?.readOnly === true;
  } finally {
    fs.closeSync(fd);
  }
}

/** A backend over an open file descriptor. */
export function fileBackend(
  path: string,
  readonly: boolean,
  options: FileOptions = DEFAULT_OPTIONS,
): PluginBackend {
  let opened: { fd: number; writable: boolean };
  try {
    opened = openFile(path, readonly);
  } catch (error) {
    throw new NbdError("EIO", `cannot open ${path}: ${(error as Error).message}`);
  }
  let { fd, writable } = opened;
  const stat = fs.fstatSync(fd);
  const blockDevice = stat.isBlockDevice();
  /** The Linux fast paths: preadv2, pread/pwrite on a runtime thread, fallocate, ioctl. */
  const linux = platform().linuxFast;
  const device = blockDevice && linux ? blockDeviceInfo(fd) : undefined;
  if (device?.readOnly && writable) {
    // Opening a read-only device for writing succeeds; its writes would all fail.
    fs.closeSync(fd);
    fd = fs.openSync(path, fs.constants.O_RDONLY);
    writable = false;
  }
  const size = device?.size ?? (blockDevice ? fileIo.deviceSize(fd, path) : stat.size);
  const uncached = options.cache === "none" && linux;
  // Without readahead under cache=none: it would cache pages nobody asked for, in folios
  // larger than the range read, which eviction could not drop.
  const advice = options.fadvise ?? (uncached ? "random" : undefined);
  if (advice && linux) adviseFile(fd, advice);
  const directFd = uncached ? openDirect(path, writable) : undefined;
  const eviction = uncached ? new PageCacheEviction(fd) : undefined;
  let canPunch = linux && !blockDevice;
  /** Reads try the page cache first (RWF_NOWAIT) until the descriptor turns out not to support it. */
  let readCached = linux && !uncached;
  let canZeroRange = linux && !blockDevice;
  /** Block devices: discard, zero-out and fast zero (fallocate on the device) until one fails. */
  let canDiscard = device !== undefined;
  let canZeroOut = device !== undefined;
  let canFastZero = device !== undefined;
  const sector = device?.sectorSize ?? 512;
  const extentsSupported = !blockDevice && seekData(fd, 0) !== undefined;
  /** Ranges are offered for sendfile while cachestat answers (not under cache=none). */
  let canOfferRanges = linux && !uncached;

  /** Reads into `view` at `position`: the count (0 at the end of the file). */
  async function readSome(view: Uint8Array, position: number): Promise<number> {
    if (directFd !== undefined && directAligned(position, view.length)) {
      const n = await readDirect(directFd, view, position);
      if (n >= 0) return n;
    }
    // What the page cache holds is read at once; the rest on a runtime thread, so
    // that the event loop never waits for the disk.
    let n: number | undefined | null = readCached ? preadCached(fd, view, position) : null;
    if (n === null) readCached = false;
    if (n === undefined || n === null) {
      n = linux ? await preadOnThread(fd, view, position) : undefined;
    }
    // Failed, or the portable path: node:fs reads (and reports the error).
    if (n === undefined || n < 0) n = await readAt(fd, view, position);
    if (eviction && n > 0) await eviction.afterRead(position, n);
    return n;
  }

  /** Writes some of `view` at `position`: the count. */
  async function writeSome(view: Uint8Array, position: number): Promise<number> {
    if (directFd !== undefined && directAligned(position, view.length)) {
      const n = await writeDirect(directFd, view, position);
      if (n >= 0) return n;
    }
    // Small writes are made at once: handing one to a runtime thread costs the
    // event loop more than the copy into the page cache (docs/performance.md).
    let n = !linux
      ? undefined
      : view.length <= SMALL_WRITE
      ? pwrite(fd, view, position)
      : await pwriteOnThread(fd, view, position);
    // Failed, or the portable path: node:fs writes (and reports the error).
    if (n === undefined || n < 0) n = await writeAt(fd, view, position);
    if (eviction && n > 0) await eviction.afterWrite(position, n);
    return n;
  }

  /** The sector-aligned part of a range, or undefined when it has none. */
  function aligned(offset: number, length: number): [number, number] | undefined {
    const start = Math.ceil(offset / sector) * sector;
    const end = Math.floor((offset + length) / sector) * sector;
    return end > start ? [start, end - start] : undefined;
  }

  const backend: PluginBackend = {
    size: () => size,
    // Every byte: read, or zero past a shrunken end; a failed read is an error reply.
    preadFills: true,
    capabilities: () => ({
      writable,
      fua: writable ? "emulate" : "none",
      multiConn: true,
      extents: extentsSupported,
      rotational: false,
      extendable: writable && !blockDevice,
    }),
    async pread(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const n = await readSome(buf.subarray(done), offset + done);
        if (n === 0) {
          // The file shrank under us: what is past its end reads as zeroes.
          buf.fill(0, done);
          return;
        }
        done += n;
      }
    },
    fileRange(offset, length) {
      if (!canOfferRanges || offset + length > size) return undefined;
      // Only what is all in the page cache: sendfile on the event loop's
      // thread must never wait for the disk.
      const cached = rangeCached(fd, offset, length);
      if (cached === undefined) canOfferRanges = false;
      return cached ? { fd, offset } : undefined;
    },
    async flush() {
      await eviction?.drain();
      await fsync(fd);
    },
    extents(offset, length) {
      return Promise.resolve(extentsOf(fd, offset, length));
    },
    async close() {
      await eviction?.drain();
      if (directFd !== undefined) fs.closeSync(directFd);
      fs.closeSync(fd);
    },
  };
  if (writable) {
    backend.pwrite = async (buf, offset) => {
      let done = 0;
      while (done < buf.length) done += await writeSome(buf.subarray(done), offset + done);
    };
    // WRITE payloads may be spliced into the file where writes take no other path.
    if (linux && !uncached) backend.writeTarget = (offset) => ({ fd, offset });
    backend.trim = async (offset, length) => {
      // Trim is advisory: if holes cannot be punched, doing nothing is correct.
      if (
        canPunch &&
        !(await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))
      ) {
        canPunch = false;
      }
      const range = canDiscard ? aligned(offset, length) : undefined;
      if (range && !(await discardRange(fd, range[0], range[1]))) canDiscard = false;
    };
    backend.zero = async (offset, length, flags) => {
      if (flags.mayTrim && canPunch) {
        if (await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) return;
        canPunch = false;
      }
      if (canZeroRange) {
        if (await fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)) return;
        canZeroRange = false;
      }
      if (device && aligned(offset, length)?.[1] === length && offset % sector === 0) {
        // On a device, punching a hole zeroes without falling back to writes (so it
        // is fast, or fails) but may unmap; BLKZEROOUT zeroes however the device can.
        if (canFastZero && flags.mayTrim) {
          if (await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) {
            return;
          }
          canFastZero = false;
        }
        if (canZeroOut && !flags.fast) {
          if (await zeroOutRange(fd, offset, length)) return;
          canZeroOut = false;
        }
      }
      // Falls back to writing zeroes (or fails fast zero requests) centrally.
      throw new NbdError("ENOTSUP", "the filesystem cannot zero ranges quickly");
    };
  }
  return backend;
}

function checkExportName(name: string): void {
  if (name === "" || name === "." || name === ".." || name.includes("/") || name.includes("\0")) {
    throw new NbdError("EINVAL", `"${name}" is not a file name in the export directory`);
  }
}

/** Takes and checks cache= and fadvise=. */
function takeOptions(params: Params): FileOptions {
  const cache = params.take("cache") ?? "default";
  if (cache !== "default" && cache !== "none") {
    throw new UsageError(`file: cache must be default or none, not "${cache}"`);
  }
  const fadvise = params.take("fadvise");
  if (fadvise !== undefined && !["normal", "random", "sequential"].includes(fadvise)) {
    throw new UsageError(`file: fadvise must be normal, random or sequential, not "${fadvise}"`);
  }
  if (cache === "none") {
    const refusal = linuxOnly(
      "file: cache=none",
      "leave cache= out to serve the file through the page cache",
    );
    if (refusal) throw new UsageError(refusal);
  }
  return { cache, fadvise: fadvise as FileAdvice | undefined };
}

/** The file plugin. */
export const filePlugin: Plugin = {
  name: "file",
  summary: "serve a file or block device (dir= serves every file in a directory)",
  description:
    "Examples:\n  nbd serve file disk.img\n  nbd serve -r file /dev/sdb\n  nbd serve file dir=/var/images",
  params: [
    {
      name: "file",
      value: "FILENAME",
      type: "path",
      description: "the file or block device to serve (or dir=)",
    },
    {
      name: "dir",
      value: "DIRECTORY",
      type: "path",
      description: "serve each regular file in DIRECTORY as an export (or file=)",
    },
    {
      name: "cache",
      value: "MODE",
      type: "enum",
      choices: ["default", "none"],
      default: "default",
      description:
        "none: keep the data out of the page cache (O_DIRECT, else eviction after I/O; Linux)",
    },
    {
      name: "fadvise",
      value: "ADVICE",
      type: "enum",
      choices: ["normal", "random", "sequential"],
      default: "normal",
      description: "how clients will read the file, told to the kernel's readahead (Linux)",
    },
  ],
  magicParam: "file",
  async create(params) {
    const file = params.take("file");
    const dir = params.take("dir");
    if ((file === undefined) === (dir === undefined)) {
      throw new UsageError("file: give exactly one of file=FILENAME or dir=DIRECTORY");
    }
    const options = takeOptions(params);
    if (file !== undefined) {
      let stat: Deno.FileInfo;
      try {
        stat = await Deno.stat(file);
      } catch (error) {
        throw new Error(`Cannot serve ${file}: ${(error as Error).message}`);
      }
      if (stat.isDirectory) throw new UsageError(`file: ${file} is a directory (use dir=${file})`);
      if (readOnlyDevice(file)) {
        console.error(`nbd: file: ${file} is a read-only device: serving it read-only`);
      }
      return {
        open: (context: OpenContext) =>
          Promise.resolve(completeBackend(fileBackend(file, context.readonly, options))),
      };
    }
    const directory = dir!;
    try {
      if (!(await Deno.stat(directory)).isDirectory) {
        throw new UsageError(`file: ${directory} is not a directory`);
      }
    } catch (error) {
      if (error instanceof UsageError) throw error;
      throw new Error(`Cannot serve ${directory}: ${(error as Error).message}`);
    }
    const list = async (): Promise<ExportInfo[]> => {
      const names: string[] = [];
      for await (const entry of Deno.readDir(directory)) {
        if (entry.isFile) names.push(entry.name);
      }
      return names.sort().map((name) => ({ name }));
    };
    return {
      listExports: list,
      defaultExport: async () => (await list())[0]?.name ?? "",
      open(context: OpenContext) {
        checkExportName(context.exportName);
        return Promise.resolve(
          completeBackend(
            fileBackend(`${directory}/${context.exportName}`, context.readonly, options),
          ),
        );
      },
    };
  },
};
