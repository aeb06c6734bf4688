/**
 * Helpers for the view's tests and benchmark: the view URL a server prints,
 * and `nbd view` as a subprocess.
 *
 * @module
 */

import { ROOT, type ServerProcess } from "./helpers.ts";

/** Waits for the "view at URL" line a server prints on stderr and returns the URL. */
export async function viewUrl(stderr: () => string, timeoutMs = 15000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const m = /view at (http:\/\/\S+)/.exec(stderr());
    if (m) return m[1]!;
    if (Date.now() > deadline) throw new Error(`no view URL on stderr:\n${stderr()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The view URL of a server started with `--view`. */
export function serverViewUrl(server: ServerProcess): Promise<string> {
  return viewUrl(server.stderr);
}

/** `nbd view ARGS` running in the background. */
export interface ViewProcess extends AsyncDisposable {
  /** The page's URL. */
  url: string;
  /** The child. */
  child: Deno.ChildProcess;
  /** Its stderr so far. */
  stderr(): string;
}

/** Starts `nbd view --listen 127.0.0.1:0 ARGS` and waits for its URL. */
export async function startNbdView(args: string[]): Promise<ViewProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", `${ROOT}/main.ts`, "view", "--listen", "127.0.0.1:0", ...args],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let text = "";
  const done = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) text += decoder.decode(chunk, { stream: true });
  })();
  const dispose = async () => {
    try {
      child.kill("SIGTERM");
    } catch { /* gone */ }
    await child.status;
    await done;
  };
  try {
    const url = await viewUrl(() => text);
    return { url, child, stderr: () => text, [Symbol.asyncDispose]: dispose };
  } catch (error) {
    await dispose();
    throw error;
  }
}

/** Removes the fields of a /stats document that depend on when it was read. */
export function withoutClock(value: unknown): unknown {
  const clock = new Set([
    "generatedAt",
    "uptimeSeconds",
    "secondsConnected",
    "secondsSinceLastRequest",
    "secondsSinceLastReply",
  ]);
  if (Array.isArray(value)) return value.map(withoutClock);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).filter(([k]) => !clock.has(k)).map(([k, v]) => [k, withoutClock(v)]),
    );
  }
  return value;
}
