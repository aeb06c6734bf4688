/**
 * The URI argument of the client commands: an NBD URI, or `[ CMD ARGS ... ]`
 * — a server started for the command by socket activation (like
 * `nbdinfo -- [ nbdkit memory 1G ]`) and stopped afterwards.
 *
 * @module
 */

import { UsageError } from "../util/usage_error.ts";

/** Runs `body` with the URI the positional arguments name. */
export async function withUriArgument(
  positionals: string[],
  command: string,
  body: (uri: string) => Promise<number>,
): Promise<number> {
  if (positionals.length === 1 && positionals[0] !== "[") return await body(positionals[0]!);
  if (positionals.length >= 3 && positionals[0] === "[" && positionals.at(-1) === "]") {
    // Loaded on demand: it needs process and socket modules the plain case does not.
    const { startActivatedServer } = await import("../copy/subprocess.ts");
    const server = await startActivatedServer(positionals.slice(1, -1));
    try {
      return await body(server.uri);
    } finally {
      await server.stop();
    }
  }
  throw new UsageError(
    `${command} needs one URI, or a server command as -- [ CMD ARGS ... ] (see nbd ${command} --help)`,
  );
}
