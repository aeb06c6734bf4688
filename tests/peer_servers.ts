/**
 * Starting third-party servers whose command lines need more than
 * `startServer` gives: nbd-server wants a config file and daemonises.
 *
 * @module
 */

import type { ServerProcess } from "./helpers.ts";

/** Starts nbd-server with a temporary config file serving `image` as export "disk". */
export async function startNbdServer(image: string): Promise<ServerProcess> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-server" });
  const socket = `${dir}/sock`;
  await Deno.writeTextFile(
    `${dir}/config`,
    `[generic]\n    unixsock = ${socket}\n    allowlist = true\n` +
      `[disk]\n    exportname = ${image}\n    flush = true\n    fua = true\n    trim = true\n`,
  );
  // nbd-server daemonises (and forks per client): the process to stop is the
  // one named in the pid file, not the child we start.
  const child = new Deno.Command("nbd-server", {
    args: ["-C", `${dir}/config`, "-p", `${dir}/pid`],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  await child.status;
  // Wait for the socket file rather than connecting: a probe connection that
  // hangs up at once makes nbd-server log a failed negotiation.
  for (let i = 0; i < 300; i++) {
    if (await Deno.stat(socket).then((s) => s.isSocket, () => false)) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    uri: `nbd+unix:///disk?socket=${socket}`,
    socket,
    child,
    stderr: () => "",
    async [Symbol.asyncDispose]() {
      const pid = Number(await Deno.readTextFile(`${dir}/pid`).catch(() => "0"));
      if (pid > 0) {
        try {
          Deno.kill(pid, "SIGTERM");
        } catch { /* already gone */ }
      }
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}
