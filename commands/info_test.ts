import { assertEquals } from "../tests/assert.ts";
import type { ServerReport } from "../client/inspect.ts";
import { parseNbdUri } from "../protocol/uri.ts";
import { exportUri, formatReport, formatReportJson, humanSize } from "./info.ts";

Deno.test("humanSize() uses the largest unit that divides the size exactly", () => {
  assertEquals(humanSize(1048576), { text: "1M", scaled: true });
  assertEquals(humanSize(2125119488), { text: "2075312K", scaled: true });
  assertEquals(humanSize(8003), { text: "8003", scaled: false });
  assertEquals(humanSize(0), { text: "0", scaled: false });
  assertEquals(humanSize(2 ** 50), { text: "1P", scaled: true });
});

Deno.test("exportUri() names the export and spells out the TCP port", () => {
  assertEquals(
    exportUri(parseNbdUri("nbd+unix://?socket=/tmp/s"), ""),
    "nbd+unix:///?socket=/tmp/s",
  );
  assertEquals(
    exportUri(parseNbdUri("nbd+unix:///x?socket=/tmp/s"), "a b"),
    "nbd+unix:///a%20b?socket=/tmp/s",
  );
  assertEquals(exportUri(parseNbdUri("nbd://localhost"), "disk"), "nbd://localhost:10809/disk");
  assertEquals(exportUri(parseNbdUri("nbd://[::1]:2000/x"), "y"), "nbd://[::1]:2000/y");
});

const REPORT: ServerReport = {
  protocol: "newstyle-fixed",
  tls: false,
  structuredReplies: true,
  extendedHeaders: false,
  failures: [],
  exports: [{
    requestedName: "",
    name: "disk",
    description: "my disk",
    size: 4194304,
    flags: 0x1 | 0x2 | 0x4 | 0x400,
    blockSize: { minimum: 1, preferred: 4096, maximum: 33554432 },
    contexts: ["base:allocation", "qemu:allocation-depth"],
    content: "data",
  }],
};

Deno.test("formatReport() follows nbdinfo's layout", () => {
  const uri = parseNbdUri("nbd+unix:///?socket=/tmp/q.sock");
  assertEquals(
    formatReport(REPORT, uri),
    [
      "protocol: newstyle-fixed without TLS, using structured packets",
      'export="disk":',
      "\tdescription: my disk",
      "\texport-size: 4194304 (4M)",
      "\tcontent: data",
      "\turi: nbd+unix:///?socket=/tmp/q.sock",
      "\tcontexts:",
      "\t\tbase:allocation",
      "\t\tqemu:allocation-depth",
      "\tis_rotational: false",
      "\tis_read_only: true",
      "\tcan_cache: true",
      "\tcan_df: false",
      "\tcan_fast_zero: false",
      "\tcan_flush: true",
      "\tcan_fua: false",
      "\tcan_multi_conn: false",
      "\tcan_trim: false",
      "\tcan_zero: false",
      "\tblock_size_minimum: 1",
      "\tblock_size_preferred: 4096",
      "\tblock_size_maximum: 33554432",
      "",
    ].join("\n"),
  );
});

Deno.test("formatReportJson() uses nbdinfo's field names", () => {
  const uri = parseNbdUri("nbd+unix:///?socket=/tmp/q.sock");
  const json = JSON.parse(formatReportJson(REPORT, uri));
  assertEquals(json.protocol, "newstyle-fixed");
  assertEquals(json.TLS, false);
  assertEquals(json.structured, true);
  assertEquals(json.exports[0], {
    "export-name": "disk",
    description: "my disk",
    content: "data",
    uri: "nbd+unix:///?socket=/tmp/q.sock",
    contexts: ["base:allocation", "qemu:allocation-depth"],
    is_rotational: false,
    is_read_only: true,
    can_cache: true,
    can_df: false,
    can_fast_zero: false,
    can_flush: true,
    can_fua: false,
    can_multi_conn: false,
    can_trim: false,
    can_zero: false,
    block_size_minimum: 1,
    block_size_preferred: 4096,
    block_size_maximum: 33554432,
    "export-size": 4194304,
    "export-size-str": "4M",
  });
});
