/**
 * The entry of a `nbd serve --workers` worker thread: builds the same server
 * as the main thread and accepts on its listening sockets until told to stop.
 * Messages in: `start` (argv, fds, shared regions), `stop`. Out: `ready`,
 * `stopped`, `failed` (with a message).
 *
 * @module
 */

import { useShared } from "../util/shared_buffers.ts";
import { serveWorker } from "./serve.ts";

/** A message from the main thread. */
type Message =
  | { type: "start"; argv: string[]; fds: number[]; shared: Map<string, SharedArrayBuffer> }
  | { type: "stop" };

const scope = self as unknown as {
  onmessage: ((event: MessageEvent<Message>) => void) | null;
  postMessage(message: unknown): void;
};

let stop: (() => Promise<void>) | undefined;

scope.onmessage = async (event) => {
  const message = event.data;
  try {
    if (message.type === "start") {
      useShared(message.shared);
      stop = await serveWorker(message.argv, message.fds);
      scope.postMessage({ type: "ready" });
    } else {
      await stop?.();
      scope.postMessage({ type: "stopped" });
    }
  } catch (error) {
    scope.postMessage({ type: "failed", message: (error as Error).message });
  }
};
