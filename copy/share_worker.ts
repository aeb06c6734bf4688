/**
 * A worker thread's share of a copy (shares.ts): opens its own connection
 * to each endpoint, claims parts of the image until none is left, and
 * reports what it did or why it failed.
 *
 * @module
 */

/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />

import type { Endpoint, Role, ShareSpec } from "./endpoint.ts";
import { copyImage, CopyInterrupted } from "./scheduler.ts";
import {
  describeFailure,
  partClaimer,
  type ShareCommand,
  type ShareJob,
  type ShareReport,
} from "./shares.ts";

const controller = new AbortController();

async function openShared(spec: ShareSpec, role: Role): Promise<Endpoint> {
  switch (spec.kind) {
    case "nbd": {
      const { NbdEndpoint } = await import("./nbd.ts");
      return await NbdEndpoint.open(spec.name, spec.uri, role, {
        connections: 1,
        timeouts: spec.timeouts,
      });
    }
    case "file-source": {
      const { FileSource } = await import("./file_source.ts");
      return await FileSource.open(spec.path);
    }
    case "file-destination": {
      const { FileDestination } = await import("./file_destination.ts");
      return FileDestination.openShared(spec);
    }
    case "null": {
      const { NullDestination } = await import("./null.ts");
      return new NullDestination();
    }
    case "blkhash": {
      const { BlkhashSink } = await import("./blkhash_shared.ts");
      return new BlkhashSink(spec.blockSize, spec.size, (payload) => {
        const buffer = payload.kind === "digests"
          ? payload.digests.buffer
          : payload.kind === "piece"
          ? payload.bytes.buffer
          : undefined;
        self.postMessage(
          { type: "endpoint", payload } satisfies ShareReport,
          buffer ? [buffer as ArrayBuffer] : [],
        );
      });
    }
  }
}

async function run(job: ShareJob): Promise<ShareReport> {
  let source: Endpoint | undefined;
  let destination: Endpoint | undefined;
  try {
    source = await openShared(job.source, "source");
    destination = await openShared(job.destination, "destination");
    const done = new BigInt64Array(job.progress);
    let reported = 0;
    const stats = await copyImage(source, destination, {
      ...job.options,
      signal: controller.signal,
      claim: partClaimer(job.parts, job.size, job.partSize, job.unit, job.threads),
      onProgress: (bytes) => {
        Atomics.add(done, 0, BigInt(bytes - reported));
        reported = bytes;
      },
    });
    return { type: "done", stats };
  } catch (error) {
    return { type: "failed", failure: describeFailure(error) };
  } finally {
    // The main thread owns the outcome: closing here only lets go of the connections.
    await destination?.close(true).catch(() => {});
    await source?.close(true).catch(() => {});
  }
}

self.onmessage = async (event: MessageEvent<ShareCommand>) => {
  const command = event.data;
  if (command.type === "stop") {
    controller.abort(new CopyInterrupted());
    return;
  }
  self.postMessage(await run(command.job));
  self.close();
};
