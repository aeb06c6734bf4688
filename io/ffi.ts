/**
 * Lazy access to libc through FFI, for the few calls the runtime does not
 * expose.
 *
 * @module
 */

/**
 * A loader for `symbols` from libc: the library is opened on first use;
 * null where FFI or libc is unavailable (not Linux, no --allow-ffi).
 */
export function lazyLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
): () => Deno.DynamicLibrary<S> | null {
  let lib: Deno.DynamicLibrary<S> | null | undefined;
  return () => {
    if (lib === undefined) {
      try {
        lib = Deno.build.os === "linux" ? Deno.dlopen("libc.so.6", symbols) : null;
      } catch {
        lib = null;
      }
    }
    return lib;
  };
}
