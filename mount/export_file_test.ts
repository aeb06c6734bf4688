import { assertBytes, assertEquals, assertIncludes, assertOk } from "../tests/assert.ts";
import { eventually, randomBytes, ROOT, startNbdServe, waitForSocket } from "../tests/helpers.ts";
import { ExportFile } from "./export_file.ts";

const MiB = 1024 * 1024;

Deno.test("ExportFile reads, writes, flushes and zeroes, counting each request", async () => {
  await using server = await startNbdServe(["memory", "8M"]);
  const file = await ExportFile.open(server.uri, { connections: 2 });
  try {
    assertEquals(file.size, 8 * MiB);
    assertEquals(file.connectionCount, 2);
    const data = randomBytes(MiB, 4);
    await file.write(data, MiB);
    await file.flush();
    const back = new Uint8Array(MiB);
    await file.read(back, MiB);
    assertBytes(back, data);
    await file.punchHole(MiB, 4096);
    await file.zeroRange(MiB + 8192, 100);
    await file.read(back, MiB);
    const expected = data.slice();
    expected.fill(0, 0, 4096);
    expected.fill(0, 8192, 8292);
    assertBytes(back, expected);
    const stats = file.stats();
    assertEquals(stats.received, 6);
    assertEquals(stats.completed, 6);
    assertEquals(stats.failed, 0);
    assertEquals(stats.inFlight, 0);
    assertEquals(stats.reads, 2);
    assertEquals(stats.writes, 1);
    assertEquals(stats.flushes, 1);
    assertEquals(stats.zeroes, 2);
    assertEquals(stats.bytesRead, 2 * MiB);
    assertEquals(stats.bytesWritten, MiB);
    assertOk(stats.msSinceRequest !== null && stats.msSinceReply !== null);
    assertEquals(stats.connections.map((c) => c.state), ["connected", "connected"]);
    // SEEK_DATA / SEEK_HOLE from block status: data starts where it was written.
    assertEquals(await file.seekData(0), MiB);
    assertEquals(await file.seekHole(MiB + 8192 + 4096), 2 * MiB);
  } finally {
    await file.close();
  }
});

Deno.test("ExportFile declares a silent connection stale and fails its requests", async () => {
  await using server = await startNbdServe(["memory", "8M"]);
  const events: string[] = [];
  const file = await ExportFile.open(server.uri, {
    connections: 1,
    timeoutMs: 300,
    onEvent: (message) => events.push(message),
  });
  server.child.kill("SIGSTOP");
  try {
    const started = Date.now();
    let failure: unknown;
    await file.read(new Uint8Array(4096), 0).catch((error) => failure = error);
    assertOk(failure instanceof Error, "the read should fail");
    assertOk(Date.now() - started < 3000, "and not hang");
    const stats = file.stats();
    assertEquals(stats.failed, 1);
    assertIncludes(stats.connections[0]!.state, "stale: no reply from the server");
    assertIncludes(events.join("\n"), "connection 1 of 1");
    // Later requests fail at once, naming the reason.
    let later: unknown;
    await file.write(new Uint8Array(512), 0).catch((error) => later = error);
    assertIncludes(String(later), "no working connection to the server (stale");
  } finally {
    server.child.kill("SIGCONT");
    await file.close();
  }
});

Deno.test("ExportFile.close() gives up on requests a stopped server never answers", async () => {
  await using server = await startNbdServe(["memory", "8M"]);
  const file = await ExportFile.open(server.uri, { connections: 1, timeoutMs: 0 });
  server.child.kill("SIGSTOP");
  try {
    const pending = file.read(new Uint8Array(4096), 0).catch((error) => error);
    const started = Date.now();
    await file.close(300);
    assertOk(Date.now() - started < 3000, "close should not hang");
    assertIncludes(String(await pending), "closing: no reply from the server");
  } finally {
    server.child.kill("SIGCONT");
  }
});

Deno.test("ExportFile reconnects in the background once the server is back", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-reconnect" });
  const socket = `${dir}/sock`;
  const serve = async () => {
    await Deno.remove(socket).catch(() => {});
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", socket, "memory", "8M"],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    await waitForSocket(socket);
    return child;
  };
  const events: string[] = [];
  let server = await serve();
  const file = await ExportFile.open(`nbd+unix:///?socket=${socket}`, {
    connections: 1,
    onEvent: (message) => events.push(message),
  });
  try {
    const buf = new Uint8Array(4096);
    await file.read(buf, 0);
    server.kill("SIGKILL");
    await server.status;
    let lost: unknown;
    await file.read(buf, 4096).catch((error) => lost = error);
    assertOk(lost instanceof Error, "a read while the server is gone fails");
    server = await serve();
    assertOk(
      await eventually(() => file.stats().connections[0]!.state === "connected", 10_000),
      events.join("\n"),
    );
    await file.write(randomBytes(4096, 1), 0);
    await file.read(buf, 0);
    assertBytes(buf, randomBytes(4096, 1));
    assertIncludes(events.join("\n"), "connection 1 of 1");
    assertIncludes(events.join("\n"), "reconnected");
  } finally {
    await file.close();
    server.kill("SIGTERM");
    await server.status;
    await Deno.remove(dir, { recursive: true });
  }
});
