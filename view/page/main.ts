/**
 * The block-activity page's script, type-checked against the DOM library.
 *
 * It subscribes to `/events`, paints every frame's touched cells in the
 * colour of their request kind on a canvas (one cell per block, each cell
 * fading towards a faint trace of its last kind), and fills the counter
 * and connection tables from the `stats` events. `window.nbdView` exposes
 * the layout so tests can find a block's pixels.
 *
 * How it reaches the browser: view/page_script.ts imports this module and
 * serves `(main)()` built from `main.toString()`. Deno has already
 * stripped the types by then (it runs TypeScript by transpiling it), so
 * the text is plain JavaScript, with no bundler and no network, and a
 * compiled program carries it like any other module. That only holds if
 * `main` is self-contained: everything it uses is declared inside it or is
 * a browser global. This module may hold types beside it, never values
 * (view/page_script_test.ts fails otherwise).
 *
 * The DOM library's declarations clash with Deno's, so this folder is
 * checked on its own, with its own config (`deno task check` runs
 * `deno check --config view/page/dom_check.json view/page/`), and
 * view/page_script.ts imports it by a computed URL that type-checking of
 * the rest of the program does not follow.
 *
 * @module
 */

// This is browser code: `window` is the page's own.
// deno-lint-ignore-file no-window no-window-prefix

import type {
  PageFailure,
  PageFaults,
  PageFrame,
  PageHello,
  PageOwners,
  PageReplay,
  PageSource,
  PageStats,
} from "./events.ts";

/** A request kind: its name, legend label and colour. */
type Kind = [name: string, label: string, colour: string];

/** The block map on screen: one canvas pixel per cell. */
interface CellMap {
  size: number;
  block: number;
  cells: number;
  cols: number;
  rows: number;
  /** CSS pixels per cell. */
  px: number;
  /** Last kind per cell, 1-based (0 = never touched). */
  kind: Uint8Array;
  /** When each cell was last touched (performance.now()). */
  stamp: Float64Array;
  /** Cells still fading, the first `activeCount` entries. */
  active: Int32Array;
  activeCount: number;
  isActive: Uint8Array;
  image: ImageData;
  /** `image`'s pixels as RGBA words. */
  pixels: Uint32Array;
  /** Cells changed since the last draw: dirtyLow..dirtyHigh. */
  dirtyLow: number;
  dirtyHigh: number;
}

/** What tests see of one source's map. */
interface PanelView {
  /** The source's label. */
  label: string;
  /** Id of its canvas. */
  canvasId: string;
  framesReceived: number;
  framesApplied: number;
  layout:
    | {
      size: number;
      block: number;
      cells: number;
      cols: number;
      rows: number;
      cellPx: number;
    }
    | null;
  /** The export the event stream follows. */
  subscribed: string | null;
  /** Its event stream is open. */
  live: boolean;
  /** A cell's pixel on the canvas bitmap. */
  cellPixel?: (index: number) => [number, number] | null;
  /** A cell's centre on the page, in CSS pixels. */
  cellCentre?: (index: number) => [number, number] | null;
  /** What hovering over a cell says. */
  describe?: (index: number) => string;
  /** The block owners are known (or known to be unavailable). */
  ownersLoaded?: boolean;
}

/** What `window.nbdView` shows tests: the first source's map, and every source's. */
interface NbdView extends PanelView {
  palette?: Record<string, string | number>;
  /** One entry per source, in the page's order. */
  panels: PanelView[];
}

/** One source on the page: its map, its event stream, its counters. */
interface Panel {
  index: number;
  source: PageSource;
  view: PanelView;
  root: HTMLElement;
  canvas: HTMLCanvasElement;
  ctx: CanvasRenderingContext2D;
  info: HTMLElement;
  counters: HTMLElement;
  state: HTMLElement;
  exportField: HTMLElement;
  exportSelect: HTMLSelectElement;
  exportName: string | null;
  map: CellMap | null;
  queue: PageFrame[];
  stream: EventSource | null;
  retry: number;
  /** Its event stream is open. */
  live: boolean;
  lastStats: PageStats | null;
  rateWindow: Array<[number, Record<string, number>]>;
  rates: Record<string, number>;
  replay: PageReplay | null;
  /** The fault controls, once the source says it offers them. */
  faults: FaultControls | null;
  /** Who owns each block, once asked (`/files`); a string says why not. */
  owners: PageOwners | string | null;
  /** The owners are being fetched. */
  ownersLoading: boolean;
  /** Where a clicked cell's description goes. */
  pinned: HTMLElement;
}

/** A panel's fault-injection controls. */
interface FaultControls {
  box: HTMLElement;
  enabled: HTMLInputElement;
  kinds: HTMLSelectElement;
  errno: HTMLSelectElement;
  rate: HTMLSelectElement;
  note: HTMLElement;
}

declare global {
  interface Window {
    nbdView: NbdView;
  }
}

/** The page's script: runs once, when the page loads. */
export function main(): void {
  // Kind, legend label, colour. Reads black, writes red, trims light purple,
  // zeroes white; the rest are ours.
  const KINDS: Kind[] = [
    ["READ", "read", "#000000"],
    ["WRITE", "write", "#ff0000"],
    ["TRIM", "trim", "#c9a0ff"],
    ["WRITE_ZEROES", "zero", "#ffffff"],
    ["CACHE", "cache", "#3fbf6f"],
    ["BLOCK_STATUS", "block status", "#4f86c6"],
    ["ERROR", "failed", "#ff9f1a"],
  ];
  const BACKGROUND = "#7a8089"; // never touched
  const VOID = "#16181c"; // past the end of the export
  const TRACE = 0.25; // share of the kind colour left once a cell has faded
  const MAX_CELL_PX = 24;
  const RETRY_MS = 2000; // a source whose stream failed is asked again this often

  function rgb(hex: string): number[] {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }
  function pack(c: number[]): number { // ImageData words are little-endian RGBA
    return ((255 << 24) | (c[2] << 16) | (c[1] << 8) | c[0]) >>> 0;
  }
  function mix(a: number[], b: number[], t: number): number[] {
    return [0, 1, 2].map(function (i) {
      return Math.round(a[i] + (b[i] - a[i]) * t);
    });
  }
  const BG = rgb(BACKGROUND);
  const KIND_RGB = KINDS.map(function (k) {
    return rgb(k[2]);
  });
  const KIND_PIXEL = KIND_RGB.map(pack);
  const TRACE_RGB = KIND_RGB.map(function (c) {
    return mix(BG, c, TRACE);
  });
  // Fading looks colours up in a table: no arithmetic or garbage per cell.
  const FADE_STEPS = 32;
  const FADE_LUT = KIND_RGB.map(function (c, k) {
    const lut = new Uint32Array(FADE_STEPS + 1);
    for (let i = 0; i <= FADE_STEPS; i++) {
      lut[i] = pack(mix(c, TRACE_RGB[k], i / FADE_STEPS));
    }
    return lut;
  });
  const DRAW_STEP_MS = 50; // at most 20 redraws a second, the rate frames arrive at
  const KIND_INDEX: Record<string, number | undefined> = {};
  KINDS.forEach(function (k, i) {
    KIND_INDEX[k[0]] = i;
  });

  const $ = function <T extends HTMLElement = HTMLElement>(id: string): T {
    return document.getElementById(id) as T;
  };
  const params = new URLSearchParams(location.search);

  const settings = {
    block: params.get("block") || "auto",
    fade: params.has("fade") ? Number(params.get("fade")) : 2,
  };
  if (!(settings.fade >= 0)) settings.fade = 2;

  const panels: Panel[] = [];
  let focused = 0;
  let drawPending = false;
  let lastDraw = -Infinity;
  const view: NbdView = {
    label: "",
    canvasId: "map",
    framesReceived: 0,
    framesApplied: 0,
    layout: null,
    subscribed: null,
    live: false,
    panels: [],
  };
  window.nbdView = view;

  // ---- formatting ----
  function bytes(n: number | null | undefined): string {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) +
      " " + units[i];
  }
  function micros(us: number | null | undefined): string {
    if (us === null || us === undefined) return "–";
    if (us < 1000) return us + " µs";
    if (us < 1e6) return (us / 1000).toFixed(us < 10000 ? 1 : 0) + " ms";
    return (us / 1e6).toFixed(1) + " s";
  }
  function duration(s: number | null | undefined): string {
    if (s === null || s === undefined) return "never";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) {
      return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    }
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function exportLabel(name: string): string {
    return name === "" ? "(default)" : name;
  }
  function cell<K extends keyof HTMLElementTagNameMap>(
    tag: K,
    text: string,
    cls?: string,
  ): HTMLElementTagNameMap[K] {
    const el = document.createElement(tag);
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  }

  // ---- legend (rates summed over every source) ----
  const legendItems: Record<
    string,
    { li: HTMLLIElement; rate: HTMLSpanElement }
  > = {};
  const legend: Array<[string, string, string | null]> = KINDS;
  legend.concat([["FLUSH", "flush", null]]).forEach(function (k) {
    const li = document.createElement("li");
    const swatch = cell("span", "", "swatch");
    swatch.style.background = k[2] || "transparent";
    li.appendChild(swatch);
    li.appendChild(cell("span", k[1]));
    const rate = cell("span", "", "rate");
    li.appendChild(rate);
    $("legend").appendChild(li);
    legendItems[k[0]] = { li: li, rate: rate };
  });
  function updateRates(p: Panel, requests: Record<string, number>): void {
    const now = performance.now();
    p.rateWindow.push([now, requests]);
    while (p.rateWindow.length && now - p.rateWindow[0][0] > 1000) {
      p.rateWindow.shift();
    }
    const rates: Record<string, number> = {};
    p.rateWindow.forEach(function (e) {
      Object.keys(e[1]).forEach(function (k) {
        rates[k] = (rates[k] || 0) + e[1][k];
      });
    });
    p.rates = rates;
    const total: Record<string, number> = {};
    panels.forEach(function (q) {
      Object.keys(q.rates).forEach(function (k) {
        total[k] = (total[k] || 0) + q.rates[k];
      });
    });
    Object.keys(legendItems).forEach(function (k) {
      const key = k === "ERROR" ? null : k;
      legendItems[k].rate.textContent = key && total[key] ? total[key] + "/s" : "";
    });
    if (requests.FLUSH) {
      const li = legendItems.FLUSH.li;
      li.classList.add("flash");
      setTimeout(function () {
        li.classList.remove("flash");
      }, 300);
    }
  }

  // ---- the maps ----
  function mapArea(p: Panel): { width: number; height: number } {
    const rect = p.canvas.getBoundingClientRect();
    const foot = p.counters.getBoundingClientRect().height + 16;
    const pad = panels.length > 1 ? 14 : 0; // the framed panels' padding and border
    const width = Math.max(64, Math.floor(p.root.clientWidth - pad));
    const height = Math.max(64, Math.floor(window.innerHeight - rect.top - foot - 24));
    return { width: width, height: height };
  }

  function layout(p: Panel, size: number, block: number, cells: number): CellMap {
    const area = mapArea(p);
    let px = Math.min(
      MAX_CELL_PX,
      Math.max(1, Math.floor(Math.sqrt(area.width * area.height / cells))),
    );
    while (
      px > 1 &&
      Math.ceil(cells / Math.floor(area.width / px)) * px > area.height
    ) px--;
    const cols = Math.max(1, Math.min(cells, Math.floor(area.width / px)));
    const rows = Math.ceil(cells / cols);
    // One canvas pixel per cell, scaled up by CSS (image-rendering: pixelated):
    // the page only ever writes cells, never scales them itself.
    p.canvas.width = cols;
    p.canvas.height = rows;
    p.canvas.style.width = cols * px + "px";
    p.canvas.style.height = rows * px + "px";
    const image = p.ctx.createImageData(cols, rows);
    const pixels = new Uint32Array(image.data.buffer);
    pixels.fill(pack(rgb(VOID)));
    pixels.fill(pack(BG), 0, cells);
    const laidOut: CellMap = {
      size: size,
      block: block,
      cells: cells,
      cols: cols,
      rows: rows,
      px: px,
      kind: new Uint8Array(cells),
      stamp: new Float64Array(cells),
      active: new Int32Array(cells),
      activeCount: 0,
      isActive: new Uint8Array(cells),
      image: image,
      pixels: pixels,
      dirtyLow: 0,
      dirtyHigh: cells - 1,
    };
    p.map = laidOut;
    p.view.layout = {
      size: size,
      block: block,
      cells: cells,
      cols: cols,
      rows: rows,
      cellPx: px,
    };
    if (p.index === 0) view.layout = p.view.layout;
    p.info.textContent = exportLabel(currentExport(p)) + ": " +
      bytes(size) + " in " +
      cells + " cells of " + bytes(block) + " (" + cols + " × " + rows + ", " +
      px + " px each)";
    scheduleDraw();
    return laidOut;
  }

  function clearMap(p: Panel): void {
    if (p.map) layout(p, p.map.size, p.map.block, p.map.cells);
  }

  function touch(m: CellMap, low: number, high: number): void {
    if (low < m.dirtyLow) m.dirtyLow = low;
    if (high > m.dirtyHigh) m.dirtyHigh = high;
  }

  function apply(p: Panel, frame: PageFrame): void {
    let m = p.map;
    if (
      !m || m.size !== frame.size || m.block !== frame.block ||
      m.cells !== frame.cells
    ) {
      m = layout(p, frame.size, frame.block, frame.cells);
    }
    const laidOut = m;
    const now = performance.now();
    const fading = settings.fade > 0;
    frame.kinds.forEach(function (entry) {
      const k = KIND_INDEX[entry[0]];
      if (k === undefined) return;
      const runs = entry[1];
      const pixel = KIND_PIXEL[k];
      for (let r = 0; r < runs.length; r += 2) {
        const end = Math.min(runs[r] + runs[r + 1], laidOut.cells);
        if (end > runs[r]) touch(laidOut, runs[r], end - 1);
        for (let c = runs[r]; c < end; c++) {
          laidOut.kind[c] = k + 1;
          laidOut.stamp[c] = now;
          laidOut.pixels[c] = pixel;
          if (fading && !laidOut.isActive[c]) {
            laidOut.isActive[c] = 1;
            laidOut.active[laidOut.activeCount++] = c;
          }
        }
      }
    });
    updateRates(p, frame.requests || {});
    p.view.framesApplied++;
    if (p.index === 0) view.framesApplied = p.view.framesApplied;
  }

  function fade(m: CellMap, now: number): void {
    if (m.activeCount === 0) return;
    const ms = settings.fade * 1000;
    let kept = 0;
    let low = m.cells, high = -1;
    for (let i = 0; i < m.activeCount; i++) {
      const c = m.active[i];
      const k = m.kind[c] - 1;
      const t = ms > 0 ? (now - m.stamp[c]) / ms : 0;
      if (ms <= 0) { // fading was switched off: keep full colours
        m.pixels[c] = KIND_PIXEL[k];
        m.isActive[c] = 0;
      } else if (t >= 1) {
        m.pixels[c] = FADE_LUT[k][FADE_STEPS];
        m.isActive[c] = 0;
      } else {
        m.pixels[c] = FADE_LUT[k][Math.floor(t * FADE_STEPS)];
        m.active[kept++] = c;
      }
      if (c < low) low = c;
      if (c > high) high = c;
    }
    m.activeCount = kept;
    if (high >= 0) touch(m, low, high);
  }

  function draw(now: number): void {
    drawPending = false;
    if (now - lastDraw < DRAW_STEP_MS) { // too soon: come back on a later animation frame
      scheduleDraw();
      return;
    }
    lastDraw = now;
    let again = false;
    panels.forEach(function (p) {
      while (p.queue.length) apply(p, p.queue.shift()!);
      const m = p.map;
      if (!m) return;
      fade(m, now);
      if (m.dirtyHigh >= 0) {
        // Only the rows that changed go to the canvas.
        const top = Math.floor(m.dirtyLow / m.cols);
        const rows = Math.floor(m.dirtyHigh / m.cols) - top + 1;
        p.ctx.putImageData(m.image, 0, 0, 0, top, m.cols, rows);
        m.dirtyLow = m.cells;
        m.dirtyHigh = -1;
      }
      if (m.activeCount > 0) again = true;
    });
    if (again) scheduleDraw();
  }
  function scheduleDraw(): void {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(draw);
  }

  const palette: Record<string, string | number> = {
    background: BACKGROUND,
    void: VOID,
    trace: TRACE,
  };
  view.palette = palette;
  KINDS.forEach(function (k) {
    palette[k[0]] = k[2];
  });

  /** What the tooltip says about a cell: its bytes, its last request, who owns it. */
  function describeCell(p: Panel, c: number): string {
    const m = p.map!;
    const start = c * m.block;
    const end = Math.min(start + m.block, m.size);
    const k = m.kind[c];
    return (panels.length > 1 ? p.source.label + " · " : "") + "cell " + c + ": bytes " +
      start + "–" + (end - 1) + (k ? " · last " + KINDS[k - 1][1] : " · untouched") +
      ownersOf(p, start, end);
  }

  /** " · owner, owner (+N more)" for the bytes [start, end), or why it is not known. */
  function ownersOf(p: Panel, start: number, end: number): string {
    const owners = p.owners;
    if (owners === null) return p.ownersLoading ? " · naming blocks…" : "";
    if (typeof owners === "string") return " · " + owners;
    const list = owners.extents;
    let low = 0, high = list.length; // first extent ending after start
    while (low < high) {
      const mid = (low + high) >> 1;
      if (list[mid].offset + list[mid].length <= start) low = mid + 1;
      else high = mid;
    }
    const names: string[] = [];
    for (let i = low; i < list.length && list[i].offset < end; i++) {
      if (names.indexOf(list[i].owner) < 0) names.push(list[i].owner);
    }
    if (!names.length) return " · free or unknown";
    return " · " + names.slice(0, 3).join(", ") +
      (names.length > 3 ? " (+" + (names.length - 3) + " more)" : "");
  }

  /** Asks the source who owns its blocks (again with `refresh`); the tooltip follows. */
  function loadOwners(p: Panel, refresh: boolean): void {
    if (p.ownersLoading) return;
    p.ownersLoading = true;
    const q = new URLSearchParams();
    q.set("export", currentExport(p));
    if (refresh) q.set("refresh", "1");
    fetch(p.source.base + "/files?" + q.toString()).then(function (r) {
      return r.ok
        ? r.json().then(function (owners: PageOwners) {
          p.owners = owners;
        })
        : r.text().then(function (text) {
          p.owners = text.trim();
        });
    }, function () {
      p.owners = "cannot reach the server";
    }).then(function () {
      p.ownersLoading = false;
      p.view.ownersLoaded = true;
    });
  }

  function cellAt(p: Panel, e: MouseEvent): number {
    const m = p.map;
    if (!m) return -1;
    const rect = p.canvas.getBoundingClientRect();
    const col = Math.floor((e.clientX - rect.left) / m.px);
    const row = Math.floor((e.clientY - rect.top) / m.px);
    const c = row * m.cols + col;
    if (col < 0 || col >= m.cols || c < 0 || c >= m.cells) return -1;
    return c;
  }

  // ---- counters and connections ----
  function currentExport(p: Panel): string {
    if (p.exportName !== null) return p.exportName;
    if (p.lastStats && p.lastStats.exports.length) return p.lastStats.exports[0].name;
    return "";
  }

  function showStats(p: Panel, stats: PageStats): void {
    p.lastStats = stats;
    const select = p.exportSelect;
    const names = stats.exports.map(function (e) {
      return e.name;
    });
    if (
      select.options.length !== names.length ||
      names.some(function (n, i) {
        return select.options[i].value !== n;
      })
    ) {
      select.textContent = "";
      names.forEach(function (n) {
        const o = cell("option", exportLabel(n));
        o.value = n;
        select.appendChild(o);
      });
    }
    select.value = currentExport(p);
    p.exportField.hidden = names.length < 2;
    const exp = stats.exports.filter(function (e) {
      return e.name === currentExport(p);
    })[0];
    // The line under the map: what this source has done.
    if (exp) {
      const c = exp.commands;
      const n = function (k: string): number {
        return c[k] ? c[k].completed : 0;
      };
      const failed = Object.keys(c).reduce(function (s, k) {
        return s + c[k].failed;
      }, 0);
      p.counters.textContent = "reads " + n("READ") + " · writes " + n("WRITE") +
        " · other " + (n("TRIM") + n("WRITE_ZEROES") + n("FLUSH") + n("CACHE") +
          n("BLOCK_STATUS")) +
        " · failed " + failed + " · in flight " + exp.requests.inFlight;
      p.counters.classList.toggle("failing", failed > 0);
    }
    if (stats.control) showFaults(p, exp ? exp.faults : undefined);
    if (p.index === focused) showDetails(p);
  }

  // ---- fault injection (servers with --view-control) ----
  function faultControls(p: Panel): FaultControls {
    if (p.faults) return p.faults;
    const box = cell("div", "", "faults");
    const label = cell("label", "");
    const enabled = document.createElement("input");
    enabled.type = "checkbox";
    enabled.id = "fault-" + p.index;
    label.appendChild(enabled);
    label.appendChild(document.createTextNode(" fail "));
    box.appendChild(label);
    const select = function (cls: string, choices: Array<[string, string]>): HTMLSelectElement {
      const el = document.createElement("select");
      el.className = cls;
      choices.forEach(function (c) {
        const o = cell("option", c[1]);
        o.value = c[0];
        el.appendChild(o);
      });
      box.appendChild(el);
      return el;
    };
    const kinds = select("fault-kinds", [["all", "all requests"], ["read", "reads"], [
      "write",
      "writes",
    ]]);
    box.appendChild(document.createTextNode(" with "));
    const errno = select(
      "fault-errno",
      ["EIO", "ENOSPC", "EPERM", "ENOMEM", "EINVAL", "ESHUTDOWN", "ENOTSUP", "EOVERFLOW"].map(
        function (e): [string, string] {
          return [e, e];
        },
      ),
    );
    box.appendChild(document.createTextNode(" at "));
    const rate = select("fault-rate", [["1", "100%"], ["0.5", "50%"], ["0.1", "10%"], [
      "0.01",
      "1%",
    ]]);
    const note = cell("span", "", "fault-note");
    box.appendChild(note);
    p.root.appendChild(box);
    const controls: FaultControls = {
      box: box,
      enabled: enabled,
      kinds: kinds,
      errno: errno,
      rate: rate,
      note: note,
    };
    const send = function (): void {
      const headers: Record<string, string> = { "content-type": "application/json" };
      const token = params.get("token");
      if (token) headers.authorization = "Bearer " + token;
      note.textContent = "…";
      fetch(p.source.base + "/control", {
        method: "POST",
        headers: headers,
        body: JSON.stringify({
          export: currentExport(p),
          enabled: enabled.checked,
          kinds: kinds.value,
          errno: errno.value,
          rate: Number(rate.value),
        }),
      }).then(function (r) {
        if (r.ok) {
          return r.json().then(function (answer: { state: PageFaults }) {
            showFaults(p, answer.state);
          });
        }
        return r.text().then(function (text) {
          note.textContent = text.trim();
          note.className = "fault-note down";
        });
      }, function () {
        note.textContent = "cannot reach the server";
        note.className = "fault-note down";
      });
    };
    [enabled, kinds, errno, rate].forEach(function (el) {
      el.addEventListener("change", send);
    });
    p.faults = controls;
    return controls;
  }

  function showFaults(p: Panel, state: PageFaults | undefined): void {
    const c = faultControls(p);
    if (!state) return;
    // What the user is changing right now is left alone.
    if (document.activeElement !== c.kinds) c.kinds.value = state.kinds;
    if (document.activeElement !== c.errno) c.errno.value = state.errno;
    if (document.activeElement !== c.rate) {
      if (
        !Array.from(c.rate.options).some(function (o) {
          return Number(o.value) === state.rate;
        })
      ) {
        const o = cell("option", +(state.rate * 100).toFixed(2) + "%");
        o.value = String(state.rate);
        c.rate.appendChild(o);
      }
      c.rate.value = String(Number(c.rate.value) === state.rate ? c.rate.value : state.rate);
    }
    c.enabled.checked = state.enabled;
    c.note.textContent = state.enabled ? " failing" : "";
    c.note.className = "fault-note" + (state.enabled ? " down" : "");
    p.root.classList.toggle("faulty", state.enabled);
  }

  function showDetails(p: Panel): void {
    const stats = p.lastStats;
    if (!stats) return;
    const exp = stats.exports.filter(function (e) {
      return e.name === currentExport(p);
    })[0];
    $("details-source").textContent = panels.length > 1 ? p.source.label : "";
    $("summary").textContent = (stats.mode === "replay" ? "replaying a log · " : "") + "up " +
      duration(stats.uptimeSeconds) + " · " + stats.connectionsOpen +
      " connection" +
      (stats.connectionsOpen === 1 ? "" : "s") + " open, " +
      stats.connectionsTotal + " accepted" +
      (exp
        ? " · export " + exportLabel(exp.name) + " " +
          (exp.size === null ? "(size not known yet)" : bytes(exp.size))
        : "");
    const body = $<HTMLTableElement>("counters").tBodies[0];
    body.textContent = "";
    if (exp) {
      Object.keys(exp.commands).forEach(function (name) {
        const c = exp.commands[name];
        if (name === "OTHER" && c.received === 0) return;
        const tr = document.createElement("tr");
        [
          name.toLowerCase().replace("_", " "),
          c.received,
          c.inFlight,
          c.completed,
          c.failed,
          bytes(c.bytes),
          micros(c.latencyMicros.p50),
          micros(c.latencyMicros.p90),
          micros(c.latencyMicros.p99),
        ]
          .forEach(function (v) {
            tr.appendChild(cell("td", String(v)));
          });
        body.appendChild(tr);
      });
      $("last").textContent = "last request " +
        (exp.secondsSinceLastRequest === null
          ? "never"
          : duration(exp.secondsSinceLastRequest) + " ago") +
        " · last reply " +
        (exp.secondsSinceLastReply === null
          ? "never"
          : duration(exp.secondsSinceLastReply) + " ago") +
        " · in flight " + exp.requests.inFlight;
    }
    const conns = $<HTMLTableElement>("connections").tBodies[0];
    conns.textContent = "";
    stats.connections.forEach(function (c) {
      const tr = document.createElement("tr");
      [
        String(c.id),
        c.peer,
        c.export === null ? "(handshake)" : exportLabel(c.export),
        c.tls ? "yes" : "no",
        c.features.join(", "),
        String(c.requests.completed),
        String(c.requests.inFlight),
        duration(c.secondsConnected),
      ]
        .forEach(function (v, i) {
          tr.appendChild(cell("td", v, i === 1 || i === 4 ? "left" : ""));
        });
      conns.appendChild(tr);
    });
    if (!stats.connections.length) {
      const tr = document.createElement("tr");
      const td = cell("td", "none", "left");
      td.colSpan = 8;
      tr.appendChild(td);
      conns.appendChild(tr);
    }
  }

  function focus(index: number): void {
    focused = index;
    panels.forEach(function (p) {
      p.root.classList.toggle("focused", panels.length > 1 && p.index === index);
    });
    if (panels[index]) showDetails(panels[index]);
  }

  // ---- replay controls (shared by every replayed source) ----
  function replayPanels(): Panel[] {
    return panels.filter(function (p) {
      return p.replay !== null;
    });
  }
  function showReplay(p: Panel, state: PageReplay): void {
    p.replay = state;
    const first = replayPanels()[0];
    if (first !== p) return;
    $("replay").hidden = false;
    $("play").textContent = state.done ? "Done" : state.paused ? "Play" : "Pause";
    $<HTMLButtonElement>("play").disabled = state.done;
    const speed = $<HTMLSelectElement>("speed");
    if (
      !Array.from(speed.options).some(function (o) {
        return Number(o.value) === state.speed;
      })
    ) {
      const o = cell("option", state.speed + "×");
      o.value = String(state.speed);
      speed.appendChild(o);
    }
    if (document.activeElement !== speed) speed.value = String(state.speed);
    $<HTMLProgressElement>("progress").value = state.duration > 0
      ? state.position / state.duration
      : (state.done ? 1 : 0);
    $("replay-time").textContent = duration(state.position) + " / " +
      duration(state.duration) +
      " · " + state.replayed + " of " + state.requests + " requests";
  }
  function changeReplay(
    change: { paused?: boolean; restart?: boolean; speed?: number },
  ): void {
    replayPanels().forEach(function (p) {
      fetch(p.source.base + "/replay", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(change),
      })
        .then(function (r): Promise<PageReplay> | null {
          return r.ok ? r.json() : null;
        })
        .then(function (s) {
          if (s) showReplay(p, s);
        });
    });
  }
  $("play").addEventListener("click", function () {
    const first = replayPanels()[0];
    if (first && first.replay) changeReplay({ paused: !first.replay.paused });
  });
  $("restart").addEventListener("click", function () {
    changeReplay({ restart: true, paused: false });
  });
  $("speed").addEventListener("change", function () {
    changeReplay({ speed: Number($<HTMLSelectElement>("speed").value) });
  });

  // ---- the event streams ----
  function setStatus(text: string, cls?: string): void {
    const s = $("status");
    s.textContent = text;
    s.className = cls || "";
  }
  function updateStatus(): void {
    const live = panels.filter(function (p) {
      return p.live;
    }).length;
    if (panels.length === 1) return; // the one stream's messages say it all
    if (live === panels.length) setStatus("live", "live");
    else setStatus(live + " of " + panels.length + " sources live", "down");
  }
  function setPanelState(p: Panel, text: string, cls: string, live: boolean): void {
    p.state.textContent = text;
    p.state.className = "state " + cls;
    p.live = live;
    p.view.live = live;
    if (panels.length === 1) setStatus(text, cls);
    updateStatus();
  }

  function exportKey(p: Panel): string {
    return panels.length > 1 ? "export." + p.index : "export";
  }

  function connect(p: Panel): void {
    if (p.stream) p.stream.close();
    clearTimeout(p.retry);
    const q = new URLSearchParams();
    if (p.exportName !== null) q.set("export", p.exportName);
    if (settings.block !== "auto") q.set("block", settings.block);
    else {
      const area = mapArea(p);
      // At least 2 px per cell when the block size is chosen for us.
      q.set(
        "cells",
        String(
          Math.max(1, Math.floor(area.width / 2) * Math.floor(area.height / 2)),
        ),
      );
    }
    const stream = new EventSource(p.source.base + "/events?" + q.toString());
    p.stream = stream;
    stream.addEventListener("open", function () {
      setPanelState(p, "live", "live", true);
    });
    stream.addEventListener("error", function () {
      setPanelState(p, "disconnected: retrying", "down", false);
      // A relayed source that is down answers with an error status, after
      // which EventSource gives up: ask again ourselves.
      if (stream.readyState === EventSource.CLOSED && p.stream === stream) {
        p.retry = setTimeout(function () {
          if (p.stream === stream) connect(p);
        }, RETRY_MS);
      }
    });
    stream.addEventListener("hello", function (e: MessageEvent<string>) {
      const hello: PageHello = JSON.parse(e.data);
      if (p.exportName === null) p.exportName = hello.export;
      p.view.subscribed = hello.export; // the export this stream follows
      if (p.index === 0) view.subscribed = hello.export;
    });
    stream.addEventListener("frame", function (e: MessageEvent<string>) {
      p.view.framesReceived++;
      if (p.index === 0) view.framesReceived = p.view.framesReceived;
      p.queue.push(JSON.parse(e.data));
      scheduleDraw();
    });
    stream.addEventListener("stats", function (e: MessageEvent<string>) {
      showStats(p, JSON.parse(e.data));
    });
    stream.addEventListener("replay", function (e: MessageEvent<string>) {
      showReplay(p, JSON.parse(e.data));
    });
    stream.addEventListener("reset", function () {
      p.queue = [];
      clearMap(p);
    });
    stream.addEventListener("failure", function (e: MessageEvent<string>) {
      const failure: PageFailure = JSON.parse(e.data);
      setPanelState(p, failure.message, "down", false);
      stream.close();
    });
  }

  function updateUrl(): void {
    const q = new URLSearchParams(location.search);
    panels.forEach(function (p) {
      if (p.exportName !== null) q.set(exportKey(p), p.exportName);
      else q.delete(exportKey(p));
    });
    if (settings.block !== "auto") q.set("block", settings.block);
    else q.delete("block");
    q.set("fade", String(settings.fade));
    history.replaceState(null, "", "?" + q.toString());
  }

  // ---- one panel per source ----
  function addPanel(source: PageSource, index: number, count: number): Panel {
    const root = cell("section", "", "panel");
    const head = cell("div", "", "panel-head");
    const title = cell("span", source.label, "label");
    title.title = "Show this source's counters on the right";
    const exportField = cell("label", "Export ", "export-field");
    const exportSelect = document.createElement("select");
    exportField.appendChild(exportSelect);
    exportField.hidden = true;
    const state = cell("span", "connecting…", "state");
    if (count > 1) head.appendChild(title);
    head.appendChild(exportField);
    if (count > 1) head.appendChild(state);
    const info = cell("div", "", "map-info");
    const canvas = document.createElement("canvas");
    canvas.className = "map";
    canvas.width = canvas.height = 1;
    const counters = cell("div", "", "source-counters");
    const pinned = cell("div", "", "cell-info");
    const names = cell("button", "Name blocks", "files-button");
    names.title = "Read the filesystem again and name each block by its file";
    head.appendChild(names);
    root.appendChild(head);
    root.appendChild(info);
    root.appendChild(canvas);
    root.appendChild(counters);
    root.appendChild(pinned);
    // The first source keeps the ids a one-source page always had.
    canvas.id = index === 0 ? "map" : "map-" + index;
    exportSelect.id = index === 0 ? "export" : "export-" + index;
    exportField.id = index === 0 ? "export-field" : "export-field-" + index;
    $("maps").appendChild(root);
    const pv: PanelView = index === 0 ? view : {
      label: source.label,
      canvasId: canvas.id,
      framesReceived: 0,
      framesApplied: 0,
      layout: null,
      subscribed: null,
      live: false,
    };
    pv.label = source.label;
    pv.canvasId = canvas.id;
    const p: Panel = {
      index: index,
      source: source,
      view: pv,
      root: root,
      canvas: canvas,
      ctx: canvas.getContext("2d")!,
      info: info,
      counters: counters,
      state: state,
      exportField: exportField,
      exportSelect: exportSelect,
      exportName: params.get(count > 1 ? "export." + index : "export"),
      map: null,
      queue: [],
      stream: null,
      retry: 0,
      live: false,
      lastStats: null,
      rateWindow: [],
      rates: {},
      replay: null,
      faults: null,
      owners: null,
      ownersLoading: false,
      pinned: pinned,
    };
    names.addEventListener("click", function () {
      p.owners = null;
      loadOwners(p, true);
    });
    // Where a cell is: its pixel on the canvas bitmap, and its centre on the page (CSS px).
    pv.cellPixel = function (c) {
      if (!p.map) return null;
      return [c % p.map.cols, Math.floor(c / p.map.cols)];
    };
    pv.cellCentre = function (c) {
      const m = p.map;
      if (!m) return null;
      const rect = p.canvas.getBoundingClientRect();
      return [
        rect.left + (c % m.cols) * m.px + Math.floor(m.px / 2),
        rect.top + Math.floor(c / m.cols) * m.px + Math.floor(m.px / 2),
      ];
    };
    pv.describe = function (c) {
      return p.map ? describeCell(p, c) : "";
    };
    canvas.addEventListener("click", function (e) {
      const c = cellAt(p, e);
      if (c < 0) return;
      if (p.owners === null) loadOwners(p, false);
      p.pinned.textContent = describeCell(p, c);
    });
    canvas.addEventListener("mousemove", function (e) {
      const tip = $("tooltip");
      if (p.owners === null) loadOwners(p, false);
      const c = cellAt(p, e);
      if (c < 0) {
        tip.hidden = true;
        return;
      }
      tip.textContent = describeCell(p, c);
      tip.style.left = e.clientX + 12 + "px";
      tip.style.top = e.clientY + 12 + "px";
      tip.hidden = false;
    });
    canvas.addEventListener("mouseleave", function () {
      $("tooltip").hidden = true;
    });
    title.addEventListener("click", function () {
      focus(index);
    });
    exportSelect.addEventListener("change", function () {
      p.exportName = exportSelect.value;
      p.map = null;
      p.owners = null;
      updateUrl();
      connect(p);
    });
    panels.push(p);
    view.panels.push(pv);
    return p;
  }

  const blockSelect = $<HTMLSelectElement>("block");
  if (
    !Array.from(blockSelect.options).some(function (o) {
      return o.value === settings.block;
    })
  ) {
    const custom = cell("option", bytes(Number(settings.block)));
    custom.value = settings.block;
    blockSelect.appendChild(custom);
  }
  blockSelect.value = settings.block;
  blockSelect.addEventListener("change", function () {
    settings.block = blockSelect.value;
    updateUrl();
    panels.forEach(function (p) {
      p.map = null;
      connect(p);
    });
  });
  const fadeSelect = $<HTMLSelectElement>("fade");
  if (
    !Array.from(fadeSelect.options).some(function (o) {
      return Number(o.value) === settings.fade;
    })
  ) {
    const f = cell("option", settings.fade + " s");
    f.value = String(settings.fade);
    fadeSelect.appendChild(f);
  }
  fadeSelect.value = String(settings.fade);
  fadeSelect.addEventListener("change", function () {
    settings.fade = Number(fadeSelect.value);
    updateUrl();
    if (settings.fade > 0) { // start fading what is showing now
      const now = performance.now();
      panels.forEach(function (p) {
        const m = p.map;
        if (!m) return;
        for (let c = 0; c < m.cells; c++) {
          if (
            m.kind[c] && !m.isActive[c] &&
            m.pixels[c] === KIND_PIXEL[m.kind[c] - 1]
          ) {
            m.stamp[c] = now;
            m.isActive[c] = 1;
            m.active[m.activeCount++] = c;
          }
        }
      });
    }
    scheduleDraw();
  });
  $("clear").addEventListener("click", function () {
    panels.forEach(clearMap);
  });
  let resizeTimer = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      panels.forEach(function (p) {
        if (!p.map) return;
        if (settings.block === "auto") {
          p.map = null;
          connect(p);
        } else clearMap(p);
      });
    }, 250);
  });

  function start(sources: PageSource[]): void {
    $("maps").classList.toggle("several", sources.length > 1);
    sources.forEach(function (s, i) {
      addPanel(s, i, sources.length);
    });
    focus(0);
    panels.forEach(connect);
  }
  // The page learns its sources first; a server too old to list them is one source.
  fetch("/sources")
    .then(function (r): Promise<PageSource[]> | PageSource[] {
      return r.ok ? r.json() : [{ label: "", base: "", kind: "serve" }];
    })
    .then(start, function () {
      setStatus("cannot list the sources: reload to retry", "down");
    });
}
