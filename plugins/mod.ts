/**
 * The plugin registry: every plugin `nbd serve` knows, by name.
 *
 * @module
 */

import type { Plugin } from "../server/backend.ts";
import { memoryPlugin } from "./memory.ts";
import { nullPlugin, zeroPlugin } from "./null.ts";
import { patternPlugin } from "./pattern.ts";

/** Plugins by name. */
export const PLUGINS: ReadonlyMap<string, Plugin> = new Map(
  [memoryPlugin, nullPlugin, patternPlugin, zeroPlugin].map((p) => [p.name, p]),
);
