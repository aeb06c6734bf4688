/**
 * Lazy access to libc through FFI, for the few calls the runtime does not
 * expose.
 *
 * @module
 */

/** The bound functions of `S`, as `Deno.dlopen` gives them. */
export interface LazyLibrary<S extends Deno.ForeignLibraryInterface> {
  /** Each function is bound on its first use. */
  readonly symbols: Deno.DynamicLibrary<S>["symbols"];
}

/**
 * A loader for `symbols` from libc; null where FFI or libc is unavailable
 * (not Linux, no --allow-ffi). Each symbol is bound on first use, not all
 * at once: binding a synchronous function costs ~0.15 ms of start-up, and
 * most runs use a few of the functions a module declares.
 */
export function lazyLibc<S extends Deno.ForeignLibraryInterface>(
  symbols: S,
): () => LazyLibrary<S> | null {
  let lib: LazyLibrary<S> | null | undefined;
  return () => {
    if (lib === undefined) lib = Deno.build.os === "linux" ? bindOnUse(symbols) : null;
    return lib;
  };
}

/** Whether libc opens through FFI here (and FFI is allowed); checked once. */
let libcOpens: boolean | undefined;

function bindOnUse<S extends Deno.ForeignLibraryInterface>(symbols: S): LazyLibrary<S> | null {
  if (libcOpens === undefined) {
    try {
      // Without symbols this only checks that the library opens.
      Deno.dlopen("libc.so.6", {}).close();
      libcOpens = true;
    } catch {
      libcOpens = false;
    }
  }
  if (!libcOpens) return null;
  const bound: Record<string, unknown> = {};
  for (const name of Object.keys(symbols)) {
    Object.defineProperty(bound, name, {
      get() {
        const fn = Deno.dlopen("libc.so.6", { [name]: symbols[name]! }).symbols[name];
        Object.defineProperty(bound, name, { value: fn });
        return fn;
      },
      configurable: true,
      enumerable: true,
    });
  }
  return { symbols: bound as Deno.DynamicLibrary<S>["symbols"] };
}
