/**
 * The block-activity page's HTML. Kept as a string module (like its style;
 * its script is view/page/main.ts) so the compiled program carries it and
 * the page needs nothing from the network but the server it came from.
 *
 * @module
 */

/** The page served at `/`. */
export const PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nbd view</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/view.css">
</head>
<body>
<header>
  <h1>nbd view</h1>
  <label title="Bytes per cell of the map">Block
    <select id="block">
      <option value="auto">auto</option>
      <option value="512">512 B</option>
      <option value="4096">4 KiB</option>
      <option value="65536">64 KiB</option>
      <option value="1048576">1 MiB</option>
      <option value="16777216">16 MiB</option>
      <option value="268435456">256 MiB</option>
    </select>
  </label>
  <label title="How long a cell keeps the colour of its last request">Fade
    <select id="fade">
      <option value="0">never</option>
      <option value="0.5">0.5 s</option>
      <option value="1">1 s</option>
      <option value="2">2 s</option>
      <option value="5">5 s</option>
      <option value="20">20 s</option>
    </select>
  </label>
  <button id="clear" type="button" title="Forget what the map shows">Clear</button>
  <span id="replay" hidden>
    <button id="play" type="button">Pause</button>
    <button id="restart" type="button">Restart</button>
    <label>Speed
      <select id="speed">
        <option value="0.1">0.1×</option>
        <option value="0.25">0.25×</option>
        <option value="0.5">0.5×</option>
        <option value="1">1×</option>
        <option value="2">2×</option>
        <option value="5">5×</option>
        <option value="10">10×</option>
        <option value="100">100×</option>
        <option value="1000">1000×</option>
        <option value="10000">10000×</option>
      </select>
    </label>
    <progress id="progress" max="1" value="0"></progress>
    <span id="replay-time"></span>
  </span>
  <span id="status">connecting…</span>
</header>
<main>
  <section id="map-area">
    <div id="maps"></div>
    <div id="tooltip" hidden></div>
  </section>
  <aside>
    <ul id="legend"></ul>
    <h2>Counters <span id="details-source"></span></h2>
    <p id="summary"></p>
    <table id="counters">
      <thead><tr><th>command</th><th>received</th><th>in flight</th><th>done</th><th>failed</th><th>bytes</th><th>p50</th><th>p90</th><th>p99</th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="last"></p>
    <h2>Connections</h2>
    <table id="connections">
      <thead><tr><th>#</th><th>peer</th><th>export</th><th>TLS</th><th>features</th><th>requests</th><th>in flight</th><th>up</th></tr></thead>
      <tbody></tbody>
    </table>
  </aside>
</main>
<script src="/view.js"></script>
</body>
</html>
`;
