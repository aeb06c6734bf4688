import { assertEquals } from "../tests/assert.ts";
import { parseNbdUri } from "../protocol/uri.ts";
import { platform } from "../io/platform.ts";
import { clientTlsPath, type ClientTlsSettings, nativeTlsPossible } from "./tls.ts";

Deno.test("clientTlsPath(): the runtime's TLS directly for TCP, a verified name, no certificate", () => {
  const tcp = parseNbdUri("nbds://server.example/disk");
  const verified: ClientTlsSettings = { verify: true, hostname: "server.example" };
  assertEquals(clientTlsPath(tcp, verified), "native");
  assertEquals(clientTlsPath(tcp, { ...verified, ca: "PEM" }), "native");
  assertEquals(nativeTlsPossible(tcp, verified), true);
  // Not verifying, or a client certificate to another machine: node:tls.
  assertEquals(clientTlsPath(tcp, { ...verified, verify: false }), "node");
  assertEquals(clientTlsPath(tcp, { ...verified, cert: "PEM", key: "PEM" }), "node");
  assertEquals(nativeTlsPossible(tcp, { ...verified, verify: false }), false);
});

Deno.test("clientTlsPath(): a loopback bridge for Unix sockets and client certificates to localhost", () => {
  const bridge = platform().linuxFast ? "bridge" : "node";
  const unix = parseNbdUri("nbds+unix:///?socket=/tmp/s");
  const chainOnly: ClientTlsSettings = { verify: true };
  const withCert: ClientTlsSettings = { verify: true, cert: "PEM", key: "PEM" };
  assertEquals(clientTlsPath(unix, chainOnly), bridge);
  assertEquals(clientTlsPath(unix, withCert), bridge);
  assertEquals(clientTlsPath(unix, { ...withCert, hostname: "localhost" }), bridge);
  // A name the bridge cannot stand for, or no verification: node:tls.
  assertEquals(clientTlsPath(unix, { ...withCert, hostname: "server.example" }), "node");
  assertEquals(clientTlsPath(unix, { verify: false }), "node");
  for (const host of ["localhost", "127.0.0.1", "[::1]"]) {
    const tcp = parseNbdUri(`nbds://${host}/`);
    const name = host.replace(/^\[|\]$/g, "");
    assertEquals(clientTlsPath(tcp, { ...withCert, hostname: name }), bridge, host);
    assertEquals(clientTlsPath(tcp, { ...withCert, hostname: "server.example" }), "node", host);
    assertEquals(clientTlsPath(tcp, { verify: true, hostname: name }), "native", host);
  }
});
