/**
 * `nbd mount` against our server and nbdkit: data written through the
 * mounted file reads back byte-exact with nbdcopy and the reverse; fsync,
 * hole punching and zero-range show up as FLUSH, TRIM and WRITE_ZEROES in
 * the server's log; read-only mounts, mounts over a file, unaligned writes
 * to a server with a minimum block size, and `nbd umount`.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import {
  eventually,
  nbdExecutable,
  peers,
  randomBytes,
  runOk,
  type ServerProcess,
  startNbdServe,
  startServer,
} from "./helpers.ts";
import { makeCertificates } from "./certs.ts";
import { mountable, mountScratch, startMount } from "./mount_helpers.ts";

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

/** Reads a whole file with pread-style positioned reads. */
async function readRange(path: string, offset: number, length: number): Promise<Uint8Array> {
  using file = await Deno.open(path, { read: true });
  await file.seek(offset, Deno.SeekMode.Start);
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = await file.read(buf.subarray(done));
    if (n === null) break;
    done += n;
  }
  return buf.subarray(0, done);
}

/** Writes `data` at `offset` and fsyncs. */
async function writeRange(path: string, offset: number, data: Uint8Array): Promise<void> {
  using file = await Deno.open(path, { write: true });
  await file.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < data.length) done += await file.write(data.subarray(done));
  await file.sync();
}

function logText(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return "";
  }
}

/** Waits until the server's log has a line with `action` after `from` characters. */
async function logged(path: string, action: string, from: number): Promise<string> {
  const ok = await eventually(() => logText(path).slice(from).includes(` ${action} `), 5000);
  const text = logText(path).slice(from);
  assertOk(ok, `no ${action} in the server log:\n${text}`);
  return text;
}

/** Whether a log (ours: decimal; nbdkit: hex) has `action` for exactly this range. */
function hasRequest(text: string, action: string, offset: number, count: number): boolean {
  const number = (n: number) => `(?:${n}|0x${n.toString(16)})`;
  return new RegExp(` ${action} id=\\d+ offset=${number(offset)} count=${number(count)} `).test(
    text,
  );
}

async function roundTrip(start: (log: string) => Promise<ServerProcess>): Promise<void> {
  await using scratch = await mountScratch();
  const log = `${scratch.dir}/requests.log`;
  await using server = await start(log);
  await using mount = await startMount(scratch, [server.uri, scratch.mnt]);
  assertEquals(mount.file, `${await Deno.realPath(scratch.mnt)}/disk`);
  assertIncludes(mount.line, `${SIZE} bytes`);
  assertEquals((await Deno.stat(mount.file)).size, SIZE);

  // Through the file → read back with nbdcopy.
  const data = randomBytes(4 * MiB, 7);
  await writeRange(mount.file, 1 * MiB, data);
  const odd = randomBytes(1000, 8);
  await writeRange(mount.file, 12345, odd);
  await logged(log, "Flush", 0);
  const copy = `${scratch.dir}/copy.img`;
  await runOk("nbdcopy", [server.uri, copy]);
  const image = await Deno.readFile(copy);
  assertBytes(image.subarray(1 * MiB, 5 * MiB), data);
  assertBytes(image.subarray(12345, 13345), odd);

  // With nbdcopy → read back through the file (a new open sees fresh data).
  const whole = randomBytes(SIZE, 9);
  await Deno.writeFile(copy, whole);
  await runOk("nbdcopy", [copy, server.uri]);
  assertBytes(await Deno.readFile(mount.file), whole);

  // Hole punching → TRIM, and the hole reads back as zeroes; zero-range → WRITE_ZEROES.
  let mark = logText(log).length;
  await runOk("fallocate", [
    "--punch-hole",
    "--offset",
    `${2 * MiB}`,
    "--length",
    `${MiB}`,
    mount.file,
  ]);
  const trims = await logged(log, "Trim", mark);
  assertOk(hasRequest(trims, "Trim", 2 * MiB, MiB), trims);
  assertBytes(await readRange(mount.file, 2 * MiB, MiB), new Uint8Array(MiB));
  mark = logText(log).length;
  await runOk("fallocate", [
    "--zero-range",
    "--offset",
    `${4 * MiB}`,
    "--length",
    `${MiB}`,
    mount.file,
  ]);
  const zeroes = await logged(log, "Zero", mark);
  assertOk(hasRequest(zeroes, "Zero", 4 * MiB, MiB), zeroes);
  assertBytes(await readRange(mount.file, 4 * MiB, MiB), new Uint8Array(MiB));
  assertBytes(await readRange(mount.file, 5 * MiB, MiB), whole.subarray(5 * MiB, 6 * MiB));

  // nbd umount ends it: the process flushes and exits 0.
  const umount = await scratch.nbd(["umount", scratch.mnt]);
  assertEquals(umount.code, 0, umount.stderr);
  assertEquals(await mount.exited(), 0, mount.stderr());
  assertEquals(mount.stderr(), "");
}

Deno.test({
  name:
    "nbd mount (our server): file writes read back with nbdcopy and the reverse; FLUSH, TRIM, WRITE_ZEROES",
  ...mountable(),
  ...peers("nbdcopy", "fallocate"),
  async fn() {
    await roundTrip((log) =>
      startNbdServe(["--filter=log", "memory", String(SIZE), `logfile=${log}`])
    );
  },
});

Deno.test({
  name:
    "nbd mount (nbdkit): file writes read back with nbdcopy and the reverse; FLUSH, TRIM, WRITE_ZEROES",
  ...mountable(),
  ...peers("nbdkit", "nbdcopy", "fallocate"),
  async fn() {
    await roundTrip((log) =>
      startServer("nbdkit", [
        "-f",
        "-U",
        "$SOCKET",
        "--filter=log",
        "memory",
        String(SIZE),
        `logfile=${log}`,
      ])
    );
  },
});

Deno.test({
  name:
    "nbd mount: a punched hole reads as zeroes even without block status (TRIM, then WRITE_ZEROES)",
  ...mountable(),
  ...peers("nbdkit", "fallocate"),
  async fn() {
    await using scratch = await mountScratch();
    const log = `${scratch.dir}/requests.log`;
    // noextents hides base:allocation, so the client cannot see that TRIM zeroed the range.
    await using server = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      "--filter=log",
      "--filter=noextents",
      "memory",
      String(SIZE),
      `logfile=${log}`,
    ]);
    await using mount = await startMount(scratch, [server.uri, scratch.mnt]);
    await writeRange(mount.file, 0, randomBytes(2 * MiB, 3));
    const mark = logText(log).length;
    await runOk("fallocate", ["-p", "-o", "0", "-l", `${MiB}`, mount.file]);
    const text = await logged(log, "Zero", mark);
    assertOk(text.indexOf(" Trim ") < text.indexOf(" Zero "), text);
    assertBytes(await readRange(mount.file, 0, MiB), new Uint8Array(MiB));
  },
});

Deno.test({
  name:
    "nbd mount: unaligned writes to a server with a 4 KiB minimum block size (read-modify-write)",
  ...mountable(),
  ...peers("nbdkit", "nbdcopy"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      "--filter=blocksize-policy",
      "memory",
      String(SIZE),
      "blocksize-minimum=4096",
      "blocksize-error-policy=error",
    ]);
    await using mount = await startMount(scratch, [server.uri, scratch.mnt]);
    const before = randomBytes(64 * 1024, 11);
    await writeRange(mount.file, 0, before);
    const patch = randomBytes(5000, 12);
    await writeRange(mount.file, 4000, patch); // spans three 4 KiB blocks, aligned on neither end
    const expected = before.slice();
    expected.set(patch, 4000);
    const copy = `${scratch.dir}/copy.img`;
    await runOk("nbdcopy", [server.uri, copy]);
    assertBytes((await Deno.readFile(copy)).subarray(0, expected.length), expected);
    assertBytes(await readRange(mount.file, 0, expected.length), expected);
  },
});

Deno.test({
  name: "nbd mount -r over an existing file: the export replaces the file, read-only",
  ...mountable(),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", String(SIZE)]);
    const data = randomBytes(MiB, 5);
    {
      // Fill through a writable mount first.
      await using rw = await startMount(scratch, [server.uri, scratch.mnt]);
      await writeRange(rw.file, 0, data);
    }
    const target = `${scratch.dir}/image.raw`;
    await Deno.writeTextFile(target, "placeholder");
    await using mount = await startMount(scratch, ["-r", server.uri, target]);
    assertEquals(mount.file, await Deno.realPath(target));
    assertIncludes(mount.line, "read-only");
    const info = await Deno.stat(target);
    assertOk(info.isFile);
    assertEquals(info.size, SIZE);
    assertBytes(await readRange(target, 0, MiB), data);
    let refused: unknown;
    try {
      (await Deno.open(target, { write: true })).close();
    } catch (error) {
      refused = error;
    }
    assertOk(refused instanceof Error, "opening for writing should fail");
    assertIncludes(String(refused), "Read-only file system");
    const umount = await scratch.nbd(["umount", target]);
    assertEquals(umount.code, 0, umount.stderr);
    assertEquals(await mount.exited(), 0);
    assertEquals(await Deno.readTextFile(target), "placeholder");
  },
});

Deno.test({
  name: "nbd mount: several connections with multi-conn, and nbd attached --all lists the mount",
  ...mountable(),
  ...peers("nbdkit"),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", "16M"]);
    await using mount = await startMount(scratch, ["-C", "3", server.uri, scratch.mnt]);
    assertIncludes(mount.line, "3 connections");
    await readRange(mount.file, 0, 4 * MiB);
    const listed = await scratch.nbd(["attached", "--all", "--json"]);
    assertEquals(listed.code, 0, listed.stderr);
    const entries = JSON.parse(listed.stdout);
    assertEquals(entries.length, 1);
    assertEquals(entries[0].kind, "mount");
    assertEquals(entries[0].file, mount.file);
    assertEquals(entries[0].pid, mount.child.pid);
    assertEquals(entries[0].connections, 3);
    assertEquals(entries[0].stats.connections.length, 3);
    assertOk(entries[0].stats.reads > 0 && entries[0].stats.bytesRead >= 4 * MiB, listed.stdout);
    // Plain mounts are not attachments.
    assertEquals((await scratch.nbd(["attached"])).stdout, "");
  },
});

Deno.test({
  name: "nbd mount: SIGTERM unmounts and exits 0; nbd umount refuses a busy mount",
  ...mountable(),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "8M"]);
    await using mount = await startMount(scratch, [server.uri, scratch.mnt]);
    {
      using _open = await Deno.open(mount.file, { read: true });
      const busy = await scratch.nbd(["umount", scratch.mnt]);
      assertEquals(busy.code, 1);
      assertIncludes(busy.stderr, "busy");
    }
    mount.child.kill("SIGTERM");
    assertEquals(await mount.exited(), 0, mount.stderr());
  },
});

Deno.test({
  name: "nbd mount over TLS: an nbdkit export that requires TLS, with a client certificate",
  ...mountable(),
  ...peers("nbdkit", "openssl"),
  async fn() {
    await using scratch = await mountScratch();
    const certs = `${scratch.dir}/certs`;
    await Deno.mkdir(certs);
    await makeCertificates(certs);
    await using server = await startServer("nbdkit", [
      "-f",
      "-U",
      "$SOCKET",
      "--tls=require",
      `--tls-certificates=${certs}`,
      "--tls-verify-peer",
      "memory",
      "8M",
    ]);
    const socket = server.socket!;
    // Plaintext is refused by the server, and the mount says so.
    const plain = await scratch.nbd(["mount", server.uri, scratch.mnt]);
    assertEquals(plain.code, 1);
    assertIncludes(plain.stderr, "TLS");
    await using mount = await startMount(scratch, [
      `nbds+unix:///?socket=${socket}&tls-certificates=${certs}`,
      scratch.mnt,
    ]);
    const data = randomBytes(MiB, 31);
    await writeRange(mount.file, 3 * MiB, data);
    assertBytes(await readRange(mount.file, 3 * MiB, MiB), data);
  },
});

Deno.test({
  name: "nbd mount --ready-fd: the ready line also goes to the descriptor",
  ...mountable(),
  async fn() {
    await using scratch = await mountScratch();
    await using server = await startNbdServe(["memory", "4M"]);
    const ready = `${scratch.dir}/ready`;
    const child = new Deno.Command("sh", {
      args: [
        "-c",
        `exec "$0" mount --ready-fd 3 "$1" "$2" 3>"$3" >/dev/null`,
        await nbdExecutable(),
        server.uri,
        scratch.mnt,
        ready,
      ],
      env: scratch.env,
      stdin: "null",
      stderr: "piped",
    }).spawn();
    const text = () => {
      try {
        return Deno.readTextFileSync(ready);
      } catch {
        return "";
      }
    };
    try {
      assertOk(await eventually(() => text().endsWith("\n"), 15_000), "no ready line");
      assertEquals(
        text(),
        `mounted ${server.uri} on ${await Deno.realPath(
          scratch.mnt,
        )}/disk (4194304 bytes, 4 connections, read-write)\n`,
      );
      assertEquals((await Deno.stat(`${scratch.mnt}/disk`)).size, 4 * MiB);
    } finally {
      await scratch.nbd(["umount", scratch.mnt]);
      const out = await child.output();
      assertEquals(out.code, 0, new TextDecoder().decode(out.stderr));
    }
  },
});
