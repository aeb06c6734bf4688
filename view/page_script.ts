/**
 * The block-activity page's script (a string module, see page_html.ts).
 *
 * It subscribes to `/events`, paints every frame's touched cells in the
 * colour of their request kind on a canvas (one cell per block, each cell
 * fading towards a faint trace of its last kind), and fills the counter
 * and connection tables from the `stats` events. `window.nbdView` exposes
 * the layout so tests can find a block's pixels.
 *
 * @module
 */

/** Served at `/view.js`. */
export const PAGE_SCRIPT = String.raw`"use strict";
(function () {
  // Kind, legend label, colour. Reads black, writes red, trims light purple,
  // zeroes white; the rest are ours.
  var KINDS = [
    ["READ", "read", "#000000"],
    ["WRITE", "write", "#ff0000"],
    ["TRIM", "trim", "#c9a0ff"],
    ["WRITE_ZEROES", "zero", "#ffffff"],
    ["CACHE", "cache", "#3fbf6f"],
    ["BLOCK_STATUS", "block status", "#4f86c6"],
    ["ERROR", "failed", "#ff9f1a"],
  ];
  var BACKGROUND = "#7a8089"; // never touched
  var VOID = "#16181c"; // past the end of the export
  var TRACE = 0.25; // share of the kind colour left once a cell has faded
  var MAX_CELL_PX = 24;

  function rgb(hex) {
    var n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }
  function pack(c) { // ImageData words are little-endian RGBA
    return ((255 << 24) | (c[2] << 16) | (c[1] << 8) | c[0]) >>> 0;
  }
  function mix(a, b, t) {
    return [0, 1, 2].map(function (i) { return Math.round(a[i] + (b[i] - a[i]) * t); });
  }
  var BG = rgb(BACKGROUND);
  var KIND_RGB = KINDS.map(function (k) { return rgb(k[2]); });
  var KIND_PIXEL = KIND_RGB.map(pack);
  var TRACE_RGB = KIND_RGB.map(function (c) { return mix(BG, c, TRACE); });
  // Fading looks colours up in a table: no arithmetic or garbage per cell.
  var FADE_STEPS = 32;
  var FADE_LUT = KIND_RGB.map(function (c, k) {
    var lut = new Uint32Array(FADE_STEPS + 1);
    for (var i = 0; i <= FADE_STEPS; i++) lut[i] = pack(mix(c, TRACE_RGB[k], i / FADE_STEPS));
    return lut;
  });
  var DRAW_STEP_MS = 50; // at most 20 redraws a second, the rate frames arrive at
  var KIND_INDEX = {};
  KINDS.forEach(function (k, i) { KIND_INDEX[k[0]] = i; });

  var $ = function (id) { return document.getElementById(id); };
  var canvas = $("map");
  var ctx = canvas.getContext("2d");
  var params = new URLSearchParams(location.search);

  var settings = {
    exportName: params.get("export"),
    block: params.get("block") || "auto",
    fade: params.has("fade") ? Number(params.get("fade")) : 2,
  };
  if (!(settings.fade >= 0)) settings.fade = 2;

  var map = null; // { size, block, cells, cols, rows, px, kind, stamp, active, activeCount, isActive, image, pixels }
  var queue = [];
  var drawPending = false;
  var lastDraw = -Infinity;
  var source = null;
  var lastStats = null;
  var rates = {};
  var rateWindow = [];
  var view = { framesReceived: 0, framesApplied: 0, layout: null, subscribed: null };
  window.nbdView = view;

  // ---- formatting ----
  function bytes(n) {
    if (n === null || n === undefined) return "?";
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
  }
  function micros(us) {
    if (us === null || us === undefined) return "–";
    if (us < 1000) return us + " µs";
    if (us < 1e6) return (us / 1000).toFixed(us < 10000 ? 1 : 0) + " ms";
    return (us / 1e6).toFixed(1) + " s";
  }
  function duration(s) {
    if (s === null || s === undefined) return "never";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function exportLabel(name) { return name === "" ? "(default)" : name; }
  function cell(tag, text, cls) {
    var el = document.createElement(tag);
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  }

  // ---- legend ----
  var legendItems = {};
  KINDS.concat([["FLUSH", "flush", null]]).forEach(function (k) {
    var li = document.createElement("li");
    var swatch = cell("span", "", "swatch");
    swatch.style.background = k[2] || "transparent";
    li.appendChild(swatch);
    li.appendChild(cell("span", k[1]));
    var rate = cell("span", "", "rate");
    li.appendChild(rate);
    $("legend").appendChild(li);
    legendItems[k[0]] = { li: li, rate: rate };
  });
  function updateRates(requests) {
    var now = performance.now();
    rateWindow.push([now, requests]);
    while (rateWindow.length && now - rateWindow[0][0] > 1000) rateWindow.shift();
    rates = {};
    rateWindow.forEach(function (e) {
      Object.keys(e[1]).forEach(function (k) { rates[k] = (rates[k] || 0) + e[1][k]; });
    });
    Object.keys(legendItems).forEach(function (k) {
      var key = k === "ERROR" ? null : k;
      legendItems[k].rate.textContent = key && rates[key] ? rates[key] + "/s" : "";
    });
    if (requests.FLUSH) {
      var li = legendItems.FLUSH.li;
      li.classList.add("flash");
      setTimeout(function () { li.classList.remove("flash"); }, 300);
    }
  }

  // ---- the map ----
  function mapArea() {
    var area = $("map-area");
    var rect = area.getBoundingClientRect();
    var width = Math.max(64, Math.floor(area.clientWidth - 24));
    var height = Math.max(64, Math.floor(window.innerHeight - rect.top - 40));
    return { width: width, height: height };
  }

  function layout(size, block, cells) {
    var area = mapArea();
    var px = Math.min(MAX_CELL_PX, Math.max(1, Math.floor(Math.sqrt(area.width * area.height / cells))));
    while (px > 1 && Math.ceil(cells / Math.floor(area.width / px)) * px > area.height) px--;
    var cols = Math.max(1, Math.min(cells, Math.floor(area.width / px)));
    var rows = Math.ceil(cells / cols);
    // One canvas pixel per cell, scaled up by CSS (image-rendering: pixelated):
    // the page only ever writes cells, never scales them itself.
    canvas.width = cols;
    canvas.height = rows;
    canvas.style.width = cols * px + "px";
    canvas.style.height = rows * px + "px";
    var image = ctx.createImageData(cols, rows);
    var pixels = new Uint32Array(image.data.buffer);
    pixels.fill(pack(rgb(VOID)));
    pixels.fill(pack(BG), 0, cells);
    map = {
      size: size, block: block, cells: cells, cols: cols, rows: rows, px: px,
      kind: new Uint8Array(cells), stamp: new Float64Array(cells),
      active: new Int32Array(cells), activeCount: 0, isActive: new Uint8Array(cells),
      image: image, pixels: pixels, dirtyLow: 0, dirtyHigh: cells - 1,
    };
    view.layout = { size: size, block: block, cells: cells, cols: cols, rows: rows, cellPx: px };
    $("map-info").textContent = exportLabel(currentExport()) + ": " + bytes(size) + " in " +
      cells + " cells of " + bytes(block) + " (" + cols + " × " + rows + ", " + px + " px each)";
    scheduleDraw();
  }

  function clearMap() {
    if (map) layout(map.size, map.block, map.cells);
  }

  function touch(low, high) {
    if (low < map.dirtyLow) map.dirtyLow = low;
    if (high > map.dirtyHigh) map.dirtyHigh = high;
  }

  function apply(frame) {
    if (!map || map.size !== frame.size || map.block !== frame.block || map.cells !== frame.cells) {
      layout(frame.size, frame.block, frame.cells);
    }
    var now = performance.now();
    var fading = settings.fade > 0;
    frame.kinds.forEach(function (entry) {
      var k = KIND_INDEX[entry[0]];
      if (k === undefined) return;
      var runs = entry[1];
      var pixel = KIND_PIXEL[k];
      for (var r = 0; r < runs.length; r += 2) {
        var end = Math.min(runs[r] + runs[r + 1], map.cells);
        if (end > runs[r]) touch(runs[r], end - 1);
        for (var c = runs[r]; c < end; c++) {
          map.kind[c] = k + 1;
          map.stamp[c] = now;
          map.pixels[c] = pixel;
          if (fading && !map.isActive[c]) {
            map.isActive[c] = 1;
            map.active[map.activeCount++] = c;
          }
        }
      }
    });
    updateRates(frame.requests || {});
    view.framesApplied++;
  }

  function fade(now) {
    if (!map || map.activeCount === 0) return;
    var ms = settings.fade * 1000;
    var kept = 0;
    var low = map.cells, high = -1;
    for (var i = 0; i < map.activeCount; i++) {
      var c = map.active[i];
      var k = map.kind[c] - 1;
      var t = ms > 0 ? (now - map.stamp[c]) / ms : 0;
      if (ms <= 0) { // fading was switched off: keep full colours
        map.pixels[c] = KIND_PIXEL[k];
        map.isActive[c] = 0;
      } else if (t >= 1) {
        map.pixels[c] = FADE_LUT[k][FADE_STEPS];
        map.isActive[c] = 0;
      } else {
        map.pixels[c] = FADE_LUT[k][Math.floor(t * FADE_STEPS)];
        map.active[kept++] = c;
      }
      if (c < low) low = c;
      if (c > high) high = c;
    }
    map.activeCount = kept;
    if (high >= 0) touch(low, high);
  }

  function draw(now) {
    drawPending = false;
    if (now - lastDraw < DRAW_STEP_MS) { // too soon: come back on a later animation frame
      scheduleDraw();
      return;
    }
    lastDraw = now;
    while (queue.length) apply(queue.shift());
    fade(now);
    if (map && map.dirtyHigh >= 0) {
      // Only the rows that changed go to the canvas.
      var top = Math.floor(map.dirtyLow / map.cols);
      var rows = Math.floor(map.dirtyHigh / map.cols) - top + 1;
      ctx.putImageData(map.image, 0, 0, 0, top, map.cols, rows);
      map.dirtyLow = map.cells;
      map.dirtyHigh = -1;
    }
    if (map && map.activeCount > 0) scheduleDraw();
  }
  function scheduleDraw() {
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
    var col = index % map.cols;
    var row = Math.floor(index / map.cols);
    return [col * map.px + Math.floor(map.px / 2), row * map.px + Math.floor(map.px / 2)];
  };
  view.palette = { background: BACKGROUND, void: VOID, trace: TRACE };
  KINDS.forEach(function (k) { view.palette[k[0]] = k[2]; });

  canvas.addEventListener("mousemove", function (e) {
    var tip = $("tooltip");
    if (!map) return;
    var rect = canvas.getBoundingClientRect();
    var col = Math.floor((e.clientX - rect.left) / map.px);
    var row = Math.floor((e.clientY - rect.top) / map.px);
    var c = row * map.cols + col;
    if (col < 0 || col >= map.cols || c < 0 || c >= map.cells) { tip.hidden = true; return; }
    var start = c * map.block;
    var end = Math.min(start + map.block, map.size);
    var k = map.kind[c];
    tip.textContent = "cell " + c + ": bytes " + start + "–" + (end - 1) +
      (k ? " · last " + KINDS[k - 1][1] : " · untouched");
    tip.style.left = e.clientX + 12 + "px";
    tip.style.top = e.clientY + 12 + "px";
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", function () { $("tooltip").hidden = true; });

  // ---- counters and connections ----
  function currentExport() {
    if (settings.exportName !== null) return settings.exportName;
    if (lastStats && lastStats.exports.length) return lastStats.exports[0].name;
    return "";
  }

  function showStats(stats) {
    lastStats = stats;
    var select = $("export");
    var names = stats.exports.map(function (e) { return e.name; });
    if (select.options.length !== names.length ||
        names.some(function (n, i) { return select.options[i].value !== n; })) {
      select.textContent = "";
      names.forEach(function (n) {
        var o = cell("option", exportLabel(n));
        o.value = n;
        select.appendChild(o);
      });
    }
    select.value = currentExport();
    $("export-field").hidden = names.length < 2;

    var exp = stats.exports.filter(function (e) { return e.name === currentExport(); })[0];
    $("summary").textContent = (stats.mode === "replay" ? "replaying a log · " : "") + "up " +
      duration(stats.uptimeSeconds) + " · " + stats.connectionsOpen + " connection" +
      (stats.connectionsOpen === 1 ? "" : "s") + " open, " + stats.connectionsTotal + " accepted" +
      (exp ? " · export " + exportLabel(exp.name) + " " + (exp.size === null ? "(size not known yet)" : bytes(exp.size)) : "");
    var body = $("counters").tBodies[0];
    body.textContent = "";
    if (exp) {
      Object.keys(exp.commands).forEach(function (name) {
        var c = exp.commands[name];
        if (name === "OTHER" && c.received === 0) return;
        var tr = document.createElement("tr");
        [name.toLowerCase().replace("_", " "), c.received, c.inFlight, c.completed, c.failed, bytes(c.bytes),
          micros(c.latencyMicros.p50), micros(c.latencyMicros.p90), micros(c.latencyMicros.p99)]
          .forEach(function (v) { tr.appendChild(cell("td", String(v))); });
        body.appendChild(tr);
      });
      $("last").textContent = "last request " + (exp.secondsSinceLastRequest === null ? "never" : duration(exp.secondsSinceLastRequest) + " ago") +
        " · last reply " + (exp.secondsSinceLastReply === null ? "never" : duration(exp.secondsSinceLastReply) + " ago") +
        " · in flight " + exp.requests.inFlight;
    }
    var conns = $("connections").tBodies[0];
    conns.textContent = "";
    stats.connections.forEach(function (c) {
      var tr = document.createElement("tr");
      [String(c.id), c.peer, c.export === null ? "(handshake)" : exportLabel(c.export), c.tls ? "yes" : "no",
        c.features.join(", "), String(c.requests.completed), String(c.requests.inFlight), duration(c.secondsConnected)]
        .forEach(function (v, i) { tr.appendChild(cell("td", v, i === 1 || i === 4 ? "left" : "")); });
      conns.appendChild(tr);
    });
    if (!stats.connections.length) {
      var tr = document.createElement("tr");
      var td = cell("td", "none", "left");
      td.colSpan = 8;
      tr.appendChild(td);
      conns.appendChild(tr);
    }
  }

  // ---- replay controls ----
  var replayState = null;
  function showReplay(state) {
    replayState = state;
    $("replay").hidden = false;
    $("play").textContent = state.done ? "Done" : state.paused ? "Play" : "Pause";
    $("play").disabled = state.done;
    var speed = $("speed");
    if (!Array.prototype.some.call(speed.options, function (o) { return Number(o.value) === state.speed; })) {
      var o = cell("option", state.speed + "×");
      o.value = String(state.speed);
      speed.appendChild(o);
    }
    if (document.activeElement !== speed) speed.value = String(state.speed);
    $("progress").value = state.duration > 0 ? state.position / state.duration : (state.done ? 1 : 0);
    $("replay-time").textContent = duration(state.position) + " / " + duration(state.duration) +
      " · " + state.replayed + " of " + state.requests + " requests";
  }
  function changeReplay(change) {
    fetch("/replay", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(change) })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) { if (s) showReplay(s); });
  }
  $("play").addEventListener("click", function () {
    if (replayState) changeReplay({ paused: !replayState.paused });
  });
  $("restart").addEventListener("click", function () { changeReplay({ restart: true, paused: false }); });
  $("speed").addEventListener("change", function () { changeReplay({ speed: Number($("speed").value) }); });

  // ---- the event stream ----
  function setStatus(text, cls) {
    var s = $("status");
    s.textContent = text;
    s.className = cls || "";
  }

  function connect() {
    if (source) source.close();
    var q = new URLSearchParams();
    if (settings.exportName !== null) q.set("export", settings.exportName);
    if (settings.block !== "auto") q.set("block", settings.block);
    else {
      var area = mapArea();
      // At least 2 px per cell when the block size is chosen for us.
      q.set("cells", String(Math.max(1, Math.floor(area.width / 2) * Math.floor(area.height / 2))));
    }
    source = new EventSource("/events?" + q.toString());
    source.addEventListener("open", function () { setStatus("live", "live"); });
    source.addEventListener("error", function () { setStatus("disconnected: retrying", "down"); });
    source.addEventListener("hello", function (e) {
      var hello = JSON.parse(e.data);
      if (settings.exportName === null) settings.exportName = hello.export;
      view.subscribed = hello.export; // the export this stream follows
    });
    source.addEventListener("frame", function (e) {
      view.framesReceived++;
      queue.push(JSON.parse(e.data));
      scheduleDraw();
    });
    source.addEventListener("stats", function (e) { showStats(JSON.parse(e.data)); });
    source.addEventListener("replay", function (e) { showReplay(JSON.parse(e.data)); });
    source.addEventListener("reset", function () { queue = []; clearMap(); });
    source.addEventListener("failure", function (e) {
      setStatus(JSON.parse(e.data).message, "down");
      source.close();
    });
  }

  function updateUrl() {
    var q = new URLSearchParams(location.search);
    if (settings.exportName !== null) q.set("export", settings.exportName); else q.delete("export");
    if (settings.block !== "auto") q.set("block", settings.block); else q.delete("block");
    q.set("fade", String(settings.fade));
    history.replaceState(null, "", "?" + q.toString());
  }

  var blockSelect = $("block");
  if (!Array.prototype.some.call(blockSelect.options, function (o) { return o.value === settings.block; })) {
    var custom = cell("option", bytes(Number(settings.block)));
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
  var fadeSelect = $("fade");
  if (!Array.prototype.some.call(fadeSelect.options, function (o) { return Number(o.value) === settings.fade; })) {
    var f = cell("option", settings.fade + " s");
    f.value = String(settings.fade);
    fadeSelect.appendChild(f);
  }
  fadeSelect.value = String(settings.fade);
  fadeSelect.addEventListener("change", function () {
    settings.fade = Number(fadeSelect.value);
    updateUrl();
    if (map && settings.fade > 0) { // start fading what is showing now
      var now = performance.now();
      for (var c = 0; c < map.cells; c++) {
        if (map.kind[c] && !map.isActive[c] && map.pixels[c] === KIND_PIXEL[map.kind[c] - 1]) {
          map.stamp[c] = now;
          map.isActive[c] = 1;
          map.active[map.activeCount++] = c;
        }
      }
    }
    scheduleDraw();
  });
  $("export").addEventListener("change", function () {
    settings.exportName = $("export").value;
    map = null;
    updateUrl();
    connect();
  });
  $("clear").addEventListener("click", clearMap);
  var resizeTimer = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      if (!map) return;
      if (settings.block === "auto") { map = null; connect(); } else clearMap();
    }, 250);
  });

  connect();
})();
`;
