/**
 * `nbd serve`: serve a plugin (with filters) over TCP, a Unix socket,
 * socket activation or stdin/stdout, optionally in captive `--run` mode.
 *
 * @module
 */

import { signalNumber, terminationSignal, whenAborted } from "../util/signals.ts";
import { FILTERS } from "../filters/mod.ts";
import { PLUGINS } from "../plugins/mod.ts";
import type { Filter, Plugin } from "../core/backend.ts";
import { Exports } from "../server/exports.ts";
import {
  activationFds,
  listenerUri,
  listenOnDescriptors,
  type ListenPlan,
  openListeners,
} from "../server/listener.ts";
import {
  duplicateDescriptor,
  newListeningDescriptors,
  socketDescriptors,
} from "../io/listening_fds.ts";
import { startSharing } from "../util/shared_buffers.ts";
import { formatParams, paramKey, Params } from "../core/params.ts";
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
import { startLayers } from "../server/stack.ts";
import { isModuleSpecifier, loadFilter, loadPlugin } from "../core/module_loader.ts";
import { serverTls } from "../server/tls.ts";
import {
  DEFAULT_VIEW_ADDRESS,
  looksLikeViewAddress,
  type OpenDisk,
  parseViewAddress,
  startViewServer,
  type ViewServer,
} from "../view/view_server.ts";
import { faultControl } from "../view/fault_control.ts";
import { CachedReader } from "../formats/disk_reader.ts";
import { FaultSwitch } from "../filters/fault_switch.ts";
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
  "view-control": {
    type: "boolean",
    help: "let the view's page (POST /control) switch injected errors per export at run time",
  },
  "view-token": {
    type: "string",
    value: "TOKEN",
    help: "with --view-control: accept changes from any peer that sends TOKEN (else loopback only)",
  },
  workers: {
    type: "string",
    value: "N",
    help:
      "serve on N threads, each accepting connections on the same sockets (default 1; memory, file, null and pattern plugins, no filters)",
  },
  verbose: { type: "boolean", short: "v", help: "log options and requests to stderr" },
  "debug-layers": {
    type: "boolean",
    help: "check every call between layers and report the layer at fault (also NBD_DEBUG_LAYERS=1)",
  },
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
  "view-control"?: boolean;
  "view-token"?: string;
  workers?: string;
  verbose?: boolean;
  "debug-layers"?: boolean;
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

function pluginHelp(plugin: Plugin, invokedAs: string = plugin.name): string {
  return `Usage: nbd serve [OPTIONS] ${invokedAs} ${
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

function filterHelp(filter: Filter, invokedAs: string = filter.name): string {
  return `Usage: nbd serve --filter=${invokedAs} [OPTIONS] PLUGIN ... [PARAM=VALUE ...]

${filter.summary}

Parameters:
${formatParams(filter.params)}
${filter.description ? `\n${filter.description}\n` : ""}`;
}

function lookupFilter(name: string, modules?: ReadonlyMap<string, Filter>): Filter {
  const filter = FILTERS.get(name) ?? modules?.get(name);
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

/** The TLS options, checked but not yet looked up on disk. */
export interface TlsConfig {
  /** off, on (the client chooses) or require. */
  mode: TlsMode;
  /** The certificate directory; absent = look in nbdkit's default places. */
  certificates?: string;
  /** Require a client certificate signed by the CA. */
  verifyPeer: boolean;
}

/** What `nbd serve` is asked to do: its options checked, resolved and defaulted. */
export interface ServeConfig {
  /** Filters to stack, outermost (nearest the client) first. */
  filters: Filter[];
  /** Name of the export. */
  exportName: string;
  /** Description of the export. */
  description?: string;
  /** Serve read-only. */
  readonly: boolean;
  /** Log options and requests. */
  verbose: boolean;
  /** Check every call between layers (absent = the NBD_DEBUG_LAYERS environment variable). */
  debugLayers?: boolean;
  /** Per-server limits (absent = the server's defaults). */
  limits: {
    maxInFlight: number;
    maxConnections?: number;
    maxPayload?: number;
    handshakeTimeout?: number;
    idleTimeout?: number;
  };
  /** TLS. */
  tls: TlsConfig;
  /** Where to listen. */
  listen: ListenPlan;
  /** The captive command (`--run`). */
  run?: string;
  /** Print the URI on stdout once listening. */
  printUri: boolean;
  /** File to write the process id to once listening. */
  pidfile?: string;
  /** The view's address, as given and as parsed. */
  view?: { text: string; hostname: string; port: number };
  /** Fault injection from the view (`--view-control`), with its token if any. */
  viewControl?: { token?: string };
  /** Threads serving connections (`--workers`): 1 = the event loop alone. */
  workers: number;
}

/** What the options are checked against besides themselves. */
export interface ServeEnvironment {
  /** Sockets passed by socket activation (0 = none). */
  listenFds: number;
  /** Filters loaded from modules (`--filter=./slow.ts`), by the argument that named them. */
  filterModules?: ReadonlyMap<string, Filter>;
}

/**
 * Loads the filters that `--filter` names by a module path or URL, once
 * each; built-in names are left to `parseServeConfig`.
 */
export async function loadFilterModules(
  names: readonly string[],
): Promise<Map<string, Filter>> {
  const modules = new Map<string, Filter>();
  for (const name of names) {
    if (!FILTERS.has(name) && isModuleSpecifier(name) && !modules.has(name)) {
      modules.set(name, await loadFilter(name));
    }
  }
  return modules;
}

/** The plugin a command-line word names: a built-in, or a module path or URL. */
export async function resolvePlugin(name: string): Promise<Plugin> {
  const plugin = PLUGINS.get(name);
  if (plugin) return plugin;
  if (isModuleSpecifier(name)) return await loadPlugin(name);
  throw new UsageError(
    `unknown plugin "${name}" (known: ${[...PLUGINS.keys()].join(", ")}; ` +
      "or a module: ./plugin.ts, file: or https: URL)",
  );
}

/**
 * Checks `nbd serve`'s options and turns them into a `ServeConfig`. Pure:
 * it reads no files or environment (socket activation comes in
 * `environment`), so every usage error is found before anything starts.
 */
export function parseServeConfig(values: ServeValues, environment: ServeEnvironment): ServeConfig {
  const filters = (values.filter ?? []).map((name) =>
    lookupFilter(name, environment.filterModules)
  );
  const view = values.view === undefined
    ? undefined
    : { text: values.view, ...viewAddressOption(values.view) };
  if (values["view-control"] && !view) throw new UsageError("--view-control needs --view");
  const token = values["view-token"];
  if (token !== undefined && !values["view-control"]) {
    throw new UsageError("--view-token needs --view-control");
  }
  if (token !== undefined && !/^[\x21-\x7e]{8,}$/.test(token)) {
    throw new UsageError("--view-token: expected at least 8 printable characters, no spaces");
  }
  const viewControl = values["view-control"] ? { token } : undefined;
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
  const tls = parseTlsOptions(values);
  if (tls.mode !== "off" && values.single) {
    throw new UsageError("--single cannot be combined with TLS");
  }
  const fds = environment.listenFds;
  const tcpGiven = values.port !== undefined || values.ip !== undefined;
  const modes = [values.single, values.unix !== undefined, tcpGiven].filter(Boolean).length;
  if (values.single && modes > 1) {
    throw new UsageError("--single cannot be combined with -p, -i or -U");
  }
  if (values.single && values.run) throw new UsageError("--single cannot be combined with --run");
  if (fds > 0 && (modes > 0 || values.run)) {
    throw new UsageError(
      "with socket activation (LISTEN_FDS), -p, -i, -U, -s and --run cannot be used",
    );
  }
  let listen: ListenPlan;
  if (values.single) {
    listen = { transport: "stdio" };
  } else if (fds > 0) {
    listen = { transport: "activation", fds };
  } else {
    let unix = values.unix;
    // Captive mode without an address uses a private Unix socket: no port to collide on.
    if (unix === undefined && values.run !== undefined && !tcpGiven) unix = "-";
    listen = { transport: "sockets" };
    if (unix !== undefined) listen.unix = unix === "-" ? {} : { path: unix };
    if (tcpGiven || unix === undefined) {
      listen.tcp = {
        port: values.port === undefined ? 10809 : parsePort(values.port),
        hosts: values.ip ?? ["127.0.0.1", "::1"],
        // ::1 is optional in the default pair: some hosts have no IPv6.
        optional: values.ip === undefined ? ["::1"] : [],
      };
    }
  }
  const workers = integerOption(values.workers, "--workers", 1, MAX_WORKERS) ?? 1;
  if (workers > 1) checkWorkers(values, listen, filters);
  return {
    workers,
    filters,
    exportName: values["export-name"] ?? "",
    description: values.description,
    readonly: values.readonly ?? false,
    verbose: values.verbose ?? false,
    debugLayers: values["debug-layers"] || undefined,
    limits: { maxInFlight, maxConnections, maxPayload, handshakeTimeout, idleTimeout },
    tls,
    listen,
    run: values.run,
    printUri: values["print-uri"] ?? false,
    pidfile: values.pidfile,
    view,
    viewControl,
  };
}

/** Most threads `--workers` starts. */
const MAX_WORKERS = 256;

/**
 * Plugins whose state every worker sees alike: the file's is the kernel's,
 * memory's is shared memory, the rest have none to diverge.
 */
export const WORKER_PLUGINS: ReadonlySet<string> = new Set(["file", "memory", "null", "pattern"]);

/** Refuses `--workers` where the workers could not serve as one server. */
function checkWorkers(values: ServeValues, listen: ListenPlan, filters: Filter[]): void {
  if (listen.transport === "stdio") {
    throw new UsageError("--workers needs listening sockets (-p, -i, -U or socket activation)");
  }
  if (values.tls !== undefined && values.tls !== "off") {
    throw new UsageError("--workers cannot be combined with --tls");
  }
  if (values.view !== undefined) throw new UsageError("--workers cannot be combined with --view");
  if (filters.length > 0) throw new UsageError("--workers cannot be combined with --filter");
}

/** Checks the TLS options. */
function parseTlsOptions(values: ServeValues): TlsConfig {
  if (values["tls-psk"] !== undefined) {
    throw new UsageError(
      "--tls-psk: TLS-PSK is not supported by this build's TLS library; use X.509 certificates (--tls-certificates)",
    );
  }
  const mode = (values.tls ?? (values["tls-certificates"] ? "on" : "off")) as TlsMode;
  if (!["off", "on", "require"].includes(mode)) {
    throw new UsageError(`--tls: expected off, on or require, got "${mode}"`);
  }
  const verifyPeer = values["tls-verify-peer"] ?? false;
  if (mode === "off" && verifyPeer) {
    throw new UsageError("--tls-verify-peer needs --tls=on or --tls=require");
  }
  return { mode, certificates: values["tls-certificates"], verifyPeer };
}

/** Everything `runServer` needs: the parsed options and the configured plugin and filters. */
export interface ServerSetup {
  /** Parsed options. */
  values: ServeValues;
  /** The plugin to serve. */
  plugin: Plugin;
  /** Its parameters (filters take theirs first). */
  params: Params;
  /** The command line these came from (what `--workers` hands each worker). */
  argv?: string[];
}

/** Default certificate directories, as nbdkit looks them up. */
function defaultCertificateDirs(): string[] {
  const home = Deno.env.get("HOME");
  const dirs = home ? [`${home}/.pki/nbdkit`, `${home}/.config/pki/nbdkit`] : [];
  return [...dirs, "/etc/pki/nbdkit"];
}

/** TLS ready to serve: the mode, and with TLS on the upgrader and where its certificates are. */
export interface TlsSetup {
  /** off, on or require. */
  mode: TlsMode;
  /** Upgrades connections; absent when TLS is off. */
  upgrader?: TlsUpgrader;
  /** The certificate directory in use. */
  certificates?: string;
}

/** Finds and loads the certificates of `config`. */
function configureTls(config: TlsConfig): TlsSetup {
  const { mode, verifyPeer } = config;
  if (mode === "off") return { mode };
  let certificates = config.certificates;
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
  const upgrader = serverTls({ certificates, verifyPeer });
  return { mode, upgrader, certificates };
}

/**
 * Configures the filters and the plugin, listens, serves until a signal,
 * the captive command or the single connection ends, and shuts down
 * cleanly. Resolves to the exit status.
 */
export async function runServer(setup: ServerSetup): Promise<number> {
  const filterModules = await loadFilterModules(setup.values.filter ?? []);
  const config = parseServeConfig(setup.values, { listenFds: activationFds(), filterModules });
  if (config.workers > 1) {
    if (!WORKER_PLUGINS.has(setup.plugin.name) || setup.argv === undefined) {
      throw new UsageError(
        `--workers: the ${setup.plugin.name} plugin cannot be served by several workers (only ${
          [...WORKER_PLUGINS].join(", ")
        })`,
      );
    }
    // From here on the memory plugin keeps its disk where the workers can see it.
    const shared = startSharing();
    return await serve(config, setup.plugin, setup.params, { argv: setup.argv, shared });
  }
  return await serve(config, setup.plugin, setup.params);
}

/** What the main thread hands its workers. */
interface WorkerPlan {
  /** The `nbd serve` command line, parsed again by each worker. */
  argv: string[];
  /** The shared regions plugins created on the main thread. */
  shared: Map<string, SharedArrayBuffer>;
}

/** Parses a `nbd serve` command line into what a server needs (as `serveCommand` does). */
async function parseServeArgv(
  argv: string[],
): Promise<{ values: ServeValues; plugin: Plugin; params: Params }> {
  const { values, positionals } = parseOptions(expandViewOption(argv), SERVE_OPTIONS);
  const [pluginName, ...words] = positionals;
  if (!pluginName) throw new UsageError("missing PLUGIN");
  const plugin = await resolvePlugin(pluginName);
  const params = Params.parse(
    words,
    plugin.magicParam,
    plugin.params.some((p) => p.name === plugin.magicParam && p.repeatable),
  );
  return { values, plugin, params };
}

/**
 * In a serve worker: builds the same server as the main thread from its
 * command line and accepts on the main thread's listening sockets (`fds`,
 * this worker's own copies). Resolves once accepting, to the function that
 * stops it (listeners first, then connections and layers).
 */
export async function serveWorker(argv: string[], fds: number[]): Promise<() => Promise<void>> {
  const { values, plugin, params } = await parseServeArgv(argv);
  const config = parseServeConfig(values, { listenFds: 0 });
  const layers = await startLayers(config.filters, plugin, params);
  const exports = new Exports({
    plugin: layers.plugin,
    filters: layers.filters,
    exportName: config.exportName,
    description: config.description,
    debugLayers: config.debugLayers,
    layerNames: { plugin: plugin.name, filters: [] },
  });
  const server = new NbdServer({
    exports,
    readonly: config.readonly,
    verbose: config.verbose,
    ...config.limits,
    tlsMode: "off",
  });
  const listener = listenOnDescriptors(server, fds, { transport: "activation", fds: fds.length });
  return async () => {
    listener.close();
    await server.shutdown();
  };
}

/**
 * Starts `count` workers serving on the listening sockets opened since
 * `before`; resolves once each accepts, and disposes by stopping them all.
 */
async function startWorkers(
  count: number,
  plan: WorkerPlan,
  before: Map<number, string>,
): Promise<AsyncDisposable> {
  const listening = newListeningDescriptors(before);
  if (listening === null || listening.length === 0) {
    throw new Error("--workers: cannot find the listening sockets to share (needs Linux and FFI)");
  }
  const workers: Worker[] = [];
  const stopAll = async () => {
    await Promise.all(workers.map((worker) => stopWorker(worker)));
  };
  try {
    for (let i = 0; i < count; i++) {
      const fds = listening.map((fd) => duplicateDescriptor(fd) ?? fd);
      const worker = new Worker(new URL("./serve_worker.ts", import.meta.url), { type: "module" });
      workers.push(worker);
      await workerReply(worker, { type: "start", argv: plan.argv, fds, shared: plan.shared }, [
        "ready",
      ]);
    }
  } catch (error) {
    await stopAll();
    throw error;
  }
  return { [Symbol.asyncDispose]: stopAll };
}

/** Asks a worker to stop serving and waits for it (within the server's grace), then ends it. */
async function stopWorker(worker: Worker): Promise<void> {
  try {
    await workerReply(worker, { type: "stop" }, ["stopped"]);
  } catch {
    // It failed or had already stopped: ending it is all that is left.
  }
  worker.terminate();
}

/** Sends `message` and waits for a reply of one of `types`; rejects on "failed" or an error. */
function workerReply(worker: Worker, message: unknown, types: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    worker.onmessage = (event: MessageEvent) => {
      const data = event.data as { type: string; message?: string };
      if (types.includes(data.type)) resolve();
      else if (data.type === "failed") reject(new Error(data.message ?? "worker failed"));
    };
    worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      reject(new Error(`worker: ${event.message}`));
    };
    worker.postMessage(message);
  });
}

/**
 * The server's lifecycle. Everything `serveUntilStopped` starts is
 * registered on one stack as it is started, so that on every way out (a
 * signal, the end of the captive command or of the single connection, an
 * error at any step) it is released in reverse order: the captive
 * command, the signal handlers, the listeners, the view, then the
 * connections and the layers, and last the pidfile.
 */
async function serve(
  config: ServeConfig,
  plugin: Plugin,
  params: Params,
  workers?: WorkerPlan,
): Promise<number> {
  const tls = configureTls(config.tls);
  const stack = new AsyncDisposableStack();
  let status: number;
  try {
    status = await serveUntilStopped(config, tls, plugin, params, stack, workers);
  } catch (error) {
    // What stopped the server is what the user must see, not a failure to undo it.
    await stack.disposeAsync().catch(() => {});
    throw error;
  }
  try {
    await stack.disposeAsync();
  } catch (error) {
    // Several failures while stopping: report the last, as one line.
    throw error instanceof SuppressedError ? error.error : error;
  }
  return status;
}

/** Starts everything, registering each part's release on `stack`, and waits for the stop. */
async function serveUntilStopped(
  config: ServeConfig,
  tls: TlsSetup,
  plugin: Plugin,
  params: Params,
  stack: AsyncDisposableStack,
  workers?: WorkerPlan,
): Promise<number> {
  const pidfile = config.pidfile;
  let pidfileWritten = false;
  if (pidfile !== undefined) {
    stack.defer(async () => {
      if (pidfileWritten) await Deno.remove(pidfile).catch(() => {});
    });
  }

  const layers = await startLayers(config.filters, plugin, params);
  // Run-time faults sit nearest the client, and only when asked for.
  const faults = config.viewControl ? new FaultSwitch() : undefined;
  const exports = new Exports({
    plugin: layers.plugin,
    filters: faults ? [faults.layer(), ...layers.filters] : layers.filters,
    exportName: config.exportName,
    description: config.description,
    debugLayers: config.debugLayers,
    layerNames: { plugin: plugin.name, filters: config.filters.map((f) => f.name) },
  });
  const server = new NbdServer({
    exports,
    readonly: config.readonly,
    verbose: config.verbose,
    ...config.limits,
    tlsMode: tls.mode,
    tls: tls.upgrader,
  });
  // Naming blocks for the view reads below the fault layer: an analysis is not a client.
  const analysis = new Exports({
    plugin: layers.plugin,
    filters: layers.filters,
    exportName: config.exportName,
    description: config.description,
  });
  // Shutting the server down closes the layers too.
  stack.defer(() => server.shutdown());

  let view: ViewServer | undefined;
  if (config.view) {
    try {
      const control = faults &&
        faultControl(faults, {
          token: config.viewControl?.token,
          log: (line) => server.state.log(line),
        });
      view = await startViewServer({
        stats: server.state.stats,
        listExports: async () => (await exports.list()).map((e) => e.name),
        routes: control?.routes,
        annotate: control?.annotate,
        openDisk: (name) => openForAnalysis(analysis, name),
      }, { hostname: config.view.hostname, port: config.view.port });
    } catch (error) {
      throw new Error(`Cannot serve the view on ${config.view.text}: ${(error as Error).message}`);
    }
    stack.use(view);
  }

  const socketsBefore = socketDescriptors();
  const listeners = stack.use(
    await openListeners(server, config.listen, { nodeSockets: tls.mode !== "off" }),
  );
  // Workers stop before the main thread's server (the stack unwinds in reverse).
  if (workers) stack.use(await startWorkers(config.workers - 1, workers, socketsBefore));
  const address = listeners.primary.address;
  const uri = listenerUri(address, config.exportName, {
    tls: tls.mode === "require",
    certificates: tls.certificates,
  });
  if (config.printUri && uri) console.log(uri);
  if (pidfile !== undefined) {
    await Deno.writeTextFile(pidfile, `${Deno.pid}\n`);
    pidfileWritten = true;
  }
  if (config.verbose && uri) server.state.log(`listening on ${uri}`);
  if (view) server.state.log(`view at ${view.url}`);

  const stopped = Promise.withResolvers<number>();
  // The process's first stop signal (SIGINT, SIGTERM or SIGHUP, see
  // util/signals.ts), also when it came while starting: stop serving, exit 0.
  const signalled = whenAborted(terminationSignal());
  signalled.promise.then(() => stopped.resolve(0));
  stack.defer(() => signalled.dispose());

  if (config.run !== undefined) {
    const env: Record<string, string> = {
      uri: uri ?? "",
      nbd: uri ?? "",
      exportname: config.exportName,
      unixsocket: address.transport === "unix" ? address.path : "",
      port: address.transport === "tcp" ? String(address.port) : "",
    };
    if (tls.mode !== "off") {
      env.tls = tls.mode === "require" ? "2" : "1";
      env.tls_certificates = tls.certificates!;
    }
    const child = new Deno.Command("/bin/sh", { args: ["-c", config.run], env, stdin: "inherit" })
      .spawn();
    stack.defer(() => {
      try {
        child.kill("SIGTERM");
      } catch { /* already exited */ }
    });
    child.status.then((status) =>
      stopped.resolve(status.signal ? 128 + signalNumber(status.signal) : status.code)
    );
  } else if (config.listen.transport === "stdio") {
    listeners.primary.done.then(() => stopped.resolve(0));
  }
  return await stopped.promise;
}

/** Opens an export read-only for the view's `/files`, outside any connection. */
async function openForAnalysis(exports: Exports, name: string): Promise<OpenDisk> {
  const info = await exports.resolve(name);
  if (!info) throw new Error(`no export named ${JSON.stringify(name)}`);
  const backend = await exports.open({
    exportName: info.name,
    readonly: true,
    tls: false,
    connectionId: 0,
  });
  return {
    reader: new CachedReader(backend.size(), (buf, offset) => backend.pread(buf, offset)),
    close: () => backend.close(),
  };
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
        console.log(pluginHelp(await resolvePlugin(pluginName), pluginName));
      } else if (values.filter?.length) {
        const modules = await loadFilterModules(values.filter);
        for (const name of values.filter) {
          console.log(filterHelp(lookupFilter(name, modules), name));
        }
      } else {
        console.log(USAGE);
      }
      return 0;
    }
    if (!pluginName) {
      throw new UsageError("missing PLUGIN (e.g. nbd serve memory 1G); see nbd serve --help");
    }
    const plugin = await resolvePlugin(pluginName);
    const params = Params.parse(
      words,
      plugin.magicParam,
      plugin.params.some((p) => p.name === plugin.magicParam && p.repeatable),
    );
    return await runServer({ values, plugin, params, argv });
  },
};
