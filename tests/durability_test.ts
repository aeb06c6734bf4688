// Durability of acknowledged data on a file export, an orderly SIGTERM,
// clients that die mid-request, and the writable filters (cache, qcow2, cow)
// under SIGKILL at random points (rounds of tests/crash_consistency.ts).
// The server runs as a subprocess so it can be killed; where the test must
// see inside it (is a FLUSH reply really waiting for fsync?) it runs under
// strace, which injects failures or delays into fsync without changing the
// server.

import { assertEquals, assertOk } from "./assert.ts";
import { peers, ROOT, type ServerProcess, startNbdServe, startServer, tempDir } from "./helpers.ts";
import { NbdReplyError, PipelinedClient } from "./pipelined_client.ts";
import { blockContents, checkBlock, VerifiedWorker } from "./verified_io.ts";
import * as C from "../protocol/constants.ts";
import { formatCrash, runCrash } from "./crash_consistency.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

async function makeImage(path: string, size: number): Promise<void> {
  const f = await Deno.open(path, { create: true, write: true, truncate: true });
  await f.truncate(size);
  f.close();
}

function block(worker: number, index: number, version: number, size = 4 * KiB): Uint8Array {
  const out = new Uint8Array(size);
  blockContents(out, worker, index, version);
  return out;
}

/**
 * Starts `nbd serve ARGS` under strace with the given strace options. Stop it
 * with `stop()`: strace detaches rather than kills on SIGTERM, so the signal
 * goes to the server itself (its pid comes from --pidfile).
 */
async function straceServe(
  dir: string,
  straceArgs: string[],
  serveArgs: string[],
): Promise<{ server: ServerProcess; pid: number; stop(): Promise<Deno.CommandStatus> }> {
  const pidfile = `${dir}/server.pid`;
  const server = await startServer("strace", [
    "-f",
    "-qq",
    ...straceArgs,
    Deno.execPath(),
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "serve",
    "-U",
    "$SOCKET",
    "-P",
    pidfile,
    ...serveArgs,
  ]);
  // The pidfile is written once the server listens, which may be just after the socket appears.
  let pid = 0;
  for (let i = 0; i < 250 && !pid; i++) {
    pid = Number((await Deno.readTextFile(pidfile).catch(() => "")).trim());
    if (!pid) await new Promise((resolve) => setTimeout(resolve, 20));
  }
  if (!pid) throw new Error(`${pidfile} was not written`);
  let stopped: Promise<Deno.CommandStatus> | undefined;
  const stop = () => {
    stopped ??= (async () => {
      try {
        Deno.kill(pid, "SIGTERM");
      } catch { /* already gone */ }
      const status = await server.child.status;
      await server[Symbol.asyncDispose]();
      return status;
    })();
    return stopped;
  };
  return { server, pid, stop };
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  return undefined;
}

Deno.test("durability: data acknowledged by FLUSH or a FUA write is in the file when the server is SIGKILLed at once", async () => {
  await using dir = await tempDir("nbd-durable");
  const image = `${dir.path}/disk.img`;
  await makeImage(image, 8 * MiB);
  {
    await using server = await startNbdServe(["file", image]);
    const client = await PipelinedClient.connect(server.socket!);
    // Plain writes are only promised to be durable once a FLUSH is answered.
    await Promise.all(
      Array.from({ length: 64 }, (_, i) => client.write(block(1, i, 1), i * 4 * KiB)),
    );
    await client.flush();
    server.child.kill("SIGKILL");
    assertEquals((await server.child.status).signal, "SIGKILL");
    client.close();
  }
  {
    await using server = await startNbdServe(["file", image]);
    const client = await PipelinedClient.connect(server.socket!);
    await client.write(block(2, 0, 1, 64 * KiB), 4 * MiB, true);
    server.child.kill("SIGKILL");
    assertEquals((await server.child.status).signal, "SIGKILL");
    client.close();
  }
  const bytes = await Deno.readFile(image);
  for (let i = 0; i < 64; i++) {
    assertOk(checkBlock(bytes.subarray(i * 4 * KiB, (i + 1) * 4 * KiB), 1, i, 1), `block ${i}`);
  }
  assertOk(checkBlock(bytes.subarray(4 * MiB, 4 * MiB + 64 * KiB), 2, 0, 1), "FUA block");
});

Deno.test(
  "durability: FLUSH and FUA replies wait for fsync (an injected fsync failure fails them)",
  peers("strace"),
  async () => {
    await using dir = await tempDir("nbd-durable");
    const image = `${dir.path}/disk.img`;
    await makeImage(image, 8 * MiB);
    const { server, stop } = await straceServe(dir.path, [
      "-o",
      "/dev/null",
      "-e",
      "trace=fsync,fdatasync",
      "-e",
      "inject=fsync,fdatasync:error=EIO",
    ], ["file", image]);
    try {
      const client = await PipelinedClient.connect(server.socket!);
      // A plain write needs no fsync and succeeds.
      await client.write(block(3, 0, 1), 0);
      // A FUA write and a FLUSH are only answered after a successful fsync.
      const fua = await rejection(client.write(block(3, 1, 1), 4 * KiB, true));
      assertOk(fua instanceof NbdReplyError, `FUA write: ${fua}`);
      assertEquals(fua.errno, C.NBD_EIO);
      const flush = await rejection(client.flush());
      assertOk(flush instanceof NbdReplyError, `FLUSH: ${flush}`);
      assertEquals(flush.errno, C.NBD_EIO);
      await client.disconnect();
    } finally {
      await stop();
    }
  },
);

Deno.test(
  "durability: SIGTERM lets an in-flight FUA write finish, refuses new requests with ESHUTDOWN, flushes and exits 0",
  peers("strace"),
  async () => {
    await using dir = await tempDir("nbd-durable");
    const image = `${dir.path}/disk.img`;
    const trace = `${dir.path}/fsync.log`;
    await makeImage(image, 8 * MiB);
    // Every fsync is held for 2 s after it has done its work, so a FUA write
    // is certainly still in flight once its fsync shows up in the trace.
    const { server, stop } = await straceServe(dir.path, [
      "-o",
      trace,
      "-e",
      "trace=fsync,fdatasync",
      "-e",
      "inject=fsync:delay_exit=2000000",
    ], ["file", image]);
    try {
      const client = await PipelinedClient.connect(server.socket!);
      await client.write(block(4, 0, 1), 0); // not FUA: only the shutdown flush makes it durable
      const fua = client.write(block(4, 1, 1), 4 * KiB, true);
      const fsyncs = async () => ((await Deno.readTextFile(trace)).match(/fsync\(/g) ?? []).length;
      const deadline = Date.now() + 30_000;
      while ((await fsyncs()) === 0) {
        assertOk(Date.now() < deadline, "the FUA write never reached fsync");
        await new Promise((r) => setTimeout(r, 20));
      }
      const exiting = stop(); // SIGTERM
      // Give the signal a moment to be handled; the FUA write is still held in fsync.
      await new Promise((r) => setTimeout(r, 200));
      const late = await rejection(client.read(0, 4 * KiB));
      assertOk(late instanceof NbdReplyError, `request after SIGTERM: ${late}`);
      assertEquals(late.errno, C.NBD_ESHUTDOWN);
      await fua; // finished and acknowledged, not cut off
      await client.done;
      const status = await exiting;
      assertEquals(status.code, 0);
      // One fsync for the FUA write, at least one more for the flush at shutdown.
      assertOk((await fsyncs()) >= 2, `fsync calls: ${await fsyncs()}`);
      const bytes = await Deno.readFile(image);
      assertOk(checkBlock(bytes.subarray(0, 4 * KiB), 4, 0, 1), "plain write");
      assertOk(checkBlock(bytes.subarray(4 * KiB, 8 * KiB), 4, 1, 1), "FUA write");
    } finally {
      await stop();
    }
  },
);

Deno.test("durability: clients killed mid-stream do not disturb verified I/O on another connection", async () => {
  await using server = await startNbdServe(["memory", "64M"]);
  const checkerClient = await PipelinedClient.connect(server.socket!, { extended: true });
  const checker = new VerifiedWorker(checkerClient, {
    id: 7,
    regionStart: 0,
    regionBlocks: 1024,
    blockSize: 4 * KiB,
    inFlight: 8,
  });
  let stop = false;
  const running = checker.run(() => stop);
  for (let round = 0; round < 3; round++) {
    const writer = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", `${ROOT}/tests/writer_client.ts`, server.socket!],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const reader = writer.stdout.getReader();
    let seen = "";
    while (!seen.includes("ready")) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += new TextDecoder().decode(value);
    }
    assertOk(seen.includes("ready"), "the writer never got a write acknowledged");
    // Let it stream for a moment: with eight 1 MiB writes in flight it is
    // almost always part-way through a payload when it dies.
    await new Promise((r) => setTimeout(r, 50 + round * 100));
    writer.kill("SIGKILL");
    reader.releaseLock();
    await writer.stdout.cancel().catch(() => {});
    assertEquals((await writer.status).signal, "SIGKILL");
  }
  await new Promise((r) => setTimeout(r, 300));
  stop = true;
  await running;
  await checker.sweep();
  assertEquals(checker.stats.problems, []);
  assertEquals([checker.stats.errors, checker.stats.mismatches], [0, 0]);
  assertOk(checker.stats.reads > 0 && checker.stats.writes > 0);
  await checkerClient.disconnect();
  // The server is still up and serving new clients.
  const fresh = await PipelinedClient.connect(server.socket!);
  assertEquals((await fresh.read(16 * MiB, 4)).length, 4);
  await fresh.disconnect();
});

Deno.test("durability: cache (writeback) keeps every flushed byte across SIGKILLs at random points", async () => {
  const result = await runCrash("cache", { rounds: 4 });
  console.log(formatCrash(result));
  assertEquals(result.failures, []);
  assertEquals([result.stats.lostFlushedBytes, result.stats.foreign], [0, 0]);
  assertOk(result.stats.flushes > 0 && result.stats.bytesVerified > 0);
});

Deno.test(
  "durability: qcow2 keeps every flushed byte across SIGKILLs and qemu-img check finds no corruption",
  peers("qemu-img"),
  async () => {
    const result = await runCrash("qcow2", { rounds: 4 });
    console.log(formatCrash(result));
    assertEquals(result.failures, []);
    assertEquals([result.stats.lostFlushedBytes, result.stats.foreign], [0, 0]);
    assertEquals(result.checks["2"], undefined);
    assertEquals(Object.values(result.checks).reduce((a, b) => a + b, 0), 4);
  },
);

Deno.test("durability: cow is volatile as documented: after a SIGKILL the layer below is unchanged and nothing is left in TMPDIR", async () => {
  const result = await runCrash("cow", { rounds: 2 });
  console.log(formatCrash(result));
  assertEquals(result.failures, []);
  assertOk(result.overlayBytes > 0);
});

Deno.test("durability: cache=writeback loses unflushed writes on a crash, as documented, and FLUSH makes them persistent", async () => {
  await using dir = await tempDir("nbd-durable");
  const image = `${dir.path}/disk.img`;
  await makeImage(image, 8 * MiB);
  const args = ["--filter=cache", "file", image, "cache=writeback"];
  {
    await using server = await startNbdServe(args);
    const client = await PipelinedClient.connect(server.socket!);
    await client.write(block(5, 0, 1), 0);
    await client.flush();
    await client.write(block(5, 1, 1), 4 * KiB); // acknowledged, never flushed
    assertOk(checkBlock(await client.read(4 * KiB, 4 * KiB), 5, 1, 1), "visible before the crash");
    server.child.kill("SIGKILL");
    assertEquals((await server.child.status).signal, "SIGKILL");
    client.close();
  }
  const bytes = await Deno.readFile(image);
  assertOk(checkBlock(bytes.subarray(0, 4 * KiB), 5, 0, 1), "the flushed block");
  assertOk(checkBlock(bytes.subarray(4 * KiB, 8 * KiB), 5, 1, 0), "the unflushed block is gone");
});
