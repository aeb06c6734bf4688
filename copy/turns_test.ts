import { assertEquals, assertRejects } from "../tests/assert.ts";
import { Turns } from "./turns.ts";

Deno.test("Turns grants turns in offset order whatever order they are asked in", async () => {
  const turns = new Turns();
  const order: number[] = [];
  const take = async (offset: number, length: number) => {
    await turns.wait(offset);
    order.push(offset);
    turns.advance(offset + length);
  };
  await Promise.all([take(20, 5), take(10, 10), take(0, 10), take(25, 1)]);
  assertEquals(order, [0, 10, 20, 25]);
  assertEquals(turns.position, 26);
});

Deno.test("Turns.open() grants every turn, and abort() fails waiting and later ones", async () => {
  const opened = new Turns();
  const waiting = opened.wait(100);
  opened.open();
  await waiting;
  await opened.wait(5000);
  assertEquals(opened.ended, true);

  const aborted = new Turns();
  const pending = aborted.wait(10);
  aborted.abort(new Error("stop"));
  await assertRejects(() => pending, Error, "stop");
  await assertRejects(() => aborted.wait(0), Error, "stop");
});
