/**
 * Worker side of the qcow2 fuzzer: runs cases in process and reports each
 * one before and after, so that the main thread can tell a hang (no
 * result within its limit) from a slow case and replay it.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { caseRng, layoutOf, nextQcow2Case, runQcow2Case } from "./fuzz_qcow2_cases.ts";

/** A job for the worker. */
export interface WorkerJob {
  /** Seed images. */
  seeds: Array<{ name: string; bytes: Uint8Array }>;
  /** The run's seed. */
  seed: number;
  /** First case index. */
  first: number;
  /** Stop before this index. */
  end: number;
}

let layouts: ReturnType<typeof layoutOf>[] | undefined;

self.onmessage = async (event: MessageEvent<WorkerJob>) => {
  const job = event.data;
  const seeds = layouts ??= job.seeds.map((s) => layoutOf(s.name, s.bytes));
  for (let index = job.first; index < job.end; index++) {
    const rng = caseRng(job.seed, index);
    const c = nextQcow2Case(seeds, rng);
    self.postMessage({ type: "start", index, classes: c.classes, seed: c.seed });
    const outcome = await runQcow2Case(c, rng, rng.chance(0.4));
    self.postMessage({ type: "result", index, outcome });
  }
  self.postMessage({ type: "done" });
};

// Loading (and, under `deno test`, type-checking) this module can take long: say when ready.
self.postMessage({ type: "ready" });
