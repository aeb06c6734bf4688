/**
 * The file plugin's cache= and fadvise= parameters, checked through the page
 * cache itself (fincore), and block devices (loop devices): size, writes,
 * trims and zeroes on the device, a read-only device, and the portable
 * paths. Data is compared byte for byte.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk, assertRejects } from "./assert.ts";
import {
  linuxPaths,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  startServer,
  tempDir,
  withLoopDevice,
} from "./helpers.ts";
import { NbdClient } from "../client/client.ts";

const MiB = 1024 * 1024;

/** Bytes of `path` in the page cache. */
async function cachedBytes(path: string): Promise<number> {
  const result = await runOk("fincore", ["--bytes", "--noheadings", "--output", "RES", path]);
  return Number(result.stdout.trim());
}

/** Polls until `path` has `predicate(cached bytes)`; returns the last figure. */
async function cachedUntil(
  path: string,
  predicate: (bytes: number) => boolean,
  timeoutMs = 10000,
): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const bytes = await cachedBytes(path);
    if (predicate(bytes) || Date.now() > deadline) return bytes;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Writes back and drops every cached page of `path`. */
async function evict(path: string): Promise<void> {
  await runOk("sync", [path]);
  await runOk("dd", [`if=${path}`, "iflag=nocache", "count=0", "status=none"]);
  assertEquals(await cachedBytes(path), 0, `${path} is still cached`);
}

function serveWithPaths(args: string[], portable: boolean) {
  return startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", ...args],
    { env: portable ? { NBD_PORTABLE: "1" } : {} },
  );
}

Deno.test({
  name: "file cache=none: aligned and unaligned writes and reads leave nothing in the page cache",
  ...linuxPaths("cache=none", peers("fincore", "nbdcopy", "dd", "sync")),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const size = 8 * MiB;
    await Deno.writeFile(image, new Uint8Array(size));
    await evict(image);
    const input = randomBytes(size, 71);
    await Deno.writeFile(`${dir.path}/in.img`, input);
    const expected = input.slice();
    {
      await using server = await startNbdServe(["file", image, "cache=none"]);
      // nbdcopy writes aligned blocks (O_DIRECT); the client's odd ranges go through the
      // page cache and must be evicted after.
      await runOk("nbdcopy", [`${dir.path}/in.img`, server.uri]);
      await using client = await NbdClient.connect(server.uri);
      const odd = randomBytes(10000, 72);
      await client.pwrite(odd, 12345);
      expected.set(odd, 12345);
      await client.pwrite(new Uint8Array([1, 2, 3]), size - 3);
      expected.set([1, 2, 3], size - 3);
      const back = new Uint8Array(7000);
      await client.pread(back, 4097);
      assertBytes(back, expected.subarray(4097, 4097 + 7000));
      await client.flush();
      assertEquals(await cachedUntil(image, (n) => n === 0), 0, "cached after flush");
      await runOk("nbdcopy", [server.uri, `${dir.path}/out.img`]);
      assertBytes(await Deno.readFile(`${dir.path}/out.img`), expected);
      assertEquals(await cachedUntil(image, (n) => n === 0), 0, "cached after reads");
    }
    assertBytes(await Deno.readFile(image), expected);
    // The measure can tell: the same read with cache=default fills the cache.
    await evict(image);
    await using cached = await startNbdServe(["file", image]);
    await runOk("nbdcopy", [cached.uri, `${dir.path}/out2.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out2.img`), expected);
    assertEquals(await cachedBytes(image), size);
  },
});

Deno.test({
  name: "file writes on both sides of the small-write size land byte for byte, pipelined",
  ...linuxPaths("small writes on the event loop", peers("qemu-io")),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const size = 8 * MiB;
    await Deno.writeFile(image, new Uint8Array(size));
    const expected = new Uint8Array(size);
    {
      await using server = await startNbdServe(["file", image]);
      await using client = await NbdClient.connect(server.uri);
      // Sizes below, at and above the 1 MiB that splits the two write paths, all in flight
      // at once, some with FUA; the ranges do not overlap.
      const writes: Promise<void>[] = [];
      let offset = 0;
      let seed = 80;
      for (
        const length of [1, 4096, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 2 << 20, 100000]
      ) {
        const data = randomBytes(length, seed++);
        expected.set(data, offset);
        writes.push(client.pwrite(data, offset, { fua: seed % 3 === 0 }));
        offset += length + 4093;
      }
      await Promise.all(writes);
      await client.flush();
    }
    // A peer's 4 KiB writes, odd offsets too.
    {
      await using server = await startNbdServe(["file", image]);
      const script = ["write -P 0x5a 6000000 4096", "write -P 0xa5 7000001 3000"];
      await runOk("qemu-io", ["-f", "raw", ...script.flatMap((c) => ["-c", c]), server.uri]);
      expected.fill(0x5a, 6000000, 6000000 + 4096);
      expected.fill(0xa5, 7000001, 7000001 + 3000);
    }
    assertBytes(await Deno.readFile(image), expected);
  },
});

Deno.test({
  name: "file fadvise=random: a 4 KiB read brings no readahead; normal does",
  ...linuxPaths("fadvise=", peers("fincore", "dd", "sync")),
  async fn() {
    await using dir = await tempDir();
    const image = `${dir.path}/disk.img`;
    const data = randomBytes(4 * MiB, 73);
    await Deno.writeFile(image, data);
    const cachedAfterOneRead = async (advice: string) => {
      await evict(image);
      await using server = await startNbdServe(["file", image, `fadvise=${advice}`]);
      await using client = await NbdClient.connect(server.uri);
      const buf = new Uint8Array(4096);
      // At the start, where the kernel reads ahead unless told the reads are random.
      await client.pread(buf, 0);
      assertBytes(buf, data.subarray(0, 4096));
      return await cachedBytes(image);
    };
    assertEquals(await cachedAfterOneRead("random"), 4096);
    const normal = await cachedAfterOneRead("normal");
    assertOk(normal > 4096, `readahead with fadvise=normal: ${normal} bytes cached`);
    const sequential = await cachedAfterOneRead("sequential");
    assertOk(sequential > 4096, `readahead with fadvise=sequential: ${sequential} bytes cached`);
    const bad = await run(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "serve",
      "file",
      image,
      "fadvise=often",
    ]);
    assertEquals(bad.code, 2);
    assertEquals(
      bad.stderr,
      'nbd: file: fadvise must be normal, random or sequential, not "often"\n',
    );
  },
});

Deno.test({
  name: "file on a loop device: size, writes, trims, zeroes (fast, NO_HOLE, unaligned) on it",
  ...linuxPaths("block devices", peers("losetup", "nbdcopy")),
  async fn(t) {
    await using dir = await tempDir();
    const size = 16 * MiB;
    const backing = `${dir.path}/backing.img`;
    await Deno.writeFile(backing, new Uint8Array(size).fill(0xff));
    await withLoopDevice(t, backing, async (device) => {
      for (const cache of ["default", "none"]) {
        const input = randomBytes(size, cache === "none" ? 75 : 74);
        await Deno.writeFile(`${dir.path}/in.img`, input);
        const expected = input.slice();
        await using server = await startNbdServe(["file", device, `cache=${cache}`]);
        await runOk("nbdcopy", [`${dir.path}/in.img`, server.uri]);
        await using client = await NbdClient.connect(server.uri);
        assertEquals(client.size(), size);
        await client.trim(MiB, MiB); // BLKDISCARD: the loop device punches its file
        expected.fill(0, MiB, 2 * MiB);
        await client.trim(3 * MiB + 100, MiB); // only the whole sectors inside
        expected.fill(0, 3 * MiB + 512, 4 * MiB);
        await client.zero(4 * MiB, MiB, { mayTrim: false }); // BLKZEROOUT
        expected.fill(0, 4 * MiB, 5 * MiB);
        await client.zero(6 * MiB, MiB, { mayTrim: true, fast: true });
        expected.fill(0, 6 * MiB, 7 * MiB);
        await client.zero(8 * MiB + 100, 1000, { mayTrim: true }); // written as zeroes
        expected.fill(0, 8 * MiB + 100, 8 * MiB + 1100);
        const odd = randomBytes(777, 76);
        await client.pwrite(odd, 9 * MiB + 3);
        expected.set(odd, 9 * MiB + 3);
        await client.flush();
        const back = new Uint8Array(size);
        await client.pread(back, 0);
        assertBytes(back, expected, `through the server, cache=${cache}`);
        assertBytes(await Deno.readFile(device), expected, `on the device, cache=${cache}`);
      }
    });
  },
});

Deno.test({
  name: "file on a read-only loop device: served read-only with a note, reads exact",
  ...linuxPaths("block devices", peers("losetup")),
  async fn(t) {
    await using dir = await tempDir();
    const backing = `${dir.path}/backing.img`;
    const data = randomBytes(4 * MiB, 77);
    await Deno.writeFile(backing, data);
    await withLoopDevice(t, backing, async (device) => {
      await using server = await startNbdServe(["file", device]);
      await using client = await NbdClient.connect(server.uri);
      assertEquals(client.capabilities().writable, false);
      const back = new Uint8Array(data.length);
      await client.pread(back, 0);
      assertBytes(back, data);
      await assertRejects(
        () => client.pwrite(new Uint8Array(512), 0),
        (error) => (error as { errno?: string }).errno === "EPERM",
      );
      assertEquals(
        server.stderr(),
        `nbd: file: ${device} is a read-only device: serving it read-only\n`,
      );
      assertBytes(await Deno.readFile(backing), data);
    }, { readOnly: true });
  },
});

Deno.test({
  name: "file on the portable paths: a loop device served exactly; cache=none refused in one line",
  ...peers("losetup"),
  async fn(t) {
    await using dir = await tempDir();
    const backing = `${dir.path}/backing.img`;
    await Deno.writeFile(backing, new Uint8Array(2 * MiB));
    await withLoopDevice(t, backing, async (device) => {
      await using server = await serveWithPaths(["file", device], true);
      await using client = await NbdClient.connect(server.uri);
      assertEquals(client.size(), 2 * MiB);
      const data = randomBytes(2 * MiB, 78);
      await client.pwrite(data, 0);
      await client.flush();
      const back = new Uint8Array(data.length);
      await client.pread(back, 0);
      assertBytes(back, data);
      assertBytes(await Deno.readFile(device), data);
    });
    const refused = await run(
      Deno.execPath(),
      ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "file", backing, "cache=none"],
      { env: { NBD_PORTABLE: "1" } },
    );
    assertEquals(refused.code, 2);
    assertIncludes(refused.stderr, "nbd: file: cache=none needs Linux");
    assertEquals(refused.stderr.trim().split("\n").length, 1, refused.stderr);
  },
});

for (
  const [label, env] of [
    ["spliced from the socket", {}],
    ["with NBD_NO_SPLICE=1", { NBD_NO_SPLICE: "1" }],
    ["on the portable paths", { NBD_PORTABLE: "1" }],
  ] as Array<[string, Record<string, string>]>
) {
  Deno.test({
    name: `file: nbdcopy and qemu-io writes ${label} land byte for byte`,
    ...peers("nbdcopy", "qemu-io"),
    async fn() {
      await using dir = await tempDir();
      const image = `${dir.path}/disk.img`;
      const size = 32 * MiB;
      await Deno.writeFile(image, new Uint8Array(0));
      await Deno.truncate(image, size);
      const input = randomBytes(size, 90);
      await Deno.writeFile(`${dir.path}/in.img`, input);
      const expected = input.slice();
      {
        await using server = await startServer(
          Deno.execPath(),
          ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", "file", image],
          { env },
        );
        await runOk("nbdcopy", [`${dir.path}/in.img`, server.uri]);
        // Large writes at odd offsets, one with FUA, then a flush.
        const script = [
          "write -P 0x3c 1000001 300000",
          "write -f -P 0xc3 5000000 1048576",
          "write -P 0x66 9000000 65536",
          "flush",
        ];
        await runOk("qemu-io", ["-f", "raw", ...script.flatMap((c) => ["-c", c]), server.uri]);
        expected.fill(0x3c, 1000001, 1000001 + 300000);
        expected.fill(0xc3, 5000000, 5000000 + 1048576);
        expected.fill(0x66, 9000000, 9000000 + 65536);
        await runOk("nbdcopy", [server.uri, `${dir.path}/out.img`]);
        assertBytes(await Deno.readFile(`${dir.path}/out.img`), expected);
      }
      assertBytes(await Deno.readFile(image), expected);
    },
  });
}
