/**
 * `nbd proxy` and our client's TLS against real peers: TLS added in front of
 * qemu-nbd, stripped in front of nbdkit --tls=require, certificate checks of
 * our client, pass-through of flags and errors, and a lost upstream.
 */

import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import {
  eventually,
  NBDSH_ENV,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  startServer,
  tempDir,
} from "./helpers.ts";

const MiB = 1024 * 1024;

function nbd(...args: string[]) {
  return run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args]);
}

function startProxy(args: string[]) {
  return startServer(Deno.execPath(), [
    "run",
    "-A",
    "--quiet",
    `${ROOT}/main.ts`,
    "proxy",
    "-U",
    "$SOCKET",
    ...args,
  ]);
}

let pki: Promise<{ good: string; other: string; expired: string; wrongHost: string }> | undefined;
function certificates() {
  pki ??= (async () => {
    const root = await Deno.makeTempDir({ prefix: "nbd-proxy-pki" });
    const dirs = {
      good: `${root}/good`,
      other: `${root}/other`,
      expired: `${root}/expired`,
      wrongHost: `${root}/wh`,
    };
    for (const d of Object.values(dirs)) await Deno.mkdir(d);
    await makeCertificates(dirs.good);
    await makeCertificates(dirs.other);
    await makeCertificates(dirs.expired, { expired: true });
    await makeCertificates(dirs.wrongHost, { serverNames: ["elsewhere.example"] });
    return dirs;
  })();
  return pki;
}

Deno.test({
  name: "proxy adds TLS in front of a plaintext qemu-nbd; nbdcopy reads it over TLS byte for byte",
  ...peers("qemu-nbd", "nbdcopy", "openssl"),
  async fn() {
    const { good } = await certificates();
    await using dir = await tempDir();
    const data = randomBytes(8 * MiB, 21);
    await Deno.writeFile(`${dir.path}/disk.img`, data);
    await using qemu = await startServer("qemu-nbd", [
      "-f",
      "raw",
      "-x",
      "disk",
      "-k",
      "$SOCKET",
      "-t",
      `${dir.path}/disk.img`,
    ], {
      exportName: "disk",
    });
    await using proxy = await startProxy(["--tls=require", `--tls-certificates=${good}`, qemu.uri]);
    const secure = `nbds+unix:///?socket=${proxy.socket}&tls-certificates=${good}`;
    await runOk("nbdcopy", [secure, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
    // No plaintext access through the proxy.
    const plain = await run("nbdinfo", [`nbd+unix:///?socket=${proxy.socket}`]);
    assertOk(plain.code !== 0);
  },
});

Deno.test({
  name: "plaintext proxy onto nbdkit --tls=require --tls-verify-peer, with writes passed through",
  ...peers("nbdkit", "nbdcopy", "openssl"),
  async fn() {
    const { good } = await certificates();
    await using dir = await tempDir();
    await using upstream = await startServer("nbdkit", [
      ...[
        "-f",
        "-U",
        "$SOCKET",
        "--tls=require",
        `--tls-certificates=${good}`,
        "--tls-verify-peer",
      ],
      ...["memory", "8M"],
    ]);
    const upstreamUri = `nbds+unix:///?socket=${upstream.socket}&tls-certificates=${good}`;
    await using proxy = await startProxy([upstreamUri]);
    const data = randomBytes(8 * MiB, 22);
    await Deno.writeFile(`${dir.path}/in.img`, data);
    await runOk("nbdcopy", [`${dir.path}/in.img`, proxy.uri]);
    // Read back directly from the TLS upstream with libnbd.
    await runOk("nbdcopy", [upstreamUri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
  },
});

Deno.test({
  name: "proxy passes size, flags, block sizes, block status and errors through faithfully",
  ...peers("nbdkit", "nbdinfo", "nbdsh"),
  async fn() {
    await using upstream = await startServer("nbdkit", [
      ...["-f", "-U", "$SOCKET", "--filter=blocksize-policy", "--filter=error", "data"],
      ...[
        "data=1 @1048576 2 @4194304 3",
        "size=8M",
        "blocksize-minimum=512",
        "blocksize-preferred=8192",
      ],
      ...["blocksize-maximum=1M", "error-pwrite-rate=100%", "error-pwrite=ENOSPC"],
    ]);
    await using proxy = await startProxy([upstream.uri]);
    const direct = JSON.parse((await runOk("nbdinfo", ["--json", upstream.uri])).stdout).exports[0];
    const proxied = JSON.parse((await runOk("nbdinfo", ["--json", proxy.uri])).stdout).exports[0];
    for (const key of Object.keys(direct)) {
      if (key === "uri") continue;
      assertEquals(proxied[key], direct[key], key);
    }
    assertEquals(
      (await runOk("nbdinfo", ["--map", proxy.uri])).stdout,
      (await runOk("nbdinfo", ["--map", upstream.uri])).stdout,
    );
    const out = await runOk("nbdsh", [
      "-u",
      proxy.uri,
      "-c",
      `
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print("write", e.errno)
print("read", bytes(h.pread(512, 1048576))[0])
`,
    ], { env: NBDSH_ENV });
    assertIncludes(out.stdout, "write ENOSPC");
    assertIncludes(out.stdout, "read 2");
  },
});

Deno.test({
  name: "our client speaks TLS to nbdkit, with a client certificate, and checks the server's",
  ...peers("nbdkit", "nbddump", "openssl"),
  async fn() {
    const { good, other, expired, wrongHost } = await certificates();
    await using server = await startServer("nbdkit", [
      ...[
        "-f",
        "-U",
        "$SOCKET",
        "--tls=require",
        `--tls-certificates=${good}`,
        "--tls-verify-peer",
      ],
      ...["data", "data=0x41 0x42 0x43 @4095 0x44", "size=64K"],
    ]);
    const uri = `nbds+unix:///?socket=${server.socket}&tls-certificates=${good}`;
    const info = JSON.parse((await nbd("info", "--json", uri)).stdout);
    assertEquals([info.TLS, info.exports[0]["export-size"]], [true, 65536]);
    const dump = await nbd("dump", "--length", "4096", uri);
    assertEquals(dump.stdout, (await runOk("nbddump", ["-n", "4096", uri])).stdout);
    // The same through the flags instead of the query.
    const flagged = await nbd(
      "info",
      "--size",
      `--tls-certificates=${good}`,
      `nbd+unix:///?socket=${server.socket}`,
    );
    assertEquals(flagged.stdout.trim(), "65536");
    // A CA that did not sign the server's certificate: refused, no data.
    const wrongCa = await nbd(
      "info",
      "--size",
      `nbds+unix:///?socket=${server.socket}&tls-certificates=${other}`,
    );
    assertEquals(wrongCa.code, 1);
    assertIncludes(wrongCa.stderr, "TLS handshake");
    assertEquals(wrongCa.stdout, "");
    // Checking the certificate against a name it does not have.
    const wrongName = await nbd("info", "--size", `${uri}&tls-hostname=elsewhere.example`);
    assertEquals(wrongName.code, 1);
    assertIncludes(wrongName.stderr, "does not match");
    for (const bad of [expired, wrongHost]) {
      await using badServer = await startServer("nbdkit", [
        ...["-f", "-U", "$SOCKET", "--tls=require", `--tls-certificates=${bad}`, "memory", "1M"],
      ]);
      const result = await nbd(
        "info",
        "--size",
        `nbds+unix:///?socket=${badServer.socket}&tls-certificates=${bad}&tls-hostname=localhost`,
      );
      assertEquals(result.code, 1, `${bad}: ${result.stdout}`);
      assertEquals(result.stdout, "");
    }
  },
});

Deno.test({
  name: "nbds:// never falls back to plaintext; a missing client certificate is explained",
  ...peers("nbdkit", "openssl"),
  async fn() {
    const { good } = await certificates();
    await using plain = await startServer("nbdkit", ["-f", "-U", "$SOCKET", "memory", "1M"]);
    const refused = await nbd(
      "info",
      `nbds+unix:///?socket=${plain.socket}&tls-certificates=${good}`,
    );
    assertEquals(refused.code, 1);
    assertIncludes(refused.stderr, "not connecting in plaintext");
    await using demanding = await startServer("nbdkit", [
      ...[
        "-f",
        "-U",
        "$SOCKET",
        "--tls=require",
        `--tls-certificates=${good}`,
        "--tls-verify-peer",
        "memory",
        "1M",
      ],
    ]);
    await using dir = await tempDir();
    await Deno.copyFile(`${good}/ca-cert.pem`, `${dir.path}/ca-cert.pem`);
    const noCert = await nbd(
      "info",
      `nbds+unix:///?socket=${demanding.socket}&tls-certificates=${dir.path}`,
    );
    assertEquals(noCert.code, 1);
    assertIncludes(noCert.stderr, "client certificate");
  },
});

Deno.test({
  name:
    "proxy: a lost upstream gives EIO replies without crashing, and it recovers when it returns",
  ...peers("nbdsh"),
  async fn() {
    await using dir = await tempDir();
    const socket = `${dir.path}/upstream.sock`;
    const serveUpstream = () =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--quiet", `${ROOT}/main.ts`, "serve", "-U", socket, "pattern", "4M"],
        stdout: "null",
        stderr: "null",
      }).spawn();
    let upstream = serveUpstream();
    await eventually(() => {
      try {
        return Deno.statSync(socket).isSocket === true;
      } catch {
        return false;
      }
    });
    await using proxy = await startProxy([`nbd+unix:///?socket=${socket}`]);
    // One long-lived client session: read, lose the upstream, read (EIO), restore, read again.
    const script = `
import os, time, struct
def read():
    try:
        return struct.unpack(">Q", bytes(h.pread(8, 65536)))[0]
    except nbd.Error as e:
        return e.errno
print("before", read(), flush=True)
open("${dir.path}/go-kill", "w").close()
while not os.path.exists("${dir.path}/killed"): time.sleep(0.02)
print("during", read(), flush=True)
open("${dir.path}/go-restart", "w").close()
while not os.path.exists("${dir.path}/restarted"): time.sleep(0.02)
deadline = time.time() + 15
value = read()
while value != 65536 and time.time() < deadline:
    time.sleep(0.1)
    value = read()
print("after", value, flush=True)
`;
    const client = new Deno.Command("nbdsh", {
      args: ["-u", proxy.uri, "-c", script],
      env: NBDSH_ENV,
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const exists = (name: string) => {
      try {
        Deno.statSync(`${dir.path}/${name}`);
        return true;
      } catch {
        return false;
      }
    };
    assertOk(await eventually(() => exists("go-kill"), 15000), "client did not start");
    upstream.kill("SIGKILL");
    await upstream.status;
    await Deno.writeTextFile(`${dir.path}/killed`, "");
    assertOk(await eventually(() => exists("go-restart"), 15000));
    upstream = serveUpstream();
    await eventually(() => {
      try {
        return Deno.statSync(socket).isSocket === true;
      } catch {
        return false;
      }
    });
    await Deno.writeTextFile(`${dir.path}/restarted`, "");
    const out = await client.output();
    upstream.kill("SIGTERM");
    await upstream.status;
    const text = new TextDecoder().decode(out.stdout);
    assertIncludes(text, "before 65536");
    assertIncludes(text, "during EIO");
    assertIncludes(text, "after 65536");
    assertOk(await eventually(() => proxy.stderr().includes("reconnected")), proxy.stderr());
  },
});

Deno.test({
  name: "proxy keeps multi-conn end to end: nbdcopy with 4 connections through it",
  ...peers("nbdkit", "nbdcopy", "nbdinfo"),
  async fn() {
    await using upstream = await startNbdServe(["memory", "32M"]);
    await using proxy = await startProxy([upstream.uri]);
    const info = JSON.parse((await runOk("nbdinfo", ["--json", proxy.uri])).stdout).exports[0];
    assertEquals(info.can_multi_conn, true);
    await using dir = await tempDir();
    const data = randomBytes(32 * MiB, 23);
    await Deno.writeFile(`${dir.path}/in.img`, data);
    await runOk("nbdcopy", ["--connections=4", `${dir.path}/in.img`, proxy.uri]);
    await runOk("nbdcopy", ["--connections=4", upstream.uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
  },
});
