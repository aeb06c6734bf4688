/**
 * The subcommand registry.
 *
 * @module
 */

import type { Command } from "./command.ts";
import { copyCommand } from "./copy.ts";
import { dumpCommand } from "./dump.ts";
import { infoCommand } from "./info.ts";
import { listCommand } from "./list.ts";
import { mapCommand } from "./map.ts";
import { proxyCommand } from "./proxy.ts";
import { serveCommand } from "./serve.ts";
import { statsCommand } from "./stats.ts";
import { viewCommand } from "./view.ts";

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, Command> = new Map(
  [
    serveCommand,
    proxyCommand,
    infoCommand,
    listCommand,
    mapCommand,
    dumpCommand,
    copyCommand,
    statsCommand,
    viewCommand,
  ].map((c) => [c.name, c]),
);
