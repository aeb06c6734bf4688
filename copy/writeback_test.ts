import { assertBytes, assertEquals, assertOk } from "../tests/assert.ts";
import { peers, randomBytes, tempDir } from "../tests/helpers.ts";
import * as fs from "node:fs";
import { WriteBehind } from "./writeback.ts";

const MiB = 1 << 20;

Deno.test("WriteBehind flushes and drops written ranges without losing data", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/out.img`;
  const fd = fs.openSync(path, "w");
  const behind = new WriteBehind(fd, MiB, 2 * MiB);
  const data = randomBytes(8 * MiB, 17);
  // Out of order and concurrent, as the copy's lanes write.
  const order = Array.from({ length: 32 }, (_, i) => (i * 13) % 32);
  await Promise.all(order.map(async (i) => {
    const piece = data.subarray(i * 256 * 1024, (i + 1) * 256 * 1024);
    fs.writeSync(fd, piece, 0, piece.length, i * 256 * 1024);
    await behind.written(i * 256 * 1024, piece.length);
  }));
  fs.closeSync(fd);
  assertBytes(await Deno.readFile(path), data);
});

Deno.test({
  name: "WriteBehind: nothing reaches the descriptor once stop() has resolved",
  ...peers("strace"),
  async fn() {
    await using dir = await tempDir();
    const script = `${dir.path}/behind.ts`;
    // Windows of 1 MiB with a 1 MiB budget: every write past the first starts a retire.
    await Deno.writeTextFile(
      script,
      `import { WriteBehind } from ${
        JSON.stringify(new URL("./writeback.ts", import.meta.url).href)
      };
import { closeFd, O_CREAT, O_WRONLY, openFd, pwrite } from ${
        JSON.stringify(new URL("../io/libc.ts", import.meta.url).href)
      };
const fd = openFd(${JSON.stringify(`${dir.path}/data`)}, O_WRONLY | O_CREAT)!;
const behind = new WriteBehind(fd, ${MiB}, ${MiB});
const chunk = new Uint8Array(${MiB}).fill(7);
const write = (i: number) => {
  pwrite(fd, chunk, i * ${MiB});
  void behind.written(i * ${MiB}, ${MiB});
};
for (let i = 0; i < 4; i++) write(i);
// Time for the first windows to be retired; the next ones are still on their way at the close.
await new Promise((resolve) => setTimeout(resolve, 100));
for (let i = 4; i < 8; i++) write(i);
await behind.stop();
closeFd(fd);
console.log(fd);
await new Promise((resolve) => setTimeout(resolve, 200));
`,
    );
    const log = `${dir.path}/trace`;
    const output = await new Deno.Command("strace", {
      args: [
        "-f",
        "-qq",
        "-o",
        log,
        "-e",
        "trace=close,pwrite64,sync_file_range,fadvise64",
        Deno.execPath(),
        "run",
        "-A",
        "--quiet",
        script,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assertOk(output.success, new TextDecoder().decode(output.stderr));
    const fd = Number(new TextDecoder().decode(output.stdout).trim());
    const lines = (await Deno.readTextFile(log)).split("\n");
    // The descriptor's number may have been used and closed before: the close that counts
    // is the first one after the script's writes.
    const lastWrite = lines.findLastIndex((line) => line.includes(`pwrite64(${fd},`));
    const closed = lines.findIndex((line, i) => i > lastWrite && line.includes(`close(${fd})`));
    assertOk(lastWrite >= 0 && closed >= 0, `no write and close of ${fd} in the trace`);
    const retired = lines.slice(0, closed).filter((line) => line.includes(`fadvise64(${fd},`));
    assertOk(retired.length > 0, "no window was retired before the close");
    const late = lines.slice(closed).filter((line) =>
      new RegExp(`(sync_file_range|fadvise64)\\(${fd},`).test(line)
    );
    assertEquals(late, []);
  },
});
