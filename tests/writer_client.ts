/**
 * A client process for durability tests: it connects to the Unix socket
 * given as its argument and writes 1 MiB blocks as fast as it can (eight in
 * flight) over [16 MiB, 48 MiB) of the export, printing "ready" after the
 * first acknowledgement. Tests kill it with SIGKILL mid-stream.
 *
 * @module
 */

import { PipelinedClient } from "./pipelined_client.ts";

const socket = Deno.args[0];
if (!socket) {
  console.error("usage: writer_client.ts SOCKET");
  Deno.exit(2);
}
const client = await PipelinedClient.connect(socket);
const block = new Uint8Array(1024 * 1024).fill(0xa5);
let announced = false;
let next = 0;
async function lane(): Promise<void> {
  while (true) {
    const offset = 16 * 1024 * 1024 + (next++ % 32) * block.length;
    await client.write(block, offset);
    if (!announced) {
      announced = true;
      console.log("ready");
    }
  }
}
await Promise.all(Array.from({ length: 8 }, lane));
