import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { linuxPaths, ROOT, run, tempDir } from "../tests/helpers.ts";
import {
  adoptListeningSocket,
  duplicateDescriptor,
  newListeningDescriptors,
  socketDescriptors,
} from "./listening_fds.ts";

/** A listening socket of the runtime's, and a second descriptor for it (the "inherited" one). */
function rawListeningSocket(
  options: Deno.TcpListenOptions | Deno.UnixListenOptions & { transport: "unix" },
): { original: Deno.Listener; fd: number } {
  const before = socketDescriptors();
  const original = Deno.listen(options as Deno.TcpListenOptions);
  const found = newListeningDescriptors(before);
  assertOk(found && found.length === 1, `one new listening socket: ${found}`);
  const fd = duplicateDescriptor(found[0]!);
  assertOk(fd !== null, "dup");
  return { original, fd };
}

function isOpen(fd: number): boolean {
  try {
    Deno.readLinkSync(`/proc/self/fd/${fd}`);
    return true;
  } catch {
    return false;
  }
}

/** Fails after `ms` rather than hanging when an accept never wakes up. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no wake-up within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Accepts on `listener` (already waiting before the client connects), then echoes both ways. */
async function roundTrip(listener: Deno.Listener, connect: () => Promise<Deno.Conn>) {
  const accepted = listener.accept();
  // Let the accept find nothing and wait on the poller: only a readiness event can wake it now.
  await new Promise((resolve) => setTimeout(resolve, 50));
  const client = await connect();
  const server = await within(accepted, 5000, "accept");
  const sent = crypto.getRandomValues(new Uint8Array(4096));
  await client.write(sent);
  const got = new Uint8Array(sent.length);
  let n = 0;
  while (n < got.length) n += (await within(server.read(got.subarray(n)), 5000, "read"))!;
  assertBytes(got, sent);
  await server.write(got.subarray(0, 100));
  const back = new Uint8Array(100);
  let m = 0;
  while (m < back.length) m += (await client.read(back.subarray(m)))!;
  assertBytes(back, sent.subarray(0, 100));
  client.close();
  server.close();
}

Deno.test(
  "adoptListeningSocket: a TCP socket becomes a runtime listener that wakes up on connect",
  linuxPaths("adopting listening sockets"),
  async () => {
    const { original, fd } = rawListeningSocket({ hostname: "127.0.0.1", port: 0 });
    const port = (original.addr as Deno.NetAddr).port;
    original.close();
    const listener = adoptListeningSocket(fd);
    assertOk(listener, "adopted");
    assertOk(!isOpen(fd) || !Deno.readLinkSync(`/proc/self/fd/${fd}`).startsWith("socket:"));
    assertEquals(listener.addr, { transport: "tcp", hostname: "127.0.0.1", port });
    for (let i = 0; i < 3; i++) {
      await roundTrip(listener, async () => {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        assertEquals((conn.remoteAddr as Deno.NetAddr).port, port);
        return conn;
      });
    }
    listener.close();
    // Closing the listener closes the adopted socket.
    let refused = false;
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
    } catch (error) {
      refused = error instanceof Deno.errors.ConnectionRefused;
    }
    assertOk(refused, "no one listens after close");
  },
);

Deno.test(
  "adoptListeningSocket: a Unix socket becomes a runtime listener; accept ends on close",
  linuxPaths("adopting listening sockets"),
  async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/socket`;
    // The original stays open (its close would remove the path) but never accepts.
    const { original, fd } = rawListeningSocket({ transport: "unix", path });
    const listener = adoptListeningSocket(fd);
    assertOk(listener, "adopted");
    assertEquals(listener.addr, { transport: "unix", path });
    await roundTrip(listener, () => Deno.connect({ transport: "unix", path }));
    const pending = listener.accept().then(() => "accepted", (error) => error.name);
    listener.close();
    assertEquals(await within(pending, 5000, "accept after close"), "BadResource");
    original.close();
  },
);

Deno.test(
  "adoptListeningSocket: works in a worker thread, which has a poller of its own",
  linuxPaths("adopting listening sockets"),
  async () => {
    const { original, fd } = rawListeningSocket({ hostname: "127.0.0.1", port: 0 });
    const port = (original.addr as Deno.NetAddr).port;
    original.close();
    const code = `
      import { adoptListeningSocket } from ${JSON.stringify(`file://${ROOT}/io/listening_fds.ts`)};
      self.onmessage = async (event) => {
        const listener = adoptListeningSocket(event.data);
        self.postMessage(listener ? "adopted" : "refused");
        if (!listener) return;
        const conn = await listener.accept();
        const buf = new Uint8Array(64);
        const n = await conn.read(buf);
        await conn.write(buf.subarray(0, n).reverse());
        conn.close();
        listener.close();
        self.postMessage("done");
      };
    `;
    const url = URL.createObjectURL(new Blob([code], { type: "application/javascript" }));
    const worker = new Worker(url, { type: "module" });
    try {
      const messages: string[] = [];
      const next = () =>
        new Promise<string>((resolve) => {
          worker.onmessage = (event) => resolve(event.data);
        });
      let reply = next();
      worker.postMessage(fd);
      messages.push(await within(reply, 5000, "worker"));
      assertEquals(messages, ["adopted"]);
      reply = next();
      await new Promise((resolve) => setTimeout(resolve, 50));
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      await conn.write(new Uint8Array([1, 2, 3]));
      const buf = new Uint8Array(3);
      let n = 0;
      while (n < 3) n += (await within(conn.read(buf.subarray(n)), 5000, "echo"))!;
      assertBytes(buf, new Uint8Array([3, 2, 1]));
      conn.close();
      assertEquals(await within(reply, 5000, "worker end"), "done");
    } finally {
      worker.terminate();
      URL.revokeObjectURL(url);
    }
  },
);

Deno.test(
  "adoptListeningSocket: refuses what is not a listening stream socket, leaving it open",
  linuxPaths("adopting listening sockets"),
  async () => {
    await using dir = await tempDir();
    const file = await Deno.open(`${dir.path}/f`, { write: true, create: true });
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const before = socketDescriptors();
    const client = await Deno.connect({
      hostname: "127.0.0.1",
      port: (listener.addr as Deno.NetAddr).port,
    });
    const server = await listener.accept();
    const connected = [...socketDescriptors().keys()].filter((fd) => !before.has(fd));
    assertOk(connected.length === 2, `two connection sockets: ${connected}`);
    for (const fd of connected) {
      assertEquals(adoptListeningSocket(fd), null);
      assertOk(isOpen(fd), `descriptor ${fd} still open`);
    }
    // The connection still works.
    await client.write(new Uint8Array([7]));
    const one = new Uint8Array(1);
    assertEquals(await server.read(one), 1);
    client.close();
    server.close();
    listener.close();
    file.close();
  },
);

Deno.test("adoptListeningSocket: null with NBD_PORTABLE=1, the socket left as it was", async () => {
  const script = `
    import { adoptListeningSocket } from ${JSON.stringify(`file://${ROOT}/io/listening_fds.ts`)};
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const fds = [...Deno.readDirSync("/proc/self/fd")].map((e) => Number(e.name));
    console.log(JSON.stringify(fds.map((fd) => adoptListeningSocket(fd))));
    const conn = await Deno.connect(listener.addr);
    (await listener.accept()).close();
    conn.close();
    console.log("still listening");
  `;
  const result = await run(Deno.execPath(), ["eval", script], {
    env: { NBD_PORTABLE: "1" },
  });
  assertEquals(result.code, 0, result.stderr);
  const [adopted, after] = result.stdout.trim().split("\n");
  assertOk((JSON.parse(adopted!) as unknown[]).every((x) => x === null), adopted);
  assertEquals(after, "still listening");
});
