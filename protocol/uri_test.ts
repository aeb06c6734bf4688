import { assertEquals, assertThrows } from "../tests/assert.ts";
import { formatNbdUri, isNbdUri, parseNbdUri } from "./uri.ts";

Deno.test("parseNbdUri() reads TCP URIs with host, port and export", () => {
  assertEquals(parseNbdUri("nbd://example.com:10810/disk"), {
    tls: false,
    transport: "tcp",
    host: "example.com",
    port: 10810,
    exportName: "disk",
  });
  const v6 = parseNbdUri("nbds://[::1]/a%20b");
  assertEquals([v6.host, v6.port, v6.exportName, v6.tls], ["::1", 10809, "a b", true]);
  assertEquals(parseNbdUri("nbd://h").exportName, "");
  assertEquals(parseNbdUri("nbd://h/").exportName, "");
  assertEquals(parseNbdUri("nbd://h//disk").exportName, "/disk");
});

Deno.test("parseNbdUri() reads Unix URIs in both forms nbdkit and the spec use", () => {
  const a = parseNbdUri("nbd+unix:///disk?socket=/tmp/s.sock");
  assertEquals([a.transport, a.exportName, a.socket], ["unix", "disk", "/tmp/s.sock"]);
  const b = parseNbdUri("nbd+unix://?socket=/tmp/nbdkitX/socket");
  assertEquals([b.exportName, b.socket], ["", "/tmp/nbdkitX/socket"]);
  assertEquals(parseNbdUri("nbd+unix:///?socket=/tmp/a%2Bb+c").socket, "/tmp/a+b+c");
});

Deno.test("parseNbdUri() reads TLS query parameters", () => {
  const u = parseNbdUri(
    "nbds+unix:///x?socket=/s&tls-certificates=/pki&tls-verify-peer=false&tls-hostname=h",
  );
  assertEquals([u.tls, u.tlsCertificates, u.tlsVerifyPeer, u.tlsHostname], [
    true,
    "/pki",
    false,
    "h",
  ]);
});

Deno.test("parseNbdUri() names the part that is wrong", () => {
  assertThrows(() => parseNbdUri("http://x/"), SyntaxError, 'unknown scheme "http"');
  assertThrows(() => parseNbdUri("nbd+unix:///disk"), SyntaxError, "socket=PATH");
  assertThrows(() => parseNbdUri("nbd://h:99999/"), SyntaxError, "bad port");
  assertThrows(() => parseNbdUri("nbd://h/?frobnicate=1"), SyntaxError, "unknown query parameter");
  assertThrows(
    () => parseNbdUri("nbd://h/%zz"),
    SyntaxError,
    "percent-encoding in the export name",
  );
  assertThrows(() => parseNbdUri("not a uri"), SyntaxError, "expected scheme");
});

Deno.test("formatNbdUri() round-trips through parseNbdUri()", () => {
  for (
    const text of [
      "nbd://localhost:10810/disk",
      "nbds://[::1]/a%20b",
      "nbd+unix:///x?socket=/tmp/s.sock",
      "nbds+unix:///?socket=/s&tls-certificates=/pki",
    ]
  ) {
    assertEquals(formatNbdUri(parseNbdUri(text)), text);
  }
  assertEquals(isNbdUri("nbd+unix:///?socket=x"), true);
  assertEquals(isNbdUri("/dev/sda"), false);
});
