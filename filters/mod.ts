/**
 * The filter registry: every filter `nbd serve --filter=NAME` knows.
 *
 * @module
 */

import type { Filter } from "../server/backend.ts";

/** Filters by name. */
export const FILTERS: ReadonlyMap<string, Filter> = new Map<string, Filter>();
