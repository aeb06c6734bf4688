import { resolve } from "node:path";
import { assertEquals } from "../tests/assert.ts";
import { absolutePath } from "./absolute_path.ts";

Deno.test("absolutePath: agrees with node:path resolve on relative, absolute and odd paths", () => {
  const cwd = "/work/dir";
  for (
    const path of [
      "out.img",
      "./out.img",
      "../out.img",
      "a/./b/../c.img",
      "/abs/x.img",
      "/abs//y/",
      "../../../../z",
      ".",
      "a/b/",
    ]
  ) {
    assertEquals(absolutePath(path, cwd), resolve(cwd, path), path);
  }
});

Deno.test("absolutePath: a relative path is taken from the working directory", () => {
  assertEquals(absolutePath("x.img"), resolve("x.img"));
});
