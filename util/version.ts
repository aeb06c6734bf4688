/**
 * The program's version, read from deno.json's `"version"` so that there is
 * one place to change it.
 *
 * @module
 */

import denoConfig from "../deno.json" with { type: "json" };

/** Version of this program. */
export const VERSION: string = denoConfig.version;
