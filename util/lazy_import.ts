/**
 * Importing a module only when it is needed. A literal `import("./x.ts")`
 * makes the runtime read and analyse the module's whole graph when the
 * importing module loads, whether or not it is ever called; a copy between
 * two files would pay for the qcow2, RBD and S3 code that way. A URL built
 * at run time is not seen ahead, so the module loads on the first call.
 * A compiled binary must `--include` such a module (tests/release_test.ts
 * checks that every module URL built from `import.meta.url` is listed).
 *
 * @module
 */

/**
 * Imports `url` (a module's URL made from the caller's `import.meta.url`);
 * `T` is its type, written as a `typeof import(...)` of the same module.
 */
export function lazyImport<T>(url: URL): Promise<T> {
  return import(url.href);
}
