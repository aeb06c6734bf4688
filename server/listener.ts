/**
 * Listeners that feed accepted connections to an `NbdServer`: TCP, Unix
 * sockets (including a private one in a temporary directory), systemd-style
 * socket activation, and a single connection over stdin/stdout; and
 * `openListeners`, which opens the set a server is configured with.
 *
 * @module
 */

import * as net from "node:net";
import { fromDenoConn, fromNodeSocket, fromStdio } from "../io/byte_stream.ts";
import { formatNbdUri, type NbdUri } from "../protocol/uri.ts";
import { enlargeNewSocketBuffers } from "../io/socket_buffers.ts";
import { acceptedFd, sendFileAllowed, spliceAllowed } from "../io/socket_fast.ts";
import { unixSocketUnsupported } from "../io/platform.ts";
import { adoptListeningSocket } from "../io/listening_fds.ts";
import type { NbdServer } from "./server.ts";

/** A running listener. */
export interface Listener {
  /** What clients connect to, for logs and URIs. */
  readonly address: ListenAddress;
  /** Stops accepting. */
  close(): void;
  /** Resolves when the accept loop has ended. */
  readonly done: Promise<void>;
}

/** Where a listener listens. */
export type ListenAddress =
  | { transport: "tcp"; hostname: string; port: number }
  | { transport: "unix"; path: string }
  | { transport: "activation"; fds: number }
  | { transport: "stdio" };

/** Accepts from a Deno listener until it is closed. */
function acceptLoop(listener: Deno.Listener, server: NbdServer, tcp: boolean): Promise<void> {
  const files = sendFileAllowed();
  const splicing = spliceAllowed();
  return (async () => {
    while (true) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch (error) {
        if (error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted) {
          return;
        }
        // Transient accept failures (EMFILE...) must not stop the server.
        server.state.log(`accept failed: ${(error as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      // Found before anything else runs: see acceptedFd.
      const fd = files || splicing ? acceptedFd(conn) : undefined;
      enlargeNewSocketBuffers();
      let peer = "unix";
      if (tcp) {
        try {
          (conn as Deno.TcpConn).setNoDelay(true);
        } catch { /* closed already */ }
        const remote = conn.remoteAddr as Deno.NetAddr;
        peer = `${remote.hostname}:${remote.port}`;
      }
      // Only READ replies from files and WRITE payloads into them use the
      // descriptor (docs/performance.md).
      server.serve(
        fromDenoConn(conn, fd, { files, syncReadWrite: false, splice: splicing }),
        peer,
      );
    }
  })();
}

/** Options of the socket listeners. */
export interface ListenOptions {
  /**
   * Accept through node:net instead of Deno's own sockets: needed when the
   * connection may be upgraded to TLS in the middle of the stream.
   */
  nodeSockets?: boolean;
}

/** Accepts through a node:net server (TLS-capable sockets). */
function listenNode(
  server: NbdServer,
  where: { host: string; port: number } | { path: string },
): Promise<{ server: net.Server; done: Promise<void> }> {
  const netServer = net.createServer((socket) => {
    if ("port" in where) socket.setNoDelay(true);
    enlargeNewSocketBuffers();
    const peer = "port" in where ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
    server.serve(fromNodeSocket(socket), peer);
  });
  const done = new Promise<void>((resolve) => netServer.on("close", () => resolve()));
  return new Promise((resolve, reject) => {
    netServer.once("error", reject);
    netServer.listen(where, () => {
      netServer.off("error", reject);
      netServer.on("error", (error) => server.state.log(`listener: ${error.message}`));
      resolve({ server: netServer, done });
    });
  });
}

/** Listens on TCP. Port 0 picks a free port (see `address`). */
export async function listenTcp(
  server: NbdServer,
  hostname: string,
  port: number,
  options: ListenOptions = {},
): Promise<Listener> {
  if (options.nodeSockets) {
    const { server: netServer, done } = await listenNode(server, { host: hostname, port });
    const addr = netServer.address() as net.AddressInfo;
    return {
      address: { transport: "tcp", hostname: addr.address, port: addr.port },
      close: () => netServer.close(),
      done,
    };
  }
  const listener = Deno.listen({ hostname, port, transport: "tcp" });
  const addr = listener.addr as Deno.NetAddr;
  return {
    address: { transport: "tcp", hostname: addr.hostname, port: addr.port },
    close: () => {
      try {
        listener.close();
      } catch { /* already closed */ }
    },
    done: acceptLoop(listener, server, true),
  };
}

/**
 * Listens on a Unix socket. A stale socket file left by a dead server is
 * replaced; a live one is an error. The file is removed on close.
 */
export async function listenUnix(
  server: NbdServer,
  path: string,
  options: ListenOptions = {},
): Promise<Listener> {
  try {
    const stat = await Deno.lstat(path);
    if (!stat.isSocket) throw new Error(`Cannot listen on ${path}: it exists and is not a socket`);
    try {
      const probe = await Deno.connect({ transport: "unix", path });
      probe.close();
      throw new Error(`Cannot listen on ${path}: another server is listening there`);
    } catch (error) {
      if (!(error instanceof Deno.errors.ConnectionRefused)) throw error;
      await Deno.remove(path);
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  let closed = false;
  if (options.nodeSockets) {
    const { server: netServer, done } = await listenNode(server, { path });
    return {
      address: { transport: "unix", path },
      close: () => {
        if (closed) return;
        closed = true;
        netServer.close();
        try {
          Deno.removeSync(path);
        } catch { /* already gone */ }
      },
      done,
    };
  }
  let listener: Deno.Listener;
  try {
    listener = Deno.listen({ transport: "unix", path });
  } catch (error) {
    const unsupported = unixSocketUnsupported(error);
    if (unsupported) throw new Error(`Cannot listen on ${path}: ${unsupported}`);
    throw error;
  }
  return {
    address: { transport: "unix", path },
    close: () => {
      if (closed) return;
      closed = true;
      try {
        listener.close();
      } catch { /* already closed */ }
      try {
        Deno.removeSync(path);
      } catch { /* already gone */ }
    },
    done: acceptLoop(listener, server, false),
  };
}

/** Socket activation: the listening sockets passed as fds 3.. (LISTEN_FDS/LISTEN_PID). */
export function activationFds(): number {
  const fds = Number(Deno.env.get("LISTEN_FDS") ?? "0");
  const pid = Number(Deno.env.get("LISTEN_PID") ?? "0");
  if (!Number.isInteger(fds) || fds < 1) return 0;
  // Accept our own pid, or our parent's when started through a wrapper that did not exec.
  if (pid !== Deno.pid && pid !== Deno.ppid) return 0;
  return fds;
}

/** Accepts on the sockets inherited through socket activation. */
function listenActivated(server: NbdServer, fds: number): Listener {
  const descriptors = Array.from({ length: fds }, (_, i) => 3 + i);
  return listenOnDescriptors(server, descriptors, { transport: "activation", fds });
}

/**
 * Accepts on listening sockets this process already has open, by
 * descriptor: those of socket activation, or the main thread's in a serve
 * worker. Each is adopted as a runtime listener where possible
 * (`adoptListeningSocket`), else served through node:net. Closing the
 * listener closes the descriptors.
 */
export function listenOnDescriptors(
  server: NbdServer,
  fds: number[],
  address: ListenAddress,
): Listener {
  const servers: net.Server[] = [];
  const adopted: Deno.Listener[] = [];
  const done: Promise<void>[] = [];
  for (const fd of fds) {
    // The runtime's own connections where the socket can be adopted; node:net's otherwise.
    const listener = adoptListeningSocket(fd);
    if (listener) {
      adopted.push(listener);
      done.push(acceptLoop(listener, server, listener.addr.transport === "tcp"));
      continue;
    }
    const s = net.createServer({ pauseOnConnect: false }, (socket) => {
      socket.setNoDelay?.(true);
      enlargeNewSocketBuffers();
      server.serve(fromNodeSocket(socket), socket.remoteAddress ?? address.transport);
    });
    done.push(new Promise((resolve) => s.on("close", () => resolve())));
    s.on("error", (error) => server.state.log(`listening socket ${fd}: ${error.message}`));
    s.listen({ fd });
    servers.push(s);
  }
  return {
    address,
    close: () => {
      servers.forEach((s) => s.close());
      for (const listener of adopted) {
        try {
          listener.close();
        } catch { /* already closed */ }
      }
    },
    done: Promise.all(done).then(() => {}),
  };
}

/** Serves exactly one connection over stdin/stdout. */
function serveStdio(server: NbdServer): Listener {
  return {
    address: { transport: "stdio" },
    close: () => {},
    done: server.serve(fromStdio(), "stdio"),
  };
}

/** Where a server listens: one connection on stdio, activated sockets, or sockets it opens. */
export type ListenPlan =
  | { transport: "stdio" }
  | { transport: "activation"; fds: number }
  | {
    transport: "sockets";
    /** A Unix socket at `path`, or without a path a private one in a new temporary directory. */
    unix?: { path?: string };
    /** TCP on `port` (0 picks one) at each of `hosts` ("[::1]" or "::1" for IPv6). */
    tcp?: {
      port: number;
      hosts: string[];
      /** Hosts that are skipped when they cannot be listened on (IPv6 loopback on hosts without IPv6). */
      optional?: string[];
    };
  };

/** The listeners of a server, closed (and a private socket's directory removed) on dispose. */
export interface ListenerSet extends AsyncDisposable {
  /** Every listener, the Unix socket first. */
  readonly listeners: readonly Listener[];
  /** The one clients are pointed at: the Unix socket when there is one. */
  readonly primary: Listener;
}

/**
 * Opens the listeners of `plan` for `server`. When one fails, those
 * already opened are closed again before the error is thrown.
 */
export async function openListeners(
  server: NbdServer,
  plan: ListenPlan,
  options: ListenOptions = {},
): Promise<ListenerSet> {
  const listeners: Listener[] = [];
  let privateDir: string | undefined;
  const close = async () => {
    for (const listener of listeners.toReversed()) listener.close();
    if (privateDir) await Deno.remove(privateDir, { recursive: true }).catch(() => {});
  };
  try {
    if (plan.transport === "stdio") {
      listeners.push(serveStdio(server));
    } else if (plan.transport === "activation") {
      listeners.push(listenActivated(server, plan.fds));
    } else {
      if (plan.unix) {
        let path = plan.unix.path;
        if (path === undefined) {
          privateDir = await Deno.makeTempDir({ prefix: "nbd" });
          path = `${privateDir}/socket`;
        }
        listeners.push(await listenUnix(server, path, options));
      }
      if (plan.tcp) {
        const { port, hosts, optional = [] } = plan.tcp;
        let chosen = port;
        for (const host of hosts) {
          try {
            const listener = await listenTcp(
              server,
              host.replace(/^\[(.*)\]$/, "$1"),
              chosen,
              options,
            );
            // With port 0 every address must share the port the first one got.
            if (listener.address.transport === "tcp") chosen = listener.address.port;
            listeners.push(listener);
          } catch (error) {
            if (optional.includes(host)) continue;
            throw new Error(`Cannot listen on ${host} port ${port}: ${(error as Error).message}`);
          }
        }
      }
    }
  } catch (error) {
    await close();
    throw error;
  }
  if (listeners.length === 0) throw new Error("nothing to listen on");
  return {
    listeners,
    primary: listeners.find((l) => l.address.transport === "unix") ?? listeners[0]!,
    [Symbol.asyncDispose]: close,
  };
}

/** The NBD URI clients use to reach `address`, if it has one (stdio and activation have none). */
export function listenerUri(
  address: ListenAddress,
  exportName: string,
  options: { tls?: boolean; certificates?: string } = {},
): string | undefined {
  // With TLS the URI carries the certificate directory so libnbd clients can connect as is.
  const base: NbdUri = {
    tls: options.tls ?? false,
    transport: "tcp",
    exportName,
    tlsCertificates: options.certificates,
  };
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
