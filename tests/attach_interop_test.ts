/**
 * `nbd attach` / `nbd detach` / `nbd attached`: an export as a loop block
 * device. A full round trip through ext4 (mkfs, files, detach, attach again
 * from the same server, files intact), the I/O counters, and soft detach
 * refusing a device in use while --hard goes ahead.
 */

import { assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  eventually,
  nbdExecutable,
  peers,
  randomBytes,
  run,
  runOk,
  startNbdServe,
  startServer,
} from "./helpers.ts";
import { loopsUnder, mountable, type MountScratch, mountScratch } from "./mount_helpers.ts";

const MiB = 1024 * 1024;

/** `nbd attach URI`; returns the device it printed. */
async function attach(scratch: MountScratch, args: string[]): Promise<string> {
  const result = await scratch.nbd(["attach", ...args]);
  assertEquals(result.code, 0, result.stderr);
  assertEquals(result.stderr, "");
  const device = result.stdout.trim();
  assertOk(/^\/dev\/loop\d+$/.test(device), `not a loop device: ${result.stdout}`);
  return device;
}

async function detach(scratch: MountScratch, args: string[]): Promise<void> {
  const result = await scratch.nbd(["detach", ...args]);
  assertEquals(result.code, 0, result.stderr);
}

Deno.test({
  name: "nbd attach: mkfs.ext4, files, detach, attach again from the same server: files intact",
  ...mountable(),
  ...peers("losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "128M"]);
    const fs = `${scratch.dir}/fs`;
    await Deno.mkdir(fs);
    const big = randomBytes(3 * MiB + 123, 21);

    const device = await attach(scratch, [server.uri]);
    const losetup = await loopsUnder([scratch.runDir]);
    assertEquals(losetup.length, 1, losetup.join("\n"));
    assertIncludes(losetup[0]!, device);
    const dio = await runOk("losetup", ["--list", "--noheadings", "--output", "DIO", device]);
    assertEquals(dio.stdout.trim(), "1", "direct I/O on the file");
    await runOk("mkfs.ext4", ["-q", device]);
    await runOk("mount", [device, fs]);
    await Deno.writeTextFile(`${fs}/hello.txt`, "hello, block device\n");
    await Deno.mkdir(`${fs}/dir`);
    await Deno.writeFile(`${fs}/dir/big.bin`, big);
    await runOk("umount", [fs]);

    const listed = await scratch.nbd(["attached", "--json"]);
    assertEquals(listed.code, 0, listed.stderr);
    const [entry] = JSON.parse(listed.stdout);
    assertEquals(entry.device, device);
    assertEquals(entry.kind, "attach");
    assertEquals(entry.uri, server.uri);
    assertEquals(entry.exportName, "");
    assertEquals(entry.readOnly, false);
    assertEquals(entry.size, 128 * MiB);
    assertEquals(entry.negotiated.tls, false);
    assertEquals(entry.negotiated.structuredReplies, true);
    for (const flag of ["SEND_FLUSH", "SEND_TRIM", "SEND_WRITE_ZEROES", "CAN_MULTI_CONN"]) {
      assertOk(entry.negotiated.flags.includes(flag), `${flag} in ${entry.negotiated.flags}`);
    }
    assertEquals(entry.negotiated.blockSize.minimum, 1);
    assertOk(entry.alive);
    assertOk(entry.stats.writes > 0 && entry.stats.bytesWritten > 3 * MiB, listed.stdout);
    assertOk(entry.stats.flushes > 0, "ext4 flushes on unmount");
    assertEquals(entry.stats.failed, 0);
    assertEquals(entry.stats.inFlight, 0);
    const table = await scratch.nbd(["attached"]);
    assertIncludes(table.stdout, "DEVICE");
    assertIncludes(table.stdout, device);
    assertIncludes(table.stdout, String(entry.pid));

    await detach(scratch, [device]);
    assertEquals(await loopsUnder([scratch.runDir]), []);
    assertEquals((await scratch.nbd(["attached"])).stdout, "");

    // Again, from the same server, named by URI this time when detaching.
    const again = await attach(scratch, [server.uri]);
    await runOk("mount", ["-o", "ro", again, fs]);
    try {
      assertEquals(await Deno.readTextFile(`${fs}/hello.txt`), "hello, block device\n");
      const read = await Deno.readFile(`${fs}/dir/big.bin`);
      assertEquals(read.length, big.length);
      assertOk(read.every((b, i) => b === big[i]), "big.bin differs");
    } finally {
      await runOk("umount", [fs]);
    }
    await runOk("fsck.ext4", ["-n", again]);
    await detach(scratch, [server.uri]);
  },
});

Deno.test({
  name: "nbd detach refuses a device in use (mounted, open) unless --hard",
  ...mountable(),
  ...peers("losetup", "mkfs.ext4", "mount", "umount"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "64M"]);
    const fs = `${scratch.dir}/fs`;
    await Deno.mkdir(fs);
    const device = await attach(scratch, [server.uri]);
    await runOk("mkfs.ext4", ["-q", device]);
    await runOk("mount", [device, fs]);
    let mounted = true;
    try {
      const refused = await scratch.nbd(["detach", device]);
      assertEquals(refused.code, 1);
      assertIncludes(refused.stderr, `Cannot detach ${device}: it is in use (mounted on ${fs}`);
      assertIncludes(refused.stderr, "--hard");
      // Still attached and working.
      await Deno.writeTextFile(`${fs}/still.txt`, "works");
      await runOk("umount", [fs]);
      mounted = false;

      // Open in a process: refused too, naming the process.
      const sh = new Deno.Command("sh", {
        args: ["-c", `exec 3<"${device}"; exec sleep 30`],
        stdin: "null",
      }).spawn();
      try {
        assertOk(
          await eventually(() => {
            try {
              return Deno.readLinkSync(`/proc/${sh.pid}/fd/3`) === device;
            } catch {
              return false;
            }
          }),
        );
        const open = await scratch.nbd(["detach", device]);
        assertEquals(open.code, 1);
        assertIncludes(open.stderr, `open by ${sh.pid} (sleep)`);
      } finally {
        sh.kill("SIGKILL");
        await sh.status;
      }
    } finally {
      if (mounted) await run("umount", [fs]);
    }
    await detach(scratch, [device]);
  },
});

Deno.test({
  name: "nbd detach --hard cuts off a mounted device: its I/O fails, nothing stays attached",
  ...mountable(),
  ...peers("losetup", "mkfs.ext4", "mount", "umount", "dd"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "64M"]);
    const fs = `${scratch.dir}/fs`;
    await Deno.mkdir(fs);
    const device = await attach(scratch, [server.uri]);
    await runOk("mkfs.ext4", ["-q", device]);
    await runOk("mount", [device, fs]);
    try {
      const hard = await scratch.nbd(["detach", "--hard", device]);
      assertEquals(hard.code, 0, hard.stderr);
      assertIncludes(hard.stderr, "was in use");
      assertEquals(sessionsCount(scratch), 0);
      // The file system lost its device: writing through to it fails.
      const write = await run("dd", [
        "if=/dev/zero",
        `of=${fs}/x`,
        "bs=1M",
        "count=4",
        "oflag=direct",
      ]);
      assertOk(write.code !== 0, "writing to a cut-off device should fail");
    } finally {
      await run("umount", [fs]);
    }
    // The kernel frees the loop device once the file system is gone.
    assertOk(await eventually(() => !loopAttached(device), 5000), `${device} still attached`);
  },
});

Deno.test({
  name: "nbd attach -r: a read-only device; nbd umount refuses the attachment's private mount",
  ...mountable(),
  ...peers("losetup", "blockdev", "nbdkit"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "pattern", "8M"]);
    const device = await attach(scratch, ["-r", server.uri]);
    try {
      const ro = await runOk("blockdev", ["--getro", device]);
      assertEquals(ro.stdout.trim(), "1");
      // nbdkit's pattern: each 8-byte word holds its own offset, big-endian.
      const sector = new Uint8Array(512);
      {
        using file = await Deno.open(device, { read: true });
        await file.seek(4096, Deno.SeekMode.Start);
        assertEquals(await file.read(sector), 512);
      }
      const words = new DataView(sector.buffer);
      assertEquals(words.getBigUint64(0), 4096n);
      assertEquals(words.getBigUint64(504), 4096n + 504n);
      const [entry] = JSON.parse((await scratch.nbd(["attached", "--json"])).stdout);
      assertEquals(entry.readOnly, true);
      const refused = await scratch.nbd(["umount", entry.mountpoint]);
      assertEquals(refused.code, 1);
      assertIncludes(refused.stderr, `use "nbd detach ${device}"`);
    } finally {
      await detach(scratch, [device]);
    }
  },
});

Deno.test({
  name: "nbd attach: a server that is not there is a clear error, and nothing is left behind",
  ...mountable(),
  async fn() {
    await using scratch = await mountScratch();
    const result = await scratch.nbd([
      "attach",
      `nbd+unix:///?socket=${scratch.dir}/no-such.sock`,
    ]);
    assertEquals(result.code, 1);
    assertEquals(result.stdout, "");
    assertIncludes(result.stderr, "nbd: Cannot connect to NBD server at Unix socket");
    assertIncludes(result.stderr, "no such socket");
    const detach = await scratch.nbd(["detach", "/dev/loop99"]);
    assertEquals(detach.code, 1);
    assertIncludes(detach.stderr, "not attached by nbd attach");
  },
});

function sessionsCount(scratch: MountScratch): number {
  try {
    return [...Deno.readDirSync(scratch.runDir)].length;
  } catch {
    return 0;
  }
}

function loopAttached(device: string): boolean {
  try {
    Deno.readTextFileSync(`/sys/block/${device.replace("/dev/", "")}/loop/backing_file`);
    return true;
  } catch {
    return false;
  }
}

Deno.test({
  name: "nbd attach --foreground serves until nbd detach, then exits 0",
  ...mountable(),
  ...peers("losetup"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "8M"]);
    const child = new Deno.Command(await nbdExecutable(), {
      args: ["attach", "--foreground", server.uri],
      env: scratch.env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const reader = child.stdout.getReader();
    let line = "";
    while (!line.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      line += new TextDecoder().decode(value);
    }
    reader.releaseLock();
    const device = line.trim();
    try {
      assertOk(/^\/dev\/loop\d+$/.test(device), line);
      const [entry] = JSON.parse((await scratch.nbd(["attached", "--json"])).stdout);
      assertEquals(entry.pid, child.pid);
      assertEquals(entry.device, device);
    } finally {
      if (device.startsWith("/dev/")) await scratch.nbd(["detach", device]);
      else child.kill("SIGTERM");
      const out = await child.output();
      assertEquals(out.code, 0, new TextDecoder().decode(out.stderr));
    }
  },
});
