import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { BufferedReader } from "./buffered_reader.ts";
import { fromDenoConn, writeAll } from "./byte_stream.ts";
import { platform } from "./platform.ts";
import { acceptedFd, connectWithFd, SocketFastPath } from "./socket_fast.ts";

const linux = Deno.build.os === "linux";

/**
 * A Unix socket echo server in another process (sockets of this process
 * appearing on accept would hide which one a connection got); stopped on
 * dispose.
 */
async function echoServer() {
  const dir = await Deno.makeTempDir({ prefix: "nbd-fast" });
  const path = `${dir}/echo.sock`;
  const script = `
    const listener = Deno.listen({ transport: "unix", path: ${JSON.stringify(path)} });
    console.log("ready");
    for await (const conn of listener) {
      (async () => {
        const buf = new Uint8Array(65536);
        try {
          while (true) {
            const n = await conn.read(buf);
            if (n === null) break;
            let done = 0;
            while (done < n) done += await conn.write(buf.subarray(done, n));
          }
        } catch { /* the client went away */ }
        conn.close();
      })();
    }`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", script],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.getReader();
  const { value } = await reader.read();
  reader.releaseLock();
  if (!new TextDecoder().decode(value).includes("ready")) throw new Error("echo server failed");
  return {
    path,
    async [Symbol.asyncDispose]() {
      child.kill();
      await child.status;
      await child.stdout.cancel().catch(() => {});
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test({
  name: "connectWithFd: connections opened together never get each other's descriptor",
  ignore: !linux,
  async fn() {
    await using server = await echoServer();
    const opened = await Promise.all(
      Array.from(
        { length: 8 },
        () => connectWithFd(() => Deno.connect({ transport: "unix", path: server.path })),
      ),
    );
    try {
      const fds = opened.map((o) => o.fd);
      // Opened one at a time within this thread, every connection finds its own.
      assertEquals(fds.includes(undefined), false, "a connection's descriptor was not found");
      assertEquals(new Set(fds).size, fds.length, "a descriptor was given to two connections");
      // Each connection's token, sent through the runtime, comes back on the descriptor found.
      for (const [i, { conn, fd }] of opened.entries()) {
        const fast = SocketFastPath.create(fd)!;
        const token = new TextEncoder().encode(`connection ${i}`);
        await writeAll(conn, token);
        const got = new Uint8Array(token.length);
        let filled = 0;
        while (filled < got.length) {
          const n = fast.read(got.subarray(filled)) ?? await conn.read(got.subarray(filled));
          assertOk(n !== null, "unexpected end of stream");
          filled += n;
        }
        assertBytes(got, token);
      }
      const alone = await connectWithFd(() =>
        Deno.connect({ transport: "unix", path: server.path })
      );
      assertOk(alone.fd !== undefined, "a lone connection's descriptor was not found");
      alone.conn.close();
    } finally {
      for (const { conn } of opened) conn.close();
    }
  },
});

Deno.test({
  name: "fromDenoConn: synchronous reads and writes carry the data; none after close",
  ignore: !linux,
  async fn() {
    await using server = await echoServer();
    const { conn, fd } = await connectWithFd(() =>
      Deno.connect({ transport: "unix", path: server.path })
    );
    assertOk(fd !== undefined);
    const stream = fromDenoConn(conn, fd);
    assertOk(stream.tryRead && stream.tryWrite, "no fast path on a plain Unix connection");
    const data = new Uint8Array(3 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >>> 12)) & 0xff;
    // More than the socket buffers hold: the writes must fall back to waiting.
    const writing = writeAll(stream, data);
    const back = new Uint8Array(data.length);
    await new BufferedReader(stream).readInto(back);
    await writing;
    assertBytes(back, data);
    stream.close();
    assertEquals(stream.tryRead(new Uint8Array(1)), undefined);
    assertEquals(stream.tryWrite(new Uint8Array(1)), 0);
  },
});

Deno.test("BufferedReader: a source that always has data still lets timers run", async () => {
  let asyncReads = 0;
  const source = {
    // Like the runtime's own reads, an asynchronous read completes on a later turn of the event loop.
    read(buf: Uint8Array): Promise<number | null> {
      asyncReads++;
      buf.fill(1);
      return new Promise((resolve) => setTimeout(() => resolve(buf.length), 0));
    },
    tryRead(buf: Uint8Array): number {
      buf.fill(1);
      return Math.min(buf.length, 4096);
    },
  };
  const reader = new BufferedReader(source, 8192);
  let timerRan = false;
  setTimeout(() => timerRan = true, 0);
  const started = performance.now();
  while (!timerRan && performance.now() - started < 5000) {
    await reader.readInto(new Uint8Array(1 << 20));
  }
  assertOk(timerRan, "a timer never ran while the reader had data");
  assertOk(asyncReads > 0);
});

Deno.test({
  name: "acceptedFd finds each accepted connection's own descriptor (Unix and TCP)",
  ignore: !linux || !platform().linuxFast,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-accept" });
    const unix = Deno.listen({ transport: "unix", path: `${dir}/s.sock` });
    const tcp = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const opened: Deno.Conn[] = [];
    try {
      for (const listener of [unix, tcp, unix, tcp, unix]) {
        const client = await (listener === unix
          ? Deno.connect({ transport: "unix", path: `${dir}/s.sock` })
          : Deno.connect({ hostname: "127.0.0.1", port: (tcp.addr as Deno.NetAddr).port }));
        const accepted = await listener.accept();
        opened.push(client, accepted);
        const fd = acceptedFd(accepted);
        assertOk(fd !== undefined, "the accepted connection's descriptor was not found");
        // A token sent on the descriptor found arrives at this connection's client.
        const token = new TextEncoder().encode(`to ${opened.length}`);
        assertEquals(SocketFastPath.create(fd)!.write(token), token.length);
        const got = new Uint8Array(token.length);
        await new BufferedReader(client).readInto(got);
        assertBytes(got, token);
      }
    } finally {
      for (const conn of opened) conn.close();
      unix.close();
      tcp.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
