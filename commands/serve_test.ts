import { assertEquals, assertIncludes, assertOk, assertThrows } from "../tests/assert.ts";
import { nbdExecutable, run, tempDir } from "../tests/helpers.ts";
import { UsageError } from "../util/usage_error.ts";
import { expandViewOption, parseServeConfig, type ServeValues } from "./serve.ts";

Deno.test("expandViewOption() gives --view its optional address", () => {
  const cases: Array<[string[], string[]]> = [
    [["--view", "memory", "1G"], ["--view=127.0.0.1:8080", "memory", "1G"]],
    [["--view", "9000", "memory", "1G"], ["--view=9000", "memory", "1G"]],
    [["--view", "0.0.0.0:9000", "memory"], ["--view=0.0.0.0:9000", "memory"]],
    [["--view", ":9000", "memory"], ["--view=:9000", "memory"]],
    [["--view=[::1]:9", "memory"], ["--view=[::1]:9", "memory"]],
    [["memory", "1G", "--view"], ["memory", "1G", "--view=127.0.0.1:8080"]],
    [["--view", "--readonly", "memory"], ["--view=127.0.0.1:8080", "--readonly", "memory"]],
    // Values of other options are not options.
    [["--run", "--view", "memory"], ["--run", "--view", "memory"]],
    [["-e", "--view", "memory"], ["-e", "--view", "memory"]],
    [["-rU", "--view", "memory"], ["-rU", "--view", "memory"]],
    [["-p", "10809", "--view", "10810", "memory"], ["-p", "10809", "--view=10810", "memory"]],
    // Plugin parameters that happen to follow --view stay parameters.
    [["--view", "size=1G", "memory"], ["--view=127.0.0.1:8080", "size=1G", "memory"]],
    // Everything after -- is left alone.
    [["memory", "--", "--view"], ["memory", "--", "--view"]],
  ];
  for (const [argv, expected] of cases) {
    assertEquals(expandViewOption(argv), expected, argv.join(" "));
  }
});

/** Runs `nbd serve ARGS` and returns its exit status and stderr lines. */
async function serveFails(args: string[]): Promise<{ code: number; lines: string[] }> {
  const result = await run(await nbdExecutable(), ["serve", ...args]);
  assertEquals(result.stdout, "");
  return { code: result.code, lines: result.stderr.split("\n").filter((l) => l !== "") };
}

Deno.test("nbd serve closes the filters started before a failing filter", async () => {
  await using dir = await tempDir();
  const stats = `${dir.path}/stats.txt`;
  // The stats filter writes its summary only when it is closed.
  const { code, lines } = await serveFails([
    "--filter=stats",
    "--filter=cache",
    "memory",
    "1M",
    `statsfile=${stats}`,
    "cache=bogus",
  ]);
  assertEquals(code, 2);
  assertEquals(lines, ['nbd: cache: expected writeback, writethrough or unsafe, got "bogus"']);
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});

Deno.test("nbd serve closes every filter when the plugin fails to start", async () => {
  await using dir = await tempDir();
  const stats = `${dir.path}/stats.txt`;
  const { code, lines } = await serveFails([
    "--filter=stats",
    "--filter=cache",
    "file",
    `${dir.path}/missing.img`,
    `statsfile=${stats}`,
  ]);
  assertEquals(code, 1);
  assertEquals(lines.length, 1, lines.join("\n"));
  assertOk(lines[0]!.startsWith(`nbd: Cannot serve ${dir.path}/missing.img: `), lines[0]);
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});

Deno.test("nbd serve exits 1 with one line when a filter fails to start", async () => {
  await using dir = await tempDir();
  const closes = `${dir.path}/closes.txt`;
  // The program with two extra filters: "record" notes its close, "broken" cannot start.
  const script = `${dir.path}/serve.ts`;
  await Deno.writeTextFile(
    script,
    `import { FILTERS } from ${JSON.stringify(new URL("../filters/mod.ts", import.meta.url).href)};
import { main } from ${JSON.stringify(new URL("../main.ts", import.meta.url).href)};
const filters = FILTERS as Map<string, unknown>;
for (const name of ["record1", "record2"]) {
  filters.set(name, {
    name,
    summary: "",
    params: [],
    create: () => Promise.resolve({
      wrap: (next: unknown) => Promise.resolve(next),
      close: () => Deno.writeTextFile(${JSON.stringify(closes)}, name + "\\n", { append: true }),
    }),
  });
}
filters.set("broken", {
  name: "broken",
  summary: "",
  params: [],
  create: () => Promise.reject(new Error("broken: the device is not ready")),
});
Deno.exit(await main(Deno.args));
`,
  );
  const stats = `${dir.path}/stats.txt`;
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    script,
    "serve",
    "--filter=record1",
    "--filter=stats",
    "--filter=record2",
    "--filter=broken",
    "--filter=cache",
    "memory",
    "1M",
    `statsfile=${stats}`,
  ], { env: { DENO_NO_UPDATE_CHECK: "1" } });
  assertEquals(result.code, 1);
  assertEquals(result.stderr, "nbd: broken: the device is not ready\n");
  assertEquals(result.stdout, "");
  // Closed last started first; the layers after the broken one never started.
  assertEquals(await Deno.readTextFile(closes), "record2\nrecord1\n");
  assertIncludes(await Deno.readTextFile(stats), "total: 0 ops");
});

const NO_ACTIVATION = { listenFds: 0 };

Deno.test("parseServeConfig() fills in the defaults", () => {
  const config = parseServeConfig({}, NO_ACTIVATION);
  assertEquals(config.listen, {
    transport: "sockets",
    tcp: { port: 10809, hosts: ["127.0.0.1", "::1"], optional: ["::1"] },
  });
  assertEquals(config.filters, []);
  assertEquals(config.exportName, "");
  assertEquals(config.readonly, false);
  assertEquals(config.limits, {
    maxInFlight: 64,
    maxConnections: undefined,
    maxPayload: undefined,
    handshakeTimeout: undefined,
    idleTimeout: undefined,
  });
  assertEquals(config.tls, { mode: "off", certificates: undefined, verifyPeer: false });
  assertEquals(config.view, undefined);
});

Deno.test("parseServeConfig() resolves where to listen", () => {
  const listen = (values: ServeValues, listenFds = 0) =>
    parseServeConfig(values, { listenFds }).listen;
  // Captive mode without an address: a private Unix socket only.
  assertEquals(listen({ run: "true" }), { transport: "sockets", unix: {} });
  assertEquals(listen({ unix: "-" }), { transport: "sockets", unix: {} });
  assertEquals(listen({ unix: "/run/nbd.sock", port: "0" }), {
    transport: "sockets",
    unix: { path: "/run/nbd.sock" },
    tcp: { port: 0, hosts: ["127.0.0.1", "::1"], optional: ["::1"] },
  });
  // Addresses given by the user are all required.
  assertEquals(listen({ ip: ["0.0.0.0", "[::]"], run: "true" }), {
    transport: "sockets",
    tcp: { port: 10809, hosts: ["0.0.0.0", "[::]"], optional: [] },
  });
  assertEquals(listen({ single: true }), { transport: "stdio" });
  assertEquals(listen({}, 2), { transport: "activation", fds: 2 });
});

Deno.test("parseServeConfig() reads the other options without touching the system", () => {
  const config = parseServeConfig({
    filter: ["cow", "cache"],
    "export-name": "disk",
    description: "a disk",
    readonly: true,
    "max-in-flight": "8",
    "max-payload": "1M",
    "idle-timeout": "30",
    // Neither directory exists: they are looked at only when the server starts.
    "tls-certificates": "/nonexistent/pki",
    "tls-verify-peer": true,
    view: ":9000",
    pidfile: "/nonexistent/nbd.pid",
    "print-uri": true,
  }, NO_ACTIVATION);
  assertEquals(config.filters.map((f) => f.name), ["cow", "cache"]);
  assertEquals([config.exportName, config.description, config.readonly], [
    "disk",
    "a disk",
    true,
  ]);
  assertEquals(config.limits.maxInFlight, 8);
  assertEquals(config.limits.maxPayload, 1024 * 1024);
  assertEquals(config.limits.idleTimeout, 30);
  assertEquals(config.tls, { mode: "on", certificates: "/nonexistent/pki", verifyPeer: true });
  assertEquals(config.view?.text, ":9000");
  assertEquals(config.view?.port, 9000);
  assertEquals([config.pidfile, config.printUri], ["/nonexistent/nbd.pid", true]);
});

Deno.test("parseServeConfig() rejects bad and conflicting options as usage errors", () => {
  const cases: Array<[ServeValues, number, string]> = [
    [{ single: true, port: "10809" }, 0, "--single cannot be combined with -p, -i or -U"],
    [{ single: true, run: "true" }, 0, "--single cannot be combined with --run"],
    [{ single: true, tls: "on" }, 0, "--single cannot be combined with TLS"],
    [{ unix: "/run/nbd.sock" }, 1, "with socket activation (LISTEN_FDS)"],
    [{ port: "65536" }, 0, '--port: bad port "65536"'],
    [{ filter: ["nope"] }, 0, 'unknown filter "nope"'],
    [{ tls: "maybe" }, 0, '--tls: expected off, on or require, got "maybe"'],
    [{ "tls-verify-peer": true }, 0, "--tls-verify-peer needs --tls=on or --tls=require"],
    [{ "tls-psk": "keys.psk" }, 0, "--tls-psk: TLS-PSK is not supported"],
    [{ "max-payload": "1K" }, 0, "--max-payload: expected a size from 4K to 2G"],
    [{ "max-in-flight": "0" }, 0, "--max-in-flight: expected an integer from 1 to 65536"],
    [{ view: "host:port" }, 0, "--view: "],
  ];
  for (const [values, listenFds, message] of cases) {
    assertThrows(() => parseServeConfig(values, { listenFds }), UsageError, message);
  }
});
