/**
 * Fault injection from the view (`nbd serve --view --view-control`): a
 * real client (nbdsh) sees its reads fail with the chosen errno while the
 * control endpoint says so, and succeed again once it is switched off;
 * who may switch it; every change logged; `nbd stats` shows the state.
 */

import { assertEquals, assertOk } from "./assert.ts";
import { NBDSH_ENV, peers, ROOT, run, runOk, startNbdServe } from "./helpers.ts";
import { serverViewUrl } from "./view_helpers.ts";

function nbd(args: string[]) {
  return run(Deno.execPath(), ["run", "-A", "--quiet", `${ROOT}/main.ts`, ...args]);
}

/** POSTs a change to /control; returns the status and the body. */
async function control(
  url: string,
  body: unknown,
  headers: Record<string, string> = { "content-type": "application/json" },
): Promise<{ status: number; body: string }> {
  const r = await fetch(new URL("/control", url), {
    method: "POST",
    headers,
    body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.text() };
}

/** Runs Python in nbdsh against `uri`; returns what it prints. */
async function nbdsh(uri: string, python: string): Promise<string> {
  return (await runOk("nbdsh", ["-u", uri, "-c", python], { env: NBDSH_ENV })).stdout.trim();
}

const TRY_READ = `
try:
    h.pread(4096, 0)
    print("ok")
except nbd.Error as e:
    print(e.errno)`;

Deno.test({
  name: "view control: reads fail with EIO while on, writes pass, all logged and in nbd stats",
  ...peers("nbdsh"),
  async fn() {
    await using server = await startNbdServe([
      "--view",
      "127.0.0.1:0",
      "--view-control",
      "memory",
      "16M",
    ]);
    const url = await serverViewUrl(server);
    const state = await (await fetch(new URL("/control", url))).json();
    assertEquals(state, { tokenRequired: false, exports: {} });
    assertEquals(await nbdsh(server.uri, TRY_READ), "ok");

    // Refused: not JSON (a form post from any page could do that), another site's page, bad values.
    assertEquals(
      (await control(url, { enabled: true }, { "content-type": "text/plain" })).status,
      403,
    );
    const cross = await control(url, { enabled: true }, {
      "content-type": "application/json",
      origin: "http://attacker.example",
    });
    assertEquals([cross.status, cross.body.trim()], [403, "refused: another site's page"]);
    assertEquals((await control(url, { kinds: "some" })).status, 400);
    assertEquals((await control(url, { rate: 5 })).status, 400);

    const on = await control(url, { enabled: true, kinds: "read" });
    assertEquals(on.status, 200);
    assertEquals(JSON.parse(on.body), {
      export: "",
      state: { enabled: true, kinds: "read", errno: "EIO", rate: 1 },
    });
    assertEquals(await nbdsh(server.uri, TRY_READ), "EIO");
    await nbdsh(server.uri, `h.pwrite(b"w" * 4096, 8192)`); // writes pass

    const human = await nbd(["stats", url]);
    assertEquals(human.code, 0, human.stderr);
    assertOk(
      human.stdout.includes("injected faults: on: read requests fail with EIO at 100%"),
      human.stdout,
    );
    const doc = await (await fetch(new URL("/stats", url))).json();
    assertEquals(doc.control, { tokenRequired: false });
    assertEquals(doc.exports[0].faults.enabled, true);
    assertOk(doc.exports[0].commands.READ.failed >= 1);

    await control(url, { kinds: "write", errno: "ENOSPC" });
    assertEquals(await nbdsh(server.uri, TRY_READ), "ok");
    const write = `
try:
    h.pwrite(b"w" * 512, 0)
    print("ok")
except nbd.Error as e:
    print(e.errno)`;
    assertEquals(await nbdsh(server.uri, write), "ENOSPC");

    assertEquals((await control(url, { enabled: false })).status, 200);
    assertEquals(await nbdsh(server.uri, TRY_READ), "ok");
    assertEquals(await nbdsh(server.uri, write), "ok");
    const logged = server.stderr().split("\n").filter((l) => l.includes("view control:"));
    assertEquals(logged.map((l) => l.replace(/^.*view control: /, "")), [
      'export "" faults on: read requests fail with EIO at 100% (from 127.0.0.1)',
      'export "" faults on: write requests fail with ENOSPC at 100% (from 127.0.0.1)',
      'export "" faults off (from 127.0.0.1)',
    ]);
  },
});

Deno.test("view control: with --view-token only the token is accepted; off without --view-control", async () => {
  await using server = await startNbdServe([
    "--view",
    "127.0.0.1:0",
    "--view-control",
    "--view-token",
    "s3cret-token",
    "memory",
    "1M",
  ]);
  const url = await serverViewUrl(server);
  const json = { "content-type": "application/json" };
  assertEquals((await control(url, { enabled: true })).status, 403);
  assertEquals(
    (await control(url, { enabled: true }, { ...json, authorization: "Bearer s3cret-tokeN" }))
      .status,
    403,
  );
  const ok = await control(url, { enabled: true }, {
    ...json,
    authorization: "Bearer s3cret-token",
  });
  assertEquals(ok.status, 200);
  assertEquals((await (await fetch(new URL("/control", url))).json()).tokenRequired, true);

  await using plain = await startNbdServe(["--view", "127.0.0.1:0", "memory", "1M"]);
  const plainUrl = await serverViewUrl(plain);
  assertEquals((await control(plainUrl, { enabled: true })).status, 404);
  assertEquals((await (await fetch(new URL("/stats", plainUrl))).json()).control, undefined);

  for (
    const args of [
      ["--view-control", "memory", "1M"],
      ["--view", "127.0.0.1:0", "--view-token", "abcdefghij", "memory", "1M"],
      ["--view", "127.0.0.1:0", "--view-control", "--view-token", "short", "memory", "1M"],
    ]
  ) {
    const result = await nbd(["serve", ...args]);
    assertEquals(result.code, 2, args.join(" "));
    assertOk(/^nbd: --view-(control|token)/.test(result.stderr), result.stderr);
  }
});
