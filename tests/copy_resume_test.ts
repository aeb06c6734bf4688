/**
 * Resumable copies against real servers: `nbd copy --state` stopped by
 * SIGINT, by SIGKILL and by a lost connection, then `--resume`, and
 * `--retry` through a TCP proxy that keeps cutting the connection. Each
 * result is compared byte for byte with the source; the reads the source
 * server logged show that a resumed copy did not read the done ranges
 * again; and every change to either end or to the options is refused.
 *
 * @module
 */

import { type CopyState, readState, writeState } from "../copy/resume.ts";
import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  nbdExecutable,
  peers,
  randomBytes,
  readExport,
  type RunResult,
  startNbdServe,
  startServer,
  tempDir,
  waitForSocket,
} from "./helpers.ts";

const MiB = 1024 * 1024;
/** 16 MiB of data, then a 4 MiB hole. */
const DATA = 16 * MiB;
const SIZE = DATA + 4 * MiB;

/** The source image: random data and a hole at the end. */
async function writeSource(path: string, seed = 24): Promise<Uint8Array> {
  const bytes = new Uint8Array(SIZE);
  bytes.set(randomBytes(DATA, seed));
  await Deno.writeFile(path, bytes.subarray(0, DATA));
  await Deno.truncate(path, SIZE);
  return bytes;
}

async function sha256(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** `nbd ARGS` to completion. */
async function nbd(args: string[]): Promise<RunResult> {
  const out = await new Deno.Command(await nbdExecutable(), {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

/** Starts `nbd ARGS` with its output collected. */
async function spawnNbd(args: string[]) {
  const child = new Deno.Command(await nbdExecutable(), {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return {
    child,
    async done(): Promise<RunResult> {
      const out = await child.output();
      const text = new TextDecoder();
      return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
    },
  };
}

/** The saved state, or undefined while there is none (or it is being replaced). */
async function tryState(path: string): Promise<CopyState | undefined> {
  try {
    return await readState(path);
  } catch {
    return undefined;
  }
}

/** Waits until the state file says at least `bytes` are done; returns it. */
async function progressAtLeast(path: string, bytes: number, ms = 30_000): Promise<CopyState> {
  const deadline = Date.now() + ms;
  while (true) {
    const state = await tryState(path);
    if (state && state.done.reduce((n, [s, e]) => n + e - s, 0) >= bytes) return state;
    if (Date.now() > deadline) throw new Error(`no checkpoint with ${bytes} bytes done`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function doneBytes(state: CopyState): number {
  return state.done.reduce((n, [s, e]) => n + e - s, 0);
}

function oneLine(stderr: string, context: string): string {
  const lines = stderr.trimEnd().split("\n");
  assertEquals(lines.length, 1, `${context}: expected one line on stderr, got:\n${stderr}`);
  assertOk(lines[0]!.startsWith("nbd: "), `${context}: ${stderr}`);
  return lines[0]!;
}

/** Reads that an nbdkit log filter file records: [offset, count]. */
function loggedReads(log: string): Array<[number, number]> {
  const reads: Array<[number, number]> = [];
  for (const m of log.matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)) {
    reads.push([parseInt(m[1]!, 16), parseInt(m[2]!, 16)]);
  }
  return reads;
}

/** `nbd serve ARGS` on a Unix socket of our choosing, so that a restart keeps the URI. */
async function serveAt(socket: string, args: string[]) {
  const child = new Deno.Command(await nbdExecutable(), {
    args: ["serve", "-U", socket, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  let exited = false;
  child.status.then(() => exited = true);
  await waitForSocket(socket, 15_000, () => exited);
  return {
    async [Symbol.asyncDispose]() {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
      await child.status;
      await Deno.remove(socket).catch(() => {});
    },
  };
}

/**
 * A TCP proxy to a Unix socket that cuts each connection once it has
 * carried about `cutAfter` bytes (in either direction), mid-request.
 */
function cuttingProxy(socket: string, cutAfter: number) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const stats = { connections: 0, cuts: 0 };
  const open = new Set<Deno.Conn>();
  const serving = (async () => {
    for await (const client of listener) {
      stats.connections++;
      const limit = cutAfter + Math.floor(Math.random() * (cutAfter / 2));
      (async () => {
        let server: Deno.Conn;
        try {
          server = await Deno.connect({ transport: "unix", path: socket });
        } catch {
          client.close();
          return;
        }
        open.add(client);
        open.add(server);
        let carried = 0;
        let cut = false;
        const close = () => {
          for (const c of [client, server]) {
            open.delete(c);
            try {
              c.close();
            } catch { /* closed */ }
          }
        };
        const pump = async (from: Deno.Conn, to: Deno.Conn) => {
          const buf = new Uint8Array(64 * 1024);
          try {
            while (true) {
              const n = await from.read(buf);
              if (n === null) break;
              let chunk = buf.subarray(0, n);
              if (carried + n > limit) {
                // Forward part of this chunk, then cut: the peer sees half a message.
                chunk = chunk.subarray(0, Math.max(0, limit - carried));
                cut = true;
              }
              carried += chunk.length;
              let written = 0;
              while (written < chunk.length) written += await to.write(chunk.subarray(written));
              if (cut) break;
            }
          } catch { /* the other side closed */ }
          close();
        };
        await Promise.all([pump(client, server), pump(server, client)]);
        if (cut) stats.cuts++;
      })();
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    stats,
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const c of open) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await serving.catch(() => {});
    },
  };
}

Deno.test({
  name: "copy --state: SIGINT mid-copy, then --resume reads none of the done ranges again",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src.img`;
    const source = await writeSource(src);
    const log = `${dir.path}/reads.log`;
    await using server = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      "--filter=log",
      "--filter=delay",
      "file",
      src,
      "rdelay=100ms",
      `logfile=${log}`,
    ]);
    const out = `${dir.path}/out.img`;
    const state = `${dir.path}/copy.state`;
    const args = ["copy", "-R", "2", `--state=${state}`, server.uri, out];
    const first = await spawnNbd(args);
    await progressAtLeast(state, 2 * MiB);
    first.child.kill("SIGINT");
    const stopped = await first.done();
    assertEquals(stopped.code, 130, stopped.stderr);
    const line = oneLine(stopped.stderr, "interrupted copy");
    assertIncludes(line, `progress saved in ${state}: run the same command with --resume`);
    const saved = await readState(state);
    const doneBefore = doneBytes(saved);
    assertOk(doneBefore >= 2 * MiB && doneBefore < DATA, `${doneBefore} bytes done`);
    assertEquals(saved.source.export?.name, "");
    assertEquals(saved.source.size, SIZE);
    assertOk(saved.destination.partial !== undefined, "the partial copy is named");
    assertOk((await Deno.stat(saved.destination.partial!)).isFile);
    assertEquals(await Deno.stat(out).then(() => true, () => false), false, `${out} exists`);

    const logBefore = (await Deno.readTextFile(log)).length;
    const resumed = await nbd([...args.slice(0, 1), "--resume", "--checksum", ...args.slice(1)]);
    assertEquals(resumed.code, 0, resumed.stderr);
    assertEquals(resumed.stdout, `${await sha256(source)}  ${server.uri}\n`);
    assertBytes(await Deno.readFile(out), source, "the resumed copy");
    // Only the result is left: no state, no temporary file.
    assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name).sort(), [
      "out.img",
      "reads.log",
      "src.img",
    ]);
    const reads = loggedReads((await Deno.readTextFile(log)).slice(logBefore));
    assertOk(reads.length > 0, "the resumed copy read the rest");
    for (const [offset, count] of reads) {
      for (const [start, end] of saved.done) {
        assertOk(
          offset + count <= start || offset >= end,
          `read at ${offset}+${count} overlaps the done range [${start}, ${end})`,
        );
      }
    }
    const readBytes = reads.reduce((n, [, c]) => n + c, 0);
    // The hole at the end is never read.
    assertEquals(readBytes, DATA - doneBefore, "bytes read by the resumed copy");
  },
});

Deno.test("copy --state: SIGKILL mid-copy leaves flushed ranges that --resume completes", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 7);
  await using server = await startNbdServe(["--filter=delay", "file", src, "rdelay=100ms"]);
  const out = `${dir.path}/out.img`;
  const state = `${dir.path}/copy.state`;
  const args = ["copy", "-R", "2", `--state=${state}`, server.uri, out];
  const first = await spawnNbd(args);
  await progressAtLeast(state, 2 * MiB);
  first.child.kill("SIGKILL");
  await first.done();
  const saved = await readState(state);
  // What the state claims is in the partial copy already, byte for byte.
  const partial = await Deno.readFile(saved.destination.partial!);
  for (const [start, end] of saved.done) {
    assertBytes(partial.subarray(start, end), source.subarray(start, end), `[${start}, ${end})`);
  }
  const resumed = await nbd([...args.slice(0, 1), "--resume", ...args.slice(1)]);
  assertEquals(resumed.code, 0, resumed.stderr);
  assertEquals(resumed.stderr, "");
  assertBytes(await Deno.readFile(out), source, "the resumed copy");
  assertEquals(await Deno.stat(state).then(() => true, () => false), false, "state left");
});

Deno.test("copy --retry survives a proxy that cuts the connection again and again", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 11);
  await using server = await startNbdServe(["file", src]);
  // Source side: replies are cut in the middle of their data.
  {
    await using proxy = cuttingProxy(server.socket!, 1536 * 1024);
    const out = `${dir.path}/out.img`;
    const result = await nbd(["copy", "--retry", `nbd://127.0.0.1:${proxy.port}`, out]);
    assertEquals(result.code, 0, result.stderr);
    assertBytes(await Deno.readFile(out), source, "copied through the cutting proxy");
    assertOk(proxy.stats.cuts >= 5, `only ${proxy.stats.cuts} cuts`);
    const notes = result.stderr.trimEnd().split("\n");
    assertOk(notes.every((l) => l.includes(": reconnected (attempt ")), result.stderr);
    // Connections cut together are replaced together, with one note.
    assertOk(notes.length >= 1 && notes.length <= proxy.stats.cuts, result.stderr);
    // A source has nothing to write again.
    assertOk(!result.stderr.includes("writing again"), result.stderr);
  }
  // Destination side: writes are cut in the middle of their data.
  await using target = await startNbdServe(["memory", String(SIZE)]);
  {
    await using proxy = cuttingProxy(target.socket!, 1536 * 1024);
    const result = await nbd(["copy", "--retry=20", src, `nbd://127.0.0.1:${proxy.port}`]);
    assertEquals(result.code, 0, result.stderr);
    assertOk(proxy.stats.cuts >= 5, `only ${proxy.stats.cuts} cuts`);
  }
  assertBytes(await readExport(target.uri), source, "written through the cutting proxy");
});

Deno.test("copy --state without --retry stops at a cut; --resume --retry finishes it", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 13);
  await using target = await startNbdServe(["memory", String(SIZE)]);
  await using proxy = cuttingProxy(target.socket!, 6 * MiB);
  const state = `${dir.path}/copy.state`;
  const uri = `nbd://127.0.0.1:${proxy.port}`;
  const cut = await nbd(["copy", `--state=${state}`, src, uri]);
  assertEquals(cut.code, 1, cut.stderr);
  assertIncludes(
    oneLine(cut.stderr, "cut copy"),
    `in ${state}: run the same command with --resume`,
  );
  const saved = await readState(state);
  assertOk(doneBytes(saved) < SIZE, "the cut copy was not complete");
  const resumed = await nbd(["copy", `--state=${state}`, "--resume", "--retry", src, uri]);
  assertEquals(resumed.code, 0, resumed.stderr);
  assertBytes(await readExport(target.uri), source, "the resumed copy");
});

Deno.test("copy --resume refuses a changed export, size or option, and keeps the state", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 17);
  const socket = `${dir.path}/src.sock`;
  const uri = `nbd+unix:///?socket=${socket}`;
  const out = `${dir.path}/out.img`;
  const state = `${dir.path}/copy.state`;
  const args = ["copy", "-R", "2", `--state=${state}`, uri, out];
  {
    await using _server = await serveAt(socket, [
      "--description=disk one",
      "--filter=delay",
      "file",
      src,
      "rdelay=100ms",
    ]);
    const first = await spawnNbd(args);
    await progressAtLeast(state, MiB);
    first.child.kill("SIGINT");
    assertEquals((await first.done()).code, 130);
  }
  const before = await Deno.readTextFile(state);
  const saved = await readState(state);
  assertEquals(saved.source.export?.description, "disk one");
  const refused = async (serveArgs: string[], extra: string[], expected: string) => {
    const server = serveAt(socket, serveArgs);
    await using _server = await server;
    const result = await nbd([...args.slice(0, 1), ...extra, ...args.slice(1)]);
    assertEquals(result.code, 1, `${expected}: ${result.stderr}`);
    assertIncludes(oneLine(result.stderr, expected), expected);
    assertEquals(await Deno.readTextFile(state), before, `${expected}: the state changed`);
    assertOk((await Deno.stat(saved.destination.partial!)).isFile, "the partial copy is gone");
  };
  const same = ["--description=disk one", "file", src];
  await refused(
    ["--description=disk two", "file", src],
    ["--resume"],
    `cannot resume from ${state}: the source ${uri} changed (export "", flags`,
  );
  await refused(["-r", ...same], ["--resume"], "flags 0x");
  const bigger = `${dir.path}/bigger.img`;
  await Deno.copyFile(src, bigger);
  await Deno.truncate(bigger, SIZE + MiB);
  await refused(
    ["--description=disk one", "file", bigger],
    ["--resume"],
    `the source ${uri} changed size (${SIZE} → ${SIZE + MiB} bytes)`,
  );
  await refused(same, ["--resume", "--no-extents"], "other options (extents was true, now false)");
  await refused(same, [], `${state} holds the progress of an earlier copy: add --resume`);
  const missing = await nbd(["copy", `--state=${dir.path}/none`, "--resume", uri, out]);
  assertEquals(missing.code, 1);
  assertIncludes(oneLine(missing.stderr, "no state"), "no such state file");
  // The unchanged source: the copy completes.
  await using _server = await serveAt(socket, same);
  const elsewhere = await nbd(["copy", `--state=${state}`, "--resume", uri, `${out}.2`]);
  assertEquals(elsewhere.code, 1);
  assertIncludes(
    oneLine(elsewhere.stderr, "another destination"),
    `the destination was ${out}, not ${out}.2`,
  );
  const resumed = await nbd([...args.slice(0, 1), "--resume", ...args.slice(1)]);
  assertEquals(resumed.code, 0, resumed.stderr);
  assertBytes(await Deno.readFile(out), source, "the resumed copy");
});

Deno.test({
  name: "copy --retry writes again what a restarted server lost before a flush",
  ...peers("nbdkit"),
  async fn() {
    await using dir = await tempDir();
    const src = `${dir.path}/src.img`;
    const source = await writeSource(src, 19);
    const dst = `${dir.path}/dst.img`;
    await Deno.writeFile(dst, new Uint8Array(0));
    await Deno.truncate(dst, SIZE);
    const socket = `${dir.path}/dst.sock`;
    const log = `${dir.path}/writes.log`;
    // Writes are slowed, then held in a write-back cache that only a flush empties into
    // the file: a server killed with SIGKILL loses what it acknowledged since the last one.
    const start = () =>
      new Deno.Command("nbdkit", {
        args: [
          "-f",
          "-U",
          socket,
          "--filter=log",
          "--filter=delay",
          "--filter=cache",
          "file",
          dst,
          "wdelay=50ms",
          "cache=writeback",
          `logfile=${log}`,
        ],
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn();
    let server = start();
    let result: RunResult;
    try {
      await waitForSocket(socket);
      const copy = await spawnNbd([
        "copy",
        "--retry",
        "-R",
        "4",
        src,
        `nbd+unix:///?socket=${socket}`,
      ]);
      // Killed once it acknowledged some writes, and started again at once.
      const deadline = Date.now() + 30_000;
      while (!/Write id=\d+ .*return=0/.test(await Deno.readTextFile(log).catch(() => ""))) {
        assertOk(Date.now() < deadline, "no write acknowledged");
        await new Promise((r) => setTimeout(r, 20));
      }
      server.kill("SIGKILL");
      await server.status;
      await Deno.remove(socket).catch(() => {});
      server = start();
      result = await copy.done();
    } finally {
      server.kill("SIGTERM");
      await server.status;
    }
    assertEquals(result.code, 0, result.stderr);
    assertBytes(await Deno.readFile(dst), source, "the destination after the restart");
    assertIncludes(result.stderr, "reconnected (attempt");
    assertIncludes(result.stderr, "acknowledged by a lost connection before a flush");
  },
});

Deno.test("copy --retry: a server gone for good fails in one line; SIGINT ends the waiting", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 23);
  const socket = `${dir.path}/src.sock`;
  const uri = `nbd+unix:///?socket=${socket}`;
  const slow = ["--filter=delay", "file", src, "rdelay=100ms"];
  // Two attempts, 0.25 s apart, then the copy gives up.
  {
    const server = await serveAt(socket, slow);
    const state = `${dir.path}/a.state`;
    const copy = await spawnNbd([
      "copy",
      "-R",
      "2",
      "--retry=2",
      `--state=${state}`,
      uri,
      `${dir.path}/a`,
    ]);
    await progressAtLeast(state, MiB);
    await server[Symbol.asyncDispose]();
    const result = await copy.done();
    assertEquals(result.code, 1, result.stderr);
    const line = oneLine(result.stderr, "server gone");
    assertIncludes(line, `lost ${uri} and could not reconnect in 2 attempts`);
    assertIncludes(line, `progress saved in ${state}`);
  }
  // With the default ten attempts the waits grow to seconds: a signal ends them.
  const state = `${dir.path}/b.state`;
  const out = `${dir.path}/b`;
  const args = ["copy", "-R", "2", "--retry", `--state=${state}`, uri, out];
  {
    const server = await serveAt(socket, slow);
    const copy = await spawnNbd(args);
    await progressAtLeast(state, MiB);
    await server[Symbol.asyncDispose]();
    // Past the first attempts (at 0, 0.25, 0.75, 1.75, 3.75 and 7.75 s), into an 8 s wait.
    await new Promise((r) => setTimeout(r, 8500));
    const sent = Date.now();
    copy.child.kill("SIGINT");
    const result = await copy.done();
    const took = Date.now() - sent;
    assertEquals(result.code, 130, result.stderr);
    assertIncludes(oneLine(result.stderr, "SIGINT while reconnecting"), "interrupted by SIGINT");
    // The wait had seconds to go; the stop does not sit it out.
    assertOk(took < 4000, `took ${took} ms to stop`);
  }
  await using _server = await serveAt(socket, ["file", src]);
  const resumed = await nbd([...args.slice(0, 1), "--resume", ...args.slice(1)]);
  assertEquals(resumed.code, 0, resumed.stderr);
  assertBytes(await Deno.readFile(out), source, "resumed after the server came back");
});

Deno.test("copy --state: a second SIGINT stops at once and still leaves a resumable copy", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  const source = await writeSource(src, 29);
  await using server = await startNbdServe(["--filter=delay", "file", src, "rdelay=200ms"]);
  const out = `${dir.path}/out.img`;
  const state = `${dir.path}/copy.state`;
  const first = await spawnNbd(["copy", "-R", "4", `--state=${state}`, server.uri, out]);
  await progressAtLeast(state, MiB);
  // The server stops answering: after one signal the copy would wait 5 s for its reads.
  server.child.kill("SIGSTOP");
  let took: number;
  try {
    await new Promise((r) => setTimeout(r, 300));
    first.child.kill("SIGINT");
    await new Promise((r) => setTimeout(r, 300));
    const sent = Date.now();
    first.child.kill("SIGINT");
    const stopped = await first.done();
    took = Date.now() - sent;
    assertEquals(stopped.code, 130, stopped.stderr);
    assertIncludes(stopped.stderr, "interrupted again: stopping at once");
  } finally {
    server.child.kill("SIGCONT");
  }
  assertOk(took < 3000, `the second signal took ${took} ms`);
  const saved = await readState(state);
  assertOk((await Deno.stat(saved.destination.partial!)).isFile, "the partial copy was removed");
  // More requests in flight is not a change of the result: the rest goes quicker.
  const resumed = await nbd(["copy", "-R", "64", `--state=${state}`, "--resume", server.uri, out]);
  assertEquals(resumed.code, 0, resumed.stderr);
  assertBytes(await Deno.readFile(out), source, "the resumed copy");
});

Deno.test("copy --resume after the rename: a finished copy is reported, an unfinished one refused", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  await writeSource(src, 31);
  const out = `${dir.path}/out.img`;
  const state = `${dir.path}/copy.state`;
  // A complete copy, then the state it would have left had it stopped before removing it.
  const copied = await nbd(["copy", `--state=${state}`, src, out]);
  assertEquals(copied.code, 0, copied.stderr);
  assertEquals(await Deno.stat(state).then(() => true, () => false), false, "state left");
  const left: CopyState = {
    version: 1,
    source: { argument: src, kind: "file", size: SIZE },
    destination: {
      argument: out,
      kind: "file",
      size: SIZE,
      partial: `${dir.path}/.out.img.nbd-copy-0000`,
    },
    options: { sparse: 4096, allocated: false, destinationIsZero: false, extents: true },
    done: [[0, SIZE]],
  };
  await writeState(state, { ...left, complete: true });
  const finished = await nbd(["copy", `--state=${state}`, "--resume", src, out]);
  assertEquals(finished.code, 0, finished.stderr);
  assertIncludes(oneLine(finished.stderr, "finished"), `${state} records a finished copy`);
  assertEquals(await Deno.stat(state).then(() => true, () => false), false, "state left");
  // Not marked complete: the destination that appeared is not ours to trust.
  await writeState(state, left);
  const refused = await nbd(["copy", `--state=${state}`, "--resume", src, out]);
  assertEquals(refused.code, 1, refused.stderr);
  assertIncludes(oneLine(refused.stderr, "unfinished"), `${out} exists now`);
});

Deno.test("copy --state where the state cannot be written: one line, nothing left", async () => {
  await using dir = await tempDir();
  const src = `${dir.path}/src.img`;
  await writeSource(src, 37);
  const out = `${dir.path}/out.img`;
  const state = `${dir.path}/missing/copy.state`;
  const result = await nbd(["copy", `--state=${state}`, src, out]);
  assertEquals(result.code, 1, result.stderr);
  assertIncludes(oneLine(result.stderr, "unwritable state"), `cannot write ${state}:`);
  assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name), ["src.img"]);
});
