import { assertEquals } from "../tests/assert.ts";
import { parseNbdUri } from "../protocol/uri.ts";
import { type ClientTlsSettings, nativeTlsPossible } from "./tls.ts";

Deno.test("nativeTlsPossible(): TCP, a verified name and no client certificate only", () => {
  const tcp = parseNbdUri("nbds://server.example/disk");
  const unix = parseNbdUri("nbds+unix:///?socket=/tmp/s&tls-hostname=server.example");
  const verified: ClientTlsSettings = { verify: true, hostname: "server.example" };
  assertEquals(nativeTlsPossible(tcp, verified), true);
  assertEquals(nativeTlsPossible(tcp, { ...verified, ca: "PEM" }), true);
  assertEquals(nativeTlsPossible(unix, verified), false);
  assertEquals(nativeTlsPossible(tcp, { ...verified, cert: "PEM", key: "PEM" }), false);
  assertEquals(nativeTlsPossible(tcp, { ...verified, verify: false }), false);
  assertEquals(nativeTlsPossible(tcp, { verify: true }), false);
});
