/**
 * TLS through the loopback bridge (io/loopback_bridge.ts): the runtime's
 * own TLS over Unix sockets and with client certificates, against nbdkit
 * with and without --tls-verify-peer; the bridge's own checks (only this
 * process's connection is joined, one connection, then closed); the
 * refusals (a CA that did not sign the server's certificate, TLS-PSK) and
 * a handshake that never comes.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  eventually,
  freePort,
  LINUX_PATHS,
  nbdExecutable,
  peers,
  randomBytes,
  run,
  type ServerProcess,
  startServer,
  tempDir,
} from "./helpers.ts";
import { makeCertificates } from "./certs.ts";
import { NbdClient } from "../client/client.ts";
import { NbdHandshake } from "../client/handshake.ts";
import { openLoopbackBridge, ownConnection, procAddress } from "../io/loopback_bridge.ts";
import { fromDenoConn } from "../io/byte_stream.ts";

const MiB = 1 << 20;

/** How many of this process's descriptors are TCP sockets (any state). */
function ownTcpSockets(): number {
  const inodes = new Set<string>();
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of Deno.readTextFileSync(table).split("\n").slice(1)) {
      const inode = line.trim().split(/\s+/)[9];
      if (inode && inode !== "0") inodes.add(`socket:[${inode}]`);
    }
  }
  let count = 0;
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    try {
      if (inodes.has(Deno.readLinkSync(`/proc/self/fd/${entry.name}`))) count++;
    } catch { /* closed meanwhile */ }
  }
  return count;
}

/** Starts nbdkit with `args` on 127.0.0.1:`port`; a ServerProcess that stops it. */
async function nbdkitTcp(port: number, args: string[]): Promise<ServerProcess> {
  const child = new Deno.Command("nbdkit", {
    args: ["-f", "-p", String(port), "-i", "127.0.0.1", ...args],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let stderr = "";
  const gathered = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) stderr += decoder.decode(chunk, { stream: true });
  })();
  const server: ServerProcess = {
    uri: `nbd://localhost:${port}/`,
    child,
    stderr: () => stderr,
    async [Symbol.asyncDispose]() {
      child.kill("SIGTERM");
      await child.status;
      await gathered;
    },
  };
  for (let i = 0;; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return server;
    } catch (error) {
      if (i >= 300) {
        await server[Symbol.asyncDispose]();
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

for (const transport of ["unix", "tcp"] as const) {
  for (const verifyPeer of [false, true]) {
    Deno.test({
      name: `bridged TLS over ${transport}${
        verifyPeer ? ", client certificate checked" : ""
      }: byte-exact both ways, closed cleanly`,
      ...peers("nbdkit", "openssl"),
      async fn() {
        await using dir = await tempDir();
        await makeCertificates(dir.path);
        const size = 3 * MiB;
        const args = [
          "--tls=require",
          `--tls-certificates=${dir.path}`,
          ...(verifyPeer ? ["--tls-verify-peer"] : []),
          "memory",
          String(size),
        ];
        await using server = transport === "unix"
          ? await startServer("nbdkit", ["-f", "-U", "$SOCKET", ...args])
          : await nbdkitTcp(freePort(), args);
        const uri = transport === "unix"
          ? `nbds+unix:///?socket=${server.socket}&tls-certificates=${dir.path}`
          : `${server.uri.replace("nbd:", "nbds:")}?tls-certificates=${dir.path}`;
        const input = randomBytes(size, transport === "unix" ? 31 : 32);
        const before = ownTcpSockets();
        {
          await using writer = await NbdClient.connect(uri);
          // The bridge: two loopback sockets of ours (its accepted end and the TLS client's).
          const bridge = transport === "unix" ? 2 : 3;
          if (LINUX_PATHS) assertEquals(ownTcpSockets() - before, bridge, "a loopback bridge");
          await writer.pwrite(input, 0);
          await writer.flush();
        }
        {
          await using reader = await NbdClient.connect(uri);
          const out = new Uint8Array(size);
          await reader.pread(out, 0);
          assertBytes(out, input);
        }
        assertOk(await eventually(() => ownTcpSockets() === before), "the bridges are gone");
        // A whole copy process: all data, and every connection ends with the TLS closure.
        const copied = await run(await nbdExecutable(), ["copy", uri, `${dir.path}/out.img`]);
        assertEquals(copied.code, 0, copied.stderr);
        assertBytes(await Deno.readFile(`${dir.path}/out.img`), input);
        assertOk(!/non-properly|gnutls/i.test(server.stderr()), server.stderr());
      },
    });
  }
}

Deno.test({
  name: "bridged TLS: a CA that did not sign the server's certificate is refused in one line",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    await Deno.mkdir(`${dir.path}/server`);
    await Deno.mkdir(`${dir.path}/other`);
    await makeCertificates(`${dir.path}/server`);
    await makeCertificates(`${dir.path}/other`);
    await using server = await startServer("nbdkit", [
      ...["-f", "-U", "$SOCKET", "--tls=require", `--tls-certificates=${dir.path}/server`],
      ...["memory", "1M"],
    ]);
    const before = ownTcpSockets();
    const uri = `nbds+unix:///?socket=${server.socket}&tls-certificates=${dir.path}/other`;
    let message = "";
    try {
      (await NbdClient.connect(uri)).close();
    } catch (error) {
      message = (error as Error).message;
    }
    assertIncludes(message, `TLS handshake with Unix socket ${server.socket} failed`);
    assertEquals(message.split("\n").length, 1, message);
    assertOk(await eventually(() => ownTcpSockets() === before), "the bridge is closed");
  },
});

Deno.test({
  name: "bridged TLS: the name is checked when there is one, only the chain without one",
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using dir = await tempDir();
    // A certificate for another name: right chain, wrong name for localhost.
    await makeCertificates(dir.path, { serverNames: ["server.example"] });
    const port = freePort();
    const tls = ["--tls=require", `--tls-certificates=${dir.path}`, "memory", "1M"];
    await using _tcp = await nbdkitTcp(port, tls);
    await using unix = await startServer("nbdkit", ["-f", "-U", "$SOCKET", ...tls]);
    const failure = async (uri: string) => {
      try {
        (await NbdClient.connect(uri)).close();
        return "";
      } catch (error) {
        return (error as Error).message;
      }
    };
    // TCP to localhost with a client certificate (the bridge): the name must match.
    const byName = await failure(`nbds://localhost:${port}/?tls-certificates=${dir.path}`);
    assertIncludes(byName, `TLS handshake with localhost:${port} failed`);
    assertEquals(byName.split("\n").length, 1, byName);
    // A Unix socket without tls-hostname: the chain alone, which is right.
    const unixUri = `nbds+unix:///?socket=${unix.socket}&tls-certificates=${dir.path}`;
    assertEquals(await failure(unixUri), "");
    // With tls-hostname=localhost the bridge checks that name, which the certificate lacks.
    const named = await failure(`${unixUri}&tls-hostname=localhost`);
    assertIncludes(named, "TLS handshake with Unix socket");
  },
});

Deno.test("TLS-PSK is refused in one line before connecting", async () => {
  let message = "";
  try {
    await NbdClient.connect("nbds+unix:///?socket=/nonexistent/sock&tls-psk-file=/nonexistent/k");
  } catch (error) {
    message = (error as Error).message;
  }
  assertIncludes(message, "TLS-PSK is not supported");
  assertEquals(message.split("\n").length, 1, message);
});

/**
 * A server on a Unix socket that greets, acknowledges NBD_OPT_STARTTLS and
 * then says nothing more.
 */
function silentAfterStartTls(path: string): { done: Promise<void> } & Disposable {
  const listener = Deno.listen({ transport: "unix", path });
  let conn: Deno.Conn | undefined;
  const done = (async () => {
    conn = await listener.accept();
    const greeting = new Uint8Array(18);
    greeting.set(new TextEncoder().encode("NBDMAGICIHAVEOPT"));
    greeting[17] = 3; // fixed newstyle, no zeroes
    await conn.write(greeting);
    const request = new Uint8Array(4 + 16);
    for (let got = 0; got < request.length;) {
      const n = await conn.read(request.subarray(got));
      if (n === null) return;
      got += n;
    }
    const reply = new Uint8Array(20);
    const view = new DataView(reply.buffer);
    view.setBigUint64(0, 0x3e889045565a9n);
    view.setUint32(8, new DataView(request.buffer).getUint32(12)); // the option
    view.setUint32(12, 1); // NBD_REP_ACK
    await conn.write(reply);
    // Silence: wait for the client to give up.
    while (await conn.read(new Uint8Array(4096)) !== null) { /* the client's hello */ }
  })().catch(() => {});
  return {
    done,
    [Symbol.dispose]() {
      listener.close();
      try {
        conn?.close();
      } catch { /* closed by the client going away */ }
    },
  };
}

Deno.test({
  name: "bridged TLS: a peer that never answers the TLS hello times out, nothing left open",
  ...peers("openssl"),
  async fn() {
    await using dir = await tempDir();
    await makeCertificates(dir.path);
    const path = `${dir.path}/sock`;
    using server = silentAfterStartTls(path);
    const before = ownTcpSockets();
    const started = Date.now();
    let message = "";
    try {
      await NbdHandshake.open(`nbds+unix:///?socket=${path}&tls-certificates=${dir.path}`, {
        timeout: 1,
      });
    } catch (error) {
      message = (error as Error).message;
    }
    const took = Date.now() - started;
    assertOk(/timed out|stalled/.test(message), message);
    assertEquals(message.split("\n").length, 1, message);
    assertOk(took < 5000, `gave up after ${took} ms`);
    await server.done;
    assertOk(await eventually(() => ownTcpSockets() === before), "the bridge is closed");
  },
});

Deno.test({
  name: "loopback bridge: joins only this process's connection, once, and copies both ways",
  ...peers("bash"),
  ignore: !LINUX_PATHS,
  async fn() {
    // The other side: a plain TCP pair, `far` playing the server.
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const near = await Deno.connect({
      hostname: "127.0.0.1",
      port: (listener.addr as Deno.NetAddr).port,
    });
    const far = await listener.accept();
    listener.close();
    const bridge = openLoopbackBridge(fromDenoConn(near));
    await far.write(new TextEncoder().encode("hello"));
    // Another process connects first: it is closed without a byte.
    const foreign = await run("bash", [
      "-c",
      'exec 3<>"/dev/tcp/127.0.0.1/$0" && timeout 5 cat <&3 | wc -c',
      String(bridge.port),
    ]);
    assertEquals(foreign.stdout.trim(), "0", foreign.stderr);
    const own = await Deno.connect({ hostname: bridge.hostname, port: bridge.port });
    await bridge.joined;
    const buf = new Uint8Array(16);
    assertEquals(new TextDecoder().decode(buf.subarray(0, (await own.read(buf))!)), "hello");
    await own.write(new TextEncoder().encode("back"));
    assertEquals(new TextDecoder().decode(buf.subarray(0, (await far.read(buf))!)), "back");
    // One connection only: the listener is gone.
    let refused = false;
    try {
      (await Deno.connect({ hostname: bridge.hostname, port: bridge.port })).close();
    } catch (error) {
      refused = error instanceof Deno.errors.ConnectionRefused;
    }
    assertOk(refused, "the listener is closed after the first connection");
    // Closing one end closes the other.
    own.close();
    await bridge.finished;
    assertEquals(await far.read(buf), null);
    far.close();
  },
});

Deno.test({
  name: "loopback bridge: a connection is ours only if its socket is among our descriptors",
  ignore: !LINUX_PATHS,
  async fn() {
    assertEquals(
      procAddress({ transport: "tcp", hostname: "127.0.0.1", port: 8080 }),
      "0100007F:1F90",
    );
    assertEquals(
      procAddress({ transport: "tcp", hostname: "::1", port: 1 }),
      "00000000000000000000000001000000:0001",
    );
    assertEquals(procAddress({ transport: "tcp", hostname: "localhost", port: 1 }), undefined);
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const client = await Deno.connect({
      hostname: "127.0.0.1",
      port: (listener.addr as Deno.NetAddr).port,
    });
    const accepted = await listener.accept();
    const peer = accepted.remoteAddr as Deno.NetAddr;
    const local = accepted.localAddr as Deno.NetAddr;
    assertOk(ownConnection(peer, local), "our own client socket");
    // The accepted end seen from the other side is ours too; an unknown peer port is not.
    assertOk(ownConnection(local, peer), "our accepted socket");
    const unknown = { ...peer, port: peer.port === 65535 ? 65534 : peer.port + 1 };
    assertOk(!ownConnection(unknown, local), "no such socket");
    client.close();
    accepted.close();
    listener.close();
  },
});
