/**
 * Test PKI made at run time with openssl: a CA, a server certificate for
 * localhost/127.0.0.1/::1 and a client certificate, in the directory layout
 * nbdkit, qemu and libnbd share (ca-cert.pem, server-cert.pem,
 * server-key.pem, client-cert.pem, client-key.pem).
 *
 * @module
 */

import { runOk } from "./helpers.ts";

/** Options for making a certificate directory. */
export interface CertOptions {
  /** Names the server certificate is valid for (default localhost, 127.0.0.1, ::1). */
  serverNames?: string[];
  /** Make the server certificate already expired. */
  expired?: boolean;
}

async function openssl(dir: string, args: string[]): Promise<void> {
  await runOk("openssl", args, { cwd: dir });
}

/** Creates a CA and the server and client certificates in `dir`. */
export async function makeCertificates(dir: string, options: CertOptions = {}): Promise<void> {
  const names = options.serverNames ?? ["localhost", "127.0.0.1", "::1"];
  const san = names.map((n) => (/^[\d.]+$|:/.test(n) ? `IP:${n}` : `DNS:${n}`)).join(",");
  await openssl(dir, ["genrsa", "-out", "ca-key.pem", "2048"]);
  await openssl(dir, [
    ...["req", "-x509", "-new", "-key", "ca-key.pem", "-days", "3650", "-subj", "/CN=nbd test CA"],
    ...[
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ],
    ...["-out", "ca-cert.pem"],
  ]);
  for (const role of ["server", "client"] as const) {
    await openssl(dir, ["genrsa", "-out", `${role}-key.pem`, "2048"]);
    await openssl(dir, [
      "req",
      "-new",
      "-key",
      `${role}-key.pem`,
      "-subj",
      `/CN=${role === "server" ? names[0] : "nbd test client"}`,
      "-out",
      `${role}.csr`,
    ]);
    const ext = role === "server"
      ? `basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=${san}\n`
      : "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
    await Deno.writeTextFile(`${dir}/${role}.ext`, ext);
    if (role === "server" && options.expired) {
      // "openssl ca" is the way to set explicit dates on OpenSSL 3.0.
      await Deno.writeTextFile(`${dir}/index.txt`, "");
      await Deno.writeTextFile(`${dir}/serial`, "1000\n");
      await Deno.writeTextFile(
        `${dir}/ca.cnf`,
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n" +
          "default_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n",
      );
      await openssl(dir, [
        ...["ca", "-batch", "-config", "ca.cnf", "-cert", "ca-cert.pem", "-keyfile", "ca-key.pem"],
        ...["-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-notext"],
        ...["-extfile", `${role}.ext`, "-in", `${role}.csr`, "-out", `${role}-cert.pem`],
      ]);
      continue;
    }
    await openssl(dir, [
      ...[
        "x509",
        "-req",
        "-in",
        `${role}.csr`,
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
      ],
      ...["-days", "3650", "-extfile", `${role}.ext`, "-out", `${role}-cert.pem`],
    ]);
  }
}
