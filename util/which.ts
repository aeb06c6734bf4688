/**
 * Looking up a program on PATH, for plugins that run external tools.
 *
 * @module
 */

/** Where the executable `name` is on PATH, or undefined. */
export function findOnPath(name: string): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (!dir) continue;
    const path = `${dir}/${name}`;
    try {
      const info = Deno.statSync(path);
      if (info.isFile && ((info.mode ?? 0) & 0o111) !== 0) return path;
    } catch {
      // not here
    }
  }
  return undefined;
}
