/**
 * `nbd proxy`: serve another NBD server's export, adding or stripping TLS
 * on the way. It is `nbd serve nbd uri=UPSTREAM` with the same options.
 *
 * @module
 */

import { nbdPlugin } from "../plugins/nbd.ts";
import { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { expandViewOption, runServer, SERVE_OPTIONS } from "./serve.ts";
import { CLIENT_OPTIONS, CLIENT_USAGE } from "./client_options.ts";

const OPTIONS = { ...SERVE_OPTIONS, ...CLIENT_OPTIONS } as const;

const USAGE = `Usage: nbd proxy [SERVE OPTIONS] UPSTREAM-URI [PARAM=VALUE ...]

Serve the export UPSTREAM-URI names, forwarding every request. The listening
side takes all of "nbd serve"'s options (-p, -i, -U, --run, --tls..., --filter,
--view);
the upstream side follows the URI: nbds:// or nbds+unix:// for TLS, with
?tls-certificates=DIR. Each client gets its own upstream connection, so
multi-connection clients work end to end. A lost upstream gives EIO replies
until it comes back.

Options (those of "nbd serve"):
${formatOptions(SERVE_OPTIONS)}

Upstream ${
  CLIENT_USAGE.replace("Timeouts:", "timeouts (the nbd plugin's timeout= and request-timeout=):")
}

Parameters (after the URI): dynamic-export=true passes each client's export
name upstream; retry=false stops reconnecting; filter parameters.

Examples:
  # TLS in front of a plaintext qemu-nbd:
  nbd proxy --tls=require --tls-certificates=/etc/pki/nbd -p 10809 -i 0.0.0.0 \\
      'nbd+unix:///disk?socket=/run/qemu-nbd.sock'
  # A local plaintext socket onto a remote TLS server, for TLS-unaware tools:
  nbd proxy -U /tmp/plain.sock 'nbds://storage.example/disk?tls-certificates=/etc/pki/nbd'
`;

/** `nbd proxy`. */
export const proxyCommand: Command = {
  name: "proxy",
  summary: "forward an export from another NBD server, adding or stripping TLS",
  usage: USAGE,
  options: OPTIONS,
  async run(argv) {
    const { values, positionals } = parseOptions(expandViewOption(argv), OPTIONS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    const [upstream, ...words] = positionals;
    if (!upstream) {
      throw new UsageError(
        "missing UPSTREAM-URI (e.g. nbd proxy -U - nbd+unix:///?socket=/tmp/s.sock)",
      );
    }
    const params = Params.parse(words);
    params.add("uri", upstream);
    if (values.timeout !== undefined) params.add("timeout", values.timeout);
    if (values["request-timeout"] !== undefined) {
      params.add("request-timeout", values["request-timeout"]);
    }
    return await runServer({ values, plugin: nbdPlugin, params });
  },
};
