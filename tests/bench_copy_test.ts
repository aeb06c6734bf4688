// The copy benchmark in the suite (one short round): the harness runs both
// tools on every case and prints a comparable row for each.

import { assertEquals, assertOk } from "./assert.ts";
import { peers, run } from "./helpers.ts";

Deno.test({
  name: "bench/copy.ts: one short round prints both tools' times, rates, ratio and peak memory",
  ...peers("nbdkit", "nbdcopy", "openssl"),
  async fn() {
    const result = await run(Deno.execPath(), [
      "run",
      "-A",
      new URL("../bench/copy.ts", import.meta.url).pathname,
      "--rounds",
      "1",
      "--size",
      "16M",
      "--sparse-size",
      "64M",
    ]);
    assertEquals(result.code, 0, result.stderr);
    const rows = result.stdout.split("\n").filter((line) => /^\| (nbdkit|file|TLS|\[) /.test(line));
    assertEquals(rows.map((row) => row.split("|")[1]!.trim()), [
      "nbdkit memory 16M → null:",
      "nbdkit memory 16M → file",
      "file 16M → nbdkit memory",
      "nbdkit memory 16M → nbdkit memory",
      "nbdkit sparse-random 64M → file",
      "file 16M → file",
      "[ nbd serve file ] 16M → file",
      "TLS nbdkit memory 16M → null: (Unix socket)",
      "TLS nbdkit memory 16M → null: (TCP, client certificate)",
      "TLS nbdkit memory 16M → null: (TCP, CA only)",
    ]);
    for (const row of rows) {
      const cells = row.split("|").map((cell) => cell.trim());
      assertOk(/^\d+\.\d{3} s \(\d+ MB\/s\)$/.test(cells[2]!), row);
      assertOk(/^\d+\.\d{3} s \(\d+ MB\/s\)$/.test(cells[3]!), row);
      assertOk(/^\d+\.\d\dx$/.test(cells[4]!), row);
      // GNU time is not always installed; without it the memory columns say so.
      assertOk(/^(\d+ MiB|\?)$/.test(cells[5]!) && /^(\d+ MiB|\?)$/.test(cells[6]!), row);
    }
  },
});
