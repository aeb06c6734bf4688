/**
 * Running this program again as a background process: `nbd attach` starts
 * itself with an internal flag in a new session (so terminal signals do not
 * reach it) and waits for its ready line before returning.
 *
 * @module
 */

import { selfCommand } from "../util/self_command.ts";

/** How a background start ended. */
export type DaemonStart =
  | { ready: true; line: string; pid: number }
  | { ready: false; code: number; stderr: string };

/**
 * Starts `args` of this program in the background and waits until it
 * prints its first stdout line (ready) or exits (failed, with its stderr).
 * After the ready line the child is left running on its own.
 */
export async function startDaemon(args: string[]): Promise<DaemonStart> {
  const [cmd, cmdArgs] = selfCommand(args);
  const child = new Deno.Command(cmd, {
    args: cmdArgs,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  const decoder = new TextDecoder();
  let stderr = "";
  const stderrReader = child.stderr.getReader();
  const stderrDone = (async () => {
    try {
      while (true) {
        const { value, done } = await stderrReader.read();
        if (done) break;
        stderr += decoder.decode(value, { stream: true });
      }
    } catch { /* cancelled */ }
  })();
  const stdoutReader = child.stdout.getReader();
  let stdout = "";
  while (!stdout.includes("\n")) {
    const { value, done } = await stdoutReader.read();
    if (done) break;
    stdout += decoder.decode(value, { stream: true });
  }
  if (stdout.includes("\n")) {
    // Ready: stop listening, so this process can exit and leave the child running.
    await stdoutReader.cancel().catch(() => {});
    await stderrReader.cancel().catch(() => {});
    await stderrDone;
    child.unref();
    return { ready: true, line: stdout.slice(0, stdout.indexOf("\n")), pid: child.pid };
  }
  const status = await child.status;
  await stderrDone;
  return { ready: false, code: status.code || 1, stderr };
}
