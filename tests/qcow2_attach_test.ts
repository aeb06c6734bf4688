/**
 * An ext4 round trip through `nbd serve --filter=qcow2` and `nbd attach`:
 * mkfs.ext4 and files written through the loop device land in a qcow2
 * image that `qemu-img check` finds clean, qemu reads the same files back
 * (debugfs on `qemu-img convert`'s output), and attaching again through
 * the filter shows them intact.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { peers, randomBytes, run, runOk, startNbdServe } from "./helpers.ts";
import { loopsUnder, mountable, type MountScratch, mountScratch } from "./mount_helpers.ts";

const MiB = 1024 * 1024;

async function attach(scratch: MountScratch, args: string[]): Promise<string> {
  const result = await scratch.nbd(["attach", ...args]);
  assertEquals(result.code, 0, result.stderr);
  const device = result.stdout.trim();
  assertOk(/^\/dev\/loop\d+$/.test(device), `not a loop device: ${result.stdout}`);
  return device;
}

async function detach(scratch: MountScratch, device: string): Promise<void> {
  const result = await scratch.nbd(["detach", device]);
  assertEquals(result.code, 0, result.stderr);
}

Deno.test({
  name: "qcow2 filter + nbd attach: ext4 round trip; qemu-img check clean; qemu reads the files",
  ...mountable(),
  ...peers("qemu-img", "losetup", "mkfs.ext4", "fsck.ext4", "debugfs", "mount", "umount"),
  async fn() {
    await using scratch = await mountScratch();
    const image = `${scratch.dir}/disk.qcow2`;
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", image, "96M"]);
    const fs = `${scratch.dir}/fs`;
    await Deno.mkdir(fs);
    const big = randomBytes(5 * MiB + 321, 31);
    {
      await using server = await startNbdServe(["--filter=qcow2", "file", image]);
      const device = await attach(scratch, [server.uri]);
      try {
        await runOk("mkfs.ext4", ["-q", device]);
        await runOk("mount", [device, fs]);
        try {
          await Deno.writeTextFile(`${fs}/hello.txt`, "hello, qcow2\n");
          await Deno.mkdir(`${fs}/dir`);
          await Deno.writeFile(`${fs}/dir/big.bin`, big);
          await Deno.writeFile(`${fs}/gone.bin`, randomBytes(2 * MiB, 32));
          await Deno.remove(`${fs}/gone.bin`);
          await runOk("fstrim", [fs]).catch(() => {}); // trims become discards, where supported
        } finally {
          await runOk("umount", [fs]);
        }
      } finally {
        await detach(scratch, device);
      }
      assertEquals(await loopsUnder([scratch.runDir]), []);
    }
    // The server has stopped: the image must be clean, with no leaks.
    const check = await run("qemu-img", ["check", image]);
    assertEquals(check.code, 0, check.stdout + check.stderr);

    // qemu's reading of the image holds the same files.
    const raw = `${scratch.dir}/disk.raw`;
    await runOk("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw]);
    await runOk("fsck.ext4", ["-n", "-f", raw]);
    const hello = await runOk("debugfs", ["-R", "cat /hello.txt", raw]);
    assertEquals(hello.stdout, "hello, qcow2\n");
    const dumped = `${scratch.dir}/big.out`;
    await runOk("debugfs", ["-R", `dump /dir/big.bin ${dumped}`, raw]);
    const read = await Deno.readFile(dumped);
    assertEquals(read.length, big.length);
    assertOk(read.every((b, i) => b === big[i]), "big.bin differs in qemu's view");

    // And through the filter again, read-only.
    await using again = await startNbdServe(["-r", "--filter=qcow2", "file", image]);
    const device = await attach(scratch, [again.uri]);
    try {
      await runOk("mount", ["-o", "ro", device, fs]);
      try {
        assertEquals(await Deno.readTextFile(`${fs}/hello.txt`), "hello, qcow2\n");
        const back = await Deno.readFile(`${fs}/dir/big.bin`);
        assertOk(back.length === big.length && back.every((b, i) => b === big[i]), "big.bin");
      } finally {
        await runOk("umount", [fs]);
      }
    } finally {
      await detach(scratch, device);
    }
  },
});
