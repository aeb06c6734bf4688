import { assertEquals } from "../tests/assert.ts";
import { parseLogLine, parseTimestamp, readLines } from "./log_format.ts";

Deno.test("parseTimestamp() keeps microseconds and rejects other text", () => {
  assertEquals(
    parseTimestamp("2026-01-02T03:04:05.123456Z"),
    Date.UTC(2026, 0, 2, 3, 4, 5, 123) + 0.456,
  );
  assertEquals(parseTimestamp("2026-01-02T03:04:05Z"), Date.UTC(2026, 0, 2, 3, 4, 5));
  assertEquals(parseTimestamp("2026-01-02 03:04:05Z"), NaN);
  assertEquals(parseTimestamp("earlier"), NaN);
});

Deno.test("parseLogLine() reads the log filter's lines", () => {
  const t = Date.UTC(2026, 0, 2, 3, 4, 5, 123) + 0.5;
  assertEquals(
    parseLogLine(
      '2026-01-02T03:04:05.123500Z connection=1 Open export="my \\"disk\\" é" tls=0 readonly=1 size=1048576 fua="native"',
    ),
    {
      time: t,
      action: "Open",
      fields: {
        connection: "1",
        export: 'my "disk" é',
        tls: "0",
        readonly: "1",
        size: "1048576",
        fua: "native",
      },
    },
  );
  assertEquals(
    parseLogLine(
      "2026-01-02T03:04:05.123500Z connection=12 Zero id=4 offset=0 count=8192 trim=1 fua=0 fast=0 elapsed=0.000012 return=0",
    )?.fields,
    {
      connection: "12",
      id: "4",
      offset: "0",
      count: "8192",
      trim: "1",
      fua: "0",
      fast: "0",
      elapsed: "0.000012",
      return: "0",
    },
  );
  assertEquals(
    parseLogLine(
      '2026-01-02T03:04:05.123500Z connection=7 Flush id=3 elapsed=0.000001 return=EIO error="EIO: injected = error"',
    )?.fields.error,
    "EIO: injected = error",
  );
});

Deno.test("parseLogLine() returns undefined for lines that are not the filter's", () => {
  for (
    const line of [
      "",
      "earlier",
      "2026-01-02T03:04:05.1Z",
      "2026-01-02T03:04:05.1Z connection=1", // no action
      "2026-01-02T03:04:05.1Z Read offset=0", // no connection
      "2026-01-02T03:04:05.1Z connection=1 Read Write", // two actions
      '2026-01-02T03:04:05.1Z connection=1 Open export="unterminated',
      "not-a-time connection=1 Read offset=0 count=1",
    ]
  ) {
    assertEquals(parseLogLine(line), undefined, line);
  }
});

Deno.test("readLines() splits on newlines across chunks and keeps a last line without one", async () => {
  const chunks = ["a\nb", "c\r\n", "\nd"].map((s) => new TextEncoder().encode(s));
  const stream = ReadableStream.from(chunks);
  const lines: string[] = [];
  for await (const line of readLines(stream)) lines.push(line);
  assertEquals(lines, ["a", "bc", "", "d"]);
});
