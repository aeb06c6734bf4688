/**
 * The record of running mounts and attachments: one directory per serving
 * process under /run/nbd (or $NBD_RUN_DIR) holding `state.json` and a
 * control socket. `nbd attached`, `nbd detach` and `nbd umount` find the
 * sessions there and talk to them over the socket: one JSON request line,
 * one JSON reply line.
 *
 * @module
 */

import type { IoStats } from "./io_counters.ts";

/** What a session records about itself. */
export interface SessionRecord {
  /** "attach" (a loop device) or "mount" (a file only). */
  kind: "attach" | "mount";
  /** Process serving the file. */
  pid: number;
  /** The export's URI. */
  uri: string;
  /** The export name. */
  exportName: string;
  /** Size of the export in bytes. */
  size: number;
  /** Where the file system is mounted. */
  mountpoint: string;
  /** Path of the file that holds the export. */
  file: string;
  /** The loop device, for attachments. */
  device?: string;
  /** NBD connections. */
  connections: number;
  /** Mounted read-only. */
  readOnly: boolean;
  /** Stale-connection timeout in seconds (0 = none). */
  timeoutSeconds: number;
  /** What was negotiated with the server. */
  negotiated: {
    /** TLS is in use. */
    tls: boolean;
    /** Structured replies are in use. */
    structuredReplies: boolean;
    /** Extended (64-bit) headers are in use. */
    extendedHeaders: boolean;
    /** Transmission flags by name, e.g. ["SEND_FLUSH", "CAN_MULTI_CONN"]. */
    flags: string[];
    /** Block sizes in force. */
    blockSize: { minimum: number; preferred: number; maximum: number };
  };
  /** When the session started (ISO 8601). */
  started: string;
}

/** A session as listed: its record, where it lives, and whether its process runs. */
export interface SessionEntry {
  /** The record. */
  record: SessionRecord;
  /** The session's directory. */
  dir: string;
  /** Whether the serving process is alive. */
  alive: boolean;
}

/** A control request. */
export type ControlRequest =
  | { op: "status" }
  | { op: "stop"; hard?: boolean };

/** A control reply. */
export interface ControlReply {
  /** Whether the request succeeded. */
  ok: boolean;
  /** Why not. */
  error?: string;
  /** For "status": the record. */
  record?: SessionRecord;
  /** For "status": the IO counters. */
  stats?: IoStats;
}

/** The directory holding the sessions. */
export function runDir(): string {
  return Deno.env.get("NBD_RUN_DIR") ?? "/run/nbd";
}

/** The directory of the session of process `pid`. */
export function sessionDir(pid: number = Deno.pid): string {
  return `${runDir()}/${pid}`;
}

/** The control socket of a session directory. */
function controlPath(dir: string): string {
  return `${dir}/control.sock`;
}

/** Whether a process runs (a zombie waiting for its parent counts as exited). */
function processAlive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // The state letter follows the command name, which is in parentheses.
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/** Creates this process's session directory (private mountpoint included when asked). */
export async function createSessionDir(): Promise<string> {
  const dir = sessionDir();
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  return dir;
}

/** Writes the record atomically (readers never see half a file). */
export async function writeRecord(dir: string, record: SessionRecord): Promise<void> {
  const tmp = `${dir}/state.json.tmp`;
  await Deno.writeTextFile(tmp, JSON.stringify(record, null, 2) + "\n");
  await Deno.rename(tmp, `${dir}/state.json`);
}

/** Removes a session directory (the mountpoint inside must be unmounted already). */
export async function removeSessionDir(dir: string): Promise<void> {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

/** Every session with a record, oldest first. */
export async function listSessions(): Promise<SessionEntry[]> {
  const entries: SessionEntry[] = [];
  let names: string[] = [];
  try {
    for await (const e of Deno.readDir(runDir())) if (e.isDirectory) names.push(e.name);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  names = names.filter((n) => /^\d+$/.test(n));
  for (const name of names) {
    const dir = `${runDir()}/${name}`;
    try {
      const record = JSON.parse(await Deno.readTextFile(`${dir}/state.json`)) as SessionRecord;
      entries.push({ record, dir, alive: processAlive(record.pid) });
    } catch {
      // A session still starting (no record yet), or one being removed.
    }
  }
  entries.sort((a, b) => a.record.started.localeCompare(b.record.started));
  return entries;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Sends one control request to a session; rejects if it does not answer. */
export async function controlRequest(
  dir: string,
  request: ControlRequest,
  timeoutMs = 10_000,
): Promise<ControlReply> {
  const conn = await Deno.connect({ transport: "unix", path: controlPath(dir) });
  const timer = setTimeout(() => {
    try {
      conn.close();
    } catch { /* closed */ }
  }, timeoutMs);
  try {
    await conn.write(encoder.encode(JSON.stringify(request) + "\n"));
    let text = "";
    const buf = new Uint8Array(64 * 1024);
    while (!text.includes("\n")) {
      const n = await conn.read(buf);
      if (n === null) break;
      text += decoder.decode(buf.subarray(0, n), { stream: true });
    }
    if (!text.includes("\n")) throw new Error("the session closed the control connection");
    return JSON.parse(text.slice(0, text.indexOf("\n"))) as ControlReply;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

/**
 * Serves control requests on a session's socket until `close()`.
 * `handle` answers each request.
 */
export class ControlServer {
  readonly #listener: Deno.Listener;
  readonly #handle: (request: ControlRequest) => Promise<ControlReply>;
  readonly #loop: Promise<void>;

  private constructor(
    listener: Deno.Listener,
    handle: (request: ControlRequest) => Promise<ControlReply>,
  ) {
    this.#listener = listener;
    this.#handle = handle;
    this.#loop = this.#accept();
  }

  /** Listens on the control socket of `dir`. */
  static async listen(
    dir: string,
    handle: (request: ControlRequest) => Promise<ControlReply>,
  ): Promise<ControlServer> {
    const path = controlPath(dir);
    await Deno.remove(path).catch(() => {});
    const listener = Deno.listen({ transport: "unix", path });
    await Deno.chmod(path, 0o600);
    return new ControlServer(listener, handle);
  }

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) this.#serve(conn);
    } catch {
      // closed
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    try {
      let text = "";
      const buf = new Uint8Array(4096);
      while (!text.includes("\n") && text.length < 65536) {
        const n = await conn.read(buf);
        if (n === null) return;
        text += decoder.decode(buf.subarray(0, n), { stream: true });
      }
      let reply: ControlReply;
      try {
        reply = await this.#handle(JSON.parse(text.slice(0, text.indexOf("\n"))));
      } catch (error) {
        reply = { ok: false, error: (error as Error).message };
      }
      await conn.write(encoder.encode(JSON.stringify(reply) + "\n"));
    } catch {
      // the client went away
    } finally {
      try {
        conn.close();
      } catch { /* closed */ }
    }
  }

  /** Stops listening. */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch { /* closed */ }
    await this.#loop;
  }
}

/**
 * A field of /proc/self/mountinfo as it was given to mount(2): the kernel
 * writes space, tab, newline and backslash as three octal digits ("\\040").
 */
export function unescapeMountField(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_, octal) => String.fromCharCode(parseInt(octal, 8)));
}

/** The file-system type of the mount at `path`, if `path` is a mountpoint. */
export function mountTypeAt(path: string): string | undefined {
  let type: string | undefined;
  for (const line of Deno.readTextFileSync("/proc/self/mountinfo").split("\n")) {
    const fields = line.split(" ");
    const dash = fields.indexOf("-");
    if (dash < 0 || unescapeMountField(fields[4] ?? "") !== path) continue;
    type = fields[dash + 1]; // the last one listed is the one on top
  }
  return type;
}

/** Waits up to `timeoutMs` for a process to exit; resolves to whether it did. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}
