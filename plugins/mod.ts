/**
 * The plugin registry: every plugin `nbd serve` knows, by name.
 *
 * @module
 */

import type { Plugin } from "../core/backend.ts";
import { dataPlugin } from "./data.ts";
import { evalPlugin } from "./eval.ts";
import { filePlugin } from "./file.ts";
import { floppyPlugin } from "./floppy.ts";
import { curlPlugin, httpPlugin } from "./http.ts";
import { isoPlugin } from "./iso.ts";
import { linuxdiskPlugin } from "./linuxdisk.ts";
import { memoryPlugin } from "./memory.ts";
import { nbdPlugin } from "./nbd.ts";
import { nullPlugin, zeroPlugin } from "./null.ts";
import { partitioningPlugin } from "./partitioning.ts";
import { patternPlugin } from "./pattern.ts";
import { randomPlugin } from "./random.ts";
import { rbdPlugin } from "./rbd.ts";
import { s3Plugin } from "./s3.ts";
import { shPlugin } from "./sh.ts";
import { sparseRandomPlugin } from "./sparse_random.ts";
import { splitPlugin } from "./split.ts";
import { tsPlugin } from "./ts.ts";
import { tmpdiskPlugin } from "./tmpdisk.ts";

/** Plugins by name. */
export const PLUGINS: ReadonlyMap<string, Plugin> = new Map(
  [
    curlPlugin,
    dataPlugin,
    evalPlugin,
    filePlugin,
    floppyPlugin,
    httpPlugin,
    isoPlugin,
    linuxdiskPlugin,
    memoryPlugin,
    nbdPlugin,
    nullPlugin,
    partitioningPlugin,
    patternPlugin,
    randomPlugin,
    rbdPlugin,
    s3Plugin,
    shPlugin,
    sparseRandomPlugin,
    splitPlugin,
    tsPlugin,
    tmpdiskPlugin,
    zeroPlugin,
  ].map((p) => [p.name, p]),
);
