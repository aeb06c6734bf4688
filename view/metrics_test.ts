import { assertEquals, assertOk, assertThrows } from "../tests/assert.ts";
import { parsePrometheus, sampleValue } from "../tests/prometheus.ts";
import { NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE } from "../protocol/constants.ts";
import { LATENCY_BUCKETS_MICROS, ServerStats } from "../server/stats.ts";
import { escapeLabelValue, formatMetrics } from "./metrics.ts";

/** Records one finished request with a given latency. */
function request(
  stats: ServerStats,
  id: number,
  type: number,
  length: number,
  ok: boolean,
  micros: number,
): void {
  const conn = stats.connections.get(id)!;
  const counters = stats.exportCounters(conn.exportName!);
  const started = stats.start(conn, counters, type);
  stats.finish(conn, counters, type, 0, length, ok, started - micros / 1000);
}

function sampleStats(): ServerStats {
  const stats = new ServerStats();
  const a = stats.open(1, "unix");
  a.exportName = 'we"ird\\name\nx';
  a.features = ["structured replies", "base:allocation"];
  const b = stats.open(2, "127.0.0.1:5000");
  b.exportName = "";
  b.tls = true;
  stats.noteExportSize("", 1 << 20);
  request(stats, 1, NBD_CMD_WRITE, 4096, true, 1500);
  request(stats, 1, NBD_CMD_WRITE, 8192, true, 3000);
  request(stats, 1, NBD_CMD_READ, 512, false, 20);
  request(stats, 2, NBD_CMD_READ, 65536, true, 100);
  request(stats, 2, NBD_CMD_TRIM, 1 << 20, true, 40);
  request(stats, 2, NBD_CMD_FLUSH, 0, true, 1e9); // 1000 s: past the last bucket (268 s)
  // One request still in flight on connection 2.
  stats.start(b, stats.exportCounters(""), NBD_CMD_READ);
  return stats;
}

Deno.test("escapeLabelValue() escapes backslash, quote and newline only", () => {
  assertEquals(escapeLabelValue('a\\b"c\nd\te'), 'a\\\\b\\"c\\nd\te');
});

Deno.test("formatMetrics() is valid Prometheus text with the exact counts", () => {
  const stats = sampleStats();
  const text = formatMetrics(stats, ["", "unused"]);
  const m = parsePrometheus(text);
  const weird = 'we"ird\\name\nx';
  assertEquals(m.get("nbd_requests_received_total")!.type, "counter");
  assertEquals(m.get("nbd_requests_in_flight")!.type, "gauge");
  assertEquals(m.get("nbd_request_duration_seconds")!.type, "histogram");
  const v = (name: string, labels: Record<string, string>) => sampleValue(m, name, labels);
  assertEquals(v("nbd_requests_received_total", { export: weird, command: "write" }), 2);
  assertEquals(v("nbd_requests_completed_total", { export: weird, command: "write" }), 2);
  assertEquals(v("nbd_bytes_total", { export: weird, command: "write" }), 12288);
  assertEquals(v("nbd_requests_failed_total", { export: weird, command: "read" }), 1);
  assertEquals(v("nbd_bytes_total", { export: weird, command: "read" }), 0);
  assertEquals(v("nbd_requests_received_total", { export: "", command: "read" }), 2);
  assertEquals(v("nbd_requests_in_flight", { export: "", command: "read" }), 1);
  assertEquals(v("nbd_bytes_total", { export: "", command: "trim" }), 1 << 20);
  assertEquals(v("nbd_bytes_total", { export: "", command: "flush" }), 0);
  // A listed export nobody used is there, with zeroes.
  assertEquals(v("nbd_requests_received_total", { export: "unused", command: "write" }), 0);
  assertEquals(v("nbd_last_request_timestamp_seconds", { export: "unused" }), 0);
  assertEquals(v("nbd_export_size_bytes", { export: "" }), 1 << 20);
  assertEquals(v("nbd_connections_open", {}), 2);
  assertEquals(v("nbd_connections_accepted_total", {}), 2);
  // Per connection.
  assertEquals(
    v("nbd_connection_requests_received_total", { connection: "1", command: "write" }),
    2,
  );
  assertEquals(v("nbd_connection_requests_in_flight", { connection: "2", command: "read" }), 1);
  assertEquals(
    v("nbd_connection_info", {
      connection: "1",
      export: weird,
      peer: "unix",
      tls: "0",
      features: "structured replies,base:allocation",
    }),
    1,
  );
  assertEquals(v("nbd_connection_info", { connection: "2", tls: "1" }), 1);
  // Histogram: the 1.5 ms write is in the 2.048 ms bucket, the 3 ms one in the 4.096 ms
  // bucket (latencies here are the given ones plus the few µs the test itself takes).
  const le = (micros: number) => String(micros / 1e6);
  const bucket = (micros: number) =>
    v("nbd_request_duration_seconds_bucket", { export: weird, command: "write", le: le(micros) });
  assertEquals(bucket(8), 0);
  assertEquals(bucket(1024), 0);
  assertEquals(bucket(2048), 1);
  assertEquals(bucket(4096), 2);
  assertEquals(v("nbd_request_duration_seconds_count", { export: weird, command: "write" }), 2);
  const sum = v("nbd_request_duration_seconds_sum", { export: weird, command: "write" });
  assertOk(sum >= 0.0045 && sum < 0.0050, `sum ${sum}`);
  // The 1000 s flush is only in +Inf.
  const last = LATENCY_BUCKETS_MICROS[LATENCY_BUCKETS_MICROS.length - 1]!;
  assertEquals(
    v("nbd_request_duration_seconds_bucket", { export: "", command: "flush", le: le(last) }),
    0,
  );
  assertEquals(
    v("nbd_request_duration_seconds_bucket", { export: "", command: "flush", le: "+Inf" }),
    1,
  );
  // Every family has HELP text.
  for (const [name, family] of m) assertOk(family.help.length > 0, `${name} has HELP`);
});

Deno.test("parsePrometheus() rejects malformed exposition text", () => {
  const bad = [
    "x_total 1", // no final newline
    "# TYPE x_total counter\nx_total -1\n", // negative counter
    "# TYPE x counter\nx 1\n", // counter without _total
    'x{a="1",a="2"} 1\n', // repeated label
    "x{a=1} 1\n", // unquoted label value
    'x{a="\\t"} 1\n', // bad escape
    "x 1\ny 1\nx 2\n", // family split apart
    "x 1\nx 2\n", // duplicate series
    "x one\n", // bad value
    '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',
    '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 0\nh_count 1\n',
    "x 1\n# TYPE x gauge\n", // TYPE after samples
  ];
  for (const text of bad) assertThrows(() => parsePrometheus(text), SyntaxError);
  const good = parsePrometheus(
    '# HELP x_total a "help"\n# TYPE x_total counter\nx_total{a="q\\"\\\\\\n"} 1 1700000000\n',
  );
  assertEquals(good.get("x_total")!.samples[0]!.labels.a, 'q"\\\n');
});
