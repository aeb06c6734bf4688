/**
 * Shared memory handed from the main thread to serve workers. A plugin asks
 * for a region by name; on the main thread it is created (and recorded to be
 * sent to the workers), in a worker it is the one the main thread created
 * under that name, so every thread sees the same bytes.
 *
 * @module
 */

let recording: Map<string, SharedArrayBuffer> | undefined;
let received: ReadonlyMap<string, SharedArrayBuffer> | undefined;

/** On the main thread: record the regions plugins create from now on, to hand to workers. */
export function startSharing(): Map<string, SharedArrayBuffer> {
  recording = new Map();
  return recording;
}

/** In a worker: use the regions the main thread created. */
export function useShared(regions: ReadonlyMap<string, SharedArrayBuffer>): void {
  received = regions;
}

/** Whether plugins must keep their state in shared regions (workers serve too). */
export function sharing(): boolean {
  return recording !== undefined || received !== undefined;
}

/**
 * The shared region `name` of `bytes` bytes: created here on the main
 * thread, the main thread's own in a worker. Throws when it cannot be
 * allocated, or a worker has none of that name and size.
 */
export function sharedRegion(name: string, bytes: number): SharedArrayBuffer {
  if (received) {
    const region = received.get(name);
    if (!region || region.byteLength !== bytes) {
      throw new Error(`no shared region ${name} of ${bytes} bytes from the main thread`);
    }
    return region;
  }
  const region = new SharedArrayBuffer(bytes);
  recording?.set(name, region);
  return region;
}
