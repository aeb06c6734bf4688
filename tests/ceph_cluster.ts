/**
 * A throwaway single-node Ceph cluster for tests: one monitor, one manager,
 * one OSD on memstore and, when asked, radosgw with an S3 user. Everything
 * (configuration, data, logs, sockets, pid files) lives under a temporary
 * directory with its own ceph.conf; nothing is read from or written to
 * /etc/ceph or /var. The daemons run in the foreground as children of the
 * test process and are stopped by their own pids; a failed start stops
 * whatever was started and removes the directory.
 *
 * ```ts
 * await using cluster = await startCephCluster({ rgw: true });
 * await cluster.rbd("create", "--size", "64M", "rbd/disk");
 * ```
 *
 * @module
 */

import { freePort, hasCommand } from "./helpers.ts";

/** The Debian packages the cluster needs, by the command that shows each is there. */
export const CEPH_COMMANDS: Readonly<Record<string, string>> = {
  "ceph-mon": "ceph-mon",
  "ceph-osd": "ceph-osd",
  "ceph-mgr": "ceph-mgr",
  "ceph": "ceph-common",
  "rbd": "ceph-common",
  "radosgw": "radosgw",
};

/** What an S3 client needs to reach the cluster's radosgw. */
export interface CephS3 {
  /** Base URL, e.g. http://127.0.0.1:PORT. */
  endpoint: string;
  /** Access key of the test user. */
  accessKey: string;
  /** Secret key of the test user. */
  secretKey: string;
  /** Region radosgw accepts in signatures. */
  region: string;
}

/** A running cluster; stopping it (dispose) kills the daemons and removes the directory. */
export interface CephCluster extends AsyncDisposable {
  /** The temporary directory holding everything. */
  dir: string;
  /** Path of the cluster's ceph.conf. */
  conf: string;
  /** Environment for Ceph command-line tools and librados users (CEPH_CONF). */
  env: Record<string, string>;
  /** The S3 endpoint, when started with radosgw. */
  s3?: CephS3;
  /** Runs `rbd ARGS` against the cluster; throws with its stderr on failure. */
  rbd(...args: string[]): Promise<string>;
  /** Runs `ceph ARGS` against the cluster; throws with its stderr on failure. */
  ceph(...args: string[]): Promise<string>;
  /** Stops the radosgw daemon only (to test failures of S3 clients). */
  stopRgw(): Promise<void>;
  /** Starts radosgw again after `stopRgw` (same port, same users). */
  startRgw(): Promise<void>;
  /** Stops every daemon and removes the directory. */
  stop(): Promise<void>;
}

/** Options of `startCephCluster`. */
export interface CephClusterOptions {
  /** Also start radosgw and create an S3 user. */
  rgw?: boolean;
  /** Give up after this long (default 60 s). */
  timeoutMs?: number;
}

/** The commands the cluster needs that are missing (empty when it can run). */
export function missingCephCommands(rgw: boolean): string[] {
  return Object.keys(CEPH_COMMANDS).filter((c) => (rgw || c !== "radosgw") && !hasCommand(c));
}

interface Daemon {
  name: string;
  child: Deno.ChildProcess;
  exited: boolean;
}

async function runTool(
  cmd: string,
  args: string[],
  env: Record<string, string>,
): Promise<string> {
  const out = await new Deno.Command(cmd, {
    args,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim();
    throw new Error(`${cmd} ${args.join(" ")} exited ${out.code}: ${err}${text.trim()}`);
  }
  return text;
}

function configuration(
  dir: string,
  fsid: string,
  ports: { v1: number; v2: number; rgw: number },
): string {
  return `[global]
fsid = ${fsid}
mon host = [v2:127.0.0.1:${ports.v2},v1:127.0.0.1:${ports.v1}]
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
keyring = ${dir}/keyring
log file = ${dir}/log/$name.log
mon cluster log file = ${dir}/log/cluster.log
run dir = ${dir}/run
admin socket = ${dir}/run/$name.$pid.asok
pid file = ${dir}/run/$name.pid
crash dir = ${dir}/crash
exporter sock dir = ${dir}/run
mon data = ${dir}/mon.$id
mgr data = ${dir}/mgr.$id
osd data = ${dir}/osd.$id
osd objectstore = memstore
memstore device bytes = 4294967296
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
mon warn on pool no redundancy = false
paxos propose interval = 0.05
paxos min wait = 0.01
mgr initial modules =
osd max object name len = 256
osd max object namespace len = 64

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:${ports.rgw}
rgw data = ${dir}/rgw
rgw dns name = localhost
`;
}

async function waitFor(
  what: string,
  deadline: number,
  check: () => Promise<boolean>,
  daemons: Daemon[],
): Promise<void> {
  while (true) {
    const dead = daemons.find((d) => d.exited);
    if (dead) throw new Error(`${dead.name} exited while waiting for ${what}`);
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function stopDaemon(daemon: Daemon): Promise<void> {
  if (daemon.exited) return;
  try {
    daemon.child.kill("SIGTERM");
  } catch { /* gone already */ }
  const timer = setTimeout(() => {
    try {
      daemon.child.kill("SIGKILL");
    } catch { /* gone */ }
  }, 5000);
  await daemon.child.status;
  clearTimeout(timer);
}

/**
 * Starts a single-node cluster under a new temporary directory, with the
 * pool `rbd` created and initialised; with `rgw`, radosgw and an S3 user too.
 */
export async function startCephCluster(options: CephClusterOptions = {}): Promise<CephCluster> {
  const deadline = Date.now() + (options.timeoutMs ?? 60_000);
  const dir = await Deno.makeTempDir({ prefix: "nbd-ceph" });
  const conf = `${dir}/ceph.conf`;
  const env = { CEPH_CONF: conf };
  const daemons: Daemon[] = [];
  const fsid = crypto.randomUUID();
  const ports = { v1: freePort(), v2: freePort(), rgw: freePort() };

  const spawn = (name: string, cmd: string, args: string[]): Daemon => {
    const child = new Deno.Command(cmd, {
      args: ["-f", "-c", conf, ...args],
      env,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    const daemon: Daemon = { name, child, exited: false };
    child.status.then(() => daemon.exited = true);
    daemons.push(daemon);
    return daemon;
  };
  const tool = (cmd: string, ...args: string[]) => runTool(cmd, args, env);
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    // Clients first, then the OSD and manager, the monitor last.
    for (const daemon of [...daemons].reverse()) await stopDaemon(daemon);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };

  try {
    for (const sub of ["log", "run", "crash", "mon.a", "mgr.x", "osd.0", "rgw"]) {
      await Deno.mkdir(`${dir}/${sub}`);
    }
    await Deno.writeTextFile(conf, configuration(dir, fsid, ports));
    await tool(
      "ceph-authtool",
      "--create-keyring",
      `${dir}/keyring`,
      "--gen-key",
      "-n",
      "mon.",
      "--cap",
      "mon",
      "allow *",
    );
    await tool(
      "monmaptool",
      "--create",
      "--fsid",
      fsid,
      "--addv",
      "a",
      `[v2:127.0.0.1:${ports.v2},v1:127.0.0.1:${ports.v1}]`,
      `${dir}/monmap`,
    );
    await tool(
      "ceph-mon",
      "-c",
      conf,
      "--mkfs",
      "-i",
      "a",
      "--monmap",
      `${dir}/monmap`,
      "--keyring",
      `${dir}/keyring`,
    );
    spawn("ceph-mon", "ceph-mon", ["-i", "a"]);
    spawn("ceph-mgr", "ceph-mgr", ["-i", "x"]);
    const osdUuid = crypto.randomUUID();
    const id = (await tool("ceph", "--connect-timeout", "30", "osd", "new", osdUuid)).trim();
    if (id !== "0") throw new Error(`expected osd id 0, got "${id}"`);
    await tool("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osdUuid);
    spawn("ceph-osd", "ceph-osd", ["-i", "0"]);
    await waitFor("osd.0 to come up", deadline, async () => {
      const dump = await tool("ceph", "osd", "dump");
      return /^osd\.0 up/m.test(dump);
    }, daemons);
    await tool("ceph", "osd", "pool", "create", "rbd", "8");
    await tool("rbd", "pool", "init", "rbd");

    let s3: CephS3 | undefined;
    let rgw: Daemon | undefined;
    const endpoint = `http://127.0.0.1:${ports.rgw}`;
    const startRgw = async (until: number): Promise<Daemon> => {
      const daemon = spawn("radosgw", "radosgw", ["-n", "client.rgw"]);
      await waitFor("radosgw to answer", until, async () => {
        const response = await fetch(endpoint);
        await response.body?.cancel();
        return true;
      }, [daemon]);
      return daemon;
    };
    if (options.rgw) {
      const accessKey = "NBDTESTACCESSKEY0001";
      const secretKey = "nbd-test-secret-" + crypto.randomUUID();
      rgw = await startRgw(deadline);
      await tool(
        "radosgw-admin",
        "user",
        "create",
        "--uid=nbd-test",
        "--display-name=nbd test",
        `--access-key=${accessKey}`,
        `--secret=${secretKey}`,
      );
      s3 = { endpoint, accessKey, secretKey, region: "us-east-1" };
    }

    return {
      dir,
      conf,
      env,
      s3,
      rbd: (...args) => tool("rbd", ...args),
      ceph: (...args) => tool("ceph", ...args),
      async stopRgw() {
        if (rgw) await stopDaemon(rgw);
      },
      async startRgw() {
        if (!rgw) throw new Error("the cluster was started without radosgw");
        if (!rgw.exited) return;
        rgw = await startRgw(Date.now() + (options.timeoutMs ?? 60_000));
      },
      stop,
      [Symbol.asyncDispose]: stop,
    };
  } catch (error) {
    const logs = await logTail(dir);
    await stop();
    throw new Error(`the Ceph cluster did not start: ${(error as Error).message}${logs}`);
  }
}

/** The last lines of each daemon log, to explain a failed start. */
async function logTail(dir: string): Promise<string> {
  let out = "";
  try {
    for await (const entry of Deno.readDir(`${dir}/log`)) {
      const text = await Deno.readTextFile(`${dir}/log/${entry.name}`);
      out += `\n--- ${entry.name}\n${text.split("\n").slice(-15).join("\n")}`;
    }
  } catch { /* no logs */ }
  return out;
}
