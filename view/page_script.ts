/**
 * The block-activity page's script, served at `/view.js`. The code lives
 * in view/page/main.ts, typed against the DOM; this module serves the
 * JavaScript Deno has already made of it (see that module's comment), so
 * the page needs no bundler and nothing from the network.
 *
 * @module
 */

// Loaded by a computed URL, which type-checking does not follow: main.ts is
// typed against the DOM library, whose declarations clash with Deno's, so
// it is checked on its own (`deno task check`), never as part of the
// program. The compile task names it with --include for the same reason.
const PAGE_MAIN = new URL("./page/main.ts", import.meta.url).href;
const { main } = (await import(PAGE_MAIN)) as { main: () => void };

/** Served at `/view.js`. */
export const PAGE_SCRIPT = `"use strict";\n(${main.toString()})();\n`;
