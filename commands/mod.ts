/**
 * The subcommand registry.
 *
 * @module
 */

import type { Command } from "./command.ts";
import { attachCommand } from "./attach.ts";
import { attachedCommand } from "./attached.ts";
import { detachCommand } from "./detach.ts";
import { dumpCommand } from "./dump.ts";
import { infoCommand } from "./info.ts";
import { listCommand } from "./list.ts";
import { mapCommand } from "./map.ts";
import { mountCommand } from "./mount.ts";
import { proxyCommand } from "./proxy.ts";
import { serveCommand } from "./serve.ts";
import { umountCommand } from "./umount.ts";

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, Command> = new Map(
  [
    serveCommand,
    proxyCommand,
    infoCommand,
    listCommand,
    mapCommand,
    dumpCommand,
    mountCommand,
    umountCommand,
    attachCommand,
    detachCommand,
    attachedCommand,
  ].map((
    c,
  ) => [c.name, c]),
);
