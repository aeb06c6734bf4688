/**
 * Small measurement helpers shared by the load test and the fuzzer: memory
 * of a process from /proc, and latency percentiles.
 *
 * @module
 */

function statusField(pid: number, field: string): number | undefined {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    return match ? Number(match[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Peak resident set size of a running process in KiB (VmHWM), or undefined if unknown. */
export function peakRssKiB(pid: number): number | undefined {
  return statusField(pid, "VmHWM");
}

/** Current resident set size of a running process in KiB (VmRSS), or undefined if unknown. */
export function rssKiB(pid: number): number | undefined {
  return statusField(pid, "VmRSS");
}

/** Formats KiB as MiB with one decimal, or "?" when unknown. */
export function formatKiB(kib: number | undefined): string {
  return kib === undefined ? "?" : `${(kib / 1024).toFixed(1)} MiB`;
}

/** The p-th percentile (0–100) of ascending-sorted values (nearest rank). */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}
