/**
 * Several sources in one page: two live servers of different sizes and a
 * log file, shown by `nbd view` side by side. A real client (nbdsh) writes
 * known ranges to each server, and exactly those cells must turn red on
 * that server's map only; the log's map shows what the log recorded.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { artifactPath, launchChromium } from "./browser.ts";
import { NBDSH_ENV, peers, runOk, startNbdServe, tempDir } from "./helpers.ts";
import { serverViewUrl, startNbdView } from "./view_helpers.ts";
import { cellDifferences, PALETTE, waitForPanel } from "./view_pixels.ts";
import { SAMPLE_LOG } from "../view/_test_fixtures.ts";

const BLOCK = 65536;

Deno.test({
  name: "combined view: two live servers and a log, one map each, painted live",
  ...peers("chromium", "nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const logFile = `${dir.path}/replayed.log`;
    await Deno.writeTextFile(logFile, SAMPLE_LOG.join("\n") + "\n");
    await using small = await startNbdServe(["--view", "127.0.0.1:0", "memory", "16M"]);
    await using large = await startNbdServe(["--view", "127.0.0.1:0", "memory", "64M"]);
    const urls = [await serverViewUrl(small), await serverViewUrl(large)];
    await using view = await startNbdView(["--paused", "--speed", "100", ...urls, logFile]);
    await using browser = await launchChromium();
    const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${view.url}?fade=0&block=${BLOCK}`);
    await page.waitForSelector("#status.live", { timeout: 10000 });
    assertOk(await page.isVisible("#replay"), "replay controls are shown");
    await page.click("#play"); // paused → playing
    const labels = await page.$$eval(".panel-head .label", (ls) => ls.map((l) => l.textContent));
    assertEquals(labels, [new URL(urls[0]!).host, new URL(urls[1]!).host, "replayed.log"]);

    // Different ranges on each server, so a cell painted on the wrong map shows.
    await runOk("nbdsh", ["-u", small.uri, "-c", `h.pwrite(b"a" * ${2 * BLOCK}, ${3 * BLOCK})`], {
      env: NBDSH_ENV,
    });
    await runOk("nbdsh", ["-u", large.uri, "-c", `h.pwrite(b"b" * ${BLOCK}, ${900 * BLOCK})`], {
      env: NBDSH_ENV,
    });
    const want = (cells: number, painted: number[]) => {
      const colours = new Array(cells).fill(PALETTE.background);
      for (const c of painted) colours[c] = PALETTE.WRITE;
      return colours;
    };
    const smallWant = want(256, [3, 4]);
    const largeWant = want(1024, [900]);
    const a = await waitForPanel(
      page,
      0,
      (c) => cellDifferences(c.colours, smallWant).length === 0,
    );
    const b = await waitForPanel(
      page,
      1,
      (c) => cellDifferences(c.colours, largeWant).length === 0,
    );
    // The log: 1 MiB export in 16 cells of 64 KiB; its last requests were
    // a trim of cell 1 and a zero of cell 0.
    const logWant = [PALETTE.WRITE_ZEROES, PALETTE.TRIM, ...new Array(14).fill(PALETTE.background)];
    const c = await waitForPanel(page, 2, (c) => cellDifferences(c.colours, logWant).length === 0);
    await page.screenshot({ path: await artifactPath("view_combined.png") });
    assertEquals([a?.layout.size, a?.layout.cells], [16 << 20, 256]);
    assertEquals([b?.layout.size, b?.layout.cells], [64 << 20, 1024]);
    assertEquals(cellDifferences(a!.colours, smallWant), []);
    assertEquals(cellDifferences(b!.colours, largeWant), []);
    assertEquals(cellDifferences(c!.colours, logWant), []);
    // Per-source counters under each map.
    // The counters come from the servers' stats snapshots, which lag the requests' events.
    const deadline = Date.now() + 10_000;
    let counters: (string | null)[] = [];
    while (true) {
      counters = await page.$$eval(".source-counters", (cs) => cs.map((c) => c.textContent));
      if (/writes 1 /.test(counters[0]!) && /writes 1 /.test(counters[1]!)) break;
      assertOk(Date.now() < deadline, `counters never showed both writes: ${counters}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    assertEquals(errors, []);
  },
});

Deno.test({
  name: "view page: the fault switch fails reads, painted in the failure colour",
  ...peers("chromium", "nbdsh"),
  async fn() {
    await using server = await startNbdServe([
      "--view",
      "127.0.0.1:0",
      "--view-control",
      "memory",
      "16M",
    ]);
    const url = await serverViewUrl(server);
    await using browser = await launchChromium();
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${url}?fade=0&block=${BLOCK}`);
    await page.waitForSelector("#status.live", { timeout: 10000 });
    await page.waitForSelector("#fault-0", { timeout: 10000 });
    await page.selectOption(".fault-kinds", "read");
    await page.check("#fault-0");
    await page.waitForSelector(".fault-note.down", { timeout: 5000 });
    const state = await (await fetch(new URL("/control", url))).json();
    assertEquals(state.exports[""], { enabled: true, kinds: "read", errno: "EIO", rate: 1 });
    const out = await runOk("nbdsh", [
      "-u",
      server.uri,
      "-c",
      `h.pwrite(b"x" * ${BLOCK}, ${5 * BLOCK})
try:
    h.pread(${BLOCK}, ${7 * BLOCK})
except nbd.Error as e:
    print(e.errno)`,
    ], { env: NBDSH_ENV });
    assertEquals(out.stdout.trim(), "EIO");
    const want = new Array(256).fill(PALETTE.background);
    want[5] = PALETTE.WRITE;
    want[7] = PALETTE.ERROR;
    const cells = await waitForPanel(page, 0, (c) => cellDifferences(c.colours, want).length === 0);
    assertEquals(cellDifferences(cells!.colours, want), []);
    await page.uncheck("#fault-0");
    await page.waitForFunction(() =>
      !(globalThis as unknown as { document: { querySelector(s: string): unknown } }).document
        .querySelector(".fault-note.down")
    );
    assertOk(server.stderr().includes('view control: export "" faults off'), server.stderr());
    assertEquals(errors, []);
  },
});

Deno.test({
  name: "view page: hovering and clicking a block names its file (ext4, as debugfs does)",
  ...peers("chromium", "mkfs.ext4", "debugfs", "nbdinfo"),
  async fn() {
    await using dir = await tempDir();
    await Deno.mkdir(`${dir.path}/src/notes`, { recursive: true });
    await Deno.writeFile(`${dir.path}/src/notes/todo list.txt`, new Uint8Array(50_000).fill(65));
    const image = `${dir.path}/fs.img`;
    await runOk("mkfs.ext4", ["-q", "-b", "4096", "-d", `${dir.path}/src`, image, "16M"]);
    const blocks = (await runOk("debugfs", ["-R", 'blocks "/notes/todo list.txt"', image]))
      .stdout.trim().split(/\s+/).map(Number);
    await using server = await startNbdServe(["--view", "127.0.0.1:0", "-r", "file", image]);
    const url = await serverViewUrl(server);
    await using browser = await launchChromium();
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${url}?fade=0&block=4096`);
    await page.waitForSelector("#status.live", { timeout: 10000 });
    await runOk("nbdinfo", [server.uri]); // a client makes the export's size known
    await page.waitForFunction(() =>
      (globalThis as unknown as { nbdView: { layout: unknown } }).nbdView.layout !== null
    );
    const centre = (cell: number) =>
      page.evaluate((c) =>
        (globalThis as unknown as {
          nbdView: { cellCentre(c: number): [number, number] };
        }).nbdView.cellCentre(c), cell);
    const [x, y] = await centre(blocks[3]!);
    await page.mouse.move(x, y);
    await page.waitForFunction(
      () => (globalThis as unknown as { nbdView: { ownersLoaded?: boolean } }).nbdView.ownersLoaded,
      null,
      { timeout: 10000 },
    );
    await page.mouse.move(x + 1, y);
    const tip = await page.textContent("#tooltip");
    assertOk(tip!.includes(`cell ${blocks[3]}:`) && tip!.endsWith("· /notes/todo list.txt"), tip!);
    // The superblock's block, clicked: its description stays under the map.
    const [sx, sy] = await centre(0);
    await page.mouse.click(sx, sy);
    const pinned = await page.textContent(".cell-info");
    assertOk(pinned!.includes("<superblock>"), pinned!);
    assertEquals(errors, []);
  },
});
