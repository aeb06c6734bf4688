/**
 * The one platform switch: which I/O paths this process takes, decided
 * once, the first time anything asks, and never again. On Linux, with FFI
 * allowed and libc opening, the fast paths call libc directly (io/libc.ts:
 * positional I/O, fallocate, write-behind, pipe sizes, socket descriptors).
 * Everywhere else, or on Linux with `NBD_PORTABLE=1` (which takes the path
 * macOS and Windows take), the portable paths use only the runtime's own
 * APIs and node:fs, plus `lseek` with SEEK_DATA/SEEK_HOLE where the C
 * library has it and FFI is allowed (Linux, macOS). Nothing chooses a path
 * by catching an error on the hot path.
 *
 * @module
 */

/** What this process runs on, and which paths it takes. */
export interface Platform {
  /** `Deno.build.os`: "linux", "darwin", "windows", ... */
  readonly os: string;
  /** The platform's name for messages: "Linux", "macOS", "Windows". */
  readonly name: string;
  /** The Linux fast paths: libc through FFI, every symbol of io/libc.ts. */
  readonly linuxFast: boolean;
  /**
   * The C library that portable sparse detection opens for `lseek`
   * (SEEK_DATA/SEEK_HOLE), when it has them and FFI is allowed; else undefined.
   */
  readonly posixLibc: string | undefined;
  /** Why the portable paths are taken ("" on the fast paths). */
  readonly why: string;
}

/** The C library of each platform whose `lseek` knows SEEK_DATA and SEEK_HOLE. */
const LIBC: Record<string, string> = {
  linux: "libc.so.6",
  darwin: "/usr/lib/libSystem.B.dylib",
};

const NAMES: Record<string, string> = {
  linux: "Linux",
  darwin: "macOS",
  windows: "Windows",
  freebsd: "FreeBSD",
  netbsd: "NetBSD",
  openbsd: "OpenBSD",
  android: "Android",
};

let chosen: Platform | undefined;

/** The platform switch, decided on the first call. */
export function platform(): Platform {
  return chosen ??= decide();
}

/** Whether `NBD_PORTABLE=1` asks for the portable paths (false when the environment is not readable). */
function portableForced(): boolean {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: "NBD_PORTABLE" }).state !== "granted") {
      return false;
    }
    const value = Deno.env.get("NBD_PORTABLE");
    return value !== undefined && value !== "" && value !== "0";
  } catch {
    return false;
  }
}

/** Whether `library` opens through FFI here: FFI allowed and the library present. */
function opens(library: string): boolean {
  try {
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return false;
    Deno.dlopen(library, {}).close();
    return true;
  } catch {
    return false;
  }
}

function decide(): Platform {
  const os = Deno.build.os;
  const name = NAMES[os] ?? os;
  const library = LIBC[os];
  const ffi = library !== undefined && opens(library);
  const forced = portableForced();
  const linuxFast = os === "linux" && ffi && !forced;
  let why = "";
  if (!linuxFast) {
    why = os !== "linux" ? name : forced ? "NBD_PORTABLE=1" : "FFI is denied";
  }
  return { os, name, linuxFast, posixLibc: ffi ? library : undefined, why };
}

/**
 * The one-line refusal of a feature that only the Linux fast paths have:
 * names the platform (or why Linux is on the portable paths) and what to
 * use instead; undefined when the feature is available here.
 */
export function linuxOnly(feature: string, instead: string): string | undefined {
  const p = platform();
  if (p.linuxFast) return undefined;
  const where = p.os === "linux"
    ? `this Linux runs the portable paths: ${p.why}`
    : `this is ${p.name}`;
  return `${feature} needs Linux (${where}); ${instead}`;
}

/**
 * The one-line error for a Unix socket that failed on Windows, where the
 * runtime may not support them; undefined elsewhere or for another failure.
 */
export function unixSocketUnsupported(error: unknown): string | undefined {
  if (Deno.build.os !== "windows") return undefined;
  if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.ConnectionRefused) {
    return undefined;
  }
  return "Unix sockets are not available to this runtime on Windows; use TCP (--port, nbd://HOST:PORT)";
}
