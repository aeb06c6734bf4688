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
    const counters = await page.$$eval(".source-counters", (cs) => cs.map((c) => c.textContent));
    assertOk(/writes 1 /.test(counters[0]!) && /writes 1 /.test(counters[1]!), String(counters));
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
