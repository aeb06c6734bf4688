/**
 * The subcommand registry.
 *
 * @module
 */

import type { Command } from "./command.ts";
import { serveCommand } from "./serve.ts";
import { statsCommand } from "./stats.ts";
import { viewCommand } from "./view.ts";

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, Command> = new Map(
  [serveCommand, statsCommand, viewCommand].map((c) => [c.name, c]),
);
