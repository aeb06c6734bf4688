import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { eventually, peers, randomBytes, tempDir } from "../tests/helpers.ts";
import { closeFd, O_CREAT, O_RDONLY, O_WRONLY, openFd, SystemError } from "../io/libc.ts";
import { RING_SLOTS, WriteThread } from "./write_thread.ts";
import type { CopyOptions } from "./scheduler.ts";
import { patterned } from "./_test_utils.ts";
import type { CopyExtent } from "./endpoint.ts";

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
    while (next < pieces) {
      const piece = order[next++]!;
      view.set(data.subarray(piece * pieceSize, (piece + 1) * pieceSize));
      await thread.write(view, piece * pieceSize);
    }
  }));
  await thread.stop();
  closeFd(fd);
  assertBytes(await Deno.readFile(path), data);
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

/** What a traced copy into a new file showed. */
interface TracedCopy {
  /** pwrite calls on the file by the thread that runs the copy, and by other threads. */
  writesHere: number;
  writesElsewhere: number;
  /** The write thread's module was loaded. */
  threadStarted: boolean;
}

/**
 * Copies `size` patterned bytes (with `zeroRuns`), from an image or from a
 * stream of unknown size, into a new file at `path`, in a process of its
 * own under strace, and reports which threads wrote the file.
 */
async function tracedCopy(
  dir: string,
  path: string,
  size: number,
  { stream = false, zeroRuns = [] as CopyExtent[] } = {},
): Promise<TracedCopy> {
  const script = `${dir}/copy.ts`;
  const module = (name: string) => JSON.stringify(new URL(name, import.meta.url).href);
  await Deno.writeTextFile(
    script,
    `import { FileDestination } from ${module("./file_destination.ts")};
import { copyImage } from ${module("./scheduler.ts")};
import { StreamSource } from ${module("./pipe.ts")};
import { MemorySource, patterned, streamOf } from ${module("./_test_utils.ts")};
const data = patterned(${size}, ${JSON.stringify(zeroRuns)});
const source = ${stream} ? new StreamSource("stdin", streamOf(data)) : new MemorySource(data);
const destination = await FileDestination.open(${JSON.stringify(path)}, source.size);
await copyImage(source, destination, ${JSON.stringify(OPTIONS)});
await destination.close(true);
console.log(Deno.pid);
`,
  );
  const log = `${dir}/trace`;
  const output = await new Deno.Command("strace", {
    args: [
      "-f",
      "-qq",
      "-y",
      "-o",
      log,
      "-e",
      "trace=openat,pwrite64",
      Deno.execPath(),
      "run",
      "-A",
      "--quiet",
      script,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assertOk(output.success, new TextDecoder().decode(output.stderr));
  const pid = new TextDecoder().decode(output.stdout).trim();
  const result: TracedCopy = { writesHere: 0, writesElsewhere: 0, threadStarted: false };
  for (const line of (await Deno.readTextFile(log)).split("\n")) {
    // The file is written under its temporary name ("-y" shows a descriptor's path).
    const write = /^(\d+)\s+pwrite64\(\d+<[^>]*\.nbd-copy-/.exec(line);
    if (write) {
      if (write[1] === pid) result.writesHere++;
      else result.writesElsewhere++;
    }
    if (/^\d+\s+openat\(.*copy\/write_worker\.ts/.test(line)) result.threadStarted = true;
  }
  return result;
}

Deno.test({
  name: "a copy into a large file hands its writes to the write thread, byte for byte",
  ...peers("strace"),
  async fn() {
    await using dir = await tempDir();
    const size = 96 * MiB;
    // A zero run in the middle stays a hole in the new file.
    const zeroRuns = [{ offset: 40 * MiB, length: 8 * MiB, zero: true }];
    const path = `${dir.path}/out.img`;
    const traced = await tracedCopy(dir.path, path, size, { zeroRuns });
    assertOk(traced.threadStarted, "the write thread started");
    assertOk(
      traced.writesElsewhere > traced.writesHere,
      `${traced.writesElsewhere} writes on the write thread, ${traced.writesHere} on the copy's`,
    );
    assertBytes(await Deno.readFile(path), patterned(size, zeroRuns));
    const allocated = (await Deno.stat(path)).blocks! * 512;
    // The filesystem may count a block or two of its own (extent tree) in the file's blocks.
    assertOk(
      allocated <= size - 8 * MiB + 64 * KiB,
      `${allocated} bytes allocated: the zero run is no hole`,
    );
  },
});

Deno.test({
  name: "a stream into a file starts the write thread only once it has shown its size",
  ...peers("strace"),
  async fn() {
    await using dir = await tempDir();
    const copyInto = async (size: number, stream: boolean) => {
      const path = `${dir.path}/out-${size}.img`;
      const traced = await tracedCopy(dir.path, path, size, { stream });
      assertBytes(await Deno.readFile(path), patterned(size));
      // Without a thread, every write is the copy's own.
      if (!traced.threadStarted) assertEquals(traced.writesElsewhere, 0);
      return traced.threadStarted;
    };
    // A stream of unknown size: the thread starts after 32 MiB written here.
    assertOk(await copyInto(48 * MiB, true), "48 MiB stream");
    assertOk(!(await copyInto(24 * MiB, true)), "24 MiB stream");
    // An image known to be small never pays for the thread.
    assertOk(!(await copyInto(16 * MiB, false)), "16 MiB image");
  },
});
