/**
 * READ replies of the file plugin sent straight from the page cache
 * (sendfile): the data is exact through nbdcopy, qemu-img and simple,
 * structured and extended replies, with the path on and turned off
 * (NBD_NO_SENDFILE=1); a range not all in the page cache goes the ordinary
 * way; a client that hangs up in the middle leaves the server serving.
 * Whether sendfile ran, and on what, is read from strace.
 */

import { assertBytes, assertEquals, assertOk } from "./assert.ts";
import {
  linuxPaths,
  peers,
  randomBytes,
  runOk,
  sendfileRanges,
  startNbdServe,
  tempDir,
} from "./helpers.ts";
import { RawClient } from "./raw_client.ts";
import { NbdClient } from "../client/client.ts";
import {
  NBD_CMD_READ,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
} from "../protocol/constants.ts";
import { getU64 } from "../protocol/handshake.ts";
import { closeFd, dropCache, openFd } from "../io/libc.ts";

const MiB = 1024 * 1024;

/** Reads `length` bytes at `offset` with a raw client, in the reply style asked for. */
async function rawRead(
  socket: string,
  style: "simple" | "structured" | "extended",
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const raw = await RawClient.connect(socket);
  try {
    await raw.start();
    await raw.go("", { structured: style === "structured", extended: style === "extended" });
    await raw.request(NBD_CMD_READ, { offset, length, cookie: 7 });
    const reply = await raw.reply(length);
    if (reply.kind === "simple") {
      assertEquals(reply.errno, 0);
      assertOk(style === "simple", "a simple reply to a structured client");
      return reply.data!;
    }
    assertOk(style !== "simple", "a structured reply to a simple client");
    assertEquals(reply.type, NBD_REPLY_TYPE_OFFSET_DATA);
    assertOk(reply.flags & NBD_REPLY_FLAG_DONE, "one chunk, the last");
    const view = new DataView(reply.payload.buffer, reply.payload.byteOffset);
    assertEquals(getU64(view, 0), offset);
    return reply.payload.subarray(8);
  } finally {
    raw.close();
  }
}

for (const on of [true, false]) {
  Deno.test({
    name: `file READs from the page cache are exact, sendfile ${on ? "on" : "turned off"}`,
    ...linuxPaths("sendfile", peers("strace", "nbdcopy", "qemu-img", "nbdinfo")),
    async fn() {
      await using dir = await tempDir();
      const image = `${dir.path}/disk.img`;
      // The last READ of a copy ends mid-page.
      const data = randomBytes(6 * MiB + 1536, 31);
      await Deno.writeFile(image, data);
      await using server = await startNbdServe(["-r", "file", image], {
        env: on ? {} : { NBD_NO_SENDFILE: "1" },
      });
      const ranges = await sendfileRanges(server, async () => {
        await runOk("nbdcopy", [server.uri, `${dir.path}/copy.img`]);
        assertBytes(await Deno.readFile(`${dir.path}/copy.img`), data);
        await runOk("qemu-img", [
          "convert",
          "-f",
          "raw",
          "-O",
          "raw",
          server.uri,
          `${dir.path}/q.img`,
        ]);
        assertBytes(await Deno.readFile(`${dir.path}/q.img`), data);
        const info = await runOk("nbdinfo", ["--size", server.uri]);
        assertEquals(Number(info.stdout.trim()), data.length);
        for (const style of ["simple", "structured", "extended"] as const) {
          // Unaligned, large, and the small one that always goes the ordinary way.
          for (
            const [offset, length] of [[12345, MiB + 3], [data.length - 70000, 70000], [5, 4096]]
          ) {
            const got = await rawRead(server.socket!, style, offset!, length!);
            assertBytes(
              got,
              data.subarray(offset!, offset! + length!),
              `${style} ${offset}+${length}`,
            );
          }
        }
      });
      if (on) {
        assertOk(ranges.length > 0, "no READ reply went out with sendfile");
        const sent = ranges.reduce((n, [start, end]) => n + end - start, 0);
        assertOk(sent >= data.length, `only ${sent} bytes went out with sendfile`);
      } else {
        assertEquals(ranges.length, 0, "sendfile ran while turned off");
      }
    },
  });
}

Deno.test({
  name: "file READs of a range partly out of the page cache do not use sendfile for it",
  ...linuxPaths("sendfile", peers("strace", "fincore", "sync")),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const data = randomBytes(8 * MiB, 32);
    await Deno.writeFile(image, data);
    // The second half leaves the page cache (written back first, then dropped).
    await runOk("sync", [image]);
    const fd = openFd(image, 0)!;
    try {
      assertOk(await dropCache(fd, 4 * MiB, 4 * MiB), "the second half was not dropped");
    } finally {
      closeFd(fd);
    }
    const cached = await runOk("fincore", ["--bytes", "--noheadings", "--output", "RES", image]);
    assertEquals(Number(cached.stdout.trim()), 4 * MiB, "the first half alone is cached");
    // No readahead: what the server reads the ordinary way brings in only that range.
    await using server = await startNbdServe(["-r", "file", image, "fadvise=random"]);
    const ranges = await sendfileRanges(server, async () => {
      await using client = await NbdClient.connect(server.uri);
      // Whole MiBs, then one across the boundary of the cached half.
      for (const [offset, length] of [[0, MiB], [2 * MiB, MiB], [3.5 * MiB, MiB], [5 * MiB, MiB]]) {
        const buf = new Uint8Array(length!);
        await client.pread(buf, offset!);
        assertBytes(buf, data.subarray(offset!, offset! + length!), `${offset}+${length}`);
      }
    });
    assertOk(ranges.length > 0, "the cached half did not go out with sendfile");
    for (const [start, end] of ranges) {
      assertOk(
        start >= 0 && end <= 3.5 * MiB,
        `sendfile of ${start}..${end}, past the cached part`,
      );
    }
  },
});

Deno.test({
  name: "file: a client that hangs up in the middle of sendfile replies leaves the server serving",
  ...linuxPaths("sendfile", peers("strace")),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const data = randomBytes(32 * MiB, 33);
    await Deno.writeFile(image, data);
    await using server = await startNbdServe(["-r", "file", image]);
    const ranges = await sendfileRanges(server, async () => {
      for (let round = 0; round < 3; round++) {
        const raw = await RawClient.connect(server.socket!);
        await raw.start();
        await raw.go("", { structured: round % 2 === 0 });
        // Far more than the socket buffers hold: the server is mid-reply when the client goes.
        for (let i = 0; i < 16; i++) {
          await raw.request(NBD_CMD_READ, { offset: i * 2 * MiB, length: 2 * MiB, cookie: i });
        }
        await raw.read(100000);
        raw.close();
      }
      await new Promise((r) => setTimeout(r, 200));
    });
    assertOk(ranges.length > 0, "no sendfile ran");
    // Still serving, exactly.
    await using client = await NbdClient.connect(server.uri);
    const buf = new Uint8Array(3 * MiB);
    await client.pread(buf, 7 * MiB + 1);
    assertBytes(buf, data.subarray(7 * MiB + 1, 10 * MiB + 1));
    assertEquals(server.stderr().includes("Uncaught"), false, server.stderr());
  },
});
