/**
 * The `iso` plugin: a read-only ISO 9660 image of a directory, generated
 * on the fly. Only the metadata (volume descriptors, path tables,
 * directory records, Rock Ridge and Joliet entries) is built, in memory,
 * when the server starts; file data is read from the files when clients
 * read it. Rock Ridge (RRIP 1.10) carries long names, permissions,
 * owners, timestamps and symbolic links; Joliet carries UCS-2 names in a
 * second directory tree that shares the file data. Files of 4 GiB and
 * more are split over several extents (multi-extent records), and
 * directories may nest deeper than ISO 9660's eight levels.
 *
 * ```
 * nbd serve iso /path/to/dir
 * nbd serve iso dir=/path/to/dir label=INSTALL joliet=false
 * ```
 *
 * @module
 */

import * as fs from "node:fs";
import { NbdError } from "../protocol/errors.ts";
import { completeBackend, type Plugin } from "../core/backend.ts";
import { preadCached, preadOnThread, seekData, seekEnd, seekHole } from "../io/libc.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";
import type { Extent } from "../protocol/transmission.ts";
import { UsageError } from "../util/usage_error.ts";

const SECTOR = 2048;
/** The first volume descriptor follows the 32 KiB system area. */
const FIRST_DESCRIPTOR = 16;
/** The largest extent a directory record can describe, a whole number of sectors. */
const MAX_EXTENT = 0xfffff800;
/** How often (at most) a source file's size is compared with the image's idea of it. */
const SIZE_CHECK_MS = 100;
/** Zero sectors after the last one in use. */
const PADDING_SECTORS = 150;
/** Directory records and SUSP entries are at most this long. */
const MAX_RECORD = 255;
/** A SUSP continuation area (CE entry) is this long. */
const CE_LENGTH = 28;
/** Path tables number directories with 16 bits. */
const MAX_DIRECTORIES = 0xffff;
/** Joliet names are at most 64 UCS-2 characters. */
const JOLIET_MAX = 64;
/** ISO 9660 level-2 names: 30 characters for a file's name and extension, 31 for a directory. */
const ISO_FILE_MAX = 30;
const ISO_DIR_MAX = 31;

const FLAG_DIRECTORY = 0x02;
const FLAG_MULTI_EXTENT = 0x80;

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

const encoder = new TextEncoder();

/** A file, directory or symbolic link of the tree being served. */
interface Entry {
  name: string;
  path: string;
  kind: "dir" | "file" | "symlink";
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: Date;
  atime: Date;
  ctime: Date;
  target: string;
  /** Children in primary (ISO name) order, then in Joliet order. */
  children: Entry[];
  jolietChildren: Entry[];
  parent: Entry | undefined;
  isoName: Uint8Array;
  jolietName: Uint8Array;
  /** First sector of the file data, or of the primary / Joliet directory extent. */
  extent: number;
  jolietExtent: number;
  /** Directory extent sizes in bytes (whole sectors). */
  dirBytes: number;
  jolietDirBytes: number;
  /** Directory numbers in the path tables (1 = root). */
  number: number;
  jolietNumber: number;
}

/** Scan options. */
interface Options {
  rock: boolean;
  joliet: boolean;
}

function dateOf(d: Date | null): Date {
  return d ?? new Date(0);
}

/** Whether `path` exists (without following a final symbolic link). */
async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** Reads the tree under `path`. Unreadable files are found now, not while serving. */
async function scan(path: string, name: string, parent: Entry | undefined, options: Options) {
  const info = await Deno.lstat(path);
  const kind = info.isDirectory ? "dir" : info.isSymlink ? "symlink" : "file";
  const entry: Entry = {
    name,
    path,
    kind,
    size: kind === "file" ? info.size : 0,
    mode: (info.mode ?? 0o644) & 0o7777,
    uid: info.uid ?? 0,
    gid: info.gid ?? 0,
    mtime: dateOf(info.mtime),
    atime: dateOf(info.atime ?? info.mtime),
    ctime: dateOf(info.ctime ?? info.mtime),
    target: kind === "symlink" ? await Deno.readLink(path) : "",
    children: [],
    jolietChildren: [],
    parent,
    isoName: new Uint8Array(0),
    jolietName: new Uint8Array(0),
    extent: 0,
    jolietExtent: 0,
    dirBytes: 0,
    jolietDirBytes: 0,
    number: 0,
    jolietNumber: 0,
  };
  if (kind === "file") {
    // Fail at start-up, with the file's name, rather than with EIO later.
    fs.closeSync(fs.openSync(path, "r"));
    return entry;
  }
  if (kind !== "dir") return entry;
  const names: string[] = [];
  for await (const child of Deno.readDir(path)) {
    // Rock Ridge can describe symbolic links; plain ISO 9660 and Joliet cannot.
    if (child.isFile || child.isDirectory || (child.isSymlink && options.rock)) {
      names.push(child.name);
    }
  }
  names.sort();
  for (const child of names) {
    // The runtime decodes names as UTF-8, replacing what is not: such a name cannot be
    // opened again, and would otherwise fail later as a missing file.
    if (child.includes("\uFFFD") && !(await exists(`${path}/${child}`))) {
      throw new UsageError(
        `iso: a name in ${path} is not valid UTF-8 (read as "${child}"): rename it`,
      );
    }
    entry.children.push(await scan(`${path}/${child}`, child, entry, options));
  }
  return entry;
}

/** ISO 9660 d-characters: upper-case letters, digits and underscore. */
function dChars(text: string): string {
  return text.toUpperCase().replace(/[^A-Z0-9_]/g, "_");
}

function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i]! - b[i]!;
  return a.length - b.length;
}

/**
 * Gives the children of `dir` ISO 9660 level-2 names, unique within it:
 * upper-case d-characters, files as NAME.EXT;1. Names that do not fit are
 * cut and, when that makes them collide, end in _N.
 */
function isoNames(dir: Entry): void {
  const used = new Set<string>();
  for (const child of dir.children) {
    let base: string;
    let ext = "";
    if (child.kind === "dir") {
      base = dChars(child.name);
    } else {
      const dot = child.name.lastIndexOf(".");
      base = dChars(dot >= 0 ? child.name.slice(0, dot) : child.name);
      ext = dot >= 0 ? dChars(child.name.slice(dot + 1)).slice(0, 8) : "";
    }
    const max = child.kind === "dir" ? ISO_DIR_MAX : ISO_FILE_MAX - 1 - ext.length;
    const make = (b: string) => child.kind === "dir" ? b : `${b}.${ext}`;
    let candidate = base.slice(0, max);
    if (candidate === "" && ext === "") candidate = "_";
    for (let n = 1; used.has(make(candidate)); n++) {
      const tail = `_${n}`;
      candidate = base.slice(0, max - tail.length) + tail;
    }
    used.add(make(candidate));
    child.isoName = encoder.encode(make(candidate) + (child.kind === "dir" ? "" : ";1"));
  }
  dir.children.sort((a, b) => compareBytes(a.isoName, b.isoName));
}

function utf16be(text: string): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    out[2 * i] = c >> 8;
    out[2 * i + 1] = c & 0xff;
  }
  return out;
}

/**
 * Gives the children of `dir` Joliet names: UCS-2, at most 64 characters
 * (longer names keep their extension and end in _N when cut), without the
 * characters Joliet forbids.
 */
function jolietNames(dir: Entry): void {
  const used = new Set<string>();
  for (const child of dir.children) {
    // Joliet forbids these characters and the control characters.
    const clean = [...child.name].map((ch) => "*/:;?\\".includes(ch) || ch < " " ? "_" : ch)
      .join("");
    let name = clean;
    if (name.length > JOLIET_MAX || used.has(name)) {
      const dot = clean.lastIndexOf(".");
      const ext = child.kind !== "dir" && dot > 0 && clean.length - dot <= 16
        ? clean.slice(dot)
        : "";
      const base = ext ? clean.slice(0, dot) : clean;
      name = base.slice(0, JOLIET_MAX - ext.length) + ext;
      for (let n = 1; used.has(name) || name.length > JOLIET_MAX; n++) {
        const tail = `_${n}${ext}`;
        name = base.slice(0, JOLIET_MAX - tail.length) + tail;
        if (n > 1_000_000) break;
      }
    }
    used.add(name);
    child.jolietName = utf16be(name);
  }
  dir.jolietChildren = dir.children.filter((c) => c.kind !== "symlink");
  dir.jolietChildren.sort((a, b) => compareBytes(a.jolietName, b.jolietName));
}

// ---- Encoding helpers ------------------------------------------------------

function both16(out: Uint8Array, at: number, value: number): void {
  const view = new DataView(out.buffer, out.byteOffset);
  view.setUint16(at, value, true);
  view.setUint16(at + 2, value, false);
}

function both32(out: Uint8Array, at: number, value: number): void {
  const view = new DataView(out.buffer, out.byteOffset);
  view.setUint32(at, value, true);
  view.setUint32(at + 4, value, false);
}

/** The 7-byte date of directory records and Rock Ridge TF entries, in UTC. */
function shortDate(d: Date): Uint8Array {
  const year = Math.min(Math.max(d.getUTCFullYear(), 1900), 2155);
  return new Uint8Array([
    year - 1900,
    d.getUTCMonth() + 1,
    d.getUTCDate(),
    d.getUTCHours(),
    d.getUTCMinutes(),
    d.getUTCSeconds(),
    0,
  ]);
}

/** The 17-byte date of volume descriptors, in UTC. */
function longDate(d: Date): Uint8Array {
  const year = Math.min(Math.max(d.getUTCFullYear(), 1), 9999);
  const pad = (n: number, w: number) => String(n).padStart(w, "0");
  const text = pad(year, 4) + pad(d.getUTCMonth() + 1, 2) + pad(d.getUTCDate(), 2) +
    pad(d.getUTCHours(), 2) + pad(d.getUTCMinutes(), 2) + pad(d.getUTCSeconds(), 2) + "00";
  const out = new Uint8Array(17);
  out.set(encoder.encode(text));
  return out;
}

/** A SUSP entry: signature, length, version 1, then `body`. */
function suspEntry(signature: string, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + body.length);
  out.set(encoder.encode(signature));
  out[2] = out.length;
  out[3] = 1;
  out.set(body, 4);
  return out;
}

function both32Bytes(...values: number[]): Uint8Array {
  const out = new Uint8Array(8 * values.length);
  values.forEach((v, i) => both32(out, 8 * i, v));
  return out;
}

/** The Rock Ridge identification, found by readers through the ER entry. */
const RRIP_ID = "RRIP_1991A";
const RRIP_DESCRIPTION =
  "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const RRIP_SOURCE = "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  " +
  "SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

function erEntry(): Uint8Array {
  const id = encoder.encode(RRIP_ID);
  const des = encoder.encode(RRIP_DESCRIPTION);
  const src = encoder.encode(RRIP_SOURCE);
  const body = new Uint8Array(4 + id.length + des.length + src.length);
  body.set([id.length, des.length, src.length, 1]);
  body.set(id, 4);
  body.set(des, 4 + id.length);
  body.set(src, 4 + id.length + des.length);
  return suspEntry("ER", body);
}

/** Name pieces of at most `max` bytes (Rock Ridge entries are at most 255 bytes long). */
function chunks(bytes: Uint8Array, max: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < bytes.length; i += max) out.push(bytes.subarray(i, i + max));
  return out.length ? out : [bytes];
}

/** NM entries for a long name, continued over several entries when needed. */
function nmEntries(name: string): Uint8Array[] {
  const parts = chunks(encoder.encode(name), MAX_RECORD - 5);
  return parts.map((part, i) => {
    const body = new Uint8Array(1 + part.length);
    body[0] = i < parts.length - 1 ? 1 : 0; // CONTINUE
    body.set(part, 1);
    return suspEntry("NM", body);
  });
}

/** A component record of an SL entry: flags and text. */
interface Component {
  flags: number;
  text: Uint8Array;
}

/**
 * SL entries for a symbolic link's target. When the target needs several
 * entries, the split falls inside a name (its record flagged "continues"),
 * because some readers (libarchive) join consecutive SL entries without
 * a separator.
 */
function slEntries(target: string): Uint8Array[] {
  const components: Component[] = [];
  const empty = new Uint8Array(0);
  if (target.startsWith("/")) components.push({ flags: 0x08, text: empty }); // ROOT
  for (const part of target.split("/")) {
    if (part === "") continue;
    if (part === ".") components.push({ flags: 0x02, text: empty });
    else if (part === "..") components.push({ flags: 0x04, text: empty });
    else components.push({ flags: 0, text: encoder.encode(part) });
  }
  if (components.length === 0) components.push({ flags: 0x02, text: empty });
  const capacity = MAX_RECORD - 5;
  const entries: Component[][] = [[]];
  let used = 0;
  const add = (c: Component) => {
    entries[entries.length - 1]!.push(c);
    used += 2 + c.text.length;
  };
  const newEntry = () => {
    entries.push([]);
    used = 0;
  };
  for (let c of components) {
    while (used + 2 + c.text.length > capacity) {
      const room = capacity - used - 2;
      if (c.text.length > 0 && room >= 1) {
        // Split this name: its first part ends the entry.
        add({ flags: 0x01, text: c.text.subarray(0, room) });
        c = { flags: c.flags, text: c.text.subarray(room) };
        newEntry();
        continue;
      }
      // No room for part of it: move the last byte of the previous name over
      // (when there is one), so the entries still meet inside a name.
      const list = entries[entries.length - 1]!;
      const last = list[list.length - 1];
      newEntry();
      if (last && last.text.length >= 2) {
        list[list.length - 1] = { flags: 0x01, text: last.text.subarray(0, last.text.length - 1) };
        add({ flags: last.flags, text: last.text.subarray(last.text.length - 1) });
      }
    }
    add(c);
  }
  return entries.map((list, i) => {
    const body = new Uint8Array(1 + list.reduce((n, c) => n + 2 + c.text.length, 0));
    body[0] = i < entries.length - 1 ? 1 : 0; // CONTINUE
    let at = 1;
    for (const c of list) {
      body[at] = c.flags;
      body[at + 1] = c.text.length;
      body.set(c.text, at + 2);
      at += 2 + c.text.length;
    }
    return suspEntry("SL", body);
  });
}

function typeBits(entry: Entry): number {
  return entry.kind === "dir" ? S_IFDIR : entry.kind === "symlink" ? S_IFLNK : S_IFREG;
}

function links(entry: Entry): number {
  return entry.kind === "dir" ? 2 + entry.children.filter((c) => c.kind === "dir").length : 1;
}

/** The Rock Ridge entries of a directory record describing `entry`. */
function rockEntries(entry: Entry, what: "root" | "self" | "parent" | "child"): Uint8Array[] {
  const out: Uint8Array[] = [];
  if (what === "root") out.push(suspEntry("SP", new Uint8Array([0xbe, 0xef, 0])));
  const named = what === "child";
  const symlink = named && entry.kind === "symlink";
  // RR (RRIP 1.09/1.10) lists the entries present: PX, SL, NM, TF.
  out.push(
    suspEntry("RR", new Uint8Array([0x01 | (symlink ? 0x04 : 0) | (named ? 0x08 : 0) | 0x80])),
  );
  out.push(
    suspEntry("PX", both32Bytes(typeBits(entry) | entry.mode, links(entry), entry.uid, entry.gid)),
  );
  const tf = new Uint8Array(1 + 3 * 7);
  tf[0] = 0x02 | 0x04 | 0x08; // modify, access, attributes
  tf.set(shortDate(entry.mtime), 1);
  tf.set(shortDate(entry.atime), 8);
  tf.set(shortDate(entry.ctime), 15);
  out.push(suspEntry("TF", tf));
  if (named) out.push(...nmEntries(entry.name));
  if (symlink) out.push(...slEntries(entry.target));
  if (what === "root") out.push(erEntry());
  return out;
}

// ---- Layout ----------------------------------------------------------------

/** A directory record before its place (and its continuation areas' places) is known. */
interface RecordPlan {
  id: Uint8Array;
  /** The described extent: filled in once the layout is known. */
  extent: () => number;
  dataLength: () => number;
  flags: number;
  date: Date;
  /** SUSP entries kept in the record. */
  inline: Uint8Array[];
  /** SUSP entries in continuation areas, one list per area. */
  pieces: Uint8Array[][];
  /** Where each continuation area lies: sector and byte offset. */
  places: Array<{ sector: number; offset: number }>;
  length: number;
}

const sum = (list: Uint8Array[]) => list.reduce((n, e) => n + e.length, 0);

/** Plans one record: which SUSP entries fit in it, which go to continuation areas. */
function planRecord(
  id: Uint8Array,
  extent: () => number,
  dataLength: () => number,
  flags: number,
  date: Date,
  susp: Uint8Array[],
): RecordPlan {
  const base = 33 + id.length + (id.length % 2 === 0 ? 1 : 0);
  // Records have an even length: one byte may go to padding.
  const capacity = MAX_RECORD - 1 - base;
  let inline = susp;
  const pieces: Uint8Array[][] = [];
  if (sum(susp) > capacity) {
    inline = [];
    let i = 0;
    let used = 0;
    while (i < susp.length && used + susp[i]!.length + CE_LENGTH <= capacity) {
      used += susp[i]!.length;
      inline.push(susp[i++]!);
    }
    while (i < susp.length) {
      const rest = susp.slice(i);
      if (sum(rest) <= SECTOR) {
        pieces.push(rest);
        break;
      }
      const piece: Uint8Array[] = [];
      let size = 0;
      while (i < susp.length && size + susp[i]!.length + CE_LENGTH <= SECTOR) {
        size += susp[i]!.length;
        piece.push(susp[i++]!);
      }
      pieces.push(piece);
    }
  }
  let length = base + sum(inline) + (pieces.length ? CE_LENGTH : 0);
  length += length % 2;
  return { id, extent, dataLength, flags, date, inline, pieces, places: [], length };
}

/** Byte length of continuation area `i` of a record. */
function pieceLength(plan: RecordPlan, i: number): number {
  return sum(plan.pieces[i]!) + (i < plan.pieces.length - 1 ? CE_LENGTH : 0);
}

function ceEntry(place: { sector: number; offset: number }, length: number): Uint8Array {
  return suspEntry("CE", both32Bytes(place.sector, place.offset, length));
}

/** The bytes of a planned record. */
function recordBytes(plan: RecordPlan): Uint8Array {
  const out = new Uint8Array(plan.length);
  out[0] = plan.length;
  both32(out, 2, plan.extent());
  both32(out, 10, plan.dataLength());
  out.set(shortDate(plan.date), 18);
  out[25] = plan.flags;
  both16(out, 28, 1); // volume sequence number
  out[32] = plan.id.length;
  out.set(plan.id, 33);
  let at = 33 + plan.id.length + (plan.id.length % 2 === 0 ? 1 : 0);
  for (const e of plan.inline) {
    out.set(e, at);
    at += e.length;
  }
  if (plan.pieces.length) out.set(ceEntry(plan.places[0]!, pieceLength(plan, 0)), at);
  return out;
}

/** The bytes of continuation area `i` of a planned record. */
function pieceBytes(plan: RecordPlan, i: number): Uint8Array {
  const out = new Uint8Array(pieceLength(plan, i));
  let at = 0;
  for (const e of plan.pieces[i]!) {
    out.set(e, at);
    at += e.length;
  }
  if (i < plan.pieces.length - 1) {
    out.set(ceEntry(plan.places[i + 1]!, pieceLength(plan, i + 1)), at);
  }
  return out;
}

/** The extents of a file: one per MAX_EXTENT bytes (at least one, for empty files). */
function fileParts(size: number): number {
  return Math.max(1, Math.ceil(size / MAX_EXTENT));
}

/** A generated piece of the image. */
interface Region {
  offset: number;
  bytes: Uint8Array;
}

/** A file's data in the image. */
interface FileRegion {
  offset: number;
  size: number;
  path: string;
}

/** An open source file, shared by the requests that read it. */
interface OpenFile {
  fd: number;
  /** Size when last looked at, and when that was (performance.now()). */
  size: number;
  checked: number;
  users: number;
  evicted: boolean;
}

/** The generated image: its layout, the metadata bytes and where each file's data lies. */
export class IsoImage {
  /** Total size in bytes. */
  readonly size: number;
  readonly #meta: Region[] = [];
  readonly #files: FileRegion[] = [];
  readonly #open = new Map<string, OpenFile>();
  #readCached = true;

  private constructor(root: Entry, label: string, preparer: string, options: Options) {
    // Names and order, then directory numbers (breadth first, as path tables want).
    const dirs: Entry[] = [];
    const queue = [root];
    while (queue.length) {
      const dir = queue.shift()!;
      dirs.push(dir);
      isoNames(dir);
      if (options.joliet) jolietNames(dir);
      for (const child of dir.children) if (child.kind === "dir") queue.push(child);
    }
    if (dirs.length > MAX_DIRECTORIES) {
      throw new UsageError(`iso: ${dirs.length} directories; ISO 9660 holds at most 65535`);
    }
    dirs.forEach((d, i) => d.number = i + 1);
    const jolietDirs: Entry[] = [];
    if (options.joliet) {
      const jq = [root];
      while (jq.length) {
        const dir = jq.shift()!;
        jolietDirs.push(dir);
        for (const child of dir.jolietChildren) if (child.kind === "dir") jq.push(child);
      }
      jolietDirs.forEach((d, i) => d.jolietNumber = i + 1);
    }

    // Records of every directory, primary then Joliet.
    const fileExtent = (e: Entry, part: number) => () =>
      e.kind === "file" && e.size > 0 ? e.extent + part * (MAX_EXTENT / SECTOR) : 0;
    const fileLength = (e: Entry, part: number) => () =>
      e.kind === "file" ? Math.min(MAX_EXTENT, e.size - part * MAX_EXTENT) : 0;
    const primaryRecords = (dir: Entry): RecordPlan[] => {
      const parent = dir.parent ?? dir;
      const susp = (e: Entry, what: "root" | "self" | "parent" | "child") =>
        options.rock ? rockEntries(e, what) : [];
      const plans = [
        planRecord(
          new Uint8Array([0]),
          () => dir.extent,
          () => dir.dirBytes,
          FLAG_DIRECTORY,
          dir.mtime,
          susp(dir, dir === root ? "root" : "self"),
        ),
        planRecord(
          new Uint8Array([1]),
          () => parent.extent,
          () => parent.dirBytes,
          FLAG_DIRECTORY,
          parent.mtime,
          susp(parent, "parent"),
        ),
      ];
      for (const child of dir.children) {
        if (child.kind === "dir") {
          plans.push(
            planRecord(
              child.isoName,
              () => child.extent,
              () => child.dirBytes,
              FLAG_DIRECTORY,
              child.mtime,
              susp(child, "child"),
            ),
          );
          continue;
        }
        const parts = fileParts(child.size);
        for (let part = 0; part < parts; part++) {
          plans.push(
            planRecord(
              child.isoName,
              fileExtent(child, part),
              fileLength(child, part),
              part < parts - 1 ? FLAG_MULTI_EXTENT : 0,
              child.mtime,
              susp(child, "child"),
            ),
          );
        }
      }
      return plans;
    };
    const jolietRecords = (dir: Entry): RecordPlan[] => {
      const parent = dir.parent ?? dir;
      const plans = [
        planRecord(
          new Uint8Array([0]),
          () => dir.jolietExtent,
          () => dir.jolietDirBytes,
          FLAG_DIRECTORY,
          dir.mtime,
          [],
        ),
        planRecord(
          new Uint8Array([1]),
          () => parent.jolietExtent,
          () => parent.jolietDirBytes,
          FLAG_DIRECTORY,
          parent.mtime,
          [],
        ),
      ];
      for (const child of dir.jolietChildren) {
        if (child.kind === "dir") {
          plans.push(
            planRecord(
              child.jolietName,
              () => child.jolietExtent,
              () => child.jolietDirBytes,
              FLAG_DIRECTORY,
              child.mtime,
              [],
            ),
          );
          continue;
        }
        const parts = fileParts(child.size);
        for (let part = 0; part < parts; part++) {
          plans.push(
            planRecord(
              child.jolietName,
              fileExtent(child, part),
              fileLength(child, part),
              part < parts - 1 ? FLAG_MULTI_EXTENT : 0,
              child.mtime,
              [],
            ),
          );
        }
      }
      return plans;
    };

    /** Places records in sectors (a record never crosses one): offsets and total bytes. */
    const place = (plans: RecordPlan[]) => {
      const offsets: number[] = [];
      let at = 0;
      for (const plan of plans) {
        if ((at % SECTOR) + plan.length > SECTOR) at = Math.ceil(at / SECTOR) * SECTOR;
        offsets.push(at);
        at += plan.length;
      }
      return { offsets, bytes: Math.max(SECTOR, Math.ceil(at / SECTOR) * SECTOR) };
    };
    /** Packs continuation areas in sectors from `start`: the number of sectors used. */
    const placePieces = (plans: RecordPlan[], start: number) => {
      let sector = start;
      let offset = 0;
      let any = false;
      for (const plan of plans) {
        for (let i = 0; i < plan.pieces.length; i++) {
          const n = pieceLength(plan, i);
          if (offset + n > SECTOR) {
            sector++;
            offset = 0;
          }
          plan.places.push({ sector, offset });
          offset += n;
          any = true;
        }
      }
      return any ? sector - start + 1 : 0;
    };

    // Sectors: descriptors, path tables, then each directory followed by its
    // continuation areas (readers that stream the image want them there), the
    // Joliet directories, and the file data.
    let next = FIRST_DESCRIPTOR + (options.joliet ? 3 : 2);
    const pathTable = (list: Entry[], joliet: boolean, littleEndian: boolean) => {
      const parts: Uint8Array[] = [];
      for (const dir of list) {
        const id = dir === root ? new Uint8Array([0]) : joliet ? dir.jolietName : dir.isoName;
        const record = new Uint8Array(8 + id.length + (id.length % 2));
        const view = new DataView(record.buffer);
        record[0] = id.length;
        view.setUint32(2, joliet ? dir.jolietExtent : dir.extent, littleEndian);
        const parent = dir.parent ?? dir;
        view.setUint16(6, joliet ? parent.jolietNumber : parent.number, littleEndian);
        record.set(id, 8);
        parts.push(record);
      }
      const out = new Uint8Array(sum(parts));
      let at = 0;
      for (const p of parts) {
        out.set(p, at);
        at += p.length;
      }
      return out;
    };
    // Path table sizes depend only on names, so their sectors are known now.
    const pathTableBytes = (list: Entry[], joliet: boolean) =>
      list.reduce((n, d) => {
        const len = d === root ? 1 : (joliet ? d.jolietName : d.isoName).length;
        return n + 8 + len + (len % 2);
      }, 0);
    const primaryPathBytes = pathTableBytes(dirs, false);
    const jolietPathBytes = options.joliet ? pathTableBytes(jolietDirs, true) : 0;
    const sectorsOf = (bytes: number) => Math.ceil(bytes / SECTOR);
    const lPath = next;
    next += sectorsOf(primaryPathBytes);
    const mPath = next;
    next += sectorsOf(primaryPathBytes);
    const jlPath = next;
    next += sectorsOf(jolietPathBytes);
    const jmPath = next;
    next += sectorsOf(jolietPathBytes);

    const primaryPlans = new Map<Entry, RecordPlan[]>();
    for (const dir of dirs) {
      const plans = primaryRecords(dir);
      primaryPlans.set(dir, plans);
      dir.dirBytes = place(plans).bytes;
      dir.extent = next;
      next += dir.dirBytes / SECTOR;
      next += placePieces(plans, next);
    }
    const jolietPlans = new Map<Entry, RecordPlan[]>();
    for (const dir of jolietDirs) {
      const plans = jolietRecords(dir);
      jolietPlans.set(dir, plans);
      dir.jolietDirBytes = place(plans).bytes;
      dir.jolietExtent = next;
      next += dir.jolietDirBytes / SECTOR;
    }
    // File data in tree order.
    const visit = (dir: Entry) => {
      for (const child of dir.children) {
        if (child.kind === "file" && child.size > 0) {
          child.extent = next;
          this.#files.push({ offset: next * SECTOR, size: child.size, path: child.path });
          next += sectorsOf(child.size);
        }
      }
      for (const child of dir.children) if (child.kind === "dir") visit(child);
    };
    visit(root);
    // Zero padding at the end, as mastering tools add it: readers that look
    // ahead (the Linux CD-ROM driver, libarchive's format detection) may
    // read past the last sector in use.
    const totalSectors = next + PADDING_SECTORS;
    if (totalSectors >= 2 ** 32) throw new UsageError("iso: the files are too large for ISO 9660");
    this.size = totalSectors * SECTOR;

    // Now every place is known: generate the bytes.
    const emit = (plans: Map<Entry, RecordPlan[]>, extentOf: (d: Entry) => number) => {
      for (const [dir, list] of plans) {
        const { offsets, bytes } = place(list);
        const out = new Uint8Array(bytes);
        list.forEach((plan, i) => out.set(recordBytes(plan), offsets[i]!));
        this.#meta.push({ offset: extentOf(dir) * SECTOR, bytes: out });
        for (const plan of list) {
          plan.pieces.forEach((_, i) => {
            const p = plan.places[i]!;
            this.#meta.push({ offset: p.sector * SECTOR + p.offset, bytes: pieceBytes(plan, i) });
          });
        }
      }
    };
    emit(primaryPlans, (d) => d.extent);
    emit(jolietPlans, (d) => d.jolietExtent);

    const rootRecord = (joliet: boolean) =>
      recordBytes(planRecord(
        new Uint8Array([0]),
        () => joliet ? root.jolietExtent : root.extent,
        () => joliet ? root.jolietDirBytes : root.dirBytes,
        FLAG_DIRECTORY,
        root.mtime,
        [],
      ));
    const descriptor = (type: 1 | 2) => {
      const joliet = type === 2;
      const d = new Uint8Array(SECTOR);
      const text = (at: number, width: number, value: string) => {
        const bytes = joliet ? utf16be(value.slice(0, width / 2)) : encoder.encode(value);
        const field = joliet ? utf16be(" ".repeat(width / 2)) : encoder.encode(" ".repeat(width));
        field.set(bytes.subarray(0, width));
        d.set(field, at);
      };
      d[0] = type;
      d.set(encoder.encode("CD001"), 1);
      d[6] = 1;
      text(8, 32, "LINUX");
      text(40, 32, label);
      both32(d, 80, totalSectors);
      if (joliet) d.set([0x25, 0x2f, 0x45], 88); // "%/E": UCS-2 level 3
      both16(d, 120, 1);
      both16(d, 124, 1);
      both16(d, 128, SECTOR);
      const view = new DataView(d.buffer);
      both32(d, 132, joliet ? jolietPathBytes : primaryPathBytes);
      view.setUint32(140, joliet ? jlPath : lPath, true);
      view.setUint32(148, joliet ? jmPath : mPath, false);
      d.set(rootRecord(joliet), 156);
      text(190, 128, "");
      text(318, 128, "");
      text(446, 128, preparer);
      text(574, 128, "NBD");
      text(702, 37, "");
      text(739, 37, "");
      text(776, 37, "");
      d.set(longDate(root.mtime), 813);
      d.set(longDate(root.mtime), 830);
      d.set(encoder.encode("0000000000000000"), 847);
      d.set(encoder.encode("0000000000000000"), 864);
      d[881] = 1;
      return d;
    };
    this.#meta.push({ offset: FIRST_DESCRIPTOR * SECTOR, bytes: descriptor(1) });
    let vd = FIRST_DESCRIPTOR + 1;
    if (options.joliet) this.#meta.push({ offset: vd++ * SECTOR, bytes: descriptor(2) });
    const terminator = new Uint8Array(SECTOR);
    terminator[0] = 255;
    terminator.set(encoder.encode("CD001"), 1);
    terminator[6] = 1;
    this.#meta.push({ offset: vd * SECTOR, bytes: terminator });
    this.#meta.push({ offset: lPath * SECTOR, bytes: pathTable(dirs, false, true) });
    this.#meta.push({ offset: mPath * SECTOR, bytes: pathTable(dirs, false, false) });
    if (options.joliet) {
      this.#meta.push({ offset: jlPath * SECTOR, bytes: pathTable(jolietDirs, true, true) });
      this.#meta.push({ offset: jmPath * SECTOR, bytes: pathTable(jolietDirs, true, false) });
    }
    this.#meta.sort((a, b) => a.offset - b.offset);
  }

  /** Scans `dir` and lays out the image. */
  static async create(
    dir: string,
    label: string,
    preparer: string,
    options: Options,
  ): Promise<IsoImage> {
    const info = await Deno.stat(dir);
    if (!info.isDirectory) throw new UsageError(`iso: ${dir} is not a directory`);
    const root = await scan(dir, "", undefined, options);
    return new IsoImage(root, label, preparer, options);
  }

  /** Fills `buf` with the image's bytes at `offset`. */
  read(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    // The common case, a request within one file's data, goes straight to it.
    const files = this.#files;
    let lo = 0;
    let hi = files.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const f = files[mid]!;
      if (f.offset + f.size <= offset) lo = mid + 1;
      else hi = mid;
    }
    const only = files[lo];
    if (only && only.offset <= offset && end <= only.offset + only.size) {
      return this.#readFile(only, buf, offset - only.offset);
    }
    return this.#readMixed(buf, offset, lo);
  }

  /** A request across metadata, padding and files; `first` is the first file that may overlap. */
  async #readMixed(buf: Uint8Array, offset: number, first: number): Promise<void> {
    const end = offset + buf.length;
    let covered = offset;
    const gap = (to: number) => {
      if (to > covered) buf.fill(0, covered - offset, to - offset);
      covered = Math.max(covered, to);
    };
    if (offset < this.#dataStart()) {
      for (
        let i = firstOverlap(this.#meta, offset, (m) => m.bytes.length);
        i < this.#meta.length;
        i++
      ) {
        const m = this.#meta[i]!;
        if (m.offset >= end) break;
        const from = Math.max(offset, m.offset);
        const to = Math.min(end, m.offset + m.bytes.length);
        gap(from);
        buf.set(m.bytes.subarray(from - m.offset, to - m.offset), from - offset);
        covered = Math.max(covered, to);
      }
    }
    const reads: Promise<void>[] = [];
    for (let i = first; i < this.#files.length; i++) {
      const f = this.#files[i]!;
      if (f.offset >= end) break;
      const from = Math.max(offset, f.offset);
      const to = Math.min(end, f.offset + f.size);
      gap(from);
      reads.push(this.#readFile(f, buf.subarray(from - offset, to - offset), from - f.offset));
      covered = Math.max(covered, to);
    }
    gap(end);
    await Promise.all(reads);
  }

  /**
   * Allocation of a range: metadata is data; the padding between regions and
   * the holes of sparse source files read as zeroes.
   */
  extents(offset: number, length: number): Extent[] {
    const end = offset + length;
    const out: Extent[] = [];
    let position = offset;
    const push = (to: number, flags: number) => {
      if (to <= position) return;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += to - position;
      else out.push({ length: to - position, flags });
      position = to;
    };
    const hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
    for (
      let i = firstOverlap(this.#meta, offset, (m) => m.bytes.length);
      i < this.#meta.length;
      i++
    ) {
      const m = this.#meta[i]!;
      if (m.offset >= end) break;
      push(Math.min(end, m.offset), hole);
      push(Math.min(end, m.offset + m.bytes.length), 0);
    }
    for (let i = firstOverlap(this.#files, offset, (f) => f.size); i < this.#files.length; i++) {
      const f = this.#files[i]!;
      if (f.offset >= end) break;
      push(Math.min(end, f.offset), hole);
      const to = Math.min(end, f.offset + f.size);
      const file = this.#acquire(f.path);
      try {
        while (position < to) {
          const at = position - f.offset;
          const data = seekData(file.fd, at);
          if (data === undefined) {
            push(to, 0);
            break;
          }
          push(Math.min(to, f.offset + data), hole);
          if (position >= to) break;
          const next = seekHole(file.fd, position - f.offset) ?? f.size;
          push(Math.min(to, f.offset + next), 0);
        }
      } finally {
        this.#release(f.path, file);
      }
    }
    push(end, hole);
    return out;
  }

  /** Where the file data starts (everything before it is metadata). */
  #dataStart(): number {
    return this.#files[0]?.offset ?? this.size;
  }

  async #readFile(f: FileRegion, buf: Uint8Array, position: number): Promise<void> {
    const file = this.#acquire(f.path);
    try {
      // A file that changed size no longer matches the directory records: its
      // bytes are not what the image promised, so its reads fail. The size is
      // looked at every SIZE_CHECK_MS at most (per request it would cost a
      // noticeable share of a cached read); a read past a shrunk file's end
      // fails at once anyway.
      const now = performance.now();
      if (now - file.checked >= SIZE_CHECK_MS) {
        file.checked = now;
        file.size = seekEnd(file.fd) ?? f.size;
      }
      if (file.size !== f.size) {
        throw new NbdError("EIO", `${f.path} changed size while served`);
      }
      let done = 0;
      while (done < buf.length) {
        const view = buf.subarray(done);
        let n = this.#readCached ? preadCached(file.fd, view, position + done) : null;
        if (n === null) this.#readCached = false;
        if (n === undefined || n === null) n = await preadOnThread(file.fd, view, position + done);
        if (n === undefined || n < 0) n = await readAt(file.fd, view, position + done);
        if (n === 0) throw new NbdError("EIO", `${f.path} changed size while served`);
        done += n;
      }
    } finally {
      this.#release(f.path, file);
    }
  }

  #acquire(path: string): OpenFile {
    let file = this.#open.get(path);
    if (!file) {
      let fd: number;
      try {
        fd = fs.openSync(path, "r");
      } catch (error) {
        throw new NbdError("EIO", `cannot open ${path}: ${(error as Error).message}`);
      }
      file = { fd, size: 0, checked: -Infinity, users: 0, evicted: false };
      this.#open.set(path, file);
      // A bounded number of files stay open; the oldest goes once unused.
      if (this.#open.size > 256) {
        const [oldest, old] = this.#open.entries().next().value!;
        this.#open.delete(oldest);
        old.evicted = true;
        if (old.users === 0) fs.closeSync(old.fd);
      }
    }
    file.users++;
    return file;
  }

  #release(_path: string, file: OpenFile): void {
    file.users--;
    if (file.evicted && file.users === 0) fs.closeSync(file.fd);
  }

  /** Closes every open file. */
  close(): void {
    for (const file of this.#open.values()) {
      file.evicted = true;
      if (file.users === 0) fs.closeSync(file.fd);
    }
    this.#open.clear();
  }
}

function readAt(fd: number, buf: Uint8Array, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(
      fd,
      buf,
      0,
      buf.length,
      position,
      (error, n) => error ? reject(new NbdError("EIO", error.message)) : resolve(n),
    )
  );
}

/** Index of the first region (sorted, not overlapping) that ends after `offset`. */
function firstOverlap<T extends { offset: number }>(
  regions: T[],
  offset: number,
  length: (region: T) => number,
): number {
  let lo = 0;
  let hi = regions.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const r = regions[mid]!;
    if (r.offset + length(r) <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The iso plugin. */
export const isoPlugin: Plugin = {
  name: "iso",
  summary: "read-only ISO 9660 image (Rock Ridge, Joliet) generated on the fly from a directory",
  description: "Examples:\n  nbd serve iso /path/to/dir\n" +
    "  nbd serve iso dir=/path/to/dir label=INSTALL joliet=false",
  params: [
    {
      name: "dir",
      value: "PATH",
      type: "path",
      description: "directory to serve",
      required: true,
    },
    {
      name: "label",
      value: "TEXT",
      type: "string",
      default: "NBD",
      description: "volume label, up to 32 characters",
    },
    {
      name: "rock",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "Rock Ridge extensions",
    },
    {
      name: "joliet",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "Joliet names and tree",
    },
    {
      name: "prep",
      value: "TEXT",
      type: "string",
      description: "data preparer identifier, up to 128 characters",
    },
  ],
  magicParam: "dir",
  async create(params) {
    const dir = params.take("dir");
    if (dir === undefined) throw new UsageError("iso: missing required parameter dir=");
    const label = params.take("label") ?? "NBD";
    if (!/^[\x20-\x7e]{1,32}$/.test(label)) {
      throw new UsageError("iso: label must be 1 to 32 printable ASCII characters");
    }
    const preparer = params.take("prep") ?? "";
    if (!/^[\x20-\x7e]{0,128}$/.test(preparer)) {
      throw new UsageError("iso: prep must be at most 128 printable ASCII characters");
    }
    const rock = params.takeBoolean("rock") ?? true;
    const joliet = params.takeBoolean("joliet") ?? true;
    let image: IsoImage;
    try {
      image = await IsoImage.create(dir, label, preparer, { rock, joliet });
    } catch (error) {
      if (error instanceof UsageError) throw error;
      throw new UsageError(`iso: cannot read ${dir}: ${(error as Error).message}`);
    }
    return {
      open: () =>
        Promise.resolve(completeBackend({
          size: () => image.size,
          capabilities: () => ({ multiConn: true, cache: "none" }),
          pread: (buf, offset) => image.read(buf, offset),
          extents: (offset, length) => Promise.resolve(image.extents(offset, length)),
        })),
      close: () => Promise.resolve(image.close()),
    };
  },
};
