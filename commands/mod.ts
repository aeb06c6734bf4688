/**
 * The subcommand registry. Each command's module is loaded only when that
 * command runs, so `nbd` starts fast whatever the command.
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

/**
 * Imports a command's module by a computed specifier. With literal
 * specifiers the runtime would read and analyse every command's whole
 * module graph at start-up, whichever command runs (docs/performance.md).
 * A compiled binary carries the modules
 * because the compile task includes commands/.
 */
function importCommand<T>(name: string): Promise<T> {
  const specifier = `./${name}.ts`;
  return import(specifier);
}

const ENTRIES: CommandEntry[] = [
  {
    name: "serve",
    summary: "serve a plugin (memory, file, pattern, ...) over NBD",
    load: async () => (await importCommand<typeof import("./serve.ts")>("serve")).serveCommand,
  },
  {
    name: "proxy",
    summary: "forward an export from another NBD server, adding or stripping TLS",
    load: async () => (await importCommand<typeof import("./proxy.ts")>("proxy")).proxyCommand,
  },
  {
    name: "info",
    summary: "show information about an export or a server (like nbdinfo)",
    load: async () => (await importCommand<typeof import("./info.ts")>("info")).infoCommand,
  },
  {
    name: "list",
    summary: "list the exports of a server (like nbdinfo --list)",
    load: async () => (await importCommand<typeof import("./list.ts")>("list")).listCommand,
  },
  {
    name: "map",
    summary: "print the allocation map of an export (like nbdinfo --map)",
    load: async () => (await importCommand<typeof import("./map.ts")>("map")).mapCommand,
  },
  {
    name: "dump",
    summary: "hexdump the content of an export (like nbddump)",
    load: async () => (await importCommand<typeof import("./dump.ts")>("dump")).dumpCommand,
  },
  {
    name: "copy",
    summary: "copy a disk image between files, NBD exports, URLs and pipes (like nbdcopy)",
    load: async () => (await importCommand<typeof import("./copy.ts")>("copy")).copyCommand,
  },
  {
    name: "checksum",
    summary: "print the sha256 or blkhash of a disk image (file, NBD, http, [ CMD ])",
    load: async () =>
      (await importCommand<typeof import("./checksum.ts")>("checksum")).checksumCommand,
  },
  {
    name: "stats",
    summary: "print the IO counters of a server running with --view",
    load: async () => (await importCommand<typeof import("./stats.ts")>("stats")).statsCommand,
  },
  {
    name: "view",
    summary: "show log files and live servers in the block-activity page",
    load: async () => (await importCommand<typeof import("./view.ts")>("view")).viewCommand,
  },
  {
    name: "mount",
    summary: "present an export as a file over FUSE (like nbdfuse)",
    load: async () => (await importCommand<typeof import("./mount.ts")>("mount")).mountCommand,
  },
  {
    name: "umount",
    summary: "unmount an nbd mount and wait for it to finish",
    load: async () => (await importCommand<typeof import("./umount.ts")>("umount")).umountCommand,
  },
  {
    name: "attach",
    summary: "attach an export as a loop block device (no kernel NBD module)",
    load: async () => (await importCommand<typeof import("./attach.ts")>("attach")).attachCommand,
  },
  {
    name: "detach",
    summary: "detach an attached export (soft, or --hard)",
    load: async () => (await importCommand<typeof import("./detach.ts")>("detach")).detachCommand,
  },
  {
    name: "attached",
    summary: "list attached exports with their I/O counters",
    load: async () =>
      (await importCommand<typeof import("./attached.ts")>("attached")).attachedCommand,
  },
  {
    name: "help",
    summary: "show the manual page of a command, plugin, filter or topic",
    // The help command describes the other commands, so it is given the registry.
    load: async () =>
      (await importCommand<typeof import("./help.ts")>("help")).helpCommand(COMMANDS),
  },
  {
    name: "completions",
    summary: "print a completion script for bash, zsh or fish",
    // Typed without naming the module: it reads this registry, which must not depend on it.
    load: async () =>
      (await importCommand<{ completionsCommand: Command }>("completions")).completionsCommand,
  },
];

/** Subcommands by name, in the order `nbd --help` lists them. */
export const COMMANDS: ReadonlyMap<string, CommandEntry> = new Map(ENTRIES.map((c) => [c.name, c]));
