import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { randomBytes, tempDir } from "../tests/helpers.ts";
import { closeFd, openFd, pread } from "./libc.ts";
import { platform } from "./platform.ts";
import { BufferedReader, UnexpectedEofError } from "./buffered_reader.ts";
import { CorkedWriter } from "./corked_writer.ts";

/** A source that returns the given chunks one read at a time. */
function source(chunks: Uint8Array[]) {
  let i = 0;
  let reads = 0;
  return {
    get reads() {
      return reads;
    },
    read(buf: Uint8Array): Promise<number | null> {
      reads++;
      const chunk = chunks[i];
      if (!chunk) return Promise.resolve(null);
      const n = Math.min(buf.length, chunk.length);
      buf.set(chunk.subarray(0, n));
      if (n === chunk.length) i++;
      else chunks[i] = chunk.subarray(n);
      return Promise.resolve(n);
    },
  };
}

Deno.test("BufferedReader parses messages split across reads and reads payloads directly", async () => {
  const src = source([
    Uint8Array.from([1, 2]),
    Uint8Array.from([3, 4, 5, 6]),
    new Uint8Array(1000).fill(7),
  ]);
  const reader = new BufferedReader(src, 16);
  assertEquals(await reader.ensure(3), true);
  assertEquals([...reader.peek(3)], [1, 2, 3]);
  reader.consume(3);
  const payload = new Uint8Array(1003);
  await reader.readInto(payload);
  assertBytes(payload.subarray(0, 3), Uint8Array.from([4, 5, 6]));
  assertEquals(payload.subarray(3).every((b) => b === 7), true);
  assertEquals(await reader.ensure(1), false); // clean EOF at a message boundary
});

Deno.test("BufferedReader reports EOF in the middle of a message", async () => {
  const reader = new BufferedReader(source([Uint8Array.from([1, 2])]), 16);
  await assertRejects(() => reader.ensure(4, "a header"), UnexpectedEofError, "a header");
  const r2 = new BufferedReader(source([Uint8Array.from([1])]), 16);
  await assertRejects(() => r2.readExact(2), UnexpectedEofError);
});

/**
 * A stream whose bytes arrive in `steps`: a number of bytes that splice can
 * move now (or the next read takes), or "wait" (splice finds nothing; the
 * next ordinary read takes the following step's bytes). Spliced bytes go into `file`; a failing
 * file hands the bytes it took back as stranded.
 */
function spliceSource(data: Uint8Array, steps: Array<number | "wait">, failAt = -1) {
  let pos = 0;
  let step = 0;
  let stranded: Uint8Array | undefined;
  const file = new Uint8Array(data.length + 64);
  const reads: number[] = [];
  const next = () => steps[step] ?? data.length - pos;
  return {
    file,
    reads,
    read(buf: Uint8Array): Promise<number | null> {
      reads.push(buf.length);
      if (next() === "wait") step++;
      const n = Math.min(buf.length, next() as number, data.length - pos);
      step++;
      if (n === 0) return Promise.resolve(null);
      buf.set(data.subarray(pos, pos + n));
      pos += n;
      return Promise.resolve(n);
    },
    trySpliceToFile(_fd: number, offset: number, length: number): number {
      const here = next();
      if (here === "wait") return -1;
      const n = Math.min(here, length, data.length - pos);
      if (n === 0) return data.length === pos ? 0 : -1;
      step++;
      if (offset <= failAt && failAt < offset + n) {
        stranded = data.slice(pos, pos + n);
        pos += n;
        return -1;
      }
      file.set(data.subarray(pos, pos + n), offset);
      pos += n;
      return n;
    },
    takeStranded() {
      const out = stranded;
      stranded = undefined;
      return out;
    },
  };
}

Deno.test("BufferedReader.receiveToFile: buffered, spliced, waited-for and stranded bytes all land", async () => {
  const header = 8;
  const payload = 5000;
  const data = randomBytes(header + payload + header, 31);
  // The first read takes the header and 100 payload bytes; splice then moves pieces,
  // finds nothing once (an ordinary read fills in), and the file refuses one piece.
  const src = spliceSource(data, [header + 100, 1000, "wait", 700, 1200, 900], 3011);
  const reader = new BufferedReader(src, 4096);
  assertOk(reader.splices);
  assertOk(await reader.ensure(header));
  reader.consume(header);
  const written: Array<[number, number]> = [];
  const failure = await reader.receiveToFile(
    0,
    10,
    payload,
    (buf, offset) => {
      written.push([offset, buf.length]);
      src.file.set(buf, offset);
      return Promise.resolve();
    },
    new Uint8Array(1500),
  );
  assertEquals(failure, undefined);
  assertBytes(src.file.subarray(10, 10 + payload), data.subarray(header, header + payload));
  // Buffered bytes first, then the waited-for read, then the stranded piece.
  assertEquals(written, [[10, 100], [10 + 1100, 700], [10 + 3000, 900]]);
  // The next header is read exactly: nothing of a following payload is buffered.
  const before = src.reads.length;
  assertOk(await reader.ensure(header));
  assertEquals(src.reads.slice(before), [header]);
  assertBytes(reader.peek(header), data.subarray(header + payload));
});

Deno.test("BufferedReader.receiveToFile: a failed write consumes the payload; EOF mid-payload throws", async () => {
  const data = randomBytes(3000 + 4, 32);
  const src = spliceSource(data, ["wait", 1000, 1000]);
  const reader = new BufferedReader(src, 4096);
  const failure = await reader.receiveToFile(0, 0, 3000, () => {
    return Promise.reject(new Error("disk full"));
  }, new Uint8Array(512));
  assertEquals((failure as Error).message, "disk full");
  assertOk(await reader.ensure(4));
  assertBytes(reader.peek(4), data.subarray(3000));
  const short = new BufferedReader(spliceSource(randomBytes(100, 33), [60]), 4096);
  await assertRejects(
    () => short.receiveToFile(0, 0, 200, () => Promise.resolve(), new Uint8Array(64), "a payload"),
    UnexpectedEofError,
    "a payload",
  );
});

Deno.test("CorkedWriter keeps order, batches small chunks and reports backpressure", async () => {
  const writes: number[][] = [];
  let release!: () => void;
  let gate = new Promise<void>((r) => release = r);
  const sink = {
    async write(buf: Uint8Array) {
      await gate;
      // Write at most 3 bytes at a time to exercise partial writes.
      const n = Math.min(3, buf.length);
      writes.push([...buf.subarray(0, n)]);
      return n;
    },
  };
  const writer = new CorkedWriter(sink, 4);
  writer.write(Uint8Array.from([1, 2]), Uint8Array.from([3]));
  writer.write(Uint8Array.from([4, 5, 6, 7]));
  assertEquals(writer.full, true);
  const drained = writer.drain();
  release();
  gate = Promise.resolve();
  await drained;
  await writer.flush();
  assertEquals(writes.flat(), [1, 2, 3, 4, 5, 6, 7]);
  assertEquals(writer.queuedBytes, 0);
});

Deno.test("CorkedWriter releases a chunk only once it is written or copied, never after a failure", async () => {
  const written: number[] = [];
  let open!: () => void;
  const gate = new Promise<void>((resolve) => open = resolve);
  const sink = {
    async write(buf: Uint8Array) {
      await gate;
      // Half of what is asked at a time: a large chunk takes several writes.
      const n = Math.max(1, Math.floor(buf.length / 2));
      written.push(...buf.subarray(0, n));
      return n;
    },
  };
  // Chunks of 8 bytes and more go out as they are; smaller ones are copied together.
  const writer = new CorkedWriter(sink, 1 << 20, 8);
  const released: string[] = [];
  const big = new Uint8Array(16).fill(1);
  const small = Uint8Array.from([2, 2]);
  const last = Uint8Array.from([3]);
  writer.writeReleasing(big, () => released.push(`big after ${written.length}`));
  writer.writeReleasing(small, () => released.push(`small after ${written.length}`));
  writer.write(last);
  await Promise.resolve();
  assertEquals(released, []);
  open();
  await writer.flush();
  assertEquals(written, [...big, ...small, ...last]);
  // The large chunk when all 16 bytes were written; the small one once copied, before it went.
  assertEquals(released, ["big after 16", "small after 16"]);

  const failing = new CorkedWriter({ write: () => Promise.reject(new Error("broken pipe")) });
  let calls = 0;
  failing.writeReleasing(new Uint8Array(64), () => calls++);
  await assertRejects(() => failing.flush(), Error, "broken pipe");
  failing.writeReleasing(new Uint8Array(64), () => calls++);
  assertEquals(calls, 0);
});

Deno.test("CorkedWriter stops and surfaces the error when the sink fails", async () => {
  const writer = new CorkedWriter({ write: () => Promise.reject(new Error("broken pipe")) });
  writer.write(Uint8Array.from([1]));
  await assertRejects(() => writer.flush(), Error, "broken pipe");
  writer.write(Uint8Array.from([2])); // ignored, does not throw
  assertEquals((writer.error as Error).message, "broken pipe");
});

Deno.test("CorkedWriter writes a chunk queued whole in a write of its own, small or not", async () => {
  const writes: number[][] = [];
  let open!: () => void;
  const gate = new Promise<void>((resolve) => open = resolve);
  const sink = {
    async write(buf: Uint8Array) {
      await gate;
      writes.push([...buf]);
      return buf.length;
    },
  };
  const writer = new CorkedWriter(sink, 1 << 20, 8);
  writer.write(Uint8Array.from([1]));
  await Promise.resolve();
  // Queued while the first write waits: two small chunks, one of them whole, and a last one.
  const released: number[] = [];
  writer.write(Uint8Array.from([2]));
  writer.writeReleasing(Uint8Array.from([3, 3]), () => released.push(3), { whole: true });
  writer.writeReleasing(Uint8Array.from([4]), () => released.push(4));
  writer.write(Uint8Array.from([5]));
  open();
  await writer.flush();
  assertEquals(writes, [[1], [2], [3, 3], [4, 5]]);
  assertEquals(released, [3, 4]);
});

Deno.test("CorkedWriter holds writes while corked and sends them together; drain and flush uncork", async () => {
  const writes: number[][] = [];
  const sink = {
    write(buf: Uint8Array) {
      writes.push([...buf]);
      return Promise.resolve(buf.length);
    },
  };
  const writer = new CorkedWriter(sink);
  writer.cork();
  writer.write(Uint8Array.from([1]));
  await Promise.resolve();
  writer.write(Uint8Array.from([2]), Uint8Array.from([3]));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assertEquals(writes, []);
  writer.uncork();
  await writer.flush();
  assertEquals(writes, [[1, 2, 3]]);
  // Uncorked, a write starts on its own.
  writer.write(Uint8Array.from([4]));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assertEquals(writes, [[1, 2, 3], [4]]);
  // Waiting for the queue to go out lets it go out.
  writer.cork();
  writer.write(Uint8Array.from([5]));
  await writer.flush();
  assertEquals(writes, [[1, 2, 3], [4], [5]]);
});

Deno.test("CorkedWriter starts writing while corked once 256 KiB are queued", async () => {
  const writes: number[] = [];
  const sink = {
    write(buf: Uint8Array) {
      writes.push(buf.length);
      return Promise.resolve(buf.length);
    },
  };
  const writer = new CorkedWriter(sink);
  writer.cork();
  writer.write(new Uint8Array(200 * 1024));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assertEquals(writes, []);
  writer.write(new Uint8Array(56 * 1024));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assertEquals(writes, [256 * 1024]);
});

Deno.test({
  name:
    "CorkedWriter sends file ranges in order, waits by writing a piece, zero-fills a short file",
  ignore: !platform().linuxFast,
  async fn() {
    await using dir = await tempDir();
    const path = `${dir.path}/data.bin`;
    const data = randomBytes(300000, 5);
    await Deno.writeFile(path, data);
    const fd = openFd(path, 0)!;
    try {
      const out: number[] = [];
      const append = (buf: Uint8Array) => {
        for (const b of buf) out.push(b);
      };
      let sendFileCalls = 0;
      let sentMore = 0;
      const sink = {
        write(buf: Uint8Array) {
          // The ordinary write takes a little at a time.
          const n = Math.min(buf.length, 5000);
          append(buf.subarray(0, n));
          return Promise.resolve(n);
        },
        tryWriteMore(buf: Uint8Array) {
          sentMore++;
          append(buf);
          return buf.length;
        },
        trySendFile(file: number, offset: number, length: number) {
          // Every other call finds no room: the writer must go on the ordinary way.
          if (sendFileCalls++ % 2 === 0) return -1;
          const piece = new Uint8Array(Math.min(length, 70000));
          const n = pread(file, piece, offset)!;
          append(piece.subarray(0, n));
          return n;
        },
      };
      const writer = new CorkedWriter(sink);
      assertOk(writer.sendsFiles);
      writer.write(Uint8Array.from([1, 2, 3]));
      writer.writeFile(Uint8Array.from([9, 9]), fd, 1000, 200000);
      writer.write(Uint8Array.from([4, 5]));
      // Past the end of the file: 50000 bytes of data, then zeroes.
      writer.writeFile(Uint8Array.from([8]), fd, 250000, 100000);
      assertEquals(writer.queuedBytes, 3 + 2 + 200000 + 2 + 1 + 100000);
      await writer.flush();
      const expected = [
        ...[1, 2, 3, 9, 9],
        ...data.subarray(1000, 201000),
        ...[4, 5, 8],
        ...data.subarray(250000),
        ...new Uint8Array(50000),
      ];
      assertBytes(Uint8Array.from(out), Uint8Array.from(expected));
      assertEquals(sentMore, 2);
      assertOk(sendFileCalls > 4, "the ranges went through trySendFile");
      assertEquals(writer.queuedBytes, 0);
    } finally {
      closeFd(fd);
    }
  },
});

Deno.test("CorkedWriter without a file-sending stream says so", () => {
  assertEquals(
    new CorkedWriter({ write: (b: Uint8Array) => Promise.resolve(b.length) }).sendsFiles,
    false,
  );
});
