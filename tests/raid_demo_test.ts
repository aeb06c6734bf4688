/**
 * The RAID demo, end to end: three `nbd serve memory` exports with
 * `--view --view-control`, attached as loop devices with `nbd attach`,
 * make one btrfs RAID1 (data and metadata). Files are written; errors are
 * switched on for the second server from the combined page of `nbd view`
 * (through its control endpoint); the files still read back intact (btrfs
 * reads the other copy) and `btrfs scrub` reports the errors; the page
 * shows failures on that disk's map and reads on the others (canvas
 * pixels). Errors off, a scrub repairs what the failing disk missed, and
 * a last scrub finds nothing. A screenshot goes to the test artefacts.
 *
 * Short by default (a few MiB of files); NBD_RAID_DEMO=long writes more.
 * Skipped, loudly, only where the kernel has no btrfs.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { artifactPath, launchChromium } from "./browser.ts";
import { peers, randomBytes, run, runOk, type ServerProcess, startNbdServe } from "./helpers.ts";
import { mountable, mountScratch } from "./mount_helpers.ts";
import { serverViewUrl, startNbdView } from "./view_helpers.ts";
import { PALETTE, readPanelCells, waitForPanel } from "./view_pixels.ts";

const MiB = 1024 * 1024;
const LONG = Deno.env.get("NBD_RAID_DEMO") === "long";
const FILE_SIZE = LONG ? 32 * MiB : 2 * MiB;

/** Whether this kernel has btrfs (built in, or already loaded). */
function kernelHasBtrfs(): boolean {
  try {
    return /\bbtrfs\b/.test(Deno.readTextFileSync("/proc/filesystems"));
  } catch {
    return false;
  }
}

function btrfsAvailable(): { ignore: boolean } {
  if (kernelHasBtrfs()) return { ignore: false };
  // Not a missing package but a kernel without the driver: skipped even in CI, loudly.
  console.error("\n*** SKIPPING the RAID demo: this kernel has no btrfs ***\n");
  return { ignore: true };
}

/** Forgets cached file data, so the next reads reach the disks. */
async function dropCaches(mnt: string): Promise<void> {
  await runOk("sync", ["-f", mnt]);
  await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3");
}

/** Runs `btrfs scrub start -B` and returns its exit code and summary lines. */
async function scrub(mnt: string): Promise<{ code: number; summary: string; corrected: number }> {
  const result = await run("btrfs", ["scrub", "start", "-B", mnt]);
  const text = result.stdout + result.stderr;
  const summary = /Error summary:\s*(.*)/.exec(text)?.[1]?.trim() ?? text;
  const corrected = Number(/Corrected:\s*(\d+)/.exec(text)?.[1] ?? 0);
  return { code: result.code, summary, corrected };
}

function count(colours: string[], colour: string): number {
  return colours.filter((c) => c === colour).length;
}

Deno.test({
  name: "RAID demo: btrfs raid1 over three served disks, faults from the page, scrub repairs",
  ...mountable(),
  ...peers("chromium", "mkfs.btrfs", "btrfs", "losetup", "mount", "umount", "fallocate"),
  ...btrfsAvailable(),
  async fn() {
    await using scratch = await mountScratch();
    const servers: ServerProcess[] = [];
    for (let i = 0; i < 3; i++) {
      servers.push(
        await startNbdServe(["--view", "127.0.0.1:0", "--view-control", "memory", "256M"]),
      );
    }
    await using _servers = {
      async [Symbol.asyncDispose]() {
        for (const s of servers) await s[Symbol.asyncDispose]();
      },
    };
    const urls = await Promise.all(servers.map(serverViewUrl));
    const devices: string[] = [];
    for (const server of servers) {
      const result = await scratch.nbd(["attach", server.uri]);
      assertEquals(result.code, 0, result.stderr);
      devices.push(result.stdout.trim());
    }
    const mnt = scratch.mnt;
    let mounted = false;
    try {
      await runOk("mkfs.btrfs", ["-q", "-f", "-d", "raid1", "-m", "raid1", ...devices]);
      await runOk("mount", ["-o", "noatime", devices[0]!, mnt]);
      mounted = true;
      // mkfs puts its first chunks on the second and third disks only; filling the
      // first data chunk (allocated, never written) puts the files' chunk on the first.
      await runOk("fallocate", ["-l", "60M", `${mnt}/filler`]);
      const before = randomBytes(FILE_SIZE, 1);
      await Deno.writeFile(`${mnt}/before.bin`, before);
      await runOk("sync", ["-f", mnt]);

      await using view = await startNbdView(urls);
      await using browser = await launchChromium();
      const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
      const errors: string[] = [];
      page.on("pageerror", (e) => errors.push(String(e)));
      await page.goto(`${view.url}?fade=0`);
      await page.waitForSelector("#status.live", { timeout: 15000 });
      for (let i = 0; i < 3; i++) await waitForPanel(page, i, () => true);

      // Errors on for the second disk, from its switch on the combined page.
      await page.waitForSelector("#fault-1", { timeout: 10000 });
      await page.check("#fault-1");
      await page.waitForSelector(".panel.faulty", { timeout: 5000 });
      const control = await (await fetch(new URL("/control", urls[1]))).json();
      assertEquals(control.exports[""].enabled, true);
      assertEquals(control.exports[""].kinds, "all");

      // Reads still succeed: btrfs reads the other copy.
      await dropCaches(mnt);
      assertEquals(await Deno.readFile(`${mnt}/before.bin`), before, "read back intact");
      // Written while the second disk fails: only the other copies land.
      const during = randomBytes(FILE_SIZE, 2);
      await Deno.writeFile(`${mnt}/during.bin`, during);
      await runOk("sync", ["-f", mnt]);

      // The page, from a clean map: the scrub reads every copy on every disk.
      await page.click("#clear");
      const first = await scrub(mnt);
      assertOk(
        first.summary !== "no errors found" && /read=\d+/.test(first.summary),
        first.summary,
      );

      // Failures on the second disk's map, reads and no failures on the others.
      const failing = await waitForPanel(page, 1, (c) => count(c.colours, PALETTE.ERROR) > 0);
      const reading = [0, 2].map((i) =>
        waitForPanel(page, i, (c) => count(c.colours, PALETTE.READ) > 0)
      );
      const [disk1, disk3] = await Promise.all(reading);
      await page.screenshot({ path: await artifactPath("raid_demo.png") });
      assertOk(count(failing!.colours, PALETTE.ERROR) > 0, "failures on the failing disk");
      for (const disk of [disk1!, disk3!]) {
        assertOk(count(disk.colours, PALETTE.READ) > 0, `reads on ${disk.label}`);
        assertEquals(count(disk.colours, PALETTE.ERROR), 0, `no failures on ${disk.label}`);
      }
      const stats = await (await fetch(new URL("/stats", urls[1]))).json();
      assertOk(stats.exports[0].requests.failed > 0);

      // Errors off: a scrub repairs what the second disk missed, the next finds nothing.
      await page.uncheck("#fault-1");
      await page.waitForFunction(() =>
        !(globalThis as unknown as { document: { querySelector(s: string): unknown } }).document
          .querySelector(".panel.faulty")
      );
      const second = await scrub(mnt);
      assertEquals(second.code, 0, second.summary);
      assertOk(second.corrected > 0, `repaired: ${second.summary}`);
      const third = await scrub(mnt);
      assertEquals([third.code, third.summary], [0, "no errors found"]);
      await dropCaches(mnt);
      assertEquals(await Deno.readFile(`${mnt}/during.bin`), during);
      assertEquals((await readPanelCells(page, 1))?.layout.size, 256 * MiB);
      assertEquals(errors, []);
    } finally {
      if (mounted) await run("umount", [mnt]);
      for (const device of devices) {
        const result = await scratch.nbd(["detach", device]);
        assertEquals(result.code, 0, result.stderr);
      }
    }
  },
});
