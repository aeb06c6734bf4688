/**
 * Absolute paths without the runtime's Node compatibility layer, whose
 * first use costs a command start-up time and memory (docs/performance.md).
 *
 * @module
 */

/**
 * `path` made absolute against `cwd` (default the working directory) and
 * normalised: no `.` or `..` segments, no repeated or trailing slashes.
 */
export function absolutePath(path: string, cwd: string = Deno.cwd()): string {
  const segments: string[] = [];
  for (const segment of `${path.startsWith("/") ? "" : cwd}/${path}`.split("/")) {
    if (segment === "" || segment === ".") continue;
    if (segment === "..") segments.pop();
    else segments.push(segment);
  }
  return `/${segments.join("/")}`;
}
