/**
 * The block-activity page's style sheet (a string module, see page_html.ts).
 *
 * @module
 */

/** Served at `/view.css`. */
export const PAGE_STYLE = `:root {
  color-scheme: dark;
  --bg: #16181c;
  --panel: #1f2227;
  --text: #e3e5e8;
  --muted: #9aa0a8;
  --line: #33373e;
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body {
  background: var(--bg);
  color: var(--text);
  font: 13px/1.4 system-ui, sans-serif;
  display: flex;
  flex-direction: column;
}
header {
  display: flex;
  flex-wrap: wrap;
  gap: 6px 14px;
  align-items: center;
  padding: 8px 12px;
  background: var(--panel);
  border-bottom: 1px solid var(--line);
}
h1 { font-size: 15px; margin: 0 8px 0 0; }
h2 { font-size: 13px; margin: 14px 0 4px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
select, button { font: inherit; background: #2a2e35; color: var(--text); border: 1px solid var(--line); border-radius: 3px; padding: 2px 6px; }
button { cursor: pointer; }
#status { margin-left: auto; color: var(--muted); }
#status.live { color: #7fd18b; }
#status.down { color: #ff8a7a; }
#replay { display: inline-flex; gap: 8px; align-items: center; }
#replay[hidden] { display: none; }
#progress { width: 160px; }
main { flex: 1; display: flex; min-height: 0; }
#map-area { flex: 1; padding: 10px 12px; overflow: auto; position: relative; min-width: 0; }
#maps { display: flex; gap: 14px; align-items: flex-start; }
.panel { flex: 1 1 0; min-width: 0; }
#maps.several .panel { border: 1px solid var(--line); border-radius: 4px; padding: 6px; }
#maps.several .panel.focused { border-color: #6f7b8c; }
.panel-head { display: flex; gap: 10px; align-items: center; min-height: 22px; }
.panel-head .label { font-weight: 600; cursor: pointer; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.panel-head .state { margin-left: auto; color: var(--muted); }
.panel-head .state.live { color: #7fd18b; }
.panel-head .state.down { color: #ff8a7a; }
.export-field[hidden] { display: none; }
.map-info { color: var(--muted); margin-bottom: 6px; height: 18px; white-space: nowrap; overflow: hidden; }
.source-counters { color: var(--muted); margin-top: 6px; font-variant-numeric: tabular-nums; }
.source-counters.failing { color: #ff9f1a; }
canvas.map { display: block; image-rendering: pixelated; background: #000; }
.faults { margin-top: 6px; display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.fault-note.down { color: #ff8a7a; }
.panel.faulty { border-color: #ff9f1a !important; }
.files-button { margin-left: auto; }
.panel-head .state { margin-left: 0; }
.cell-info { color: var(--text); margin-top: 4px; word-break: break-all; }
#tooltip { white-space: normal; max-width: 480px; }
#details-source { text-transform: none; color: var(--text); }
#tooltip {
  position: fixed;
  pointer-events: none;
  background: #000d;
  border: 1px solid var(--line);
  padding: 3px 6px;
  border-radius: 3px;
  white-space: nowrap;
}
aside {
  width: 500px;
  flex: none;
  padding: 8px 12px;
  background: var(--panel);
  border-left: 1px solid var(--line);
  overflow: auto;
}
#legend { list-style: none; padding: 0; margin: 0; display: grid; grid-template-columns: 1fr 1fr; gap: 2px 10px; }
#legend li { display: flex; align-items: center; gap: 6px; }
#legend .swatch { width: 12px; height: 12px; border: 1px solid #555; flex: none; }
#legend .rate { margin-left: auto; color: var(--muted); font-variant-numeric: tabular-nums; }
#legend li.flash .swatch { outline: 2px solid #fff; }
table { border-collapse: collapse; width: 100%; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 3px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { color: var(--muted); font-weight: normal; }
td.left { text-align: left; white-space: normal; }
p { margin: 4px 0; }
#summary, #last { color: var(--muted); }
@media (max-width: 900px) {
  main { flex-direction: column; }
  aside { width: auto; border-left: 0; border-top: 1px solid var(--line); }
}
`;
