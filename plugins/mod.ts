/**
 * The plugin registry: every plugin `nbd serve` knows, by name.
 *
 * @module
 */

import type { Plugin } from "../server/backend.ts";
import { dataPlugin } from "./data.ts";
import { filePlugin } from "./file.ts";
import { memoryPlugin } from "./memory.ts";
import { nullPlugin, zeroPlugin } from "./null.ts";
import { patternPlugin } from "./pattern.ts";
import { randomPlugin } from "./random.ts";

/** Plugins by name. */
export const PLUGINS: ReadonlyMap<string, Plugin> = new Map(
  [dataPlugin, filePlugin, memoryPlugin, nullPlugin, patternPlugin, randomPlugin, zeroPlugin].map((
    p,
  ) => [p.name, p]),
);
