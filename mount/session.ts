/**
 * A running mount: the NBD connections, the FUSE server, the loop device
 * for attachments, the session record and its control socket, started and
 * stopped together. `nbd mount` runs one in the foreground; the process
 * behind `nbd attach` runs one with a loop device.
 *
 * @module
 */

import { resolve } from "node:path";
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "../protocol/constants.ts";
import { formatNbdUri, isNbdUri, parseNbdUri } from "../protocol/uri.ts";
import { ExportFile } from "./export_file.ts";
import { GRACE_MS, registerCleanup } from "../util/signals.ts";
import { MNT_DETACH, umount2Sync } from "../io/libc.ts";
import { FuseFileServer } from "./fuse_file_server.ts";
import { attachLoop, detachLoop, loopBackingFile } from "./loop_device.ts";
import {
  type ControlReply,
  type ControlRequest,
  ControlServer,
  createSessionDir,
  removeSessionDir,
  type SessionRecord,
  writeRecord,
} from "./registry.ts";

/** Options of `MountSession.start`. */
export interface MountSessionOptions {
  /** The export. */
  uri: string;
  /** Where to mount; omitted for an attachment (mounted in the session directory). */
  mountpoint?: string;
  /** Attach a loop device to the file. */
  attach?: boolean;
  /** Mount (and attach) read-only. */
  readOnly?: boolean;
  /** Connections when the server allows multi-conn (default 4). */
  connections?: number;
  /** Stale-connection timeout in seconds (0 = none). */
  timeoutSeconds: number;
  /** Seconds for connecting and each handshake step (0 = none; default 10). */
  connectTimeout?: number;
  /** Name of the file in a directory mount. */
  fileName?: string;
  /** Let other users access the file. */
  allowOther?: boolean;
  /** One-line log messages (connection events, failed requests). */
  log: (message: string) => void;
  /** Log each failed request, not just connection events. */
  verbose?: boolean;
}

/**
 * The URI with its file paths (Unix socket, certificate directory, PSK
 * file) made absolute, so it keeps working from another directory: the
 * background process of `nbd attach` leaves the caller's directory, and
 * reconnects use the URI again later.
 */
export function absoluteUri(uri: string): string {
  if (!isNbdUri(uri)) return uri;
  const parsed = parseNbdUri(uri);
  const absolute = (path: string | undefined) =>
    path === undefined || path.startsWith("/") || path.startsWith("\0") ? path : resolve(path);
  parsed.socket = absolute(parsed.socket);
  parsed.tlsCertificates = absolute(parsed.tlsCertificates);
  parsed.tlsPskFile = absolute(parsed.tlsPskFile);
  return formatNbdUri(parsed);
}

/** Names of the transmission flags a server sent. */
const FLAG_NAMES: [number, string][] = [
  [NBD_FLAG_READ_ONLY, "READ_ONLY"],
  [NBD_FLAG_SEND_FLUSH, "SEND_FLUSH"],
  [NBD_FLAG_SEND_FUA, "SEND_FUA"],
  [NBD_FLAG_ROTATIONAL, "ROTATIONAL"],
  [NBD_FLAG_SEND_TRIM, "SEND_TRIM"],
  [NBD_FLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"],
  [NBD_FLAG_SEND_DF, "SEND_DF"],
  [NBD_FLAG_CAN_MULTI_CONN, "CAN_MULTI_CONN"],
  [NBD_FLAG_SEND_CACHE, "SEND_CACHE"],
  [NBD_FLAG_SEND_FAST_ZERO, "SEND_FAST_ZERO"],
];

/** What the first connection negotiated, for the session record. */
function negotiated(file: ExportFile): SessionRecord["negotiated"] {
  const client = file.primary;
  return {
    tls: client.tls,
    structuredReplies: client.structuredReplies,
    extendedHeaders: client.extendedHeaders,
    flags: FLAG_NAMES.filter(([bit]) => (client.flags & bit) !== 0).map(([, name]) => name),
    blockSize: { ...client.blockSize },
  };
}

/** Checks for the privilege mounting needs, with a clear error. */
export function requireMountPrivilege(what: string): void {
  let capable = Deno.uid() === 0;
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const hex = /^CapEff:\s*([0-9a-f]+)/m.exec(status)?.[1];
    if (hex) capable = (BigInt(`0x${hex}`) & (1n << 21n)) !== 0n; // CAP_SYS_ADMIN
  } catch { /* keep the uid answer */ }
  if (!capable) {
    throw new Error(
      `Cannot ${what}: mounting FUSE needs root (or CAP_SYS_ADMIN); run it as root, e.g. with sudo`,
    );
  }
}

/** A running mount (and loop device, for an attachment). */
export class MountSession {
  readonly #file: ExportFile;
  readonly #server: FuseFileServer;
  readonly #dir: string;
  readonly #control: ControlServer;
  readonly #record: SessionRecord;
  readonly #log: (message: string) => void;
  #stopping: Promise<void> | undefined;
  #stopRequested: ((hard: boolean) => void) | undefined;
  /** Unregisters the lazy unmount run when the process must stop at once. */
  #unregisterCleanup: () => void = () => {};
  /** Resolves with `hard` when a control client asks the session to stop. */
  readonly stopRequested: Promise<boolean>;

  private constructor(
    file: ExportFile,
    server: FuseFileServer,
    dir: string,
    control: ControlServer,
    record: SessionRecord,
    log: (message: string) => void,
  ) {
    this.#file = file;
    this.#server = server;
    this.#dir = dir;
    this.#control = control;
    this.#record = record;
    this.#log = log;
    this.stopRequested = new Promise((resolve) => this.#stopRequested = resolve);
  }

  /** Connects, mounts, attaches (if asked) and records the session. */
  static async start(options: MountSessionOptions): Promise<MountSession> {
    const log = options.log;
    const file = await ExportFile.open(absoluteUri(options.uri), {
      connections: options.connections ?? 4,
      readOnly: options.readOnly,
      timeoutMs: options.timeoutSeconds * 1000,
      connectTimeout: options.connectTimeout,
      onEvent: log,
    });
    let dir: string | undefined;
    let server: FuseFileServer | undefined;
    let device: string | undefined;
    let control: ControlServer | undefined;
    const holder: { session?: MountSession } = {};
    try {
      dir = await createSessionDir();
      // Listening binds a socket with a blocking call: do it before mounting,
      // in case the session directory lies under the new mount, where that
      // call would wait for this very process to answer.
      control = await ControlServer.listen(
        dir,
        (request) =>
          holder.session
            ? holder.session.#handle(request)
            : Promise.resolve({ ok: false, error: "the session is starting" }),
      );
      let mountpoint = options.mountpoint;
      if (mountpoint === undefined) {
        mountpoint = `${dir}/mnt`;
        await Deno.mkdir(mountpoint, { recursive: true });
      } else {
        mountpoint = await Deno.realPath(mountpoint).catch(() => mountpoint!);
      }
      server = new FuseFileServer(file, {
        mountpoint,
        fileName: options.fileName,
        readOnly: options.readOnly,
        allowOther: options.allowOther,
        source: file.uri,
        onError: options.verbose
          ? (what, error) => log(`${what} failed: ${(error as Error).message}`)
          : undefined,
      });
      await server.mount();
      if (options.attach) {
        device = await attachLoop(server.filePath, {
          readOnly: server.readOnly,
          sectorSize: file.primary.blockSize.minimum,
        });
      }
      const record: SessionRecord = {
        kind: options.attach ? "attach" : "mount",
        pid: Deno.pid,
        uri: file.uri,
        exportName: file.primary.exportName,
        size: file.size,
        mountpoint,
        file: server.filePath,
        device,
        connections: file.connectionCount,
        readOnly: server.readOnly,
        timeoutSeconds: options.timeoutSeconds,
        negotiated: negotiated(file),
        started: new Date().toISOString(),
      };
      const session = new MountSession(file, server, dir, control, record, log);
      holder.session = session;
      // Stopping at once (a second signal) must not leave a dead mount behind.
      const mounted = server.mountpoint;
      session.#unregisterCleanup = registerCleanup(() => {
        if (device) new Deno.Command("losetup", { args: ["--detach", device] }).outputSync();
        umount2Sync(mounted, MNT_DETACH);
      });
      await writeRecord(dir, record);
      return session;
    } catch (error) {
      if (device) await detachLoop(device).catch(() => {});
      if (server) await server.unmount({ lazy: true }).catch(() => {});
      await file.close().catch(() => {});
      if (server) await server.closed;
      if (control) await control.close();
      if (dir) await removeSessionDir(dir);
      throw error;
    }
  }

  /** What the session records about itself. */
  get record(): SessionRecord {
    return this.#record;
  }

  /** The served file. */
  get file(): ExportFile {
    return this.#file;
  }

  /** The FUSE server. */
  get server(): FuseFileServer {
    return this.#server;
  }

  /** Resolves once the file system is unmounted (by `stop` or by `nbd umount`). */
  get unmounted(): Promise<void> {
    return this.#server.stopped;
  }

  /** A line describing the mount, e.g. for the ready message. */
  describe(): string {
    const r = this.#record;
    const multi = (this.#file.primary.flags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
    const conns = `${r.connections} connection${r.connections === 1 ? "" : "s"}${
      multi ? "" : " (no multi-conn)"
    }`;
    return `${r.size} bytes, ${conns}, ${r.readOnly ? "read-only" : "read-write"}`;
  }

  #handle(request: ControlRequest): Promise<ControlReply> {
    switch (request.op) {
      case "status":
        return Promise.resolve({ ok: true, record: this.#record, stats: this.#file.stats() });
      case "stop":
        this.#stopRequested?.(request.hard ?? false);
        return Promise.resolve({ ok: true });
      default:
        return Promise.resolve({
          ok: false,
          error: `unknown request "${(request as { op: string }).op}"`,
        });
    }
  }

  /**
   * Ends the session: detaches the loop device (if it is still attached to
   * our file), unmounts (lazily if busy when `hard`, otherwise waiting a
   * little for the kernel to let go), flushes and closes the connections,
   * and removes the record. Safe to call more than once.
   */
  stop(options: { hard?: boolean } = {}): Promise<void> {
    this.#stopping ??= this.#stop(options.hard ?? false);
    return this.#stopping;
  }

  async #stop(hard: boolean): Promise<void> {
    const device = this.#record.device;
    if (device && loopBackingFile(device) === this.#server.filePath) {
      await detachLoop(device).catch((error) => this.#log((error as Error).message));
    }
    // A loop device lets go of its file shortly after the detach; wait for that.
    let unmounted = false;
    const attempts = hard ? 1 : 50;
    for (let attempt = 0; attempt < attempts && !unmounted; attempt++) {
      unmounted = await this.#server.unmount();
      if (!unmounted) await new Promise((r) => setTimeout(r, 100));
    }
    if (!unmounted) {
      if (!hard) this.#log(`${this.#server.mountpoint} is busy; detaching it lazily`);
      await this.#server.unmount({ lazy: true });
    }
    // Closing fails whatever the server leaves unanswered, which lets the
    // FUSE server finish its last requests and close /dev/fuse.
    await this.#file.close(GRACE_MS);
    await this.#server.closed;
    await this.#control.close();
    await removeSessionDir(this.#dir);
    this.#unregisterCleanup();
  }
}
