/**
 * TLS on our server, driven by libnbd (nbdinfo, nbdcopy, nbdsh) and qemu:
 * require/on modes, client certificates, and the failures that must never
 * serve data in plaintext.
 */

import * as C from "../protocol/constants.ts";
import { encodeInfoRequest } from "../protocol/handshake.ts";
import { assertBytes, assertEquals, assertIncludes, assertOk } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import {
  eventually,
  peers,
  randomBytes,
  ROOT,
  run,
  runOk,
  startNbdServe,
  tempDir,
} from "./helpers.ts";
import { RawClient } from "./raw_client.ts";

const MiB = 1024 * 1024;

interface Pki extends AsyncDisposable {
  /** Good CA, server and client certificates. */
  good: string;
  /** Same layout, but the client side has only the CA (no client certificate). */
  noClientCert: string;
  /** The good CA, with a client certificate from an unrelated CA. */
  foreignClient: string;
  /** An unrelated CA with its own certificates. */
  otherCa: string;
  /** Server certificate that expired in 2020. */
  expired: string;
  /** Server certificate for another host name. */
  wrongHost: string;
}

let pkiPromise: Promise<Pki> | undefined;
/** Makes the certificate directories once for this file. */
function pki(): Promise<Pki> {
  pkiPromise ??= (async () => {
    const root = await Deno.makeTempDir({ prefix: "nbd-pki" });
    const dirs = [
      "good",
      "noClientCert",
      "foreignClient",
      "otherCa",
      "expired",
      "wrongHost",
    ] as const;
    for (const d of dirs) await Deno.mkdir(`${root}/${d}`);
    await makeCertificates(`${root}/good`);
    await makeCertificates(`${root}/otherCa`);
    await makeCertificates(`${root}/expired`, { expired: true });
    await makeCertificates(`${root}/wrongHost`, { serverNames: ["elsewhere.example"] });
    await Deno.copyFile(`${root}/good/ca-cert.pem`, `${root}/noClientCert/ca-cert.pem`);
    await Deno.copyFile(`${root}/good/ca-cert.pem`, `${root}/foreignClient/ca-cert.pem`);
    for (const f of ["client-cert.pem", "client-key.pem"]) {
      await Deno.copyFile(`${root}/otherCa/${f}`, `${root}/foreignClient/${f}`);
    }
    return {
      good: `${root}/good`,
      noClientCert: `${root}/noClientCert`,
      foreignClient: `${root}/foreignClient`,
      otherCa: `${root}/otherCa`,
      expired: `${root}/expired`,
      wrongHost: `${root}/wrongHost`,
      async [Symbol.asyncDispose]() {
        await Deno.remove(root, { recursive: true });
      },
    };
  })();
  return pkiPromise;
}

function tlsUri(socket: string, certificates: string, exportName = ""): string {
  return `nbds+unix:///${exportName}?socket=${socket}&tls-certificates=${certificates}`;
}

Deno.test({
  name: "TLS require: nbdinfo and nbdcopy over nbds+unix, data byte-exact",
  ...peers("nbdinfo", "nbdcopy", "openssl"),
  async fn() {
    const { good } = await pki();
    await using server = await startNbdServe([
      "--tls=require",
      `--tls-certificates=${good}`,
      "memory",
      "8M",
    ]);
    const uri = tlsUri(server.socket!, good);
    const info = JSON.parse((await runOk("nbdinfo", ["--json", uri])).stdout);
    assertEquals(info.TLS, true);
    await using dir = await tempDir();
    const data = randomBytes(8 * MiB, 11);
    await Deno.writeFile(`${dir.path}/in.img`, data);
    await runOk("nbdcopy", [`${dir.path}/in.img`, uri]);
    await runOk("nbdcopy", [uri, `${dir.path}/out.img`]);
    assertBytes(await Deno.readFile(`${dir.path}/out.img`), data);
  },
});

Deno.test({
  name: "TLS require: qemu-io and qemu-img with tls-creds-x509 objects",
  ...peers("qemu-io", "qemu-img", "openssl"),
  async fn() {
    const { good } = await pki();
    await using server = await startNbdServe([
      "--tls=require",
      `--tls-certificates=${good}`,
      "memory",
      "4M",
    ]);
    const object = ["--object", `tls-creds-x509,id=tls0,endpoint=client,dir=${good}`];
    const image =
      `driver=nbd,server.type=unix,server.path=${server.socket},tls-creds=tls0,tls-hostname=localhost`;
    const io = await runOk("qemu-io", [
      ...object,
      "--image-opts",
      image,
      ...["-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", "-c", "flush"],
    ]);
    assertOk(!/fail|error/i.test(io.stdout + io.stderr), io.stdout + io.stderr);
    const info = await runOk("qemu-img", ["info", ...object, "--image-opts", image]);
    assertIncludes(info.stdout, "virtual size: 4 MiB");
  },
});

Deno.test({
  name: "TLS require: plaintext clients get no data, only TLS_REQD or a closed connection",
  ...peers("nbdinfo", "openssl"),
  async fn() {
    const { good } = await pki();
    await using server = await startNbdServe([
      "--tls=require",
      `--tls-certificates=${good}`,
      "pattern",
      "1M",
    ]);
    const plain = await run("nbdinfo", [`nbd+unix:///?socket=${server.socket}`]);
    assertOk(plain.code !== 0, plain.stdout);
    const c = await RawClient.connect(server.socket!);
    try {
      await c.start();
      assertEquals((await c.ask(C.NBD_OPT_LIST))[0]!.type, C.NBD_REP_ERR_TLS_REQD);
      assertEquals(
        (await c.ask(C.NBD_OPT_INFO, encodeInfoRequest({ name: "", infos: [] })))[0]!.type,
        C.NBD_REP_ERR_TLS_REQD,
      );
      assertEquals(
        (await c.ask(C.NBD_OPT_GO, encodeInfoRequest({ name: "", infos: [] }))).map((r) => r.type),
        [
          C.NBD_REP_ERR_TLS_REQD,
        ],
      );
      assertEquals((await c.ask(0x1234))[0]!.type, C.NBD_REP_ERR_TLS_REQD);
      // A transmission request instead of an option: bad option magic, closed.
      const request = new Uint8Array(28);
      new DataView(request.buffer).setUint32(0, C.NBD_REQUEST_MAGIC);
      await c.send(request);
      assertOk(await c.closedByServer());
    } finally {
      c.close();
    }
    const legacy = await RawClient.connect(server.socket!);
    try {
      await legacy.start();
      await legacy.option(C.NBD_OPT_EXPORT_NAME);
      assertOk(await legacy.closedByServer());
    } finally {
      legacy.close();
    }
  },
});

Deno.test({
  name: "TLS on: plaintext and TLS clients both work; STARTTLS twice is refused",
  ...peers("nbdinfo", "nbdsh", "openssl"),
  async fn() {
    const { good } = await pki();
    await using server = await startNbdServe([
      "--tls=on",
      `--tls-certificates=${good}`,
      "memory",
      "1M",
    ]);
    const plain = JSON.parse(
      (await runOk("nbdinfo", ["--json", `nbd+unix:///?socket=${server.socket}`])).stdout,
    );
    assertEquals(plain.TLS, false);
    const secure = JSON.parse(
      (await runOk("nbdinfo", ["--json", tlsUri(server.socket!, good)])).stdout,
    );
    assertEquals(secure.TLS, true);
  },
});

Deno.test({
  name: "--tls-verify-peer: a client certificate signed by the CA is required",
  ...peers("nbdinfo", "openssl"),
  async fn() {
    const { good, noClientCert, foreignClient } = await pki();
    await using server = await startNbdServe([
      "--tls=require",
      `--tls-certificates=${good}`,
      "--tls-verify-peer",
      "memory",
      "1M",
    ]);
    const ok = await run("nbdinfo", ["--size", tlsUri(server.socket!, good)]);
    assertEquals([ok.code, ok.stdout.trim()], [0, String(MiB)], ok.stderr);
    const missing = await run("nbdinfo", ["--size", tlsUri(server.socket!, noClientCert)]);
    assertOk(missing.code !== 0 && missing.stdout === "", "no client certificate must fail");
    // A client certificate signed by an unrelated CA.
    const foreign = await run("nbdinfo", ["--size", tlsUri(server.socket!, foreignClient)]);
    assertOk(foreign.code !== 0 && foreign.stdout === "", "a foreign client certificate must fail");
    // The server logs the rejection as it closes the connection: give its stderr a moment.
    assertOk(
      await eventually(() => server.stderr().includes("not signed by a trusted CA")),
      server.stderr(),
    );
  },
});

Deno.test({
  name: "qemu refuses our server with an expired or wrong-host certificate, or from an unknown CA",
  ...peers("qemu-img", "openssl"),
  async fn() {
    const { good, expired, wrongHost, otherCa } = await pki();
    const info = (socket: string, clientDir: string) =>
      run("qemu-img", [
        "info",
        ...["--object", `tls-creds-x509,id=tls0,endpoint=client,dir=${clientDir}`],
        "--image-opts",
        `driver=nbd,server.type=unix,server.path=${socket},tls-creds=tls0,tls-hostname=localhost`,
      ]);
    for (const [bad, why] of [[expired, "expired"], [wrongHost, "hostname"]] as const) {
      await using server = await startNbdServe([
        "--tls=require",
        `--tls-certificates=${bad}`,
        "memory",
        "1M",
      ]);
      // The client trusts the CA that signed the bad certificate: only the certificate itself is at fault.
      const result = await info(server.socket!, bad);
      assertOk(
        result.code !== 0 && !result.stdout.includes("virtual size"),
        `${why}: ${result.stdout}`,
      );
    }
    await using server = await startNbdServe([
      "--tls=require",
      `--tls-certificates=${good}`,
      "memory",
      "1M",
    ]);
    const wrongCa = await info(server.socket!, otherCa);
    assertOk(wrongCa.code !== 0 && !wrongCa.stdout.includes("virtual size"));
    const right = await info(server.socket!, good);
    assertIncludes(right.stdout, "virtual size: 1 MiB");
  },
});

Deno.test("--tls-psk is refused at start-up with a clear message", async () => {
  const result = await run(Deno.execPath(), [
    "run",
    "-A",
    `${ROOT}/main.ts`,
    "serve",
    "--tls=require",
    "--tls-psk=/tmp/keys.psk",
    "memory",
    "1M",
  ]);
  assertEquals(result.code, 2);
  assertIncludes(result.stderr, "TLS-PSK is not supported");
  assertIncludes(result.stderr, "X.509");
});
