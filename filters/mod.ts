/**
 * The filter registry: every filter `nbd serve --filter=NAME` knows.
 *
 * @module
 */

import type { Filter } from "../core/backend.ts";
import { blocksizeFilter } from "./blocksize.ts";
import { cacheFilter } from "./cache.ts";
import { cacheextentsFilter } from "./cacheextents.ts";
import { cowFilter } from "./cow.ts";
import { delayFilter } from "./delay.ts";
import { errorFilter } from "./error.ts";
import { gzipFilter } from "./gzip.ts";
import { logFilter } from "./log.ts";
import { offsetFilter } from "./offset.ts";
import { partitionFilter } from "./partition.ts";
import { qcow2decFilter, qcow2Filter } from "./qcow2.ts";
import { rateFilter } from "./rate.ts";
import { readaheadFilter } from "./readahead.ts";
import { readonlyFilter } from "./readonly.ts";
import { retryFilter } from "./retry.ts";
import { statsFilter } from "./stats.ts";
import { tarFilter } from "./tar.ts";
import { truncateFilter } from "./truncate.ts";
import { xzFilter } from "./xz.ts";

/** Filters by name. */
export const FILTERS: ReadonlyMap<string, Filter> = new Map<string, Filter>(
  [
    blocksizeFilter,
    cacheFilter,
    cacheextentsFilter,
    cowFilter,
    delayFilter,
    errorFilter,
    gzipFilter,
    logFilter,
    offsetFilter,
    partitionFilter,
    qcow2Filter,
    qcow2decFilter,
    rateFilter,
    readaheadFilter,
    readonlyFilter,
    retryFilter,
    statsFilter,
    tarFilter,
    truncateFilter,
    xzFilter,
  ].map((f) => [f.name, f]),
);
