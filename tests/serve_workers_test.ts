/**
 * `nbd serve --workers N`: several threads accept on the same socket. Data
 * read by several clients at once is byte-exact, writes through one
 * connection are read back through the others (the memory plugin's disk is
 * shared between the threads), socket activation can start workers too,
 * a stop signal ends the server and its workers promptly, and what cannot
 * be shared is refused with one line.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { assertBytes, assertEquals, assertMatch, assertOk } from "./assert.ts";
import {
  linuxPaths,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  tempDir,
} from "./helpers.ts";

const MIB = 1024 * 1024;

/** Threads of process `pid` that have used processor time (the main thread and busy workers). */
async function busyThreads(pid: number): Promise<number> {
  let busy = 0;
  for await (const entry of Deno.readDir(`/proc/${pid}/task`)) {
    const stat = await Deno.readTextFile(`/proc/${pid}/task/${entry.name}/stat`).catch(() => "");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // utime + stime, in clock ticks: 5 ticks is far more than an idle helper thread uses.
    if (Number(fields[11]) + Number(fields[12]) >= 5) busy++;
  }
  return busy;
}

Deno.test(
  "serve --workers: 8 clients read a file at once, byte-exact, on several threads",
  linuxPaths("--workers", peers("nbdcopy")),
  async () => {
    await using dir = await tempDir();
    const image = `${dir.path}/image`;
    const data = randomBytes(16 * MIB, 23);
    await Deno.writeFile(image, data);
    await using server = await startNbdServe(["--workers", "3", "-r", "file", image]);
    const pid = server.child.pid;
    const idleThreads = await busyThreads(pid);
    const copies = Array.from({ length: 8 }, (_, i) => `${dir.path}/copy${i}`);
    // Two rounds: the kernel hands each accept to whichever thread takes it first.
    for (let round = 0; round < 2; round++) {
      await Promise.all(copies.map((copy) => runOk("nbdcopy", ["-C", "1", server.uri, copy])));
      for (const copy of copies) assertBytes(await Deno.readFile(copy), data, copy);
    }
    const busy = await busyThreads(pid);
    assertOk(busy > idleThreads, `threads with work: ${idleThreads} idle, ${busy} after`);
  },
);

Deno.test(
  "serve --workers: memory writes on one connection are read on every other",
  linuxPaths("--workers"),
  async () => {
    await using server = await startNbdServe(["--workers", "4", "memory", "16M"]);
    // Connections stay open together, so the accepts spread over the threads.
    const clients = await Promise.all(
      Array.from({ length: 8 }, () => NbdClient.connect(server.uri)),
    );
    try {
      for (const client of clients) assertOk(client.capabilities().multiConn);
      const blocks = clients.map((_, i) => randomBytes(MIB + 4096 * i, 100 + i));
      await Promise.all(clients.map((client, i) => client.pwrite(blocks[i]!, i * 2 * MIB)));
      await Promise.all(clients.map((client) => client.flush()));
      for (const [reader, client] of clients.entries()) {
        for (const [writer, block] of blocks.entries()) {
          const got = new Uint8Array(block.length);
          await client.pread(got, writer * 2 * MIB);
          assertBytes(got, block, `connection ${reader} reading connection ${writer}'s write`);
        }
      }
      // Zeroing through one connection is seen by the others, holes included.
      await clients[0]!.zero(2 * MIB, 2 * MIB);
      const got = new Uint8Array(2 * MIB);
      await clients[7]!.pread(got, 2 * MIB);
      assertBytes(got, new Uint8Array(2 * MIB), "zeroed range");
      const extents = await clients[5]!.extents(2 * MIB, 2 * MIB);
      assertEquals(extents[0]!.length, 2 * MIB);
      assertEquals(extents[0]!.flags & 3, 3, "zeroed pages read back as a hole");
    } finally {
      await Promise.all(clients.map((client) => client.close()));
    }
  },
);

Deno.test(
  "serve --workers: SIGTERM and SIGINT stop the server and its workers, with clients connected",
  linuxPaths("--workers"),
  async () => {
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      const server = await startNbdServe(["--workers", "3", "memory", "8M"]);
      const clients = await Promise.all(
        Array.from({ length: 4 }, () => NbdClient.connect(server.uri)),
      );
      const started = Date.now();
      server.child.kill(signal);
      const status = await server.child.status;
      const ms = Date.now() - started;
      assertEquals(status.code, 0, `${signal}: exit status\n${server.stderr()}`);
      assertOk(ms < 5000, `${signal}: took ${ms} ms`);
      // The socket is gone and nothing listens any more.
      assertOk(
        await Deno.connect({ transport: "unix", path: server.socket! }).then(
          (conn) => (conn.close(), false),
          () => true,
        ),
        `${signal}: still accepting`,
      );
      await Promise.all(clients.map((client) => client.close().catch(() => {})));
      await server[Symbol.asyncDispose]();
    }
  },
);

Deno.test(
  "serve --workers: under socket activation, 4 connections write and read back byte-exact",
  linuxPaths("--workers", peers("nbdcopy")),
  async () => {
    await using dir = await tempDir();
    const image = `${dir.path}/image`;
    const data = randomBytes(8 * MIB, 31);
    await Deno.writeFile(image, data);
    // nbdcopy starts the server on a socket of its own (LISTEN_FDS) and writes, then reads back
    // through a second server that serves the written file the same way.
    const serve = [Deno.execPath(), "run", "-A", "--quiet", `${ROOT}/main.ts`, "serve"];
    const target = `${dir.path}/target`;
    await Deno.writeFile(target, new Uint8Array(data.length));
    await runOk("nbdcopy", [
      "-C",
      "4",
      image,
      "--",
      "[",
      ...serve,
      "--workers",
      "2",
      "file",
      target,
      "]",
    ]);
    assertBytes(await Deno.readFile(target), data, "written through the workers");
    const copy = `${dir.path}/copy`;
    await runOk("nbdcopy", [
      "-C",
      "4",
      "--",
      "[",
      ...serve,
      "--workers",
      "3",
      "-r",
      "file",
      target,
      "]",
      copy,
    ]);
    assertBytes(await Deno.readFile(copy), data, "read through the workers");
  },
);

Deno.test("serve --workers: what cannot be shared is refused with one line", async () => {
  const cases: Array<[string[], RegExp]> = [
    [["--workers", "2", "-U", "-", "data", "1 2 3"], /the data plugin cannot be served by several/],
    [["--workers", "2", "-U", "-", "--filter=cow", "memory", "1M"], /--workers cannot be combined/],
    [["--workers", "2", "--single", "memory", "1M"], /--workers needs listening sockets/],
    [["--workers", "0", "-U", "-", "memory", "1M"], /--workers: expected an integer from 1/],
  ];
  for (const [args, message] of cases) {
    const result = await run(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "serve",
      ...args,
    ]);
    assertEquals(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
    assertMatch(result.stderr, message);
  }
});
