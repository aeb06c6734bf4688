/**
 * The subcommand registry.
 *
 * @module
 */

import type { Command } from "./command.ts";
import { serveCommand } from "./serve.ts";

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, Command> = new Map(
  [serveCommand].map((c) => [c.name, c]),
);
