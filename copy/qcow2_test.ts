import { assertBytes, assertEquals } from "../tests/assert.ts";
import { COPY_BLOCK_SIZE } from "./endpoint.ts";
import { QCOW2_FILE_REQUEST, Qcow2Destination, Qcow2Source } from "./qcow2.ts";
import { copyImage, planSizes } from "./scheduler.ts";
import { MemoryDestination, MemorySource, patterned } from "./_test_utils.ts";

const MiB = 1 << 20;

const OPTIONS = {
  requests: 8,
  requestSize: 256 * 1024,
  sparseSize: 4096,
  allocated: false,
  destinationIsZero: true,
  extents: true,
};

/** A growing in-memory file whose writes complete in line, as a local file's do. */
class InlineFile extends MemoryDestination {
  override readonly synchronous = true;
  constructor() {
    super(undefined, { blockSize: COPY_BLOCK_SIZE });
  }
}

Deno.test("a plain qcow2 image into a file is copied in requests of 1 MiB", async () => {
  const size = 6 * MiB + 65536;
  const data = patterned(size, [{ offset: 2 * MiB, length: MiB, zero: true }]);
  const source = new MemorySource(data, [{ offset: 2 * MiB, length: MiB, zero: true }]);
  const file = new InlineFile();
  const image = await Qcow2Destination.open(file, size, {});
  assertEquals(image.blockSize.preferred, QCOW2_FILE_REQUEST);
  assertEquals(planSizes(source, image, OPTIONS.requestSize, 4096).requestSize, QCOW2_FILE_REQUEST);
  await copyImage(source, image, OPTIONS);
  await image.close(true);
  // The data clusters went out in writes of 1 MiB (the first is the header's cluster).
  const largest = Math.max(...file.writes.map((w) => w.length));
  assertEquals(largest, QCOW2_FILE_REQUEST);
  assertEquals(source.reads.filter((r) => r.length === QCOW2_FILE_REQUEST).length, 5);
  // And the image reads back as the source.
  const back = await Qcow2Source.open(new MemorySource(file.data));
  const out = new Uint8Array(size);
  await back.read(out, 0);
  assertBytes(out, data);
});

Deno.test("a qcow2 image through an asynchronous endpoint keeps its preferred size", async () => {
  const file = new MemoryDestination(undefined, { blockSize: COPY_BLOCK_SIZE });
  const image = await Qcow2Destination.open(file, 4 * MiB, {});
  assertEquals(image.blockSize.preferred, Math.max(65536, COPY_BLOCK_SIZE.preferred));
  await image.close(false);
});
