/**
 * The view's counters checked against a real client: nbdsh (libnbd) sends a
 * known set of requests, and /metrics, /stats and `nbd stats` must count
 * exactly those. Also `nbd view` replaying a log.
 */

import { assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  NBDSH_ENV,
  peers,
  ROOT,
  run,
  runOk,
  startNbdServe,
  startServer,
  tempDir,
} from "./helpers.ts";
import { parsePrometheus, sampleValue } from "./prometheus.ts";
import { serverViewUrl, startNbdView, withoutClock } from "./view_helpers.ts";
import { SAMPLE_LOG } from "../view/_test_fixtures.ts";

const MiB = 1024 * 1024;

function nbd(args: string[]) {
  return run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args]);
}

/** nbdsh with strict bounds off (so a request past the end reaches the server). */
async function nbdsh(uri: string, script: string): Promise<string> {
  const prelude = `import json, urllib.request
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(${JSON.stringify(uri)})
`;
  return (await runOk("nbdsh", ["-c", prelude + script], { env: NBDSH_ENV })).stdout;
}

/** The requests the tests send, and the per-command counts they must produce. */
const SCRIPT = `
h.pwrite(b"a" * 4096, 0)
h.pwrite(b"b" * 65536, ${MiB})
h.pwrite(b"c" * 512, 8192)
h.pread(4096, 0)
h.pread(100, ${MiB + 7})
h.trim(131072, ${2 * MiB})
h.zero(8192, ${4 * MiB})
h.zero(4096, ${8 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.block_status(${MiB}, 0, lambda *args: 0)
if h.can_cache():
    h.cache(4096, 0)
try:
    h.pread(512, ${64 * MiB})
    raise Exception("a read past the end succeeded")
except nbd.Error:
    pass
`;
const EXPECTED = {
  write: { received: 3, completed: 3, failed: 0, bytes: 4096 + 65536 + 512 },
  read: { received: 3, completed: 2, failed: 1, bytes: 4096 + 100 },
  trim: { received: 1, completed: 1, failed: 0, bytes: 131072 },
  write_zeroes: { received: 2, completed: 2, failed: 0, bytes: 12288 },
  flush: { received: 1, completed: 1, failed: 0, bytes: 0 },
  block_status: { received: 1, completed: 1, failed: 0, bytes: 0 },
  other: { received: 0, completed: 0, failed: 0, bytes: 0 },
};

Deno.test({
  name: "view: /metrics counts exactly the requests nbdsh sent; nbd stats --json equals /stats",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe(
      ["--view", "127.0.0.1:0", "-e", "disk", "memory", "64M"],
      { exportName: "disk" },
    );
    const url = await serverViewUrl(server);
    // The test helper's readiness probe was a connection too.
    const before = parsePrometheus(await (await fetch(new URL("/metrics", url))).text());
    const accepted = sampleValue(before, "nbd_connections_accepted_total");
    // Read /metrics from inside the session, while the connection is still open.
    const out = await nbdsh(
      server.uri,
      SCRIPT + `print(json.dumps({"cache": h.can_cache(), ` +
        `"metrics": urllib.request.urlopen(${
          JSON.stringify(url + "metrics")
        }).read().decode()}))\n`,
    );
    const { cache, metrics } = JSON.parse(out) as { cache: boolean; metrics: string };
    const m = parsePrometheus(metrics);
    const expected: Record<string, typeof EXPECTED.read> = {
      ...EXPECTED,
      cache: cache
        ? { received: 1, completed: 1, failed: 0, bytes: 4096 }
        : { received: 0, completed: 0, failed: 0, bytes: 0 },
    };
    const [info] = m.get("nbd_connection_info")!.samples;
    assertEquals(m.get("nbd_connection_info")!.samples.length, 1);
    assertEquals(info!.labels.export, "disk");
    assertEquals(info!.labels.features, "structured replies,base:allocation");
    const connection = info!.labels.connection!;
    for (const [command, want] of Object.entries(expected)) {
      for (
        const [scope, labels] of [["nbd", { export: "disk" }], ["nbd_connection", {
          connection,
        }]] as const
      ) {
        const v = (name: string) => sampleValue(m, `${scope}_${name}`, { ...labels, command });
        const got = {
          received: v("requests_received_total"),
          completed: v("requests_completed_total"),
          failed: v("requests_failed_total"),
          bytes: v("bytes_total"),
        };
        assertEquals(got, want, `${scope} ${command}`);
        assertEquals(v("requests_in_flight"), 0);
      }
      assertEquals(
        sampleValue(m, "nbd_request_duration_seconds_count", { export: "disk", command }),
        want.received,
      );
    }
    assertEquals(sampleValue(m, "nbd_connections_open"), 1);
    assertEquals(sampleValue(m, "nbd_connections_accepted_total"), accepted + 1);
    assertEquals(sampleValue(m, "nbd_export_size_bytes", { export: "disk" }), 64 * MiB);

    // After the client left: nbd stats --json prints /stats.
    const cli = await nbd(["stats", "--json", url]);
    assertEquals(cli.code, 0, cli.stderr);
    const direct = await (await fetch(new URL("/stats", url))).json();
    const printed = JSON.parse(cli.stdout);
    assertEquals(withoutClock(printed), withoutClock(direct));
    assertEquals([direct.connectionsOpen, direct.connectionsTotal], [0, accepted + 1]);
    assertEquals(direct.exports[0].requests.received, 11 + (cache ? 1 : 0));
    assertEquals(direct.exports[0].bytes.written, EXPECTED.write.bytes);
    assertOk(Math.abs(printed.uptimeSeconds - direct.uptimeSeconds) < 5);

    const human = await nbd(["stats", url.replace(/\/$/, "")]);
    assertEquals(human.code, 0, human.stderr);
    assertIncludes(human.stdout, 'export "disk" (64.0 MiB): 0 connections, ');
    assertOk(/^ {2}write +3 +0 +3 +0 +68\.5 KiB /m.test(human.stdout), human.stdout);
  },
});

Deno.test("nbd stats: an address nobody serves is a one-line error", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const result = await nbd(["stats", String(port)]);
  assertEquals(result.code, 1);
  assertOk(
    /^nbd: Cannot read http:\/\/127\.0\.0\.1:\d+\/stats: /.test(result.stderr),
    result.stderr,
  );
  assertEquals(result.stdout, "");
  assertEquals((await nbd(["stats"])).code, 2);
});

Deno.test("nbd view replays a log: /metrics and nbd stats count its requests", async () => {
  await using dir = await tempDir();
  const file = `${dir.path}/requests.log`;
  await Deno.writeTextFile(file, SAMPLE_LOG.join("\n") + "\n");
  await using view = await startNbdView(["--speed", "1000", file]);
  assertIncludes(view.stderr(), "skipped 2 line(s) that are not log filter lines");
  const deadline = Date.now() + 10000;
  while (!(await (await fetch(new URL("/replay", view.url))).json()).done) {
    assertOk(Date.now() < deadline, "the replay finishes");
    await new Promise((r) => setTimeout(r, 20));
  }
  const m = parsePrometheus(await (await fetch(new URL("/metrics", view.url))).text());
  const v = (name: string, command: string) => sampleValue(m, name, { export: "", command });
  assertEquals(
    [v("nbd_requests_received_total", "read"), v("nbd_requests_failed_total", "read")],
    [2, 1],
  );
  assertEquals(v("nbd_bytes_total", "write"), 8192);
  assertEquals(v("nbd_bytes_total", "trim"), 65536);
  assertEquals(v("nbd_bytes_total", "write_zeroes"), 4096);
  assertEquals(v("nbd_requests_completed_total", "flush"), 1);
  assertEquals(sampleValue(m, "nbd_connections_accepted_total"), 2);
  const stats = await nbd(["stats", "--json", view.url]);
  assertEquals(JSON.parse(stats.stdout).mode, "replay");
  view.child.kill("SIGTERM");
  assertEquals((await view.child.status).code, 0);
});

Deno.test({
  name: "nbd view replays what the log filter wrote for nbdsh's requests",
  ...peers("nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const file = `${dir.path}/requests.log`;
    {
      await using server = await startNbdServe([
        "--filter=log",
        "memory",
        "64M",
        `logfile=${file}`,
      ]);
      await nbdsh(server.uri, SCRIPT);
    }
    await using view = await startNbdView(["--speed", "1000000", file]);
    const deadline = Date.now() + 10000;
    while (!(await (await fetch(new URL("/replay", view.url))).json()).done) {
      assertOk(Date.now() < deadline, "the replay finishes");
      await new Promise((r) => setTimeout(r, 20));
    }
    const m = parsePrometheus(await (await fetch(new URL("/metrics", view.url))).text());
    for (const command of ["write", "read", "trim", "write_zeroes", "flush", "block_status"]) {
      const want = EXPECTED[command as keyof typeof EXPECTED];
      const v = (name: string) => sampleValue(m, name, { export: "", command });
      // The log sits behind the server's checks: the read past the end never reaches it.
      assertEquals(v("nbd_requests_received_total"), want.completed, command);
      assertEquals(v("nbd_requests_completed_total"), want.completed, command);
      assertEquals(v("nbd_bytes_total"), want.bytes, command);
    }
  },
});

Deno.test({
  name: "nbd proxy --view counts what passes through it",
  ...peers("nbdsh"),
  async fn() {
    await using upstream = await startNbdServe(["memory", "16M"]);
    await using proxy = await startServer(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "proxy",
      "--view",
      "127.0.0.1:0",
      "-U",
      "$SOCKET",
      upstream.uri,
    ]);
    const url = await serverViewUrl(proxy);
    await nbdsh(proxy.uri, `h.pwrite(b"p" * 8192, 4096)\nh.pread(512, 0)\n`);
    const m = parsePrometheus(await (await fetch(new URL("/metrics", url))).text());
    const v = (name: string, command: string) => sampleValue(m, name, { export: "", command });
    assertEquals(v("nbd_bytes_total", "write"), 8192);
    assertEquals(v("nbd_bytes_total", "read"), 512);
    assertEquals(sampleValue(m, "nbd_export_size_bytes", { export: "" }), 16 * MiB);
  },
});

Deno.test("nbd serve --view: a bad or busy address is a one-line error", async () => {
  const bad = await nbd(["serve", "--view=nowhere:99999", "memory", "1M"]);
  assertEquals(bad.code, 2);
  assertOk(/^nbd: --view: /.test(bad.stderr), bad.stderr);
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (busy.addr as Deno.NetAddr).port;
    const result = await nbd(["serve", "--view", String(port), "memory", "1M", "--run", "true"]);
    assertEquals(result.code, 1);
    assertOk(
      result.stderr.startsWith(`nbd: Cannot serve the view on ${port}: `),
      result.stderr,
    );
  } finally {
    busy.close();
  }
  for (const command of ["stats", "view"]) {
    const help = await nbd([command, "--help"]);
    assertEquals(help.code, 0);
    assertIncludes(help.stdout, `Usage: nbd ${command} `);
  }
  assertIncludes((await nbd(["serve", "--help"])).stdout, "--view [ADDR]");
});
