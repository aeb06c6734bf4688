/**
 * The tmpdisk plugin: each connection gets its own freshly formatted disk
 * (e2fsck -fn finds it clean; two connections see different filesystems
 * and do not see each other's writes), the backing file is deleted when
 * the connection closes (the server then holds no deleted file open),
 * command= replaces mkfs, xfs works, and bad input is a one-line error.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { assertBytes, assertEquals, assertMatch, assertOk } from "./assert.ts";
import {
  eventually,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startServer,
  tempDir,
} from "./helpers.ts";

const MiB = 1024 * 1024;

function serve(args: string[], tmp: string) {
  return startServer(
    Deno.execPath(),
    ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", "$SOCKET", "tmpdisk", ...args],
    { env: { TMPDIR: tmp } },
  );
}

/** Files under `tmp` that process `pid` holds open (deleted or not). */
function openUnder(pid: number, tmp: string): string[] {
  const out: string[] = [];
  for (const entry of Deno.readDirSync(`/proc/${pid}/fd`)) {
    try {
      const target = Deno.readLinkSync(`/proc/${pid}/fd/${entry.name}`);
      if (target.startsWith(`${tmp}/`)) out.push(target);
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

async function uuidOf(image: string): Promise<string> {
  const header = await runOk("dumpe2fs", ["-h", image]);
  return /^Filesystem UUID:\s+(\S+)$/m.exec(header.stdout)![1]!;
}

Deno.test({
  name: "tmpdisk: each connection has its own clean disk, deleted when it closes",
  ...peers("mkfs.ext4", "e2fsck", "dumpe2fs", "nbdcopy"),
  async fn() {
    await using dir = await tempDir();
    const tmp = `${dir.path}/tmp`;
    await Deno.mkdir(tmp);
    await using server = await serve(["64M", "label=SCRATCH"], tmp);
    const pid = server.child.pid;
    // Two clients at once: independent disks.
    const a = await NbdClient.connect(server.uri);
    const b = await NbdClient.connect(server.uri);
    assertEquals(a.size(), 64 * MiB);
    assertEquals(openUnder(pid, tmp).length, 2);
    for (const path of openUnder(pid, tmp)) assertMatch(path, / \(deleted\)$/);
    assertEquals([...Deno.readDirSync(tmp)], []);
    const data = randomBytes(64 * 1024, 3);
    const at = 40 * MiB;
    const before = new Uint8Array(data.length);
    await b.pread(before, at);
    await a.pwrite(data, at);
    await a.flush();
    const seenByA = new Uint8Array(data.length);
    await a.pread(seenByA, at);
    assertBytes(seenByA, data);
    const seenByB = new Uint8Array(data.length);
    await b.pread(seenByB, at);
    assertBytes(seenByB, before, "b does not see a's write");
    await a.close();
    assertOk(await eventually(() => openUnder(pid, tmp).length === 1), "a's disk is gone");
    await b.close();
    assertOk(await eventually(() => openUnder(pid, tmp).length === 0), "b's disk is gone");
    // What mkfs made is clean, with the label; each connection gets a new filesystem.
    const one = `${dir.path}/one.img`;
    const two = `${dir.path}/two.img`;
    await runOk("nbdcopy", [server.uri, one]);
    await runOk("nbdcopy", [server.uri, two]);
    for (const image of [one, two]) {
      const fsck = await run("e2fsck", ["-fn", image]);
      assertEquals(fsck.code, 0, fsck.stdout + fsck.stderr);
      assertMatch(fsck.stdout, /^SCRATCH: 11\/\d+ files/m);
    }
    assertOk(await uuidOf(one) !== await uuidOf(two), "two filesystems");
    assertOk(await eventually(() => openUnder(pid, tmp).length === 0), "no disk left open");
  },
});

Deno.test({
  name: "tmpdisk: command= formats the disk instead of mkfs; type=xfs",
  ...peers("mkfs.xfs"),
  async fn() {
    await using dir = await tempDir();
    const tmp = `${dir.path}/tmp`;
    await Deno.mkdir(tmp);
    {
      await using server = await serve([
        "size=1M",
        "label=lbl",
        `command=printf '%s %s %s' "$size" "$type" "$label" | dd of="$disk" conv=notrunc status=none`,
      ], tmp);
      await using client = await NbdClient.connect(server.uri);
      const head = new Uint8Array(16);
      await client.pread(head, 0);
      assertEquals(new TextDecoder().decode(head.subarray(0, 16)), "1048576 ext4 lbl");
    }
    {
      await using server = await serve(["512M", "type=xfs", "label=XS"], tmp);
      await using client = await NbdClient.connect(server.uri);
      const sb = new Uint8Array(512);
      await client.pread(sb, 0);
      assertEquals(new TextDecoder().decode(sb.subarray(0, 4)), "XFSB");
      assertEquals(new TextDecoder().decode(sb.subarray(108, 110)), "XS");
    }
    assertEquals([...Deno.readDirSync(tmp)], []);
  },
});

Deno.test("tmpdisk: bad input is a one-line error; a failing command fails the connection", async () => {
  await using dir = await tempDir();
  const nbd = (args: string[]) =>
    run(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      `${ROOT}/main.ts`,
      "serve",
      "-U",
      `${dir.path}/sock`,
      "tmpdisk",
      ...args,
    ], { env: { TMPDIR: dir.path } });
  const noSize = await nbd([]);
  assertEquals([noSize.code, noSize.stderr], [
    2,
    "nbd: tmpdisk: missing required parameter size=\n",
  ]);
  const noType = await nbd(["1M", "type=nosuchfs"]);
  assertEquals(noType.code, 1);
  assertEquals(
    noType.stderr,
    "nbd: tmpdisk: mkfs.nosuchfs not found on PATH (is type=nosuchfs right?)\n",
  );
  const tmp = `${dir.path}/tmp`;
  await Deno.mkdir(tmp);
  await using server = await serve(["1M", "command=echo no space >&2; exit 3"], tmp);
  let refused = "";
  try {
    await using client = await NbdClient.connect(server.uri);
    refused = `connected, size ${client.size()}`;
  } catch (error) {
    refused = (error as Error).message;
  }
  assertOk(refused !== "", "the connection failed");
  assertOk(!refused.startsWith("connected"), refused);
  assertEquals([...Deno.readDirSync(tmp)], []);
  assertOk(
    await eventually(() => server.stderr().includes("formatting the disk failed: no space")),
    server.stderr(),
  );
});
