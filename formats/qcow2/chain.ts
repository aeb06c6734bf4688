/**
 * Backing chains of local files: raw or qcow2 layers to any depth, opened
 * only where the user allowed it. A backing name found inside an image is
 * guest-writable data, so following it blindly could expose any host file;
 * it is resolved next to the image that names it and must stay inside that
 * image's directory. Loops are refused. The `node:` modules load on first
 * use: a copy that opens no backing file starts without them.
 *
 * @module
 */

import type { FileHandle } from "node:fs/promises";
import { isQcow2, Qcow2FormatError } from "./header.ts";
import { type ImageStore, type Layer, Qcow2Image, readHeader, type StatusRun } from "./image.ts";

/** The most layers a chain may have. */
export const MAX_CHAIN_DEPTH = 32;

/** How backing files may be found. */
export interface ChainPolicy {
  /** Follow the backing names recorded in images (inside their directories only). */
  follow: boolean;
}

/** A read-only store over a local file. */
export async function fileStore(path: string): Promise<ImageStore & { close(): Promise<void> }> {
  let handle: FileHandle;
  try {
    const { open } = await import("node:fs/promises");
    handle = await open(path, "r");
  } catch (error) {
    throw new Qcow2FormatError(`cannot open backing file ${path}: ${(error as Error).message}`);
  }
  const size = (await handle.stat()).size;
  return {
    size: () => size,
    async pread(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await handle.read(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) {
          buf.fill(0, done);
          return;
        }
        done += bytesRead;
      }
    },
    close: () => handle.close(),
  };
}

/**
 * Resolves a backing name recorded in the image at `imagePath`: relative to
 * the image's directory, and only when it stays inside it.
 */
export async function resolveBackingName(imagePath: string, name: string): Promise<string> {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith("/")) {
    throw new Qcow2FormatError(`backing file ${JSON.stringify(name)} is not a local file name`);
  }
  const { dirname, isAbsolute, relative, resolve } = await import("node:path");
  const dir = await Deno.realPath(dirname(imagePath));
  const candidate = resolve(dir, name);
  let real: string;
  try {
    real = await Deno.realPath(candidate);
  } catch (error) {
    throw new Qcow2FormatError(
      `cannot open backing file ${JSON.stringify(name)}: ${(error as Error).message}`,
    );
  }
  const rel = relative(dir, real);
  if (rel === "" || rel.startsWith("..") || isAbsolute(rel)) {
    throw new Qcow2FormatError(
      `backing file ${JSON.stringify(name)} lies outside ${dir}: not followed`,
    );
  }
  return real;
}

/** The layer chain opened below one image. */
export interface OpenedChain {
  /** The top of the chain below the image (undefined = no backing). */
  layer?: Layer;
  /** Descriptions of the layers from top to bottom, for messages. */
  names: string[];
}

/**
 * Opens the local file `path` as a layer (raw or qcow2, by `format` or by
 * its magic), and below it whatever the policy allows. `seen` holds the
 * real paths already in the chain.
 */
export async function openLayer(
  path: string,
  format: string | undefined,
  policy: ChainPolicy,
  seen: Set<string>,
): Promise<Layer> {
  let real: string;
  try {
    real = await Deno.realPath(path);
  } catch (error) {
    throw new Qcow2FormatError(`cannot open backing file ${path}: ${(error as Error).message}`);
  }
  if (seen.has(real)) throw new Qcow2FormatError(`the backing chain loops back to ${real}`);
  if (seen.size >= MAX_CHAIN_DEPTH) {
    throw new Qcow2FormatError(`the backing chain is deeper than ${MAX_CHAIN_DEPTH} layers`);
  }
  seen.add(real);
  const store = await fileStore(real);
  try {
    const magic = new Uint8Array(Math.min(4, store.size()));
    await store.pread(magic, 0);
    const kind = format ?? (isQcow2(magic) ? "qcow2" : "raw");
    if (kind === "raw") return rawLayer(store);
    if (kind !== "qcow2") {
      throw new Qcow2FormatError(
        `backing format ${JSON.stringify(kind)} is not supported (raw or qcow2)`,
      );
    }
    const header = await readHeader(store);
    let below: Layer | undefined;
    if (header.backingFile !== undefined) {
      below = await openRecordedBacking(
        real,
        header.backingFile,
        header.backingFormat,
        policy,
        seen,
      );
    }
    let image: Qcow2Image;
    try {
      image = await Qcow2Image.open(store, { writable: false, backing: below });
    } catch (error) {
      await below?.close();
      throw error;
    }
    return {
      size: image.size,
      read: (buf, offset) => image.read(store, buf, offset),
      status: (offset, length) => image.status(store, offset, length),
      depth: (offset, length) => image.depth(store, offset, length),
      async close() {
        await below?.close();
        await store.close();
      },
    };
  } catch (error) {
    await store.close();
    throw error;
  }
}

/** Opens the backing file an image names, when the policy allows following it. */
export async function openRecordedBacking(
  imagePath: string,
  name: string,
  format: string | undefined,
  policy: ChainPolicy,
  seen: Set<string>,
): Promise<Layer> {
  if (!policy.follow) throw new Qcow2FormatError(backingRefusal(name));
  const path = await resolveBackingName(imagePath, name);
  return await openLayer(path, format, policy, seen);
}

/** The one-line refusal for an image whose backing file was not allowed. */
export function backingRefusal(name: string): string {
  return `the image has a backing file ${JSON.stringify(name)}, which is not followed unless ` +
    `allowed (qcow2-backing=PATH or qcow2-follow-backing=true): a name stored in a guest-writable ` +
    `image could disclose any host file`;
}

function rawLayer(store: ImageStore & { close(): Promise<void> }): Layer {
  const size = store.size();
  return {
    size,
    read: (buf, offset) => store.pread(buf, offset),
    status: (_offset, length): Promise<StatusRun[]> =>
      Promise.resolve([{ length, data: true, zero: false }]),
    close: () => store.close(),
  };
}
