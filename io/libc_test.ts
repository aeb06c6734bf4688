import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { randomBytes, tempDir } from "../tests/helpers.ts";
import {
  closeFd,
  ENOENT,
  O_RDONLY,
  O_RDWR,
  openFd,
  preadCached,
  preadOnThread,
  pwriteOnThread,
  SyscallError,
  SystemError,
} from "./libc.ts";

Deno.test("preadCached() reads what the page cache holds, at an offset, into a view", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/data`;
  const data = randomBytes(1 << 20, 11);
  await Deno.writeFile(path, data);
  const fd = openFd(path, O_RDONLY)!;
  try {
    // Just written, so cached: the read is whole. A view with an offset into a larger
    // buffer checks that the data lands where the view starts.
    const buffer = new Uint8Array(4096 + 65536).fill(0xaa);
    const view = buffer.subarray(4096);
    assertEquals(preadCached(fd, view, 12345), 65536);
    assertBytes(view, data.subarray(12345, 12345 + 65536));
    assertOk(buffer.subarray(0, 4096).every((b) => b === 0xaa), "nothing written before the view");
    // At the end of the file: a short count, then 0.
    assertEquals(preadCached(fd, view, data.length - 100), 100);
    assertEquals(preadCached(fd, view, data.length), 0);
  } finally {
    closeFd(fd);
  }
  // A descriptor that cannot be read: null, so that the caller uses a plain read.
  assertEquals(preadCached(-1, new Uint8Array(16), 0), null);
});

Deno.test("preadOnThread() and pwriteOnThread() read and write off the event loop", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/data`;
  await Deno.writeFile(path, new Uint8Array(3 << 20));
  const fd = openFd(path, O_RDWR)!;
  try {
    const data = randomBytes(1 << 20, 12);
    assertEquals(await pwriteOnThread(fd, data, 1 << 20), 1 << 20);
    const back = new Uint8Array(1 << 20);
    assertEquals(await preadOnThread(fd, back, 1 << 20), 1 << 20);
    assertBytes(back, data);
    assertEquals(await preadOnThread(-1, back, 0), -1);
  } finally {
    closeFd(fd);
  }
  assertBytes((await Deno.readFile(path)).subarray(1 << 20, 2 << 20), randomBytes(1 << 20, 12));
});

Deno.test("SyscallError names the call and its path, and keeps the errno", () => {
  const error = new SyscallError("mount", ENOENT, "/mnt/x");
  assertEquals(
    [error.message, error.errno, error.code, error instanceof SystemError],
    ["mount /mnt/x: no such file or directory", ENOENT, "ENOENT", true],
  );
});
