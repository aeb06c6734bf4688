/**
 * A thread of the compression pool (compress_pool.ts): compresses the
 * clusters of each job it is sent and sends back what compressed well.
 *
 * @module
 */

/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />

import { compressCluster, loadCompression } from "../formats/qcow2/compress.ts";
import type { CompressJob, CompressResult } from "./compress_pool.ts";

self.onmessage = async (event: MessageEvent<CompressJob>) => {
  const { id, type, clusterSize, data } = event.data;
  const bytes = new Uint8Array(data);
  const results: (ArrayBuffer | null)[] = [];
  const transfer: ArrayBuffer[] = [];
  try {
    await loadCompression();
    for (let at = 0; at < bytes.length; at += clusterSize) {
      const compressed = compressCluster(type, bytes.subarray(at, at + clusterSize));
      if (!compressed) {
        results.push(null);
        continue;
      }
      const copy = compressed.slice().buffer;
      results.push(copy);
      transfer.push(copy);
    }
    const reply: CompressResult = { id, results, data };
    self.postMessage(reply, [...transfer, data]);
  } catch (error) {
    const reply: CompressResult = { id, results: [], data, error: (error as Error).message };
    self.postMessage(reply, [data]);
  }
};
