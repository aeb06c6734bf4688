/**
 * The FUSE file server's stop: a request that never completes must not keep
 * /dev/fuse open once the mount is gone, or whoever still reads the detached
 * file (a loop device, a file system being unmounted) waits for ever.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { mountable } from "./mount_helpers.ts";
import { type FileContents, FuseFileServer } from "../mount/fuse_file_server.ts";

const SIZE = 1 << 20;

/** Contents whose reads at `stuckOffset` never finish; every other read is zeroes. */
function contentsWithStuckRead(stuckOffset: number): FileContents & { reached: Promise<void> } {
  const reached = Promise.withResolvers<void>();
  return {
    size: SIZE,
    readOnly: true,
    blockSize: 4096,
    reached: reached.promise,
    read(buf: Uint8Array, offset: number): Promise<void> {
      if (offset <= stuckOffset && stuckOffset < offset + buf.length) {
        reached.resolve();
        return new Promise(() => {});
      }
      buf.fill(0);
      return Promise.resolve();
    },
    write: () => Promise.reject(new Error("read-only")),
    flush: () => Promise.resolve(),
    punchHole: () => Promise.reject(new Error("read-only")),
    zeroRange: () => Promise.reject(new Error("read-only")),
  };
}

Deno.test({
  name: "FUSE server: a stuck request is failed, not waited for, once the mount is gone",
  ...mountable(),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-fuse-stop-" });
    const contents = contentsWithStuckRead(512 * 1024);
    const errors: string[] = [];
    const server = new FuseFileServer(contents, {
      mountpoint: dir,
      readOnly: true,
      onError: (what) => errors.push(what),
    });
    await server.mount();
    let unmounted = false;
    try {
      // A reader in another process: O_DIRECT so the page cache cannot answer.
      const reader = new Deno.Command("dd", {
        args: [`if=${dir}/disk`, "of=/dev/null", "bs=4096", "skip=128", "count=1", "iflag=direct"],
        stdout: "null",
        stderr: "piped",
      }).spawn();
      await contents.reached;
      // The reader keeps the mount busy: only a lazy unmount takes it away.
      assertEquals(await server.unmount({ lazy: true }), true);
      unmounted = true;
      const started = Date.now();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const closed = await Promise.race([
        server.closed.then(() => true),
        new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), 15_000)),
      ]);
      clearTimeout(timer);
      assertOk(closed, "the server kept /dev/fuse open for a request that never finished");
      assertOk(Date.now() - started < 10_000, `stopping took ${Date.now() - started} ms`);
      const status = await reader.output();
      assertOk(!status.success, "the stuck read should fail once the connection is closed");
      assertOk(errors.includes("stopping"), `the unanswered request is reported: ${errors}`);
    } finally {
      if (!unmounted) await server.unmount({ lazy: true });
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
