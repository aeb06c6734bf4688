import { assertBytes, assertEquals } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";
import { serveImage } from "../tests/http_server.ts";
import { HTTP_CONNECTIONS_FAR, HTTP_CONNECTIONS_NEAR, HttpSource } from "./http.ts";

/** Opens `url` as a copy source, reads its first 64 KiB, and returns its read limit. */
async function readLimit(url: string, data: Uint8Array, connections?: number): Promise<number> {
  const source = await HttpSource.open(url, { connections });
  try {
    assertEquals(source.size, data.length);
    const buf = new Uint8Array(65536);
    await source.read(buf, 0);
    assertBytes(buf, data.subarray(0, 65536));
    return source.maxReads!;
  } finally {
    await source.close(true);
  }
}

Deno.test("http source: more requests in flight when each costs a round trip", async () => {
  const data = randomBytes(1 << 20, 91);
  {
    await using near = serveImage(data);
    assertEquals(await readLimit(near.redirectUrl, data), 2 * HTTP_CONNECTIONS_NEAR);
  }
  {
    await using far = serveImage(data, { rttMs: 10 });
    assertEquals(await readLimit(far.redirectUrl, data), 2 * HTTP_CONNECTIONS_FAR);
    // A number given is kept.
    assertEquals(await readLimit(far.redirectUrl, data, 3), 6);
  }
});
