/**
 * Lazy access to the C library through FFI, for the few calls the runtime
 * does not expose. Every declaration goes through one of two loaders, and
 * both ask the platform switch (platform.ts) whether to bind at all:
 * `lazyLibc` for the Linux fast paths (glibc symbols, Linux numbering),
 * `lazyPosixLibc` for the few POSIX calls the portable paths may make on
 * Linux and macOS (lseek with SEEK_DATA/SEEK_HOLE). This module and
 * platform.ts are the only callers of `Deno.dlopen`
 * (tests/platform_symbols_test.ts checks it).
 *
 * @module
 */

import { platform } from "./platform.ts";

/** The bound functions of `S`, as `Deno.dlopen` gives them. */
export interface LazyLibrary<S extends Deno.ForeignLibraryInterface> {
  /** Each function is bound on its first use. */
  readonly symbols: Deno.DynamicLibrary<S>["symbols"];
}

/**
 * A loader for Linux libc `symbols`: null unless the platform switch chose
 * the Linux fast paths (Linux, FFI allowed, no NBD_PORTABLE). Each symbol is
 * bound on first use, not all at once: binding a synchronous function costs
 * ~0.15 ms of start-up, and most runs use a few of the functions a module
 * declares.
 */
export function lazyLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
): () => LazyLibrary<S> | null {
  let lib: LazyLibrary<S> | null | undefined;
  return () => {
    if (lib === undefined) lib = platform().linuxFast ? bindOnUse("libc.so.6", symbols) : null;
    return lib;
  };
}

/**
 * A loader for POSIX `symbols` from the platform's own C library (glibc on
 * Linux, libSystem on macOS), on the fast and the portable paths alike;
 * null where there is none or FFI is not allowed (Windows, --deny-ffi).
 * Only for calls whose symbol exists on every such platform.
 */
export function lazyPosixLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
): () => LazyLibrary<S> | null {
  let lib: LazyLibrary<S> | null | undefined;
  return () => {
    if (lib === undefined) {
      const library = platform().posixLibc;
      lib = library === undefined ? null : bindOnUse(library, symbols);
    }
    return lib;
  };
}

function bindOnUse<S extends Deno.ForeignLibraryInterface>(
  library: string,
  symbols: S,
): LazyLibrary<S> {
  const bound: Record<string, unknown> = {};
  for (const name of Object.keys(symbols)) {
    Object.defineProperty(bound, name, {
      get() {
        const fn = Deno.dlopen(library, { [name]: symbols[name]! }).symbols[name];
        Object.defineProperty(bound, name, { value: fn });
        return fn;
      },
      configurable: true,
      enumerable: true,
    });
  }
  return { symbols: bound as Deno.DynamicLibrary<S>["symbols"] };
}
