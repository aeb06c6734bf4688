/**
 * The `file` plugin: serve a file or block device with positional I/O.
 * FLUSH is fsync; TRIM and zeroing punch holes (or zero ranges) where the
 * filesystem can (on Linux); block status comes from SEEK_DATA/SEEK_HOLE
 * where the platform has them. With `dir=` every regular file in a
 * directory is a named export. On the portable paths (io/platform.ts)
 * reads and writes go through node:fs alone.
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
import { UsageError } from "../util/usage_error.ts";
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fallocate,
  preadCached,
  preadOnThread,
  pwriteOnThread,
  seekData,
} from "../io/libc.ts";
import { fileExtents } from "../io/file_extents.ts";
import { fileIo } from "../io/file_io.ts";
import { platform } from "../io/platform.ts";

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

/** Opens a file read-write when allowed, read-only otherwise (or when asked). */
function openFile(path: string, readonly: boolean): { fd: number; writable: boolean } {
  if (!readonly) {
    try {
      return { fd: fs.openSync(path, "r+"), writable: true };
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code !== "EACCES" && code !== "EROFS" && code !== "EPERM") throw error;
    }
  }
  return { fd: fs.openSync(path, "r"), writable: false };
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

/** A backend over an open file descriptor. */
export function fileBackend(path: string, readonly: boolean): PluginBackend {
  let opened: { fd: number; writable: boolean };
  try {
    opened = openFile(path, readonly);
  } catch (error) {
    throw new NbdError("EIO", `cannot open ${path}: ${(error as Error).message}`);
  }
  const { fd, writable } = opened;
  const stat = fs.fstatSync(fd);
  const blockDevice = stat.isBlockDevice();
  const size = blockDevice ? fileIo.deviceSize(fd, path) : stat.size;
  /** The Linux fast paths: preadv2, pread/pwrite on a runtime thread, fallocate. */
  const linux = platform().linuxFast;
  let canPunch = linux && !blockDevice;
  /** Reads try the page cache first (RWF_NOWAIT) until the descriptor turns out not to support it. */
  let readCached = linux;
  let canZeroRange = linux && !blockDevice;
  const extentsSupported = !blockDevice && seekData(fd, 0) !== undefined;

  const backend: PluginBackend = {
    size: () => size,
    capabilities: () => ({
      writable,
      fua: writable ? "emulate" : "none",
      multiConn: true,
      extents: extentsSupported,
      rotational: false,
      extendable: writable,
    }),
    async pread(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const view = buf.subarray(done);
        const position = offset + done;
        // What the page cache holds is read at once; the rest on a runtime thread, so
        // that the event loop never waits for the disk.
        let n: number | undefined | null = readCached ? preadCached(fd, view, position) : null;
        if (n === null) readCached = false;
        if (n === undefined || n === null) {
          n = linux ? await preadOnThread(fd, view, position) : undefined;
        }
        // Failed, or the portable path: node:fs reads (and reports the error).
        if (n === undefined || n < 0) n = await readAt(fd, view, position);
        if (n === 0) {
          // The file shrank under us: what is past its end reads as zeroes.
          buf.fill(0, done);
          return;
        }
        done += n;
      }
    },
    flush: () => fsync(fd),
    extents(offset, length) {
      return Promise.resolve(extentsOf(fd, offset, length));
    },
    close() {
      fs.closeSync(fd);
      return Promise.resolve();
    },
  };
  if (writable) {
    backend.pwrite = async (buf, offset) => {
      let done = 0;
      while (done < buf.length) {
        const view = buf.subarray(done);
        let n = linux ? await pwriteOnThread(fd, view, offset + done) : undefined;
        // Failed, or the portable path: node:fs writes (and reports the error).
        if (n === undefined || n < 0) n = await writeAt(fd, view, offset + done);
        done += n;
      }
    };
    backend.trim = async (offset, length) => {
      // Trim is advisory: if holes cannot be punched, doing nothing is correct.
      if (
        canPunch &&
        !(await fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))
      ) {
        canPunch = false;
      }
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
  ],
  magicParam: "file",
  async create(params) {
    const file = params.take("file");
    const dir = params.take("dir");
    if ((file === undefined) === (dir === undefined)) {
      throw new UsageError("file: give exactly one of file=FILENAME or dir=DIRECTORY");
    }
    if (file !== undefined) {
      let stat: Deno.FileInfo;
      try {
        stat = await Deno.stat(file);
      } catch (error) {
        throw new Error(`Cannot serve ${file}: ${(error as Error).message}`);
      }
      if (stat.isDirectory) throw new UsageError(`file: ${file} is a directory (use dir=${file})`);
      return {
        open: (context: OpenContext) =>
          Promise.resolve(completeBackend(fileBackend(file, context.readonly))),
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
          completeBackend(fileBackend(`${directory}/${context.exportName}`, context.readonly)),
        );
      },
    };
  },
};
