/**
 * The `nbd` plugin: forward every request to another NBD server. Each
 * client connection gets its own upstream connection, so multi-conn works
 * end to end; sizes, flags, block sizes, block status and errors pass
 * through. TLS can be added or stripped: the upstream side follows the
 * upstream URI (`nbds://...` for TLS), the listening side `nbd serve`'s
 * `--tls` options. A lost upstream turns into EIO for the requests that
 * need it, and the plugin reconnects (with back-off) when the upstream
 * comes back.
 *
 * ```
 * nbd serve nbd uri=nbd+unix:///disk?socket=/run/qemu.sock
 * nbd serve nbd hostname=storage port=10809 export=disk
 * nbd proxy --tls=require --tls-certificates=DIR nbd+unix:///?socket=/tmp/plain.sock
 * ```
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { NbdConnectionError } from "../client/errors.ts";
import { NbdError, ProtocolError } from "../protocol/errors.ts";
import { formatNbdUri, type NbdUri, parseNbdUri } from "../protocol/uri.ts";
import type {
  Backend,
  Capabilities,
  ExportInfo,
  Extent,
  ExtentsFlags,
  OpenContext,
  Plugin,
  WriteFlags,
  ZeroFlags,
} from "../core/backend.ts";
import type { Params } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";
import { DEFAULT_CONNECT_TIMEOUT, NbdHandshake } from "../client/handshake.ts";

/** Longest wait between reconnection attempts. */
const MAX_BACKOFF_MS = 5000;
const FIRST_BACKOFF_MS = 100;

/** Options of the upstream side, from the plugin's parameters. */
export interface UpstreamOptions {
  /** The upstream export. */
  uri: NbdUri;
  /** Pass the client's export name upstream instead of the URI's. */
  dynamicExport: boolean;
  /** Reconnect after losing the upstream (default true). */
  reconnect: boolean;
  /** Log sink for reconnection messages. */
  log: (message: string) => void;
  /** Seconds for connecting and each handshake step (0 = no limit; default 10). */
  timeout?: number;
  /** Seconds an upstream may leave requests unanswered before they fail with EIO (0 = no limit). */
  requestTimeout?: number;
}

function connectOptions(options: UpstreamOptions): { timeout?: number; requestTimeout?: number } {
  return { timeout: options.timeout, requestTimeout: options.requestTimeout };
}

function isConnectionFailure(error: unknown): boolean {
  return error instanceof NbdConnectionError || error instanceof ProtocolError;
}

/**
 * A backend that forwards to one upstream connection, reconnecting when it
 * is lost. Requests arriving while the upstream is down fail with EIO at
 * once (they are not queued), so clients see errors rather than hangs.
 */
export class UpstreamBackend implements Backend {
  readonly #options: UpstreamOptions;
  readonly #uri: NbdUri;
  #client: NbdClient;
  #size: number;
  #capabilities: Capabilities;
  #reconnecting: Promise<void> | undefined;
  #nextAttempt = 0;
  #backoff = FIRST_BACKOFF_MS;
  #closed = false;

  private constructor(client: NbdClient, uri: NbdUri, options: UpstreamOptions) {
    this.#client = client;
    this.#uri = uri;
    this.#options = options;
    this.#size = client.size();
    this.#capabilities = client.capabilities();
  }

  /** Connects to the upstream export. */
  static async open(uri: NbdUri, options: UpstreamOptions): Promise<UpstreamBackend> {
    const client = await NbdClient.connect(uri, connectOptions(options));
    return new UpstreamBackend(client, uri, options);
  }

  /** Whether the upstream connection is currently up. */
  get connected(): boolean {
    return this.#client.failure === undefined;
  }

  size(): number {
    return this.#size;
  }

  capabilities(): Capabilities {
    return this.#capabilities;
  }

  /** The working upstream client, or an EIO error while it is down (starting a reconnection). */
  #upstream(): NbdClient {
    const client = this.#client;
    if (client.failure === undefined) return client;
    if (this.#options.reconnect && !this.#closed) this.#startReconnect();
    throw new NbdError("EIO", `the upstream server is unavailable: ${client.failure.message}`);
  }

  #startReconnect(): void {
    if (this.#reconnecting || Date.now() < this.#nextAttempt) return;
    this.#reconnecting = (async () => {
      try {
        const fresh = await NbdClient.connect(this.#uri, connectOptions(this.#options));
        if (fresh.size() !== this.#size) {
          await fresh.close();
          throw new Error(`the upstream export changed size (${this.#size} → ${fresh.size()})`);
        }
        await this.#client.close().catch(() => {});
        this.#client = fresh;
        this.#backoff = FIRST_BACKOFF_MS;
        this.#options.log(`reconnected to ${formatNbdUri(this.#uri)}`);
      } catch (error) {
        this.#nextAttempt = Date.now() + this.#backoff;
        this.#options.log(
          `cannot reconnect to ${formatNbdUri(this.#uri)} (next try in ${this.#backoff} ms): ${
            (error as Error).message
          }`,
        );
        this.#backoff = Math.min(this.#backoff * 2, MAX_BACKOFF_MS);
      } finally {
        this.#reconnecting = undefined;
      }
    })();
  }

  /** Runs a request upstream; a lost connection becomes EIO (and a reconnection). */
  async #forward<T>(call: (client: NbdClient) => Promise<T>): Promise<T> {
    const client = this.#upstream();
    try {
      return await call(client);
    } catch (error) {
      if (isConnectionFailure(error)) {
        if (this.#options.reconnect && !this.#closed) this.#startReconnect();
        throw new NbdError("EIO", `the upstream connection failed: ${(error as Error).message}`);
      }
      throw error;
    }
  }

  pread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#forward((c) => c.pread(buf, offset));
  }

  pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    return this.#forward((c) => c.pwrite(buf, offset, flags));
  }

  flush(): Promise<void> {
    return this.#forward((c) => c.flush());
  }

  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.#forward((c) => c.trim(offset, length, flags));
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#forward((c) => c.zero(offset, length, flags));
  }

  extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    return this.#forward((c) => c.extents(offset, length, flags));
  }

  cache(offset: number, length: number): Promise<void> {
    return this.#forward((c) => c.cache(offset, length));
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#reconnecting;
    await this.#client.close().catch(() => {});
  }
}

/** Builds the upstream URI from the plugin's parameters. */
export function upstreamUri(params: Params): NbdUri {
  const uriText = params.take("uri");
  const socket = params.take("socket");
  const hostname = params.take("hostname");
  const port = params.take("port");
  const exportName = params.take("export");
  const tls = params.take("tls");
  const tlsCertificates = params.take("tls-certificates");
  const tlsVerify = params.takeBoolean("tls-verify");
  const tlsHostname = params.take("tls-hostname");
  const given = [uriText, socket, hostname].filter((x) => x !== undefined).length;
  if (given !== 1) throw new UsageError("nbd: give exactly one of uri=, socket= or hostname=");
  let uri: NbdUri;
  if (uriText !== undefined) {
    try {
      uri = parseNbdUri(uriText);
    } catch (error) {
      throw new UsageError(`nbd: ${(error as Error).message}`);
    }
  } else if (socket !== undefined) {
    uri = { tls: false, transport: "unix", socket, exportName: "" };
  } else {
    if (port !== undefined && !/^\d+$/.test(port)) throw new UsageError(`nbd: bad port "${port}"`);
    uri = {
      tls: false,
      transport: "tcp",
      host: hostname,
      port: port ? Number(port) : 10809,
      exportName: "",
    };
  }
  if (exportName !== undefined) uri.exportName = exportName;
  if (tls !== undefined) {
    if (!["on", "require", "off"].includes(tls)) {
      throw new UsageError(`nbd: tls must be off, on or require`);
    }
    if (tls === "on") {
      throw new UsageError("nbd: tls=on (opportunistic) is not supported: use tls=require");
    }
    uri.tls = tls === "require";
  }
  if (tlsCertificates !== undefined) uri.tlsCertificates = tlsCertificates;
  if (tlsVerify === false) uri.tlsVerifyPeer = false;
  if (tlsHostname !== undefined) uri.tlsHostname = tlsHostname;
  return uri;
}

/** The nbd plugin. */
export const nbdPlugin: Plugin = {
  name: "nbd",
  summary: "forward to another NBD server (a proxy; can add or strip TLS)",
  description: `Each client connection opens its own upstream connection. A lost upstream
gives EIO replies; the plugin reconnects with back-off when it comes back.
Examples:
  nbd serve nbd uri='nbd+unix:///disk?socket=/run/qemu.sock'
  nbd serve --tls=require --tls-certificates=/etc/pki/nbd nbd hostname=storage export=disk
  nbd serve nbd uri='nbds://storage/disk?tls-certificates=/etc/pki/nbd'`,
  params: [
    {
      name: "uri",
      value: "URI",
      type: "string",
      description: "the upstream export (nbd://, nbds://, nbd+unix://, nbds+unix://)",
    },
    {
      name: "socket",
      value: "PATH",
      type: "path",
      description: "upstream Unix socket (instead of uri=)",
    },
    {
      name: "hostname",
      value: "HOST",
      type: "string",
      description: "upstream host (instead of uri=)",
    },
    {
      name: "port",
      value: "PORT",
      type: "integer",
      default: "10809",
      description: "upstream TCP port (with hostname=)",
    },
    {
      name: "export",
      value: "NAME",
      type: "string",
      default: 'the one in uri=, else ""',
      description: "upstream export name",
    },
    {
      name: "dynamic-export",
      value: "BOOL",
      type: "boolean",
      default: "false",
      description: "pass each client's export name upstream",
    },
    {
      name: "tls",
      value: "MODE",
      type: "enum",
      choices: ["off", "require"],
      default: "off, or require with nbds:// URIs",
      description: "use TLS upstream",
    },
    {
      name: "tls-certificates",
      value: "DIR",
      type: "path",
      description: "CA (and client certificate) for the upstream",
    },
    {
      name: "tls-verify",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "verify the upstream certificate",
    },
    {
      name: "tls-hostname",
      value: "NAME",
      type: "string",
      default: "the upstream host",
      description: "name to check the upstream certificate against",
    },
    {
      name: "retry",
      value: "BOOL",
      type: "boolean",
      default: "true",
      description: "reconnect after losing the upstream",
    },
    {
      name: "timeout",
      value: "SECONDS",
      type: "duration",
      default: String(DEFAULT_CONNECT_TIMEOUT),
      description: "give up connecting upstream, or any handshake step, after SECONDS (0 = never)",
    },
    {
      name: "request-timeout",
      value: "SECONDS",
      type: "duration",
      default: "0 (wait forever)",
      description: "fail requests the upstream leaves unanswered for SECONDS with EIO",
    },
  ],
  magicParam: "uri",
  async create(params) {
    const uri = upstreamUri(params);
    const dynamicExport = params.takeBoolean("dynamic-export") ?? false;
    const reconnect = params.takeBoolean("retry") ?? true;
    const timeoutMs = params.takeDuration("timeout");
    const requestTimeoutMs = params.takeDuration("request-timeout");
    const timeouts = {
      timeout: timeoutMs === undefined ? undefined : timeoutMs / 1000,
      requestTimeout: requestTimeoutMs === undefined ? undefined : requestTimeoutMs / 1000,
    };
    const log = (message: string) => console.error(`nbd: upstream: ${message}`);
    // Check the upstream once at start-up so a typo fails fast with a clear message.
    const probe = await NbdHandshake.open(uri, timeouts);
    let exports: ExportInfo[] | undefined;
    try {
      if (dynamicExport && probe.canSendOptions) {
        exports = (await probe.list()).map((e) => ({
          name: e.name,
          description: e.description || undefined,
        }));
      } else if (probe.canSendOptions) {
        await probe.info(uri.exportName);
      }
    } finally {
      await probe.abort();
    }
    return {
      open(context: OpenContext) {
        const target = dynamicExport ? { ...uri, exportName: context.exportName } : uri;
        return UpstreamBackend.open(target, {
          uri: target,
          dynamicExport,
          reconnect,
          log,
          ...timeouts,
        });
      },
      listExports: dynamicExport
        ? async () => {
          await using session = await NbdHandshake.open(uri, timeouts);
          const listed = await session.list();
          return listed.map((e) => ({ name: e.name, description: e.description || undefined }));
        }
        : undefined,
      defaultExport: dynamicExport ? () => Promise.resolve(exports?.[0]?.name ?? "") : undefined,
    };
  },
};
