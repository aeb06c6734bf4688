/**
 * `nbd serve`: serve a plugin (with filters) over TCP, a Unix socket,
 * socket activation or stdin/stdout, optionally in captive `--run` mode.
 *
 * @module
 */

import { FILTERS } from "../filters/mod.ts";
import { PLUGINS } from "../plugins/mod.ts";
import { formatNbdUri, type NbdUri } from "../protocol/uri.ts";
import type { Filter, FilterInstance, Plugin } from "../core/backend.ts";
import { Exports } from "../server/exports.ts";
import {
  activationFds,
  listenActivated,
  type Listener,
  listenTcp,
  listenUnix,
  serveStdio,
} from "../server/listener.ts";
import { checkRequired, formatParams, paramKey, Params } from "../core/params.ts";
import { parseSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import {
  DEFAULT_HANDSHAKE_TIMEOUT,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MAX_IN_FLIGHT,
  NbdServer,
  type TlsMode,
  type TlsUpgrader,
} from "../server/server.ts";
import { serverTls } from "../server/tls.ts";
import {
  DEFAULT_VIEW_ADDRESS,
  looksLikeViewAddress,
  parseViewAddress,
  startViewServer,
  type ViewServer,
} from "../view/view_server.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";

/** Options shared by `nbd serve` and `nbd proxy`. */
export const SERVE_OPTIONS = {
  port: { type: "string", short: "p", value: "N", help: "TCP port (default 10809)" },
  ip: {
    type: "string",
    short: "i",
    multiple: true,
    value: "ADDR",
    help: "listen address (default 127.0.0.1 and ::1; 0.0.0.0 exposes it; repeatable)",
  },
  unix: {
    type: "string",
    short: "U",
    value: "PATH",
    path: true,
    help: 'listen on a Unix socket; "-" makes a private one in a temp dir',
  },
  single: {
    type: "boolean",
    short: "s",
    help: "serve one connection on stdin/stdout, then exit",
  },
  "export-name": {
    type: "string",
    short: "e",
    value: "NAME",
    help: 'name of the export (default "")',
  },
  description: {
    type: "string",
    value: "TEXT",
    help: "description of the export shown to clients",
  },
  readonly: { type: "boolean", short: "r", help: "serve read-only" },
  filter: {
    type: "string",
    multiple: true,
    value: "NAME",
    help: "stack a filter (repeatable; the first is nearest the client)",
  },
  run: {
    type: "string",
    value: "CMD",
    help: "run CMD with the server's URI in $uri; stop serving when it exits",
  },
  "print-uri": {
    type: "boolean",
    help: "print the URI clients should use on stdout once listening",
  },
  "max-in-flight": {
    type: "string",
    value: "N",
    help: `requests processed at once per connection (default ${DEFAULT_MAX_IN_FLIGHT})`,
  },
  "max-connections": {
    type: "string",
    value: "N",
    help: `clients served at once; more are disconnected (default ${DEFAULT_MAX_CONNECTIONS})`,
  },
  "max-payload": {
    type: "string",
    value: "SIZE",
    help: "largest request payload advertised (default 32M)",
  },
  "handshake-timeout": {
    type: "string",
    value: "S",
    help:
      `drop clients that have not finished the handshake after S seconds (default ${DEFAULT_HANDSHAKE_TIMEOUT}; 0 = never)`,
  },
  "idle-timeout": {
    type: "string",
    value: "S",
    help: "close connections idle for S seconds (default 0 = never)",
  },
  pidfile: {
    type: "string",
    short: "P",
    value: "FILE",
    path: true,
    help: "write the process id to FILE once listening",
  },
  tls: {
    type: "string",
    value: "MODE",
    help: "off (default), on (client chooses) or require (no plaintext access)",
  },
  "tls-certificates": {
    type: "string",
    value: "DIR",
    path: true,
    help: "ca-cert.pem, server-cert.pem, server-key.pem (nbdkit's layout)",
  },
  "tls-verify-peer": { type: "boolean", help: "require a client certificate signed by the CA" },
  "tls-psk": {
    type: "string",
    value: "FILE",
    path: true,
    help: "TLS-PSK (not supported: use X.509 certificates)",
  },
  view: {
    type: "string",
    value: "ADDR",
    optionalValue: "separate",
    help:
      `serve the live block-activity page, /stats and /metrics over HTTP on ADDR (default ${DEFAULT_VIEW_ADDRESS}; HOST:PORT, :PORT or PORT)`,
  },
  verbose: { type: "boolean", short: "v", help: "log options and requests to stderr" },
  help: {
    type: "boolean",
    short: "h",
    help: "show this help; with a plugin or --filter, show its parameters",
  },
} as const;

const USAGE = `Usage: nbd serve [OPTIONS] PLUGIN [PARAM=VALUE | VALUE ...]

Serve a disk image, a file, memory or generated data over NBD.

Options:
${formatOptions(SERVE_OPTIONS)}

--run: the command runs with $uri, $nbd, $unixsocket, $port and $exportname
set; serving stops when it exits, and nbd exits with its status.
--max-payload: without it, READ/WRITE requests up to 64M are still accepted,
as real clients send them.
--view: a separate ADDR is taken only when it looks like one
("--view 9000 memory 1G"); "--view memory 1G" uses the default address.

Plugins:
${[...PLUGINS.values()].map((p) => `  ${p.name.padEnd(14)} ${p.summary}`).join("\n")}
${
  FILTERS.size > 0
    ? `\nFilters:\n${
      [...FILTERS.values()].map((f) => `  ${f.name.padEnd(14)} ${f.summary}`).join("\n")
    }\n`
    : ""
}
Examples:
  nbd serve memory 1G
  nbd serve -r file disk.img
  nbd serve -U - pattern 1G --run 'nbdinfo "$uri"'
`;

/** Parsed serve options (the part of parseArgs' result we use). */
export interface ServeValues {
  port?: string;
  ip?: string[];
  unix?: string;
  single?: boolean;
  "export-name"?: string;
  description?: string;
  readonly?: boolean;
  filter?: string[];
  run?: string;
  "print-uri"?: boolean;
  "max-in-flight"?: string;
  "max-connections"?: string;
  "max-payload"?: string;
  "handshake-timeout"?: string;
  "idle-timeout"?: string;
  pidfile?: string;
  tls?: string;
  "tls-certificates"?: string;
  "tls-verify-peer"?: boolean;
  "tls-psk"?: string;
  view?: string;
  verbose?: boolean;
}

/**
 * Gives `--view` its optional value before parseArgs (which cannot express
 * optional values) sees the arguments: `--view=ADDR` stays, `--view ADDR`
 * becomes `--view=ADDR` when the next word looks like an address (a plugin
 * name never does), and a bare `--view` gets the default address. Values
 * of other options (`--run --view` runs a command named --view) and
 * everything after `--` are left alone.
 */
export function expandViewOption(
  argv: readonly string[],
  options: Record<string, { type: string; short?: string }> = SERVE_OPTIONS,
): string[] {
  const takesValue = new Set<string>();
  for (const [name, spec] of Object.entries(options)) {
    if (spec.type !== "string" || name === "view") continue;
    takesValue.add(`--${name}`);
    if (spec.short) takesValue.add(`-${spec.short}`);
  }
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i]!;
    if (word === "--") {
      out.push(...argv.slice(i));
      break;
    }
    if (word === "--view") {
      const next = argv[i + 1];
      if (next !== undefined && looksLikeViewAddress(next)) {
        out.push(`--view=${next}`);
        i++;
      } else {
        out.push(`--view=${DEFAULT_VIEW_ADDRESS}`);
      }
      continue;
    }
    out.push(word);
    // A short cluster such as -rU takes a value when its last letter does.
    const valueOf = /^-[^-]/.test(word) ? `-${word.slice(-1)}` : word;
    if (takesValue.has(valueOf) && i + 1 < argv.length) out.push(argv[++i]!);
  }
  return out;
}

function pluginHelp(plugin: Plugin): string {
  return `Usage: nbd serve [OPTIONS] ${plugin.name} ${
    plugin.params.map((p) =>
      (p.required ? "" : "[") + paramKey(p, plugin.magicParam) + (p.required ? "" : "]") +
      (p.repeatable ? " ..." : "")
    ).join(" ")
  }

${plugin.summary}

Parameters:
${formatParams(plugin.params, plugin.magicParam)}
${plugin.description ? `\n${plugin.description}\n` : ""}`;
}

function filterHelp(filter: Filter): string {
  return `Usage: nbd serve --filter=${filter.name} [OPTIONS] PLUGIN ... [PARAM=VALUE ...]

${filter.summary}

Parameters:
${formatParams(filter.params)}
${filter.description ? `\n${filter.description}\n` : ""}`;
}

function lookupFilter(name: string): Filter {
  const filter = FILTERS.get(name);
  if (!filter) {
    throw new UsageError(
      `unknown filter "${name}" (known: ${[...FILTERS.keys()].join(", ") || "none"})`,
    );
  }
  return filter;
}

function integerOption(
  text: string | undefined,
  name: string,
  min: number,
  max: number,
): number | undefined {
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < min || n > max) {
    throw new UsageError(`${name}: expected an integer from ${min} to ${max}, got "${text}"`);
  }
  return n;
}

function viewAddressOption(text: string): { hostname: string; port: number } {
  try {
    return parseViewAddress(text);
  } catch (error) {
    throw new UsageError(`--view: ${(error as Error).message}`);
  }
}

function parsePort(text: string): number {
  if (!/^\d+$/.test(text) || Number(text) > 65535) {
    throw new UsageError(`--port: bad port "${text}"`);
  }
  return Number(text);
}

/** The URI clients use for a listener. */
function uriFor(
  listener: Listener,
  exportName: string,
  tls: boolean,
  certificates?: string,
): string | undefined {
  const address = listener.address;
  // With TLS the URI carries the certificate directory so libnbd clients can connect as is.
  const base: NbdUri = { tls, transport: "tcp", exportName, tlsCertificates: certificates };
  if (address.transport === "unix") {
    return formatNbdUri({ ...base, transport: "unix", socket: address.path });
  }
  if (address.transport === "tcp") {
    const wildcard = address.hostname === "0.0.0.0" || address.hostname === "::";
    const loopbackV6 = address.hostname === "::1";
    const host = wildcard || loopbackV6 ? "localhost" : address.hostname;
    return formatNbdUri({ ...base, host, port: address.port });
  }
  return undefined;
}

/** Everything `runServer` needs: the parsed options and the configured plugin and filters. */
export interface ServerSetup {
  /** Parsed options. */
  values: ServeValues;
  /** The plugin to serve. */
  plugin: Plugin;
  /** Its parameters (filters take theirs first). */
  params: Params;
}

/** Default certificate directories, as nbdkit looks them up. */
function defaultCertificateDirs(): string[] {
  const home = Deno.env.get("HOME");
  const dirs = home ? [`${home}/.pki/nbdkit`, `${home}/.config/pki/nbdkit`] : [];
  return [...dirs, "/etc/pki/nbdkit"];
}

/** Resolves the TLS options: mode, and the upgrader when TLS is on. */
export function configureTls(
  values: ServeValues,
): { mode: TlsMode; upgrader?: TlsUpgrader; certificates?: string } {
  if (values["tls-psk"] !== undefined) {
    throw new UsageError(
      "--tls-psk: TLS-PSK is not supported by this build's TLS library; use X.509 certificates (--tls-certificates)",
    );
  }
  const mode = (values.tls ?? (values["tls-certificates"] ? "on" : "off")) as TlsMode;
  if (!["off", "on", "require"].includes(mode)) {
    throw new UsageError(`--tls: expected off, on or require, got "${mode}"`);
  }
  if (mode === "off") {
    if (values["tls-verify-peer"]) {
      throw new UsageError("--tls-verify-peer needs --tls=on or --tls=require");
    }
    return { mode };
  }
  let certificates = values["tls-certificates"];
  if (certificates === undefined) {
    certificates = defaultCertificateDirs().find((d) => {
      try {
        return Deno.statSync(`${d}/server-cert.pem`).isFile;
      } catch {
        return false;
      }
    });
    if (certificates === undefined) {
      throw new UsageError(
        `--tls=${mode} needs --tls-certificates DIR (with ca-cert.pem, server-cert.pem, server-key.pem)`,
      );
    }
  }
  const upgrader = serverTls({ certificates, verifyPeer: values["tls-verify-peer"] ?? false });
  return { mode, upgrader, certificates };
}

/**
 * Configures the filters and the plugin, listens, serves until a signal,
 * the captive command or the single connection ends, and shuts down
 * cleanly. Resolves to the exit status.
 */
export async function runServer(setup: ServerSetup): Promise<number> {
  const { values, plugin, params } = setup;
  const filterNames = values.filter ?? [];
  const filters: Filter[] = filterNames.map(lookupFilter);
  const viewAddress = values.view === undefined ? undefined : viewAddressOption(values.view);
  const maxInFlight = integerOption(values["max-in-flight"], "--max-in-flight", 1, 65536) ??
    DEFAULT_MAX_IN_FLIGHT;
  const maxConnections = integerOption(
    values["max-connections"],
    "--max-connections",
    1,
    1_000_000,
  );
  const handshakeTimeout = integerOption(
    values["handshake-timeout"],
    "--handshake-timeout",
    0,
    86400,
  );
  const idleTimeout = integerOption(values["idle-timeout"], "--idle-timeout", 0, 31_536_000);
  const maxPayload = values["max-payload"] === undefined
    ? undefined
    : parseSize(values["max-payload"], "--max-payload");
  if (maxPayload !== undefined && (maxPayload < 4096 || maxPayload > 0x7fffffff)) {
    throw new UsageError("--max-payload: expected a size from 4K to 2G");
  }
  const tls = configureTls(values);
  if (tls.mode !== "off" && values.single) {
    throw new UsageError("--single cannot be combined with TLS");
  }
  const fds = activationFds();
  const modes =
    [values.single, values.unix !== undefined, values.port !== undefined || values.ip !== undefined]
      .filter(Boolean).length;
  if (values.single && modes > 1) {
    throw new UsageError("--single cannot be combined with -p, -i or -U");
  }
  if (values.single && values.run) throw new UsageError("--single cannot be combined with --run");
  if (fds > 0 && (modes > 0 || values.run)) {
    throw new UsageError(
      "with socket activation (LISTEN_FDS), -p, -i, -U, -s and --run cannot be used",
    );
  }

  // Every layer's required parameters, before any layer is created: nothing to undo.
  for (const layer of [...filters, plugin]) checkRequired(layer.name, layer.params, params);
  const filterInstances: FilterInstance[] = [];
  for (const filter of filters) filterInstances.push(await filter.create(params));
  const pluginInstance = await plugin.create(params);
  try {
    params.assertEmpty();
  } catch (error) {
    await pluginInstance.close?.();
    throw error;
  }
  const exportName = values["export-name"] ?? "";
  let view: ViewServer | undefined;
  const exports = new Exports({
    plugin: pluginInstance,
    filters: filterInstances,
    exportName,
    description: values.description,
  });
  const server = new NbdServer({
    exports,
    readonly: values.readonly ?? false,
    verbose: values.verbose ?? false,
    maxInFlight,
    maxConnections,
    maxPayload,
    handshakeTimeout,
    idleTimeout,
    tlsMode: tls.mode,
    tls: tls.upgrader,
  });
  // The view starts first: if its address is taken, nothing else needs undoing.
  if (viewAddress) {
    try {
      view = await startViewServer({
        stats: server.state.stats,
        listExports: async () => (await exports.list()).map((e) => e.name),
      }, viewAddress);
    } catch (error) {
      await exports.close();
      throw new Error(`Cannot serve the view on ${values.view}: ${(error as Error).message}`);
    }
  }
  const listenOptions = { nodeSockets: tls.mode !== "off" };

  const listeners: Listener[] = [];
  const closeListeners = () => listeners.forEach((l) => l.close());
  try {
    if (values.single) {
      listeners.push(serveStdio(server));
    } else if (fds > 0) {
      listeners.push(listenActivated(server, fds));
    } else {
      let unix = values.unix;
      // Captive mode without an address uses a private Unix socket: no port to collide on.
      if (
        unix === undefined && values.run !== undefined && values.port === undefined &&
        values.ip === undefined
      ) {
        unix = "-";
      }
      if (unix !== undefined) {
        let path = unix;
        if (unix === "-") {
          const dir = await Deno.makeTempDir({ prefix: "nbd" });
          path = `${dir}/socket`;
        }
        listeners.push(await listenUnix(server, path, listenOptions));
      }
      if (values.port !== undefined || values.ip !== undefined || unix === undefined) {
        const port = values.port === undefined ? 10809 : parsePort(values.port);
        const ips = values.ip ?? ["127.0.0.1", "::1"];
        for (const ip of ips) {
          try {
            // With port 0 every address must share the port the first one got.
            const chosen =
              port === 0 && listeners.length > 0 && listeners[0]!.address.transport === "tcp"
                ? listeners[0]!.address.port
                : port;
            listeners.push(
              await listenTcp(server, ip.replace(/^\[(.*)\]$/, "$1"), chosen, listenOptions),
            );
          } catch (error) {
            // ::1 is optional in the default pair: some hosts have no IPv6.
            if (values.ip === undefined && ip === "::1") continue;
            throw new Error(`Cannot listen on ${ip} port ${port}: ${(error as Error).message}`);
          }
        }
      }
    }
  } catch (error) {
    closeListeners();
    await view?.close();
    await exports.close();
    throw error;
  }

  const primary = listeners.find((l) => l.address.transport === "unix") ?? listeners[0]!;
  const uri = uriFor(primary, exportName, tls.mode === "require", tls.certificates);
  if (values["print-uri"] && uri) console.log(uri);
  if (values.pidfile) await Deno.writeTextFile(values.pidfile, `${Deno.pid}\n`);
  if (values.verbose && uri) server.state.log(`listening on ${uri}`);
  if (view) server.state.log(`view at ${view.url}`);

  let stopRequested: (status: number) => void = () => {};
  const stopped = new Promise<number>((resolve) => stopRequested = resolve);
  const onSignal = () => stopRequested(0);
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  for (const signal of signals) Deno.addSignalListener(signal, onSignal);

  let child: Deno.ChildProcess | undefined;
  if (values.run !== undefined) {
    const address = primary.address;
    const env: Record<string, string> = {
      uri: uri ?? "",
      nbd: uri ?? "",
      exportname: exportName,
      unixsocket: address.transport === "unix" ? address.path : "",
      port: address.transport === "tcp" ? String(address.port) : "",
    };
    if (tls.mode !== "off") {
      env.tls = tls.mode === "require" ? "2" : "1";
      env.tls_certificates = tls.certificates!;
    }
    child = new Deno.Command("/bin/sh", { args: ["-c", values.run], env, stdin: "inherit" })
      .spawn();
    child.status.then((status) =>
      stopRequested(status.signal ? 128 + signalNumber(status.signal) : status.code)
    );
  } else if (values.single) {
    listeners[0]!.done.then(() => stopRequested(0));
  }

  const status = await stopped;
  for (const signal of signals) Deno.removeSignalListener(signal, onSignal);
  if (child) {
    try {
      child.kill("SIGTERM");
    } catch { /* already exited */ }
  }
  closeListeners();
  await view?.close();
  await server.shutdown();
  if (values.unix === "-" || (values.unix === undefined && values.run !== undefined)) {
    const address = primary.address;
    if (address.transport === "unix") {
      await Deno.remove(address.path.replace(/\/socket$/, ""), { recursive: true }).catch(() => {});
    }
  }
  if (values.pidfile) await Deno.remove(values.pidfile).catch(() => {});
  return status;
}

function signalNumber(signal: Deno.Signal): number {
  const numbers: Partial<Record<Deno.Signal, number>> = {
    SIGHUP: 1,
    SIGINT: 2,
    SIGQUIT: 3,
    SIGKILL: 9,
    SIGSEGV: 11,
    SIGPIPE: 13,
    SIGTERM: 15,
  };
  return numbers[signal] ?? 0;
}

/** `nbd serve`. */
export const serveCommand: Command = {
  name: "serve",
  summary: "serve a plugin (memory, file, pattern, ...) over NBD",
  usage: USAGE,
  options: SERVE_OPTIONS,
  async run(argv) {
    const { values, positionals } = parseOptions(expandViewOption(argv), SERVE_OPTIONS);
    const [pluginName, ...words] = positionals;
    if (values.help) {
      if (pluginName) {
        const plugin = PLUGINS.get(pluginName);
        if (!plugin) throw new UsageError(`unknown plugin "${pluginName}"`);
        console.log(pluginHelp(plugin));
      } else if (values.filter?.length) {
        for (const name of values.filter) console.log(filterHelp(lookupFilter(name)));
      } else {
        console.log(USAGE);
      }
      return 0;
    }
    if (!pluginName) {
      throw new UsageError("missing PLUGIN (e.g. nbd serve memory 1G); see nbd serve --help");
    }
    const plugin = PLUGINS.get(pluginName);
    if (!plugin) {
      throw new UsageError(
        `unknown plugin "${pluginName}" (known: ${[...PLUGINS.keys()].join(", ")})`,
      );
    }
    const params = Params.parse(words, plugin.magicParam);
    return await runServer({ values, plugin, params });
  },
};
