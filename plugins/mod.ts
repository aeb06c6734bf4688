/**
 * The plugin registry: every plugin `nbd serve` knows, by name.
 *
 * @module
 */

import type { Plugin } from "../server/backend.ts";
import { evalPlugin } from "./eval.ts";
import { floppyPlugin } from "./floppy.ts";
import { curlPlugin, httpPlugin } from "./http.ts";
import { memoryPlugin } from "./memory.ts";
import { nullPlugin, zeroPlugin } from "./null.ts";
import { patternPlugin } from "./pattern.ts";
import { shPlugin } from "./sh.ts";
import { sparseRandomPlugin } from "./sparse_random.ts";
import { splitPlugin } from "./split.ts";

/** Plugins by name. */
export const PLUGINS: ReadonlyMap<string, Plugin> = new Map(
  [
    curlPlugin,
    evalPlugin,
    floppyPlugin,
    httpPlugin,
    memoryPlugin,
    nullPlugin,
    patternPlugin,
    shPlugin,
    sparseRandomPlugin,
    splitPlugin,
    zeroPlugin,
  ].map((
    p,
  ) => [p.name, p]),
);
