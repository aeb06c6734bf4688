/**
 * The shape of a subcommand and helpers shared by the command modules:
 * argument parsing with one-line errors, and the version string.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "../server/params.ts";

/** A subcommand of `nbd`. */
export interface Command {
  /** Name on the command line. */
  name: string;
  /** One-line summary for `nbd --help`. */
  summary: string;
  /** Full usage text for `nbd NAME --help`. */
  usage: string;
  /** Runs the command; resolves to the exit status. Never calls Deno.exit. */
  run(argv: string[]): Promise<number>;
}

/** Version of this program. */
export const VERSION = "0.1.0";

/** Parses options with node:util parseArgs, turning its errors into `UsageError`. */
export function parseOptions<T extends ParseArgsConfig["options"]>(
  argv: string[],
  options: T,
  allowPositionals = true,
) {
  try {
    return parseArgs({ args: argv, options, allowPositionals, strict: true });
  } catch (error) {
    const message = (error as Error).message.replace(/\. To specify a positional argument.*$/s, "");
    throw new UsageError(message);
  }
}

/** Prints an error line to stderr in the `nbd: message` form. */
export function printError(message: string): void {
  console.error(`nbd: ${message}`);
}
