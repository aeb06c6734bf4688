/**
 * The plugin registry: every plugin `nbd serve` knows, by name.
 *
 * @module
 */

import type { Plugin } from "../server/backend.ts";
import { memoryPlugin } from "./memory.ts";

/** Plugins by name. */
export const PLUGINS: ReadonlyMap<string, Plugin> = new Map(
  [memoryPlugin].map((p) => [p.name, p]),
);
