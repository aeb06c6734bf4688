/**
 * `nbd list URI`: every export a server lists, with its details (the same
 * as `nbd info --list`, like `nbdinfo --list`).
 *
 * @module
 */

import { TLS_OPTIONS, TLS_USAGE, withTlsFlags } from "./tls_options.ts";
import { CLIENT_OPTIONS, CLIENT_USAGE, clientTimeouts } from "./client_options.ts";
import { withUriArgument } from "./uri_argument.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { showInfo } from "./info.ts";
import { writeStdout } from "./output.ts";

const OWN_OPTIONS = {
  json: { type: "boolean", help: "print JSON (nbdinfo's field names)" },
  content: { type: "boolean", help: "also probe each export's content with file(1)" },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...OWN_OPTIONS, ...CLIENT_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd list [OPTIONS] URI

List the exports of an NBD server with their size, flags and block sizes.
The export name in URI is ignored.

Options:
${formatOptions(OWN_OPTIONS)}

URI may also be a server command, started for the command by socket activation
and stopped afterwards: nbd list [OPTIONS] -- [ CMD ARGS ... ]

${CLIENT_USAGE}

${TLS_USAGE}

Examples:
  nbd list nbd://localhost
  nbd list --json "nbd+unix:///?socket=/tmp/nbd.sock"
`;

/** The `nbd list` command. */
export const listCommand: Command = {
  name: "list",
  summary: "list the exports of a server (like nbdinfo --list)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const timeouts = clientTimeouts(values);
    return await withUriArgument(positionals, "list", (uri) =>
      showInfo(withTlsFlags(uri, values), {
        json: values.json ?? false,
        list: true,
        content: values.content ?? false,
        timeouts,
      }));
  },
};
