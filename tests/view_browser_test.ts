/**
 * The block-activity page in headless Chromium: a real client (nbdsh)
 * writes, trims and zeroes known ranges, and exactly the cells of those
 * blocks must take the kind's colour (read back from the canvas pixels);
 * every other cell keeps the background. Also a log replay in the same page.
 * Screenshots go to .artifacts/.
 */

import type { Page } from "playwright-core";
import { assertEquals, assertOk } from "./assert.ts";
import { artifactPath, launchChromium } from "./browser.ts";
import { NBDSH_ENV, peers, runOk, startNbdServe, tempDir } from "./helpers.ts";
import { serverViewUrl, startNbdView } from "./view_helpers.ts";
import { SAMPLE_LOG } from "../view/_test_fixtures.ts";

const BLOCK = 4096;
const SIZE = 64 * 1024 * 1024;

// The documented palette (docs/nbd-view.md).
const BACKGROUND = "#7a8089";
const COLOURS: Record<string, string> = {
  READ: "#000000",
  WRITE: "#ff0000",
  TRIM: "#c9a0ff",
  WRITE_ZEROES: "#ffffff",
};

/** A colour faded to its trace: a quarter of the way from the background. */
function trace(hex: string): string {
  const rgb = (h: string) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
  const [bg, c] = [rgb(BACKGROUND), rgb(hex)];
  return "#" + bg.map((b, i) => Math.round(b + (c[i]! - b) * 0.25).toString(16).padStart(2, "0"))
    .join("");
}

/**
 * Reads every cell's colour from the canvas bitmap (one pixel per cell,
 * scaled up on screen by CSS), and how the canvas is laid out on the page.
 */
const READ_CELLS = `(() => {
  const view = window.nbdView;
  const canvas = document.getElementById("map");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const hex = (o) => "#" + [0, 1, 2].map((i) => data[o + i].toString(16).padStart(2, "0")).join("");
  const colours = [];
  for (let i = 0; i < view.layout.cells; i++) {
    const [x, y] = view.cellPixel(i);
    colours.push(hex((y * canvas.width + x) * 4));
  }
  const style = getComputedStyle(canvas);
  const box = canvas.getBoundingClientRect();
  return {
    colours,
    layout: view.layout,
    canvas: [canvas.width, canvas.height, box.width, box.height, style.imageRendering],
  };
})()`;

interface Cells {
  colours: string[];
  layout: { block: number; cells: number; cellPx: number; cols: number; rows: number };
  canvas: [number, number, number, number, string];
}

/** Polls the canvas until `check` holds (the page paints on animation frames). */
async function waitForCells(page: Page, check: (cells: Cells) => boolean): Promise<Cells> {
  const deadline = Date.now() + 10000;
  while (true) {
    const cells = await page.evaluate(READ_CELLS).catch(() => undefined) as Cells | undefined;
    if (cells?.layout && check(cells)) return cells;
    if (Date.now() > deadline) return cells!;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Cells first..last covered by bytes [offset, offset + length). */
function cellsOf(offset: number, length: number): number[] {
  const first = Math.floor(offset / BLOCK);
  const last = Math.floor((offset + length - 1) / BLOCK);
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

function differences(got: string[], want: string[]): string[] {
  const diffs: string[] = [];
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) diffs.push(`cell ${i}: ${got[i]} instead of ${want[i]}`);
  }
  return diffs;
}

async function openPage(browser: Awaited<ReturnType<typeof launchChromium>>, url: string) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForSelector("#status.live", { timeout: 10000 });
  return { page, errors };
}

Deno.test({
  name: "view page: nbdsh's writes, trims and zeroes paint exactly their blocks",
  ...peers("chromium", "nbdsh"),
  async fn() {
    await using server = await startNbdServe(["--view", "127.0.0.1:0", "memory", "64M"]);
    const url = await serverViewUrl(server);
    await using browser = await launchChromium();
    const { page, errors } = await openPage(browser, `${url}?fade=0`);

    // [kind, offset, length], in the order sent. Unaligned and boundary-crossing
    // ranges included; the last two pairs hit one block twice (the later kind wins).
    const requests: Array<[string, number, number]> = [
      ["WRITE", 16 * BLOCK, 3 * BLOCK],
      ["WRITE", 40 * BLOCK + 100, 1000],
      ["WRITE", SIZE - 512, 512],
      ["TRIM", 100 * BLOCK, 8 * BLOCK],
      ["WRITE_ZEROES", 300 * BLOCK + 4095, 2],
      ["WRITE_ZEROES", 5000 * BLOCK, 64 * BLOCK],
      ["WRITE", 7000 * BLOCK, BLOCK],
      ["WRITE_ZEROES", 7000 * BLOCK, BLOCK],
      ["WRITE_ZEROES", 7001 * BLOCK, BLOCK],
      ["WRITE", 7001 * BLOCK, BLOCK],
    ];
    const python = requests.map(([kind, offset, length]) =>
      kind === "WRITE"
        ? `h.pwrite(b"x" * ${length}, ${offset})`
        : kind === "TRIM"
        ? `h.trim(${length}, ${offset})`
        : `h.zero(${length}, ${offset})`
    ).join("\n");
    await runOk("nbdsh", ["-u", server.uri, "-c", python], { env: NBDSH_ENV });

    const expected: string[] = new Array(SIZE / BLOCK).fill(BACKGROUND);
    for (const [kind, offset, length] of requests) {
      for (const cell of cellsOf(offset, length)) expected[cell] = COLOURS[kind]!;
    }
    const cells = await waitForCells(
      page,
      (c) => differences(c.colours, expected).length === 0,
    );
    await page.screenshot({ path: await artifactPath("view_browser.png") });
    assertEquals(cells.layout.block, BLOCK, "4 KiB blocks fit this viewport");
    assertEquals(cells.layout.cells, SIZE / BLOCK);
    assertOk(cells.layout.cellPx >= 2, `cells of ${cells.layout.cellPx} px`);
    assertEquals(differences(cells.colours, expected), []);
    // Each cell is cellPx × cellPx crisp screen pixels.
    const { cols, rows, cellPx } = cells.layout;
    assertEquals(cells.canvas, [cols, rows, cols * cellPx, rows * cellPx, "pixelated"]);

    // Fading: with 0.5 s every painted cell settles on its kind's trace.
    await page.selectOption("#fade", "0.5");
    const faded = expected.map((c) => c === BACKGROUND ? c : trace(c));
    const after = await waitForCells(page, (c) => differences(c.colours, faded).length === 0);
    assertEquals(differences(after.colours, faded), []);
    assertEquals(errors, []);
  },
});

Deno.test({
  name: "view page: nbd view replays a log into the same map",
  ...peers("chromium"),
  async fn() {
    await using dir = await tempDir();
    const file = `${dir.path}/requests.log`;
    await Deno.writeTextFile(file, SAMPLE_LOG.join("\n") + "\n");
    await using view = await startNbdView(["--paused", file]);
    await using browser = await launchChromium();
    const { page, errors } = await openPage(browser, `${view.url}?fade=0&block=4096`);
    assertOk(await page.isVisible("#replay"), "replay controls are shown");
    await page.selectOption("#speed", "100");
    await page.click("#play"); // paused → playing
    // 1 MiB export: WRITE 4096+8192 = cells 1-2, READ 0+512 then ZERO 0+4096 = cell 0
    // (zero is later), TRIM 65536+65536 = cells 16-31, the failed read is past the end.
    const expected: string[] = new Array(256).fill(BACKGROUND);
    expected[0] = COLOURS.WRITE_ZEROES!;
    expected[1] = expected[2] = COLOURS.WRITE!;
    for (let c = 16; c < 32; c++) expected[c] = COLOURS.TRIM!;
    const cells = await waitForCells(page, (c) => differences(c.colours, expected).length === 0);
    await page.screenshot({ path: await artifactPath("view_replay.png") });
    assertEquals(differences(cells.colours, expected), []);
    const state = await (await fetch(new URL("/replay", view.url))).json();
    assertEquals([state.speed, state.done, state.replayed], [100, true, 6]);
    assertEquals(errors, []);
  },
});

Deno.test({
  name: "view page: the export selector switches the map to another export",
  ...peers("chromium", "nbdsh"),
  async fn() {
    await using dir = await tempDir();
    await Deno.writeFile(`${dir.path}/a.img`, new Uint8Array(1024 * 1024));
    await Deno.writeFile(`${dir.path}/b.img`, new Uint8Array(2 * 1024 * 1024));
    await using server = await startNbdServe([
      "--view",
      "127.0.0.1:0",
      "file",
      `dir=${dir.path}`,
    ]);
    const url = await serverViewUrl(server);
    await using browser = await launchChromium();
    const { page, errors } = await openPage(browser, `${url}?fade=0`);
    // The selector appears with the first counter snapshot.
    await page.waitForSelector("#export-field:not([hidden])", { timeout: 10000 });
    const options = await page.$$eval("#export option", (os) => os.map((o) => o.textContent));
    assertEquals(options.sort(), ["a.img", "b.img"]);
    await page.selectOption("#export", "b.img");
    await page.waitForFunction(
      () =>
        (globalThis as unknown as { nbdView: { subscribed: string } }).nbdView.subscribed ===
          "b.img",
      null,
      { timeout: 10000 },
    );
    assertOk(page.url().includes("export=b.img"), page.url());
    const uri = server.uri.replace("nbd+unix:///", "nbd+unix:///b.img");
    await runOk("nbdsh", ["-u", uri, "-c", `h.pwrite(b"y" * 8192, ${10 * BLOCK})`], {
      env: NBDSH_ENV,
    });
    const expected: string[] = new Array(512).fill(BACKGROUND);
    expected[10] = expected[11] = COLOURS.WRITE!;
    const cells = await waitForCells(page, (c) => differences(c.colours, expected).length === 0);
    assertEquals([cells.layout.block, cells.layout.cells], [BLOCK, 512]);
    assertEquals(differences(cells.colours, expected), []);
    assertEquals(errors, []);
  },
});
