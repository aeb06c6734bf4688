/**
 * The worked examples of docs/plugin-api.md (examples/), served by
 * `nbd serve` and driven by real peers (nbdinfo, nbdcopy, qemu-io), with
 * byte-exact checks.
 */

import { assertBytes, assertEquals, assertIncludes, assertMatch, assertOk } from "./assert.ts";
import { peers, randomBytes, ROOT, runOk, startNbdServe, tempDir } from "./helpers.ts";
import { sectorText } from "../examples/computed_disk.ts";

const SERVE = ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve"];
const EXAMPLES = `${ROOT}/examples`;

/** What the computed disk holds: sector after sector of its own number. */
function computed(size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let s = 0; s * 512 < size; s++) out.set(sectorText(s).subarray(0, size - s * 512), s * 512);
  return out;
}

/** `data` with its `block`-sized blocks in reverse order. */
function reversed(data: Uint8Array, block: number): Uint8Array {
  const out = new Uint8Array(data.length);
  const blocks = data.length / block;
  for (let i = 0; i < blocks; i++) {
    out.set(data.subarray((blocks - 1 - i) * block, (blocks - i) * block), i * block);
  }
  return out;
}

Deno.test({
  name: "example computed disk: nbdinfo sees its size, nbdcopy reads it byte-exact",
  ...peers("nbdinfo", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const result = await runOk(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      "-r",
      `${EXAMPLES}/computed_disk.ts`,
      "1M",
      "--run",
      'nbdinfo --json "$uri" && nbdcopy "$uri" out.img',
    ], { cwd: dir.path });
    const info = JSON.parse(result.stdout);
    assertEquals(info.exports[0]["export-size"], 1048576);
    assertEquals(info.exports[0]["is_read_only"], true);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), computed(1048576));
  },
});

Deno.test({
  name: "example kv disk: nbdcopy round-trip, qemu-io writes and zeroes, nbdinfo --map holes",
  ...peers("nbdinfo", "nbdcopy", "qemu-io"),
  async fn() {
    await using dir = await tempDir();
    // Data in the first and third quarter only, so the map has holes.
    const data = new Uint8Array(256 * 1024);
    data.set(randomBytes(64 * 1024, 7), 0);
    data.set(randomBytes(64 * 1024, 8), 128 * 1024);
    await Deno.writeFile(`${dir.path}/in.img`, data);
    await using server = await startNbdServe([`${EXAMPLES}/kv_disk.ts`, "256K"]);
    await runOk("nbdcopy", [`${dir.path}/in.img`, server.uri]);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
    const map = await runOk("nbdinfo", ["--map", "--json", server.uri]);
    const extents = JSON.parse(map.stdout) as Array<{ offset: number; type: number }>;
    assertEquals(extents.map((e) => [e.offset, e.type]), [
      [0, 0],
      [65536, 3],
      [131072, 0],
      [196608, 3],
    ]);
    const io = await runOk("qemu-io", [
      "-f",
      "raw",
      "-c",
      "write -P 0xab 1000 5000",
      "-c",
      "write -z 131072 4096",
      "-c",
      "read -P 0xab 1000 5000",
      "-c",
      "read -P 0 131072 4096",
      server.uri,
    ]);
    assertOk(!/Pattern verification failed/.test(io.stdout), io.stdout);
    data.fill(0xab, 1000, 6000);
    data.fill(0, 131072, 135168);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out2.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out2.img`), data);
  },
});

Deno.test({
  name: "example slow-request filter: logs reads slowed by the delay filter, data unchanged",
  ...peers("nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    await using server = await startNbdServe([
      `--filter=${EXAMPLES}/slow_log_filter.ts`,
      "--filter=delay",
      `${EXAMPLES}/computed_disk.ts`,
      "64K",
      "threshold=20ms",
      "rdelay=30ms",
    ]);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), computed(65536));
    assertMatch(server.stderr(), /slow: pread \d+@0 took \d+\.\d ms/);
  },
});

Deno.test({
  name: "example offset-mapping filter: blocks reversed for reads (nbdcopy) and writes (qemu-io)",
  ...peers("nbdcopy", "qemu-io"),
  async fn() {
    await using dir = await tempDir();
    const read = await runOk(Deno.execPath(), [
      ...SERVE,
      "-U",
      "-",
      `--filter=${EXAMPLES}/reverse_filter.ts`,
      `${EXAMPLES}/computed_disk.ts`,
      "256K",
      "block=8K",
      "--run",
      'nbdcopy "$uri" out.img',
    ], { cwd: dir.path });
    assertEquals(read.code, 0);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), reversed(computed(262144), 8192));
    // Writable below: a write at the start lands in the last block below, and reads back.
    await using server = await startNbdServe([
      `--filter=${EXAMPLES}/reverse_filter.ts`,
      `${EXAMPLES}/kv_disk.ts`,
      "64K",
      "block=4K",
    ]);
    const io = await runOk("qemu-io", [
      "-f",
      "raw",
      "-c",
      "write -P 0x11 0 6144",
      "-c",
      "read -P 0x11 0 6144",
      "-c",
      "read -P 0 6144 59392",
      server.uri,
    ]);
    assertOk(!/Pattern verification failed/.test(io.stdout), io.stdout);
    assertIncludes(io.stdout, "read 6144/6144 bytes at offset 0");
  },
});

Deno.test({
  name: "example RAM disk: nbdcopy round-trip byte-exact, holes reported, zero-copy reads",
  ...peers("nbdcopy", "nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    const data = new Uint8Array(1024 * 1024);
    data.set(randomBytes(300 * 1024, 3), 100 * 1024);
    await Deno.writeFile(`${dir.path}/in.img`, data);
    await using server = await startNbdServe([`${EXAMPLES}/ram_disk.ts`, "1M"]);
    await runOk("nbdcopy", [`${dir.path}/in.img`, server.uri]);
    await runOk("nbdcopy", [server.uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
    const map = await runOk("nbdinfo", ["--map", "--json", server.uri]);
    const extents = JSON.parse(map.stdout) as Array<{ offset: number; type: number }>;
    assertEquals(extents[0], { ...extents[0]!, offset: 0, type: 3 });
  },
});
