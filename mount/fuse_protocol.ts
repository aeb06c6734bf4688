/**
 * The FUSE kernel protocol (linux/fuse.h, version 7): opcodes, flags and
 * the byte layout of the requests read from /dev/fuse and the replies
 * written back. Pure encoding and decoding, no I/O. All fields are
 * little-endian on the machines this runs on (x86-64, arm64).
 *
 * @module
 */

/** Protocol major version spoken here. */
export const FUSE_KERNEL_VERSION = 7;
/** Highest minor version whose structures this module knows. */
export const FUSE_KERNEL_MINOR_VERSION = 31;
/** Node id of the mount's root. */
export const FUSE_ROOT_ID = 1;

/** Opcodes of the requests the kernel sends. */
export const FUSE_LOOKUP = 1;
/** Drop lookups of a node; no reply. */
export const FUSE_FORGET = 2;
/** stat. */
export const FUSE_GETATTR = 3;
/** chmod, chown, truncate, utimes. */
export const FUSE_SETATTR = 4;
/** open(2) of a file. */
export const FUSE_OPEN = 14;
/** Read file data. */
export const FUSE_READ = 15;
/** Write file data. */
export const FUSE_WRITE = 16;
/** statfs(2). */
export const FUSE_STATFS = 17;
/** Last close of an open file. */
export const FUSE_RELEASE = 18;
/** fsync(2) / fdatasync(2). */
export const FUSE_FSYNC = 20;
/** close(2) of one descriptor. */
export const FUSE_FLUSH = 25;
/** The first request: protocol negotiation. */
export const FUSE_INIT = 26;
/** opendir. */
export const FUSE_OPENDIR = 27;
/** Read directory entries. */
export const FUSE_READDIR = 28;
/** Last close of a directory. */
export const FUSE_RELEASEDIR = 29;
/** fsync of a directory. */
export const FUSE_FSYNCDIR = 30;
/** access(2). */
export const FUSE_ACCESS = 34;
/** The kernel gave up waiting for a request; no reply. */
export const FUSE_INTERRUPT = 36;
/** The file system is going away. */
export const FUSE_DESTROY = 38;
/** FORGET for many nodes; no reply. */
export const FUSE_BATCH_FORGET = 42;
/** fallocate(2). */
export const FUSE_FALLOCATE = 43;
/** lseek(2) with SEEK_DATA / SEEK_HOLE. */
export const FUSE_LSEEK = 46;
/** syncfs(2). */
export const FUSE_SYNCFS = 50;

/** INIT flags (the low 32 bits; the protocol's flags2 holds the rest). */
export const FUSE_ASYNC_READ = 1 << 0;
/** Writes larger than one page. */
export const FUSE_BIG_WRITES = 1 << 5;
/** O_DIRECT requests are submitted asynchronously (in parallel). */
export const FUSE_ASYNC_DIO = 1 << 15;
/** `max_pages` in the INIT reply is valid. */
export const FUSE_MAX_PAGES = 1 << 22;

/** OPEN reply flag: keep cached pages from earlier opens. */
export const FOPEN_KEEP_CACHE = 1 << 1;
/** O_DIRECT writes need not hold the inode lock (we handle concurrency). */
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

/** SETATTR `valid` bits. */
export const FATTR_MODE = 1 << 0;
/** Owner change. */
export const FATTR_UID = 1 << 1;
/** Group change. */
export const FATTR_GID = 1 << 2;
/** Size change (truncate). */
export const FATTR_SIZE = 1 << 3;
/** Access time. */
export const FATTR_ATIME = 1 << 4;
/** Modification time. */
export const FATTR_MTIME = 1 << 5;
/** Access time = now. */
export const FATTR_ATIME_NOW = 1 << 7;
/** Modification time = now. */
export const FATTR_MTIME_NOW = 1 << 8;

/** fallocate(2) modes. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** Deallocate the range; it reads back as zeroes. */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** Make the range read as zeroes, keeping it allocated. */
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** lseek whence values. */
export const SEEK_DATA = 3;
/** Next hole. */
export const SEEK_HOLE = 4;

/** File type bits of a mode. */
export const S_IFDIR = 0o040000;
/** Regular file. */
export const S_IFREG = 0o100000;
/** Directory entry types. */
export const DT_DIR = 4;
/** Regular file entry. */
export const DT_REG = 8;

/** Size of `fuse_in_header`. */
export const IN_HEADER_SIZE = 40;
/** Size of `fuse_out_header`. */
export const OUT_HEADER_SIZE = 16;
/** Size of `fuse_write_in` (which precedes the data of a WRITE). */
export const WRITE_IN_SIZE = 40;
/** Size of `fuse_attr`. */
const ATTR_SIZE = 88;
/** Size of `fuse_entry_out`. */
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
/** Size of `fuse_attr_out`. */
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
/** Size of `fuse_init_out` (minor version 23 and later). */
const INIT_OUT_SIZE = 64;
/** Size of `fuse_open_out`. */
const OPEN_OUT_SIZE = 16;
/** Size of `fuse_write_out`. */
const WRITE_OUT_SIZE = 8;
/** Size of `fuse_statfs_out`. */
const STATFS_OUT_SIZE = 80;
/** Size of `fuse_lseek_out`. */
const LSEEK_OUT_SIZE = 8;

/** The fixed header of every request. */
export interface RequestHeader {
  /** Total length of the request, header included. */
  length: number;
  /** What the kernel asks for (FUSE_*). */
  opcode: number;
  /** Request id, echoed in the reply. */
  unique: bigint;
  /** The node the request is about. */
  nodeid: number;
  /** Caller's user id. */
  uid: number;
  /** Caller's group id. */
  gid: number;
  /** Caller's process id. */
  pid: number;
}

/** Decodes the header at the start of a request. */
export function decodeRequestHeader(view: DataView): RequestHeader {
  return {
    length: view.getUint32(0, true),
    opcode: view.getUint32(4, true),
    unique: view.getBigUint64(8, true),
    nodeid: Number(view.getBigUint64(16, true)),
    uid: view.getUint32(24, true),
    gid: view.getUint32(28, true),
    pid: view.getUint32(32, true),
  };
}

/** Reads a u64 field that must fit in a JavaScript number. */
export function getU64(view: DataView, offset: number): number {
  const value = view.getBigUint64(offset, true);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
}

/** `fuse_init_in`. */
export interface InitIn {
  /** Kernel's major version. */
  major: number;
  /** Kernel's minor version. */
  minor: number;
  /** Largest readahead the kernel will do. */
  maxReadahead: number;
  /** Capabilities the kernel offers (low 32 bits). */
  flags: number;
}

/** Decodes the body of INIT (at `IN_HEADER_SIZE`). */
export function decodeInitIn(view: DataView): InitIn {
  const at = IN_HEADER_SIZE;
  return {
    major: view.getUint32(at, true),
    minor: view.getUint32(at + 4, true),
    maxReadahead: view.getUint32(at + 8, true),
    flags: view.getUint32(at + 12, true),
  };
}

/** What this file system answers to INIT. */
export interface InitOut {
  /** Minor version to speak. */
  minor: number;
  /** Largest readahead wanted. */
  maxReadahead: number;
  /** Capabilities accepted. */
  flags: number;
  /** Requests the kernel may have in flight in the background (readahead, writeback). */
  maxBackground: number;
  /** Background requests past which writers are throttled. */
  congestionThreshold: number;
  /** Largest WRITE payload. */
  maxWrite: number;
  /** Largest request in pages. */
  maxPages: number;
}

/** Sizes of each version of the INIT reply. */
function initOutSize(minor: number): number {
  if (minor < 5) return 8;
  if (minor < 23) return 24;
  return INIT_OUT_SIZE;
}

/** Encodes the INIT reply for a unique id. */
export function encodeInitOut(unique: bigint, out: InitOut): Uint8Array<ArrayBuffer> {
  const size = initOutSize(out.minor);
  const { bytes, view } = replyBuffer(unique, 0, size);
  const at = OUT_HEADER_SIZE;
  view.setUint32(at, FUSE_KERNEL_VERSION, true);
  view.setUint32(at + 4, out.minor, true);
  if (size > 8) {
    view.setUint32(at + 8, out.maxReadahead, true);
    view.setUint32(at + 12, out.flags, true);
    view.setUint16(at + 16, out.maxBackground, true);
    view.setUint16(at + 18, out.congestionThreshold, true);
    view.setUint32(at + 20, out.maxWrite, true);
  }
  if (size > 24) {
    view.setUint32(at + 24, 1, true); // time_gran: timestamps are exact to the nanosecond
    view.setUint16(at + 28, out.maxPages, true);
  }
  return bytes;
}

/** A reply: header filled in, body zeroed, ready for the caller to fill. */
function replyBuffer(
  unique: bigint,
  error: number,
  bodySize: number,
): { bytes: Uint8Array<ArrayBuffer>; view: DataView } {
  const bytes = new Uint8Array(OUT_HEADER_SIZE + bodySize);
  const view = new DataView(bytes.buffer);
  writeReplyHeader(view, unique, error, bytes.length);
  return { bytes, view };
}

/** Fills in a reply header; `error` is a positive errno (0 = success). */
export function writeReplyHeader(
  view: DataView,
  unique: bigint,
  error: number,
  length: number,
): void {
  view.setUint32(0, length, true);
  view.setInt32(4, -error, true);
  view.setBigUint64(8, unique, true);
}

/** An error reply (header only). */
export function encodeError(unique: bigint, errno: number): Uint8Array<ArrayBuffer> {
  return replyBuffer(unique, errno, 0).bytes;
}

/** File attributes as FUSE carries them. */
export interface Attributes {
  /** Inode number. */
  ino: number;
  /** Size in bytes. */
  size: number;
  /** Allocated 512-byte blocks. */
  blocks: number;
  /** Access time in milliseconds since the epoch. */
  atimeMs: number;
  /** Modification time in milliseconds since the epoch. */
  mtimeMs: number;
  /** Status change time in milliseconds since the epoch. */
  ctimeMs: number;
  /** Type and permission bits. */
  mode: number;
  /** Link count. */
  nlink: number;
  /** Owner. */
  uid: number;
  /** Group. */
  gid: number;
  /** Preferred I/O size. */
  blksize: number;
}

function setTime(view: DataView, secondsAt: number, nanosAt: number, ms: number): void {
  const seconds = Math.floor(ms / 1000);
  view.setBigUint64(secondsAt, BigInt(seconds), true);
  view.setUint32(nanosAt, Math.round((ms - seconds * 1000) * 1e6), true);
}

/** Encodes `fuse_attr` at `at`. */
function encodeAttr(view: DataView, at: number, attr: Attributes): void {
  view.setBigUint64(at, BigInt(attr.ino), true);
  view.setBigUint64(at + 8, BigInt(attr.size), true);
  view.setBigUint64(at + 16, BigInt(attr.blocks), true);
  setTime(view, at + 24, at + 48, attr.atimeMs);
  setTime(view, at + 32, at + 52, attr.mtimeMs);
  setTime(view, at + 40, at + 56, attr.ctimeMs);
  view.setUint32(at + 60, attr.mode, true);
  view.setUint32(at + 64, attr.nlink, true);
  view.setUint32(at + 68, attr.uid, true);
  view.setUint32(at + 72, attr.gid, true);
  view.setUint32(at + 76, 0, true); // rdev
  view.setUint32(at + 80, attr.blksize, true);
  view.setUint32(at + 84, 0, true); // flags
}

/** Splits seconds into the whole seconds and nanoseconds FUSE wants. */
function setValidity(view: DataView, secondsAt: number, nanosAt: number, seconds: number): void {
  const whole = Math.floor(seconds);
  view.setBigUint64(secondsAt, BigInt(whole), true);
  view.setUint32(nanosAt, Math.round((seconds - whole) * 1e9), true);
}

/** The reply to LOOKUP. */
export function encodeEntryOut(
  unique: bigint,
  attr: Attributes,
  validSeconds: number,
): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, ENTRY_OUT_SIZE);
  const at = OUT_HEADER_SIZE;
  view.setBigUint64(at, BigInt(attr.ino), true); // nodeid = inode number here
  view.setBigUint64(at + 8, 0n, true); // generation
  setValidity(view, at + 16, at + 32, validSeconds); // entry_valid
  setValidity(view, at + 24, at + 36, validSeconds); // attr_valid
  encodeAttr(view, at + 40, attr);
  return bytes;
}

/** The reply to GETATTR and SETATTR. */
export function encodeAttrOut(
  unique: bigint,
  attr: Attributes,
  validSeconds: number,
): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, ATTR_OUT_SIZE);
  const at = OUT_HEADER_SIZE;
  setValidity(view, at, at + 8, validSeconds);
  encodeAttr(view, at + 16, attr);
  return bytes;
}

/** The reply to OPEN and OPENDIR. */
export function encodeOpenOut(
  unique: bigint,
  fh: number,
  openFlags: number,
): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, OPEN_OUT_SIZE);
  view.setBigUint64(OUT_HEADER_SIZE, BigInt(fh), true);
  view.setUint32(OUT_HEADER_SIZE + 8, openFlags, true);
  return bytes;
}

/** The reply to WRITE. */
export function encodeWriteOut(unique: bigint, size: number): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, WRITE_OUT_SIZE);
  view.setUint32(OUT_HEADER_SIZE, size, true);
  return bytes;
}

/** The reply to LSEEK. */
export function encodeLseekOut(unique: bigint, offset: number): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, LSEEK_OUT_SIZE);
  view.setBigUint64(OUT_HEADER_SIZE, BigInt(offset), true);
  return bytes;
}

/** File-system statistics for STATFS. */
export interface StatFs {
  /** Total blocks of `blockSize`. */
  blocks: number;
  /** Free blocks. */
  free: number;
  /** Block size. */
  blockSize: number;
  /** Number of files. */
  files: number;
}

/** The reply to STATFS. */
export function encodeStatfsOut(unique: bigint, st: StatFs): Uint8Array<ArrayBuffer> {
  const { bytes, view } = replyBuffer(unique, 0, STATFS_OUT_SIZE);
  const at = OUT_HEADER_SIZE;
  view.setBigUint64(at, BigInt(st.blocks), true);
  view.setBigUint64(at + 8, BigInt(st.free), true);
  view.setBigUint64(at + 16, BigInt(st.free), true); // bavail
  view.setBigUint64(at + 24, BigInt(st.files), true);
  view.setBigUint64(at + 32, 0n, true); // ffree
  view.setUint32(at + 40, st.blockSize, true);
  view.setUint32(at + 44, 255, true); // namelen
  view.setUint32(at + 48, st.blockSize, true); // frsize
  return bytes;
}

/** One directory entry for READDIR. */
export interface DirEntry {
  /** Inode number. */
  ino: number;
  /** Name. */
  name: string;
  /** DT_* type. */
  type: number;
}

const encoder = new TextEncoder();

/**
 * The reply to READDIR: the entries from index `offset` on, as many as fit
 * in `maxSize` bytes. Each entry's `off` is the index of the next one.
 */
export function encodeDirents(
  unique: bigint,
  entries: readonly DirEntry[],
  offset: number,
  maxSize: number,
): Uint8Array<ArrayBuffer> {
  const parts: { entry: DirEntry; name: Uint8Array; size: number; next: number }[] = [];
  let total = 0;
  for (let i = offset; i < entries.length; i++) {
    const entry = entries[i]!;
    const name = encoder.encode(entry.name);
    const size = (24 + name.length + 7) & ~7;
    if (total + size > maxSize) break;
    parts.push({ entry, name, size, next: i + 1 });
    total += size;
  }
  const { bytes, view } = replyBuffer(unique, 0, total);
  let at = OUT_HEADER_SIZE;
  for (const part of parts) {
    view.setBigUint64(at, BigInt(part.entry.ino), true);
    view.setBigUint64(at + 8, BigInt(part.next), true);
    view.setUint32(at + 16, part.name.length, true);
    view.setUint32(at + 20, part.entry.type, true);
    bytes.set(part.name, at + 24);
    at += part.size;
  }
  return bytes;
}

/** Reads the NUL-terminated name that follows the header (LOOKUP). */
export function decodeName(bytes: Uint8Array, at: number, end: number): string {
  let stop = at;
  while (stop < end && bytes[stop] !== 0) stop++;
  return new TextDecoder().decode(bytes.subarray(at, stop));
}
