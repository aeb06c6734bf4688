// Certificate revocation under --tls-verify-peer: a client certificate on the
// CA's revocation list (ca-crl.pem) is refused, one that is not is served,
// and a CRL the server cannot apply stops it from starting.

import { X509Certificate } from "node:crypto";
import { assertEquals, assertIncludes, assertOk, assertThrows } from "./assert.ts";
import { makeCertificates } from "./certs.ts";
import { eventually, peers, run, runOk, startNbdServe, tempDir } from "./helpers.ts";
import { isRevoked, loadRevocationLists, normaliseSerial, parseCrl } from "../server/crl.ts";

const MiB = 1024 * 1024;

/** Writes DIR/ca-crl.pem signed by DIR's CA, revoking the given certificate files. */
async function makeCrl(dir: string, revoke: string[]): Promise<void> {
  await Deno.writeTextFile(`${dir}/index.txt`, "");
  await Deno.writeTextFile(`${dir}/crlnumber`, "1000\n");
  await Deno.writeTextFile(
    `${dir}/crl.cnf`,
    "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\ncrlnumber = crlnumber\n" +
      "default_md = sha256\ndefault_crl_days = 30\ncertificate = ca-cert.pem\nprivate_key = ca-key.pem\n",
  );
  for (const cert of revoke) {
    await runOk("openssl", ["ca", "-config", "crl.cnf", "-revoke", cert], { cwd: dir });
  }
  await runOk("openssl", ["ca", "-config", "crl.cnf", "-gencrl", "-out", "ca-crl.pem"], {
    cwd: dir,
  });
}

async function copyDir(from: string, to: string): Promise<void> {
  await Deno.mkdir(to);
  for await (const e of Deno.readDir(from)) {
    if (e.isFile) await Deno.copyFile(`${from}/${e.name}`, `${to}/${e.name}`);
  }
}

function uri(socket: string, dir: string): string {
  return `nbds+unix:///?socket=${socket}&tls-certificates=${dir}`;
}

Deno.test({
  name: "--tls-verify-peer: a revoked client certificate is refused, an unrevoked one served",
  ...peers("nbdinfo", "openssl"),
  async fn() {
    await using root = await tempDir("nbd-crl");
    const client = `${root.path}/client`;
    await Deno.mkdir(client);
    await makeCertificates(client);
    const revoked = `${root.path}/revoked`;
    const clean = `${root.path}/clean`;
    await copyDir(client, revoked);
    await copyDir(client, clean);
    await makeCrl(revoked, ["client-cert.pem"]);
    await makeCrl(clean, []);
    for (const [dir, ok] of [[clean, true], [revoked, false]] as const) {
      await using server = await startNbdServe([
        "--tls=require",
        `--tls-certificates=${dir}`,
        "--tls-verify-peer",
        "memory",
        "1M",
      ]);
      const result = await run("nbdinfo", ["--size", uri(server.socket!, client)]);
      if (ok) assertEquals([result.code, result.stdout.trim()], [0, String(MiB)], result.stderr);
      else {
        assertOk(result.code !== 0 && result.stdout === "", "a revoked certificate must fail");
        // The server logs the refusal as it closes the connection: give its stderr a moment.
        assertOk(
          await eventually(() => server.stderr().includes("has been revoked")),
          server.stderr(),
        );
      }
    }
  },
});

Deno.test({
  name: "--tls-verify-peer: a CRL that is not signed by the CA stops the server from starting",
  ...peers("openssl"),
  async fn() {
    await using root = await tempDir("nbd-crl");
    const dir = `${root.path}/server`;
    const other = `${root.path}/other`;
    await Deno.mkdir(dir);
    await Deno.mkdir(other);
    await makeCertificates(dir);
    await makeCertificates(other);
    await makeCrl(other, []);
    await Deno.copyFile(`${other}/ca-crl.pem`, `${dir}/ca-crl.pem`);
    const result = await run(Deno.execPath(), [
      "run",
      "-A",
      "--quiet",
      new URL("../main.ts", import.meta.url).pathname,
      "serve",
      "--tls=require",
      `--tls-certificates=${dir}`,
      "--tls-verify-peer",
      "-U",
      `${root.path}/sock`,
      "memory",
      "1M",
    ]);
    assertEquals(result.code, 1, result.stderr);
    assertIncludes(result.stderr, "ca-crl.pem");
    assertIncludes(result.stderr, "not signed by a CA in ca-cert.pem");
  },
});

Deno.test({
  name: "CRL parsing: serials of revoked certificates, signature check, malformed input",
  ...peers("openssl"),
  async fn() {
    await using root = await tempDir("nbd-crl");
    await makeCertificates(root.path);
    await makeCrl(root.path, ["client-cert.pem"]);
    const pem = await Deno.readTextFile(`${root.path}/ca-crl.pem`);
    const ca = new X509Certificate(await Deno.readTextFile(`${root.path}/ca-cert.pem`));
    const clientCert = new X509Certificate(await Deno.readTextFile(`${root.path}/client-cert.pem`));
    const serverCert = new X509Certificate(await Deno.readTextFile(`${root.path}/server-cert.pem`));
    const lists = loadRevocationLists(pem, [ca]);
    assertEquals(lists.length, 1);
    assertEquals([...lists[0]!.revoked], [normaliseSerial(clientCert.serialNumber)]);
    assertOk(isRevoked(clientCert, ca, lists));
    assertOk(!isRevoked(serverCert, ca, lists));
    // The server certificate is not a CA, so nothing it "issued" is on this list.
    assertOk(!isRevoked(clientCert, serverCert, lists));
    // A CRL checked against a CA that did not sign it.
    assertThrows(() => loadRevocationLists(pem, [serverCert]), Error, "not signed by a CA");
    // Tampering with the signed part breaks the signature.
    await runOk("openssl", ["crl", "-in", "ca-crl.pem", "-outform", "DER", "-out", "ca-crl.der"], {
      cwd: root.path,
    });
    const der = await Deno.readFile(`${root.path}/ca-crl.der`);
    const parsed = parseCrl(der);
    assertEquals(parsed.revoked, [normaliseSerial(clientCert.serialNumber)]);
    const tampered = der.slice();
    tampered[parsed.tbs.byteOffset + parsed.tbs.length - 1]! ^= 1;
    const tamperedPem = `-----BEGIN X509 CRL-----\n${
      btoa(String.fromCharCode(...tampered))
    }\n-----END X509 CRL-----\n`;
    assertThrows(() => loadRevocationLists(tamperedPem, [ca]), Error, "not signed by a CA");
    for (const bad of [der.subarray(0, der.length - 1), new Uint8Array([0x30, 0x84, 1, 0, 0, 0])]) {
      assertThrows(() => parseCrl(bad), SyntaxError);
    }
    assertThrows(() => loadRevocationLists("no crl here", [ca]), SyntaxError);
  },
});
