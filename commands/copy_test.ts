import { assertEquals, assertThrows } from "../tests/assert.ts";
import { UsageError } from "../util/usage_error.ts";
import {
  DEFAULT_RETRIES,
  defaultRequests,
  defaultSourceConnections,
  defaultThreads,
  parseCopyArgs,
} from "./copy.ts";
import { localConnections } from "../copy/nbd.ts";

Deno.test("parseCopyArgs() applies nbdcopy's defaults", () => {
  const config = parseCopyArgs(["disk.img", "nbd://host/x"]);
  assertEquals(config.source, { kind: "path", path: "disk.img" });
  assertEquals(config.destination, { kind: "nbd", uri: "nbd://host/x" });
  assertEquals(
    [config.connections, config.requests, config.requestSize, config.sparseSize],
    [undefined, 64, 256 * 1024, 4096],
  );
  assertEquals([config.extents, config.allocated, config.flush, config.progress], [
    true,
    false,
    false,
    false,
  ]);
});

Deno.test("parseCopyArgs() takes [ CMD ] groups whole, options inside included", () => {
  const config = parseCopyArgs([
    "-C",
    "2",
    "--",
    "[",
    "qemu-nbd",
    "-f",
    "qcow2",
    "--help-me",
    "img.qcow2",
    "]",
    "[",
    "nbdkit",
    "memory",
    "1G",
    "]",
  ]);
  assertEquals(config.source, {
    kind: "command",
    argv: ["qemu-nbd", "-f", "qcow2", "--help-me", "img.qcow2"],
  });
  assertEquals(config.destination, { kind: "command", argv: ["nbdkit", "memory", "1G"] });
  assertEquals(config.connections, 2);
  assertThrows(
    () => parseCopyArgs(["[", "nbdkit", "memory", "1G", "out.img"]),
    UsageError,
    "matching",
  );
});

Deno.test("parseCopyArgs() reads the progress options with and without a descriptor", () => {
  assertEquals(parseCopyArgs(["-p", "-", "null:"]).progress, true);
  const config = parseCopyArgs(["--progress=3", "--progress-json", "https://h/x", "-"]);
  assertEquals([config.progress, config.progressFd, config.progressJson], [false, 3, "stderr"]);
  assertEquals(config.source, { kind: "http", url: "https://h/x" });
  assertEquals(config.destination, { kind: "stdio" });
  assertEquals(parseCopyArgs(["--progress-json=5", "a", "null:"]).progressJson, 5);
  assertThrows(() => parseCopyArgs(["--progress=x", "a", "b"]), UsageError, "file descriptor");
});

Deno.test("parseCopyArgs() checks sizes and counts, and --synchronous means one of each", () => {
  assertEquals(parseCopyArgs(["--request-size=1M", "-S", "0", "a", "b"]).requestSize, 1 << 20);
  assertEquals(parseCopyArgs(["-S", "0", "a", "b"]).sparseSize, 0);
  assertThrows(() => parseCopyArgs(["--request-size=3000", "a", "b"]), UsageError, "power of two");
  assertThrows(() => parseCopyArgs(["--request-size=64M", "a", "b"]), UsageError, "power of two");
  assertThrows(() => parseCopyArgs(["-R", "0", "a", "b"]), UsageError, "--requests");
  assertThrows(() => parseCopyArgs(["-S", "1000", "a", "b"]), UsageError, "--sparse");
  const sync = parseCopyArgs(["--synchronous", "-C", "8", "a", "b"]);
  assertEquals([sync.connections, sync.requests], [1, 1]);
  assertThrows(() => parseCopyArgs(["a"]), UsageError, "SOURCE and a DESTINATION");
  assertThrows(() => parseCopyArgs(["--bogus", "a", "b"]), UsageError);
  assertEquals(parseCopyArgs(["--target-is-zero", "a", "b"]).destinationIsZero, true);
});

Deno.test("defaultSourceConnections(): 4 from TCP into a file, else the endpoint's default", () => {
  const file = { kind: "path", path: "out.img" } as const;
  const nul = { kind: "null" } as const;
  for (const uri of ["nbd://localhost/", "nbd://example.com/disk"]) {
    assertEquals(defaultSourceConnections({ kind: "nbd", uri }, file), 4, uri);
    assertEquals(defaultSourceConnections({ kind: "nbd", uri }, nul), undefined, uri);
  }
  assertEquals(
    defaultSourceConnections({ kind: "nbd", uri: "nbd+unix:///?socket=/tmp/s" }, file),
    undefined,
  );
  assertEquals(defaultSourceConnections({ kind: "path", path: "in.img" }, file), undefined);
});

Deno.test("defaultThreads(): one into a file, the processors shared with a server here", () => {
  const unix = { kind: "nbd", uri: "nbd+unix:///?socket=/tmp/s" } as const;
  const tcp = { kind: "nbd", uri: "nbd://example.com/disk" } as const;
  const command = { kind: "command" as const, argv: ["nbdkit", "memory", "1G"] };
  const file = { kind: "path", path: "out.img" } as const;
  const nul = { kind: "null" } as const;
  const processors = localConnections();
  const half = Math.max(1, Math.floor(processors / 2));
  assertEquals(defaultThreads(unix, nul), Math.max(1, processors - 1));
  assertEquals(defaultThreads(command, nul), Math.max(1, processors - 1));
  assertEquals(defaultThreads(tcp, nul), 4);
  assertEquals(defaultThreads(file, nul), processors);
  for (const source of [unix, command, tcp, file]) assertEquals(defaultThreads(source, file), 1);
  assertEquals(defaultThreads(file, unix), half);
  assertEquals(defaultThreads(unix, command), half);
  assertEquals(defaultThreads(tcp, unix), half);
  assertEquals(defaultThreads(file, tcp), 4);
  assertEquals(defaultThreads(tcp, tcp), 4);
  // TCP to this machine counts as local.
  for (const uri of ["nbd://localhost/", "nbd://127.0.0.1:10809/disk", "nbds://[::1]/"]) {
    const loopback = { kind: "nbd", uri } as const;
    assertEquals(defaultThreads(loopback, nul), Math.max(1, processors - 1), uri);
    assertEquals(defaultThreads(file, loopback), half, uri);
    assertEquals(defaultThreads(loopback, tcp), half, uri);
  }
});

Deno.test("defaultRequests(): 32 with a server on this machine and nothing across a network", () => {
  const unix = { kind: "nbd", uri: "nbd+unix:///?socket=/tmp/s" } as const;
  const loopback = { kind: "nbd", uri: "nbd://127.0.0.1/" } as const;
  const tcp = { kind: "nbd", uri: "nbd://example.com/disk" } as const;
  const command = { kind: "command" as const, argv: ["nbdkit", "memory", "1G"] };
  const file = { kind: "path", path: "out.img" } as const;
  const nul = { kind: "null" } as const;
  const http = { kind: "http", url: "http://example.com/disk.img" } as const;
  for (const [source, destination] of [[unix, nul], [unix, file], [file, unix], [unix, command]]) {
    assertEquals(defaultRequests(source!, destination!), 32);
  }
  assertEquals(defaultRequests(loopback, file), 32);
  assertEquals(defaultRequests(tcp, file), 64);
  assertEquals(defaultRequests(unix, tcp), 64);
  assertEquals(defaultRequests(http, unix), 64);
  assertEquals(defaultRequests(file, file), 64);
  assertEquals(parseCopyArgs(["nbd+unix:///?socket=/tmp/s", "out.img"]).requests, 32);
  assertEquals(parseCopyArgs(["nbd://example.com/disk", "out.img"]).requests, 64);
  assertEquals(parseCopyArgs(["-R", "64", "nbd+unix:///?socket=/tmp/s", "null:"]).requests, 64);
  assertEquals(parseCopyArgs(["--synchronous", "nbd+unix:///?socket=/tmp/s", "null:"]).requests, 1);
});

Deno.test("parseCopyArgs() reads --state, --resume and --retry[=N], and refuses what cannot resume", () => {
  const plain = parseCopyArgs(["a", "b"]);
  assertEquals([plain.state, plain.resume, plain.retry], [undefined, false, 0]);
  const resumed = parseCopyArgs(["--state=s", "--resume", "--retry", "a", "nbd://h/e"]);
  assertEquals([resumed.state, resumed.resume, resumed.retry], ["s", true, DEFAULT_RETRIES]);
  assertEquals(parseCopyArgs(["--retry=3", "a", "b"]).retry, 3);
  assertThrows(() => parseCopyArgs(["--retry=0", "a", "b"]), UsageError, "--retry");
  assertThrows(() => parseCopyArgs(["--resume", "a", "b"]), UsageError, "--resume needs --state");
  for (const ends of [["a", "null:"], ["-", "b"], ["a", "-"], ["https://h/x", "b"]]) {
    assertThrows(() => parseCopyArgs(["--state=s", ...ends]), UsageError, "random access");
  }
  assertThrows(
    () => parseCopyArgs(["--state=s", "-O", "qcow2", "a", "b"]),
    UsageError,
    "raw images only",
  );
});
