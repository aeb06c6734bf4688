import { assertEquals } from "../tests/assert.ts";
import { unescapeMountField } from "./registry.ts";

Deno.test("unescapeMountField restores the characters mountinfo writes in octal", () => {
  assertEquals(unescapeMountField("/mnt/a\\040b\\011c\\012d\\134e"), "/mnt/a b\tc\nd\\e");
  assertEquals(unescapeMountField("nbd://host/disk"), "nbd://host/disk");
});
