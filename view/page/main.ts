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

import type { PageFailure, PageFrame, PageHello, PageReplay, PageStats } from "./events.ts";

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

/** What `window.nbdView` shows tests. */
interface NbdView {
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
  /** A cell's pixel on the canvas bitmap. */
  cellPixel?: (index: number) => [number, number] | null;
  /** A cell's centre on the page, in CSS pixels. */
  cellCentre?: (index: number) => [number, number] | null;
  palette?: Record<string, string | number>;
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
  const canvas = $<HTMLCanvasElement>("map");
  const ctx = canvas.getContext("2d")!;
  const params = new URLSearchParams(location.search);

  const settings = {
    exportName: params.get("export"),
    block: params.get("block") || "auto",
    fade: params.has("fade") ? Number(params.get("fade")) : 2,
  };
  if (!(settings.fade >= 0)) settings.fade = 2;

  let map: CellMap | null = null;
  let queue: PageFrame[] = [];
  let drawPending = false;
  let lastDraw = -Infinity;
  let source: EventSource | null = null;
  let lastStats: PageStats | null = null;
  let rates: Record<string, number> = {};
  const rateWindow: Array<[number, Record<string, number>]> = [];
  const view: NbdView = {
    framesReceived: 0,
    framesApplied: 0,
    layout: null,
    subscribed: null,
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

  // ---- legend ----
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
  function updateRates(requests: Record<string, number>): void {
    const now = performance.now();
    rateWindow.push([now, requests]);
    while (rateWindow.length && now - rateWindow[0][0] > 1000) {
      rateWindow.shift();
    }
    rates = {};
    rateWindow.forEach(function (e) {
      Object.keys(e[1]).forEach(function (k) {
        rates[k] = (rates[k] || 0) + e[1][k];
      });
    });
    Object.keys(legendItems).forEach(function (k) {
      const key = k === "ERROR" ? null : k;
      legendItems[k].rate.textContent = key && rates[key] ? rates[key] + "/s" : "";
    });
    if (requests.FLUSH) {
      const li = legendItems.FLUSH.li;
      li.classList.add("flash");
      setTimeout(function () {
        li.classList.remove("flash");
      }, 300);
    }
  }

  // ---- the map ----
  function mapArea(): { width: number; height: number } {
    const area = $("map-area");
    const rect = area.getBoundingClientRect();
    const width = Math.max(64, Math.floor(area.clientWidth - 24));
    const height = Math.max(64, Math.floor(window.innerHeight - rect.top - 40));
    return { width: width, height: height };
  }

  function layout(size: number, block: number, cells: number): CellMap {
    const area = mapArea();
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
    canvas.width = cols;
    canvas.height = rows;
    canvas.style.width = cols * px + "px";
    canvas.style.height = rows * px + "px";
    const image = ctx.createImageData(cols, rows);
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
    map = laidOut;
    view.layout = {
      size: size,
      block: block,
      cells: cells,
      cols: cols,
      rows: rows,
      cellPx: px,
    };
    $("map-info").textContent = exportLabel(currentExport()) + ": " +
      bytes(size) + " in " +
      cells + " cells of " + bytes(block) + " (" + cols + " × " + rows + ", " +
      px + " px each)";
    scheduleDraw();
    return laidOut;
  }

  function clearMap(): void {
    if (map) layout(map.size, map.block, map.cells);
  }

  function touch(m: CellMap, low: number, high: number): void {
    if (low < m.dirtyLow) m.dirtyLow = low;
    if (high > m.dirtyHigh) m.dirtyHigh = high;
  }

  function apply(frame: PageFrame): void {
    let m = map;
    if (
      !m || m.size !== frame.size || m.block !== frame.block ||
      m.cells !== frame.cells
    ) {
      m = layout(frame.size, frame.block, frame.cells);
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
    updateRates(frame.requests || {});
    view.framesApplied++;
  }

  function fade(now: number): void {
    const m = map;
    if (!m || m.activeCount === 0) return;
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
    while (queue.length) apply(queue.shift()!);
    fade(now);
    if (map && map.dirtyHigh >= 0) {
      // Only the rows that changed go to the canvas.
      const top = Math.floor(map.dirtyLow / map.cols);
      const rows = Math.floor(map.dirtyHigh / map.cols) - top + 1;
      ctx.putImageData(map.image, 0, 0, 0, top, map.cols, rows);
      map.dirtyLow = map.cells;
      map.dirtyHigh = -1;
    }
    if (map && map.activeCount > 0) scheduleDraw();
  }
  function scheduleDraw(): void {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(draw);
  }

  // Where a cell is: its pixel on the canvas bitmap, and its centre on the page (CSS px).
  view.cellPixel = function (index) {
    if (!map) return null;
    return [index % map.cols, Math.floor(index / map.cols)];
  };
  view.cellCentre = function (index) {
    if (!map) return null;
    const col = index % map.cols;
    const row = Math.floor(index / map.cols);
    return [
      col * map.px + Math.floor(map.px / 2),
      row * map.px + Math.floor(map.px / 2),
    ];
  };
  const palette: Record<string, string | number> = {
    background: BACKGROUND,
    void: VOID,
    trace: TRACE,
  };
  view.palette = palette;
  KINDS.forEach(function (k) {
    palette[k[0]] = k[2];
  });

  canvas.addEventListener("mousemove", function (e) {
    const tip = $("tooltip");
    if (!map) return;
    const rect = canvas.getBoundingClientRect();
    const col = Math.floor((e.clientX - rect.left) / map.px);
    const row = Math.floor((e.clientY - rect.top) / map.px);
    const c = row * map.cols + col;
    if (col < 0 || col >= map.cols || c < 0 || c >= map.cells) {
      tip.hidden = true;
      return;
    }
    const start = c * map.block;
    const end = Math.min(start + map.block, map.size);
    const k = map.kind[c];
    tip.textContent = "cell " + c + ": bytes " + start + "–" + (end - 1) +
      (k ? " · last " + KINDS[k - 1][1] : " · untouched");
    tip.style.left = e.clientX + 12 + "px";
    tip.style.top = e.clientY + 12 + "px";
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", function () {
    $("tooltip").hidden = true;
  });

  // ---- counters and connections ----
  function currentExport(): string {
    if (settings.exportName !== null) return settings.exportName;
    if (lastStats && lastStats.exports.length) return lastStats.exports[0].name;
    return "";
  }

  function showStats(stats: PageStats): void {
    lastStats = stats;
    const select = $<HTMLSelectElement>("export");
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
    select.value = currentExport();
    $("export-field").hidden = names.length < 2;

    const exp = stats.exports.filter(function (e) {
      return e.name === currentExport();
    })[0];
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

  // ---- replay controls ----
  let replayState: PageReplay | null = null;
  function showReplay(state: PageReplay): void {
    replayState = state;
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
    fetch("/replay", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(change),
    })
      .then(function (r): Promise<PageReplay> | null {
        return r.ok ? r.json() : null;
      })
      .then(function (s) {
        if (s) showReplay(s);
      });
  }
  $("play").addEventListener("click", function () {
    if (replayState) changeReplay({ paused: !replayState.paused });
  });
  $("restart").addEventListener("click", function () {
    changeReplay({ restart: true, paused: false });
  });
  $("speed").addEventListener("change", function () {
    changeReplay({ speed: Number($<HTMLSelectElement>("speed").value) });
  });

  // ---- the event stream ----
  function setStatus(text: string, cls?: string): void {
    const s = $("status");
    s.textContent = text;
    s.className = cls || "";
  }

  function connect(): void {
    if (source) source.close();
    const q = new URLSearchParams();
    if (settings.exportName !== null) q.set("export", settings.exportName);
    if (settings.block !== "auto") q.set("block", settings.block);
    else {
      const area = mapArea();
      // At least 2 px per cell when the block size is chosen for us.
      q.set(
        "cells",
        String(
          Math.max(1, Math.floor(area.width / 2) * Math.floor(area.height / 2)),
        ),
      );
    }
    const stream = new EventSource("/events?" + q.toString());
    source = stream;
    stream.addEventListener("open", function () {
      setStatus("live", "live");
    });
    stream.addEventListener("error", function () {
      setStatus("disconnected: retrying", "down");
    });
    stream.addEventListener("hello", function (e: MessageEvent<string>) {
      const hello: PageHello = JSON.parse(e.data);
      if (settings.exportName === null) settings.exportName = hello.export;
      view.subscribed = hello.export; // the export this stream follows
    });
    stream.addEventListener("frame", function (e: MessageEvent<string>) {
      view.framesReceived++;
      queue.push(JSON.parse(e.data));
      scheduleDraw();
    });
    stream.addEventListener("stats", function (e: MessageEvent<string>) {
      showStats(JSON.parse(e.data));
    });
    stream.addEventListener("replay", function (e: MessageEvent<string>) {
      showReplay(JSON.parse(e.data));
    });
    stream.addEventListener("reset", function () {
      queue = [];
      clearMap();
    });
    stream.addEventListener("failure", function (e: MessageEvent<string>) {
      const failure: PageFailure = JSON.parse(e.data);
      setStatus(failure.message, "down");
      source!.close();
    });
  }

  function updateUrl(): void {
    const q = new URLSearchParams(location.search);
    if (settings.exportName !== null) q.set("export", settings.exportName);
    else q.delete("export");
    if (settings.block !== "auto") q.set("block", settings.block);
    else q.delete("block");
    q.set("fade", String(settings.fade));
    history.replaceState(null, "", "?" + q.toString());
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
    map = null;
    updateUrl();
    connect();
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
    if (map && settings.fade > 0) { // start fading what is showing now
      const now = performance.now();
      for (let c = 0; c < map.cells; c++) {
        if (
          map.kind[c] && !map.isActive[c] &&
          map.pixels[c] === KIND_PIXEL[map.kind[c] - 1]
        ) {
          map.stamp[c] = now;
          map.isActive[c] = 1;
          map.active[map.activeCount++] = c;
        }
      }
    }
    scheduleDraw();
  });
  $("export").addEventListener("change", function () {
    settings.exportName = $<HTMLSelectElement>("export").value;
    map = null;
    updateUrl();
    connect();
  });
  $("clear").addEventListener("click", clearMap);
  let resizeTimer = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      if (!map) return;
      if (settings.block === "auto") {
        map = null;
        connect();
      } else clearMap();
    }, 250);
  });

  connect();
}
