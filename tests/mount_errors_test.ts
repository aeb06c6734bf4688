/**
 * The bad cases of `nbd mount`: clear one-line errors and nothing left
 * mounted for a missing mountpoint, a user without privilege and an
 * unreachable server; a server that dies mid-I/O gives EIO, a server that
 * stops answering is declared stale after --request-timeout (EIO, and reported),
 * and neither leaves the reader hanging.
 */

import { assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { hasCommand, INTEROP_REQUIRED, ROOT, run, startNbdServe } from "./helpers.ts";
import { mountable, mountScratch, mountsUnder, startMount } from "./mount_helpers.ts";

const MiB = 1024 * 1024;
const MOUNT = mountable();

/** Reads `length` bytes at `offset`; resolves to the error's text, or "" on success. */
async function readError(path: string, offset: number, length: number): Promise<string> {
  try {
    using file = await Deno.open(path, { read: true });
    await file.seek(offset, Deno.SeekMode.Start);
    const buf = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const n = await file.read(buf.subarray(done));
      if (n === null) break;
      done += n;
    }
    return "";
  } catch (error) {
    return String(error);
  }
}

Deno.test({
  name: "nbd mount: usage errors exit 2 with one line",
  async fn() {
    await using scratch = await mountScratch();
    for (
      const [args, message] of [
        [["mount", "nbd://localhost"], "mount needs a URI and a MOUNTPOINT"],
        [["mount", "-C", "0", "nbd://localhost", scratch.mnt], "--connections"],
        [["mount", "--timeout", "soon", "nbd://localhost", scratch.mnt], "--timeout"],
        [["mount", "--name", "a/b", "nbd://localhost", scratch.mnt], "--name"],
        [["umount"], "umount needs a MOUNTPOINT"],
        [["attach"], "attach needs exactly one URI"],
        [["detach"], "detach needs a DEVICE or URI"],
        [["attached", "extra"], "attached takes no arguments"],
      ] as const
    ) {
      const result = await scratch.nbd([...args]);
      assertEquals(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
      assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
      assertIncludes(result.stderr, `nbd: `);
      assertIncludes(result.stderr, message);
    }
  },
});

Deno.test({
  name:
    "nbd mount: a missing mountpoint and an unreachable server are clear errors; nothing mounted",
  ...MOUNT,
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "1M"]);
    const missing = await scratch.nbd(["mount", server.uri, `${scratch.dir}/nowhere`]);
    assertEquals(missing.code, 1);
    assertEquals(missing.stdout, "");
    assertEquals(
      missing.stderr,
      `nbd: Cannot mount on ${scratch.dir}/nowhere: no such file or directory\n`,
    );
    const unreachable = await scratch.nbd([
      "mount",
      `nbd+unix:///?socket=${scratch.dir}/none.sock`,
      scratch.mnt,
    ]);
    assertEquals(unreachable.code, 1);
    assertEquals(
      unreachable.stderr,
      `nbd: Cannot connect to NBD server at Unix socket ${scratch.dir}/none.sock: no such socket\n`,
    );
    const refused = await scratch.nbd(["mount", "nbd://127.0.0.1:1/", scratch.mnt]);
    assertEquals(refused.code, 1);
    assertIncludes(refused.stderr, "connection refused");
    const noExport = await scratch.nbd([
      "mount",
      server.uri.replace(":///", ":///nosuch"),
      scratch.mnt,
    ]);
    assertEquals(noExport.code, 1);
    assertIncludes(noExport.stderr, "nosuch");
    assertEquals(mountsUnder([scratch.dir]), []);
    const notMounted = await scratch.nbd(["umount", scratch.mnt]);
    assertEquals(notMounted.code, 1);
    assertIncludes(notMounted.stderr, "not mounted by nbd mount");
  },
});

Deno.test({
  name: "nbd mount: without root privilege it says so (run as nobody)",
  ignore: MOUNT.ignore || (!hasCommand("setpriv") && !INTEROP_REQUIRED),
  async fn() {
    await using scratch = await mountScratch();
    // Deno needs a cache directory the unprivileged user may write.
    const denoDir = `${scratch.dir}/deno-dir`;
    await Deno.mkdir(denoDir);
    await Deno.chmod(scratch.dir, 0o755);
    await Deno.chmod(denoDir, 0o777);
    await Deno.chmod(scratch.mnt, 0o777);
    // The runtime may live under a home the unprivileged user cannot enter
    // (npx keeps it in root's cache), so it runs from a copy.
    const deno = `${scratch.dir}/deno`;
    await Deno.copyFile(Deno.execPath(), deno);
    await Deno.chmod(deno, 0o755);
    const result = await run("setpriv", [
      "--reuid=65534",
      "--regid=65534",
      "--clear-groups",
      "env",
      `DENO_DIR=${denoDir}`,
      `HOME=${denoDir}`,
      deno,
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "mount",
      "nbd://localhost/",
      scratch.mnt,
    ]);
    assertEquals(result.code, 1, result.stderr);
    assertEquals(
      result.stderr,
      `nbd: Cannot mount on ${scratch.mnt}: mounting FUSE needs root (or CAP_SYS_ADMIN); ` +
        `run it as root, e.g. with sudo\n`,
    );
    assertEquals(mountsUnder([scratch.dir]), []);
  },
});

Deno.test({
  name: "nbd mount: a server that dies mid-I/O gives EIO, not a hang; the mount still unmounts",
  ...MOUNT,
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "64M"]);
    await using mount = await startMount(scratch, [server.uri, scratch.mnt]);
    assertEquals(await readError(mount.file, 0, MiB), "");
    server.child.kill("SIGKILL");
    await server.child.status;
    const started = Date.now();
    const error = await readError(mount.file, 32 * MiB, MiB);
    assertIncludes(error, "Input/output error");
    assertOk(Date.now() - started < 5000, "the read should fail at once");
    const umount = await scratch.nbd(["umount", scratch.mnt]);
    assertEquals(umount.code, 0, umount.stderr);
    assertEquals(await mount.exited(), 0);
    assertIncludes(mount.stderr(), "the server closed the connection");
  },
});

Deno.test({
  name:
    "nbd mount --request-timeout: a server that stops answering is declared stale (EIO, reported)",
  ...MOUNT,
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "64M"]);
    await using mount = await startMount(scratch, [
      "--request-timeout",
      "1",
      "-C",
      "1",
      server.uri,
      scratch.mnt,
    ]);
    assertEquals(await readError(mount.file, 0, 4096), "");
    server.child.kill("SIGSTOP");
    try {
      const started = Date.now();
      const error = await readError(mount.file, 16 * MiB, 4096);
      const took = Date.now() - started;
      assertIncludes(error, "Input/output error");
      assertOk(took >= 900 && took < 10_000, `failed after ${took} ms`);
      const listed = JSON.parse((await scratch.nbd(["attached", "--all", "--json"])).stdout);
      assertEquals(listed.length, 1);
      const connection = listed[0].stats.connections[0];
      assertIncludes(connection.state, "stale: no reply from the server for");
      assertOk(listed[0].stats.failed >= 1);
      const table = await scratch.nbd(["attached", "--all"]);
      assertIncludes(table.stdout, "connection 1: stale");
      assertIncludes(table.stdout, " 0/1 ");
    } finally {
      server.child.kill("SIGCONT");
    }
    const umount = await scratch.nbd(["umount", scratch.mnt]);
    assertEquals(umount.code, 0, umount.stderr);
    assertEquals(await mount.exited(), 0);
    assertIncludes(mount.stderr(), "stale: no reply from the server for 1 s");
  },
});
