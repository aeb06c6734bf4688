/**
 * Reading the block maps of the view page back from its canvases, one
 * pixel per cell, for the browser tests.
 *
 * @module
 */

import type { Page } from "playwright-core";

/** The documented palette (docs/nbd-view.md). */
export const PALETTE = {
  background: "#7a8089",
  READ: "#000000",
  WRITE: "#ff0000",
  TRIM: "#c9a0ff",
  WRITE_ZEROES: "#ffffff",
  ERROR: "#ff9f1a",
} as const;

/** Every cell's colour of one source's map, and how the map is laid out. */
export interface PanelCells {
  /** The source's label. */
  label: string;
  /** `#rrggbb` per cell. */
  colours: string[];
  /** The layout the page chose. */
  layout: {
    size: number;
    block: number;
    cells: number;
    cellPx: number;
    cols: number;
    rows: number;
  };
}

/** Reads the cells of source `index` (0 = the first) from its canvas bitmap. */
export async function readPanelCells(page: Page, index: number): Promise<PanelCells | undefined> {
  return await page.evaluate((i) => {
    // deno-lint-ignore no-explicit-any
    const view = (globalThis as any).nbdView;
    const panel = view?.panels?.[i];
    if (!panel?.layout) return undefined;
    // deno-lint-ignore no-explicit-any
    const canvas = (globalThis as any).document.getElementById(panel.canvasId);
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const hex = (o: number) =>
      "#" + [0, 1, 2].map((k) => data[o + k].toString(16).padStart(2, "0")).join("");
    const colours: string[] = [];
    for (let c = 0; c < panel.layout.cells; c++) {
      const [x, y] = panel.cellPixel(c);
      colours.push(hex((y * canvas.width + x) * 4));
    }
    return { label: panel.label, colours, layout: panel.layout };
  }, index).catch(() => undefined);
}

/** Polls source `index`'s canvas until `check` holds or `timeoutMs` passes; returns the last read. */
export async function waitForPanel(
  page: Page,
  index: number,
  check: (cells: PanelCells) => boolean,
  timeoutMs = 10000,
): Promise<PanelCells | undefined> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const cells = await readPanelCells(page, index);
    if (cells && check(cells)) return cells;
    if (Date.now() > deadline) return cells;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Cells whose colour differs from `want`, as readable lines. */
export function cellDifferences(got: string[], want: string[]): string[] {
  const diffs: string[] = [];
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) diffs.push(`cell ${i}: ${got[i]} instead of ${want[i]}`);
  }
  return diffs;
}
