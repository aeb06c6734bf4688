/**
 * The subcommand registry. Each command's module is loaded only when that
 * command runs, so `nbd` starts fast whatever the command (the modules
 * are imported by literal paths, which a compiled binary still carries).
 *
 * @module
 */

import type { Command } from "./command.ts";

/** A registered command: what `nbd --help` shows, and how to load it. */
export interface CommandEntry {
  /** Name on the command line. */
  name: string;
  /** One-line summary for `nbd --help`. */
  summary: string;
  /** Loads the command's module. */
  load(): Promise<Command>;
}

const ENTRIES: CommandEntry[] = [
  {
    name: "serve",
    summary: "serve a plugin (memory, file, pattern, ...) over NBD",
    load: async () => (await import("./serve.ts")).serveCommand,
  },
  {
    name: "proxy",
    summary: "forward an export from another NBD server, adding or stripping TLS",
    load: async () => (await import("./proxy.ts")).proxyCommand,
  },
  {
    name: "info",
    summary: "show information about an export or a server (like nbdinfo)",
    load: async () => (await import("./info.ts")).infoCommand,
  },
  {
    name: "list",
    summary: "list the exports of a server (like nbdinfo --list)",
    load: async () => (await import("./list.ts")).listCommand,
  },
  {
    name: "map",
    summary: "print the allocation map of an export (like nbdinfo --map)",
    load: async () => (await import("./map.ts")).mapCommand,
  },
  {
    name: "dump",
    summary: "hexdump the content of an export (like nbddump)",
    load: async () => (await import("./dump.ts")).dumpCommand,
  },
  {
    name: "copy",
    summary: "copy a disk image between files, NBD exports, URLs and pipes (like nbdcopy)",
    load: async () => (await import("./copy.ts")).copyCommand,
  },
  {
    name: "stats",
    summary: "print the IO counters of a server running with --view",
    load: async () => (await import("./stats.ts")).statsCommand,
  },
  {
    name: "view",
    summary: "replay a log filter file in the block-activity page",
    load: async () => (await import("./view.ts")).viewCommand,
  },
  {
    name: "mount",
    summary: "present an export as a file over FUSE (like nbdfuse)",
    load: async () => (await import("./mount.ts")).mountCommand,
  },
  {
    name: "umount",
    summary: "unmount an nbd mount and wait for it to finish",
    load: async () => (await import("./umount.ts")).umountCommand,
  },
  {
    name: "attach",
    summary: "attach an export as a loop block device (no kernel NBD module)",
    load: async () => (await import("./attach.ts")).attachCommand,
  },
  {
    name: "detach",
    summary: "detach an attached export (soft, or --hard)",
    load: async () => (await import("./detach.ts")).detachCommand,
  },
  {
    name: "attached",
    summary: "list attached exports with their I/O counters",
    load: async () => (await import("./attached.ts")).attachedCommand,
  },
];

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, CommandEntry> = new Map(ENTRIES.map((c) => [c.name, c]));
