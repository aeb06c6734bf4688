/**
 * Timeouts and stop signals against real hanging peers: a TCP listener
 * that accepts and never answers, an HTTP server, and one that sends the
 * NBD greeting and then stalls. Every client command must give up after
 * --timeout with one line and exit 1, and end promptly on SIGTERM, SIGINT
 * and SIGHUP (143, 130, 129) in the connect/handshake state and mid-transfer,
 * never leaving a partial destination that looks complete. Timings are
 * measured; short timeouts keep the file fast.
 *
 * @module
 */

import { foreignGreeting } from "../client/handshake.ts";
import { Interrupted, signalExitCode, within } from "../util/signals.ts";
import { assertEquals, assertIncludes, assertMatch, assertOk } from "./assert.ts";
import { nbdExecutable, ROOT, startNbdServe, startServer, tempDir } from "./helpers.ts";
import { mountable, mountScratch } from "./mount_helpers.ts";

/** The NBD greeting of a fixed-newstyle server, after which the peer says nothing more. */
function greeting(): Uint8Array {
  const bytes = new Uint8Array(18);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, 0x4e42444d41474943n);
  view.setBigUint64(8, 0x49484156454f5054n);
  view.setUint16(16, 3);
  return bytes;
}

/** Hanging peers on loopback TCP ports, each counting the connections it accepted. */
interface HangingPeers extends AsyncDisposable {
  silent: number;
  http: number;
  stall: number;
  /** Connections accepted so far, by peer. */
  accepted: { silent: number; http: number; stall: number };
}

function hangingPeers(): HangingPeers {
  const conns: Deno.Conn[] = [];
  const accepted = { silent: 0, http: 0, stall: 0 };
  const silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const stall = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const loops = [
    (async () => {
      for await (const conn of silent) {
        conns.push(conn);
        accepted.silent++;
      }
    })(),
    (async () => {
      for await (const conn of stall) {
        conns.push(conn);
        accepted.stall++;
        await conn.write(greeting()).catch(() => {});
      }
    })(),
  ];
  const http = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, () => {
    return new Response("not a block device\n");
  });
  // An HTTP server waits for the client to speak; count its connections from the first request.
  const httpPort = http.addr.port;
  return {
    silent: (silent.addr as Deno.NetAddr).port,
    http: httpPort,
    stall: (stall.addr as Deno.NetAddr).port,
    accepted,
    async [Symbol.asyncDispose]() {
      silent.close();
      stall.close();
      for (const conn of conns) {
        try {
          conn.close();
        } catch { /* closed by the client */ }
      }
      await Promise.allSettled(loops);
      await http.shutdown();
    },
  };
}

/** A running `nbd` process whose stderr is collected. */
interface NbdRun {
  child: Deno.ChildProcess;
  started: number;
  /** Waits for the exit: code, stderr, and milliseconds since the start. */
  done(): Promise<{ code: number; stderr: string; ms: number }>;
}

async function spawnNbd(args: string[], env?: Record<string, string>): Promise<NbdRun> {
  const child = new Deno.Command(await nbdExecutable(), {
    args,
    env,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const started = Date.now();
  let stderr = "";
  const collected = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) stderr += decoder.decode(chunk, { stream: true });
  })();
  return {
    child,
    started,
    async done() {
      const status = await child.status;
      const ms = Date.now() - started;
      await collected;
      return { code: status.code, stderr, ms };
    },
  };
}

/** Runs `work` over `items`, at most `width` at a time (the cases mostly wait). */
async function inBatches<T>(items: T[], width: number, work: (item: T) => Promise<void>) {
  const queue = [...items];
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (queue.length > 0) await work(queue.shift()!);
    }),
  );
}

function assertOneLine(stderr: string, context: string): void {
  const lines = stderr.trimEnd().split("\n");
  assertEquals(lines.length, 1, `${context}: expected one line on stderr, got:\n${stderr}`);
  assertOk(lines[0]!.startsWith("nbd: "), `${context}: ${stderr}`);
}

/** Waits until `condition` holds (polling), at most `ms`. */
async function until(condition: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The command lines of the client commands, pointed at `uri`. */
function clientCommands(uri: string, out?: string): Array<[string, string[]]> {
  return [
    ["info", ["info", uri]],
    ["list", ["list", uri]],
    ["map", ["map", uri]],
    ["dump", ["dump", uri]],
    ["copy", ["copy", uri, out ?? "null:"]],
    ["checksum", ["checksum", uri]],
  ];
}

// Start-up of a deno process here takes up to several seconds when many run at once.
const START_MARGIN_MS = 7000;

Deno.test("foreignGreeting() names HTTP, TLS and SSH, and quotes other text", () => {
  const text = (s: string) => new TextEncoder().encode(s);
  assertEquals(
    foreignGreeting(text("HTTP/1.1 400 Bad Request\r\n"), "h:1"),
    "h:1 answered with HTTP, not NBD",
  );
  assertIncludes(foreignGreeting(new Uint8Array([0x15, 0x03, 0x01, 0, 2]), "h:1"), "with TLS");
  assertEquals(
    foreignGreeting(text("SSH-2.0-OpenSSH\r\n"), "h:1"),
    "h:1 answered with SSH, not NBD",
  );
  assertEquals(
    foreignGreeting(text("220 mail ESMTP\r\n"), "h:1"),
    'h:1 is not an NBD server: it sent "220 mail ESMTP"',
  );
  assertIncludes(foreignGreeting(new Uint8Array([1, 2, 0xff]), "h:1"), "01 02 ff");
});

Deno.test("signal exit codes and within() follow the conventions", async () => {
  assertEquals(signalExitCode("SIGINT"), 130);
  assertEquals(signalExitCode("SIGTERM"), 143);
  assertEquals(signalExitCode("SIGHUP"), 129);
  assertEquals(
    new Interrupted("SIGTERM", "while connecting to x").message,
    "interrupted by SIGTERM while connecting to x",
  );
  assertEquals(await within(10, new Promise(() => {})), undefined);
  assertEquals(await within(1000, Promise.resolve(7)), 7);
});

Deno.test("every client command gives up after --timeout with one line, exit 1", async () => {
  await using peers = hangingPeers();
  const expected: Record<string, string> = {
    silent: "no NBD greeting from 127.0.0.1:",
    http: "answered with HTTP, not NBD",
    stall: "stalled: no reply to NBD_OPT_",
  };
  const cases: Array<[string, string, string[]]> = [];
  for (const peer of ["silent", "http", "stall"] as const) {
    const uri = `nbd://127.0.0.1:${peers[peer]}`;
    for (const [name, args] of clientCommands(uri)) {
      cases.push([peer, name, [args[0]!, "--timeout=1", ...args.slice(1)]]);
    }
    // proxy's upstream: checked once at start-up.
    cases.push([peer, "proxy", ["proxy", "--timeout=1", "-U", "-", uri]]);
  }
  await inBatches(cases, 6, async ([peer, name, args]) => {
    const run = await spawnNbd(args);
    const { code, stderr, ms } = await run.done();
    const context = `${name} against the ${peer} peer`;
    assertEquals(code, 1, `${context}: ${stderr}`);
    assertOneLine(stderr, context);
    assertIncludes(stderr, expected[peer]!, context);
    // 1 s, plus 1 s for the probe of a silent peer, plus start-up.
    assertOk(ms >= 900 && ms < 2000 + START_MARGIN_MS, `${context}: took ${ms} ms`);
  });
});

Deno.test("SIGTERM, SIGINT and SIGHUP end every client command stuck in the handshake", async () => {
  const cases: Array<[string, (uri: string) => string[], Deno.Signal, "silent" | "stall"]> = [];
  const signals: Deno.Signal[] = ["SIGTERM", "SIGINT", "SIGHUP"];
  let i = 0;
  for (const peer of ["silent", "stall"] as const) {
    for (const [name] of clientCommands("")) {
      const args = (uri: string) => {
        const line = clientCommands(uri).find(([n]) => n === name)![1];
        return [line[0]!, "--timeout=0", ...line.slice(1)];
      };
      cases.push([name, args, signals[i++ % 3]!, peer]);
    }
    cases.push(["proxy", (uri) => ["proxy", "--timeout=0", "-U", "-", uri], "SIGTERM", peer]);
  }
  // Each case has peers of its own, so that it can tell when its connection was accepted.
  await inBatches(cases, 6, async ([name, args, signal, peer]) => {
    await using peers = hangingPeers();
    const run = await spawnNbd(args(`nbd://127.0.0.1:${peers[peer]}`));
    await until(() => peers.accepted[peer] > 0, 15_000, `${name} to connect`);
    await new Promise((r) => setTimeout(r, 200));
    const sent = Date.now();
    run.child.kill(signal);
    const { code, stderr } = await run.done();
    const took = Date.now() - sent;
    const context = `${name} (${peer}) after ${signal}`;
    assertEquals(code, signalExitCode(signal), `${context}: ${stderr}`);
    assertOneLine(stderr, context);
    assertIncludes(stderr, `interrupted by ${signal}`, context);
    // The grace bound for requests in flight is 5 s; in the handshake nothing is in flight.
    assertOk(took < 5000, `${context}: took ${took} ms to stop`);
  });
});

Deno.test("timeout 10 nbd copy nbd://127.0.0.1:PORT null: against a silent listener ends in time", async () => {
  await using peers = hangingPeers();
  const nbd = await nbdExecutable();
  const uri = `nbd://127.0.0.1:${peers.silent}`;
  const measure = async (args: string[]) => {
    const started = Date.now();
    const out = await new Deno.Command("timeout", { args, stdout: "null", stderr: "piped" })
      .output();
    return {
      code: out.code,
      stderr: new TextDecoder().decode(out.stderr),
      ms: Date.now() - started,
    };
  };
  // Exactly the reported case (default --timeout of 10 s racing timeout's SIGTERM at 10 s),
  // and the SIGTERM path alone (no client timeout at all).
  const [exact, signalled] = await Promise.all([
    measure(["10", nbd, "copy", uri, "null:"]),
    // 5 s, so that a loaded machine has started the program before the signal comes.
    measure(["5", nbd, "copy", "--timeout=0", uri, "null:"]),
  ]);
  assertOk([1, 124].includes(exact.code), `exit ${exact.code}: ${exact.stderr}`);
  assertOneLine(exact.stderr, "timeout 10 nbd copy");
  assertOk(exact.ms < 15_000, `took ${exact.ms} ms`);
  assertEquals(signalled.code, 124, signalled.stderr);
  assertOneLine(signalled.stderr, "timeout 5 nbd copy --timeout=0");
  assertMatch(
    signalled.stderr,
    /copy interrupted by SIGTERM (while connecting to|during the NBD handshake with) 127\.0\.0\.1:/,
  );
  assertOk(signalled.ms < 5000 + START_MARGIN_MS, `took ${signalled.ms} ms`);
});

Deno.test("--request-timeout fails requests to a server that stops answering, one line", async () => {
  // The handshake completes; every read then waits a minute.
  await using server = await startNbdServe(["--filter=delay", "pattern", "1M", "rdelay=60"]);
  await using dir = await tempDir();
  const out = `${dir.path}/out.img`;
  const runs = await Promise.all([
    spawnNbd(["dump", "--request-timeout=1", server.uri]),
    spawnNbd(["copy", "--request-timeout=1", "--no-extents", server.uri, out]),
    spawnNbd(["checksum", "--request-timeout=1", "--no-extents", server.uri]),
  ]);
  for (const [i, run] of runs.entries()) {
    const { code, stderr, ms } = await run.done();
    const context = ["dump", "copy", "checksum"][i]!;
    assertEquals(code, 1, `${context}: ${stderr}`);
    assertOneLine(stderr, context);
    assertIncludes(stderr, "no reply from", context);
    assertOk(ms < 1000 + START_MARGIN_MS + 1000, `${context}: took ${ms} ms`);
  }
  // Its reads would hold its shutdown for the grace period: not what this test is about.
  server.child.kill("SIGKILL");
  assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name), [], "left-over files");
});

Deno.test("--request-timeout of map and info --map against block status that never comes", async () => {
  // The handshake completes; every BLOCK_STATUS then waits a minute (memory has extents).
  await using server = await startNbdServe([
    "--filter=delay",
    "memory",
    "1M",
    "delay-extents=60",
  ]);
  const runs = await Promise.all([
    spawnNbd(["map", "--request-timeout=1", server.uri]),
    spawnNbd(["info", "--map", "--request-timeout=1", server.uri]),
  ]);
  for (const [i, run] of runs.entries()) {
    const { code, stderr, ms } = await run.done();
    const context = ["map", "info --map"][i]!;
    assertEquals(code, 1, `${context}: ${stderr}`);
    assertOneLine(stderr, context);
    assertIncludes(stderr, "no reply from", context);
    assertOk(ms < 1000 + START_MARGIN_MS + 1000, `${context}: took ${ms} ms`);
  }
  server.child.kill("SIGKILL");
});

Deno.test("SIGINT mid-copy from a slow server: exit 130, no destination left", async () => {
  await using server = await startNbdServe(["--filter=delay", "pattern", "64M", "rdelay=1"]);
  await using dir = await tempDir();
  const out = `${dir.path}/out.img`;
  const run = await spawnNbd(["copy", "--no-extents", "-R", "16", server.uri, out]);
  // A temporary file appears once the copy writes.
  await until(() => [...Deno.readDirSync(dir.path)].length > 0, 15_000, "the copy to start");
  await new Promise((r) => setTimeout(r, 500));
  const sent = Date.now();
  run.child.kill("SIGINT");
  const { code, stderr } = await run.done();
  const took = Date.now() - sent;
  assertEquals(code, 130, stderr);
  assertOneLine(stderr, "copy");
  assertIncludes(stderr, `copy interrupted by SIGINT; ${out} was not created`);
  // In-flight reads take up to 1 s each: they finish, nothing is abandoned.
  assertOk(took < 3000, `took ${took} ms to stop`);
  assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name), [], "left-over files");
});

Deno.test("SIGTERM mid-copy from a server that stopped answering: abandoned after the grace", async () => {
  await using server = await startNbdServe(["--filter=delay", "pattern", "64M", "rdelay=1"]);
  await using dir = await tempDir();
  const out = `${dir.path}/out.img`;
  const run = await spawnNbd(["copy", "--no-extents", "-R", "16", server.uri, out]);
  await until(() => [...Deno.readDirSync(dir.path)].length > 0, 15_000, "the copy to start");
  server.child.kill("SIGSTOP");
  try {
    // Replies already on their way are received; the requests sent after them hang.
    await new Promise((r) => setTimeout(r, 1500));
    const sent = Date.now();
    run.child.kill("SIGTERM");
    const { code, stderr } = await run.done();
    const took = Date.now() - sent;
    assertEquals(code, 143, stderr);
    assertOneLine(stderr, "copy");
    assertIncludes(stderr, `copy interrupted by SIGTERM; ${out} was not created`);
    // Requests in flight are abandoned 5 s after the signal.
    assertOk(took >= 4500 && took < 8000, `took ${took} ms to stop`);
    assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name), [], "left-over files");
  } finally {
    server.child.kill("SIGCONT");
  }
});

Deno.test("a second signal stops a copy at once", async () => {
  await using server = await startNbdServe(["--filter=delay", "pattern", "64M", "rdelay=1"]);
  await using dir = await tempDir();
  const out = `${dir.path}/out.img`;
  const run = await spawnNbd(["copy", "--no-extents", "-R", "16", server.uri, out]);
  await until(() => [...Deno.readDirSync(dir.path)].length > 0, 15_000, "the copy to start");
  server.child.kill("SIGSTOP");
  try {
    // Replies already on their way are received; the requests sent after them hang.
    await new Promise((r) => setTimeout(r, 1500));
    run.child.kill("SIGINT");
    await new Promise((r) => setTimeout(r, 300));
    const sent = Date.now();
    run.child.kill("SIGINT");
    const { code, stderr } = await run.done();
    const took = Date.now() - sent;
    assertEquals(code, 130, stderr);
    assertIncludes(stderr, "nbd: interrupted again: stopping at once");
    assertOk(took < 1000, `took ${took} ms to stop`);
    // The clean-up registered by the copy removed its temporary file.
    assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name), [], "left-over files");
  } finally {
    server.child.kill("SIGCONT");
  }
});

Deno.test("nbd serve stops on SIGHUP (exit 0) and within the grace with a request stuck", async () => {
  await using dir = await tempDir();
  const socket = `${dir.path}/s`;
  const run = await spawnNbd([
    "serve",
    "-U",
    socket,
    "--filter=delay",
    "pattern",
    "1M",
    "rdelay=60",
  ]);
  await until(
    () => {
      try {
        return Deno.statSync(socket).isSocket === true;
      } catch {
        return false;
      }
    },
    15_000,
    "the server to listen",
  );
  // A client whose READ the server will not answer for a minute.
  const reader = await spawnNbd(["dump", "--length=512", `nbd+unix:///?socket=${socket}`]);
  await new Promise((r) => setTimeout(r, 1000));
  const sent = Date.now();
  run.child.kill("SIGHUP");
  const { code, stderr } = await run.done();
  const took = Date.now() - sent;
  assertEquals(code, 0, stderr);
  assertOk(took < 8000, `took ${took} ms to stop`);
  const client = await reader.done();
  assertEquals(client.code, 1, client.stderr);
  assertOneLine(client.stderr, "dump from a server that stopped");
});

Deno.test({
  name: "nbd mount: --timeout against a silent listener, and SIGTERM in the handshake",
  ...mountable(),
  async fn() {
    await using peers = hangingPeers();
    await using scratch = await mountScratch();
    const uri = `nbd://127.0.0.1:${peers.silent}`;
    const timedOut = await spawnNbd(["mount", "--timeout=1", uri, scratch.mnt], scratch.env);
    const result = await timedOut.done();
    assertEquals(result.code, 1, result.stderr);
    assertOneLine(result.stderr, "mount --timeout=1");
    assertIncludes(result.stderr, "no NBD greeting from 127.0.0.1:");
    assertOk(result.ms < 2000 + START_MARGIN_MS, `took ${result.ms} ms`);

    const before = peers.accepted.silent;
    const run = await spawnNbd(["mount", "--timeout=0", uri, scratch.mnt], scratch.env);
    await until(() => peers.accepted.silent > before, 15_000, "mount to connect");
    await new Promise((r) => setTimeout(r, 200));
    run.child.kill("SIGTERM");
    const stopped = await run.done();
    assertEquals(stopped.code, 143, stopped.stderr);
    assertOneLine(stopped.stderr, "mount after SIGTERM");
    assertIncludes(stopped.stderr, "interrupted by SIGTERM");
  },
});

Deno.test({
  name: "nbd attach: --timeout against a silent listener gives one line, exit 1",
  ...mountable(),
  async fn() {
    await using peers = hangingPeers();
    await using scratch = await mountScratch();
    const uri = `nbd://127.0.0.1:${peers.silent}`;
    const run = await spawnNbd(["attach", "--foreground", "--timeout=1", uri], scratch.env);
    const { code, stderr, ms } = await run.done();
    assertEquals(code, 1, stderr);
    assertOneLine(stderr, "attach --timeout=1");
    assertIncludes(stderr, `no NBD greeting from 127.0.0.1:${peers.silent} within 1 s`);
    assertOk(ms >= 900 && ms < 2000 + START_MARGIN_MS, `took ${ms} ms`);
  },
});

Deno.test("the nbd plugin's timeout= gives up on a silent or HTTP upstream, one line", async () => {
  await using peers = hangingPeers();
  const cases: Array<[string, number, string]> = [
    ["silent", peers.silent, `no NBD greeting from 127.0.0.1:${peers.silent} within 1 s`],
    ["http", peers.http, "answered with HTTP, not NBD"],
  ];
  await Promise.all(cases.map(async ([peer, port, expected]) => {
    const run = await spawnNbd([
      "serve",
      "-U",
      "-",
      "nbd",
      `uri=nbd://127.0.0.1:${port}`,
      "timeout=1",
    ]);
    const { code, stderr, ms } = await run.done();
    assertEquals(code, 1, `${peer}: ${stderr}`);
    assertOneLine(stderr, `nbd plugin, ${peer} upstream`);
    assertIncludes(stderr, expected, peer);
    assertOk(ms >= 900 && ms < 2000 + START_MARGIN_MS, `${peer}: took ${ms} ms`);
  }));
});

Deno.test("nbd serve --handshake-timeout drops a client that never finishes the handshake", async () => {
  await using server = await startNbdServe(["--handshake-timeout=1", "memory", "1M"]);
  const conn = await Deno.connect({ transport: "unix", path: server.socket! });
  try {
    const started = Date.now();
    // The greeting arrives, then the client says nothing: the server must close.
    const received: number[] = [];
    const buf = new Uint8Array(64);
    while (true) {
      const n = await conn.read(buf);
      if (n === null) break;
      received.push(...buf.subarray(0, n));
    }
    const ms = Date.now() - started;
    assertEquals(received.length, 18, "the fixed-newstyle greeting, then the close");
    assertEquals(received.slice(0, 8), [...greeting().subarray(0, 8)]);
    assertOk(ms >= 900 && ms < 5000, `closed after ${ms} ms`);
  } finally {
    conn.close();
  }
  // The server says why, in its log on stderr.
  await until(
    () => /handshake not finished after 1 s: closing/.test(server.stderr()),
    5000,
    `the server's note on stderr (so far: ${JSON.stringify(server.stderr())})`,
  );
});

Deno.test("proxy --request-timeout turns an upstream that stops answering into EIO", async () => {
  // Reads upstream wait a minute; the proxy's clients get EIO after a second instead.
  await using upstream = await startNbdServe(["--filter=delay", "pattern", "1M", "rdelay=60"]);
  await using proxy = await startServer(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "proxy",
    "--request-timeout=1",
    "-U",
    "$SOCKET",
    upstream.uri,
  ]);
  const run = await spawnNbd(["dump", "--length=512", proxy.uri]);
  const { code, stderr, ms } = await run.done();
  assertEquals(code, 1, stderr);
  assertOneLine(stderr, "dump through the proxy");
  assertIncludes(stderr, "EIO");
  assertOk(ms < 1000 + START_MARGIN_MS + 1000, `took ${ms} ms`);
  upstream.child.kill("SIGKILL");
});
