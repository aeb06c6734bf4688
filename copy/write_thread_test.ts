import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { eventually, randomBytes, tempDir } from "../tests/helpers.ts";
import { closeFd, O_CREAT, O_RDONLY, O_WRONLY, openFd, SystemError } from "../io/libc.ts";
import { RING_SLOTS, WriteThread } from "./write_thread.ts";
import { FileDestination } from "./file.ts";
import { copyImage, type CopyOptions } from "./scheduler.ts";
import { MemorySource, patterned } from "./_test_utils.ts";
import type { Endpoint } from "./endpoint.ts";
import { StreamSource } from "./pipe.ts";

const KiB = 1024;
const MiB = 1 << 20;

const OPTIONS: CopyOptions = {
  requests: 16,
  requestSize: 256 * KiB,
  sparseSize: 4096,
  allocated: false,
  destinationIsZero: false,
  extents: true,
};

Deno.test("the write thread writes every posted piece, in any order, beyond one ring of requests", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/out.img`;
  const fd = openFd(path, O_WRONLY | O_CREAT)!;
  const pieces = RING_SLOTS * 3;
  const pieceSize = 4 * KiB;
  const data = randomBytes(pieces * pieceSize, 21);
  // Sixteen slots of the arena, each reused once its write is done.
  const arena = new SharedArrayBuffer(16 * pieceSize);
  const thread = WriteThread.start(fd, arena, MiB, 4 * MiB)!;
  assertOk(thread, "a thread starts");
  assertOk(await eventually(() => thread.ready), "the thread loads");
  const order = Array.from({ length: pieces }, (_, i) => (i * 7919) % pieces);
  let next = 0;
  await Promise.all(Array.from({ length: 16 }, async (_, slot) => {
    const view = new Uint8Array(arena, slot * pieceSize, pieceSize);
    assertOk(thread.owns(view));
    while (next < pieces) {
      const piece = order[next++]!;
      view.set(data.subarray(piece * pieceSize, (piece + 1) * pieceSize));
      await thread.write(view, piece * pieceSize);
    }
  }));
  await thread.stop();
  closeFd(fd);
  assertBytes(await Deno.readFile(path), data);
  assertOk(!thread.owns(new Uint8Array(pieceSize)), "other memory is not the arena's");
});

Deno.test("a write the system refuses rejects with its errno; the thread still stops", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/read-only.img`;
  await Deno.writeFile(path, new Uint8Array(8 * KiB));
  const fd = openFd(path, O_RDONLY)!;
  const arena = new SharedArrayBuffer(8 * KiB);
  const thread = WriteThread.start(fd, arena, MiB, 4 * MiB)!;
  assertOk(await eventually(() => thread.ready), "the thread loads");
  const error = await assertRejects(
    () => thread.write(new Uint8Array(arena, 0, 4 * KiB), 0),
    SystemError,
  );
  assertEquals((error as SystemError).code, "EBADF");
  await thread.stop();
  closeFd(fd);
  assertEquals(await Deno.readFile(path), new Uint8Array(8 * KiB), "nothing was written");
});

Deno.test("a write thread stopped before it has loaded stops all the same", async () => {
  await using dir = await tempDir();
  const fd = openFd(`${dir.path}/out.img`, O_WRONLY | O_CREAT)!;
  const thread = WriteThread.start(fd, new SharedArrayBuffer(4 * KiB), MiB, 4 * MiB)!;
  await thread.stop();
  closeFd(fd);
});

Deno.test("a copy into a large file hands its writes to the write thread, byte for byte", async () => {
  await using dir = await tempDir();
  const size = 96 * MiB;
  const data = patterned(size);
  // Zero runs in the middle stay holes in the new file.
  data.fill(0, 40 * MiB, 48 * MiB);
  const path = `${dir.path}/out.img`;
  const destination = await FileDestination.open(path, size);
  assertOk(destination instanceof FileDestination);
  await copyImage(new MemorySource(data), destination, OPTIONS);
  assertOk(destination.threaded, "the writes went through the write thread");
  await destination.close(true);
  assertBytes(await Deno.readFile(path), data);
  const allocated = (await Deno.stat(path)).blocks! * 512;
  assertOk(allocated <= size - 8 * MiB, `${allocated} bytes allocated: the zero run is no hole`);
});

Deno.test("a stream into a file starts the write thread only once it has shown its size", async () => {
  await using dir = await tempDir();
  const copyInto = async (data: Uint8Array, source: Endpoint) => {
    const path = `${dir.path}/out-${data.length}.img`;
    const destination = await FileDestination.open(path, source.size);
    assertOk(destination instanceof FileDestination);
    await copyImage(source, destination, OPTIONS);
    const started = destination.writeThreadStarted;
    await destination.close(true);
    assertBytes(await Deno.readFile(path), data);
    return started;
  };
  // A stream of unknown size: the thread starts after 32 MiB written here.
  const long = patterned(48 * MiB);
  assertOk(await copyInto(long, new StreamSource("stdin", readerOf(long))), "48 MiB stream");
  const short = patterned(24 * MiB);
  assertOk(!(await copyInto(short, new StreamSource("stdin", readerOf(short)))), "24 MiB stream");
  // An image known to be small never pays for the thread.
  const small = patterned(16 * MiB);
  assertOk(!(await copyInto(small, new MemorySource(small))), "16 MiB image");
});

/** A stream reader over `data`, in pieces of up to 64 KiB. */
function readerOf(data: Uint8Array) {
  let position = 0;
  return {
    read(buf: Uint8Array): Promise<number | null> {
      if (position >= data.length) return Promise.resolve(null);
      const n = Math.min(buf.length, 64 * KiB, data.length - position);
      buf.set(data.subarray(position, position + n));
      position += n;
      return Promise.resolve(n);
    },
  };
}
