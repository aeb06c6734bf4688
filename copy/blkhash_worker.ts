/**
 * A blkhash worker: hashes batches of whole blocks with SHA-256 and sends
 * back their digests, in the order of the blocks. Whole zero blocks get
 * the zero block's digest without hashing.
 *
 * @module
 */

import { createHash } from "node:crypto";

/** A batch to hash: `blocks` whole blocks of `blockSize` bytes at the start of `buf`. */
interface Request {
  seq: number;
  buf: ArrayBuffer;
  blocks: number;
  blockSize: number;
}

let zeroDigest: { size: number; digest: Uint8Array } | undefined;

function digestOfZero(blockSize: number): Uint8Array {
  if (zeroDigest?.size !== blockSize) {
    zeroDigest = {
      size: blockSize,
      digest: new Uint8Array(createHash("sha256").update(new Uint8Array(blockSize)).digest()),
    };
  }
  return zeroDigest.digest;
}

function isZero(words: Int32Array): boolean {
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  return true;
}

const scope = self as unknown as {
  onmessage: (event: MessageEvent<Request>) => void;
  postMessage: (message: unknown, transfer: Transferable[]) => void;
};

scope.onmessage = (event) => {
  const { seq, buf, blocks, blockSize } = event.data;
  const digests = new Uint8Array(blocks * 32);
  for (let i = 0; i < blocks; i++) {
    const block = new Uint8Array(buf, i * blockSize, blockSize);
    const digest = isZero(new Int32Array(buf, i * blockSize, blockSize >>> 2))
      ? digestOfZero(blockSize)
      : createHash("sha256").update(block).digest();
    digests.set(digest, i * 32);
  }
  scope.postMessage({ seq, digests: digests.buffer, buf }, [digests.buffer, buf]);
};
