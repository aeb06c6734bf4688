import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { MemorySource } from "./_test_utils.ts";
import { copyImage, type CopyOptions } from "./scheduler.ts";
import { S3Destination, S3PutDestination } from "./s3.ts";

const MiB = 1 << 20;

function patterned(size: number): Uint8Array {
  return new Uint8Array(size).map((_, i) => (i * 13 + (i >> 11)) & 0xff);
}

function options(): CopyOptions {
  return {
    requests: 16,
    requestSize: MiB,
    sparseSize: 4096,
    extents: true,
    allocated: false,
    destinationIsZero: false,
  };
}

/** A fake S3 service that stores a PUT's object only once its whole body arrived. */
function fakeS3() {
  const objects = new Map<string, Uint8Array>();
  const requests: Array<{ method: string; url: URL; headers: Headers }> = [];
  const received: number[] = [];
  let bodyFailed = Promise.withResolvers<void>();
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, async (req) => {
    const url = new URL(req.url);
    requests.push({ method: req.method, url, headers: req.headers });
    if (req.method !== "PUT" || url.search !== "") return new Response(null, { status: 501 });
    const chunks: Uint8Array[] = [];
    let got = 0;
    try {
      for await (const chunk of req.body!) {
        chunks.push(chunk);
        got += chunk.length;
      }
    } catch {
      received.push(got);
      bodyFailed.resolve();
      return new Response(null, { status: 400 });
    }
    received.push(got);
    const body = new Uint8Array(got);
    let at = 0;
    for (const chunk of chunks) {
      body.set(chunk, at);
      at += chunk.length;
    }
    objects.set(url.pathname, body);
    return new Response(null, { headers: { ETag: '"x"' } });
  });
  return {
    server,
    objects,
    requests,
    received,
    bodyFailed: () => bodyFailed.promise,
    reset() {
      bodyFailed = Promise.withResolvers<void>();
    },
  };
}

async function withEnvironment<T>(endpoint: string, fn: () => Promise<T>): Promise<T> {
  const vars: Record<string, string> = {
    AWS_ENDPOINT_URL: endpoint,
    AWS_ACCESS_KEY_ID: "AKIDEXAMPLE",
    AWS_SECRET_ACCESS_KEY: "secret-for-the-test",
    AWS_REGION: "us-east-1",
    // The streamed PUT is asked for; multipart is the default.
    NBD_S3_SINGLE_PUT_MAX: String(1 << 30),
  };
  const saved = Object.keys(vars).map((name) => [name, Deno.env.get(name)] as const);
  for (const [name, value] of Object.entries(vars)) Deno.env.set(name, value);
  Deno.env.delete("AWS_ENDPOINT_URL_S3");
  try {
    return await fn();
  } finally {
    for (const [name, value] of saved) {
      if (value === undefined) Deno.env.delete(name);
      else Deno.env.set(name, value);
    }
  }
}

Deno.test("copy to s3:// over http: one streamed, unsigned-payload PUT, holes as zeroes", async () => {
  const fake = fakeS3();
  await using _ = fake.server;
  const size = 6 * MiB + 333;
  const holes = [{ offset: 2 * MiB, length: MiB, zero: true }];
  const data = patterned(size);
  data.fill(0, 2 * MiB, 3 * MiB);
  await withEnvironment(`http://127.0.0.1:${fake.server.addr.port}`, async () => {
    const destination = await S3Destination.open("s3://bucket/dir/disk.raw", size);
    assertOk(destination instanceof S3PutDestination);
    await copyImage(new MemorySource(data, holes, { jitterMs: 2 }), destination, options());
    await destination.close(true);
  });
  assertEquals(fake.requests.map((r) => `${r.method} ${r.url.pathname}${r.url.search}`), [
    "PUT /bucket/dir/disk.raw",
  ]);
  const headers = fake.requests[0]!.headers;
  assertEquals(headers.get("x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
  assertEquals(headers.get("content-length"), String(size));
  assertOk(/^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE\//.test(headers.get("authorization")!));
  assertBytes(fake.objects.get("/bucket/dir/disk.raw")!, data);
});

Deno.test("a source failing mid-upload cuts the PUT short: no object is stored", async () => {
  const fake = fakeS3();
  await using _ = fake.server;
  const size = 40 * MiB;
  // The failing read comes late, once the bytes before it are on their way.
  const source = new class extends MemorySource {
    override async read(buf: Uint8Array, offset: number): Promise<number> {
      if (offset < 16 * MiB) return await super.read(buf, offset);
      await new Promise((resolve) => setTimeout(resolve, 100));
      throw new Error("injected read error");
    }
  }(patterned(size));
  await withEnvironment(`http://127.0.0.1:${fake.server.addr.port}`, async () => {
    const destination = await S3Destination.open("s3://bucket/failed.raw", size);
    await assertRejects(() => copyImage(source, destination, options()), Error, "injected");
    await destination.close(false);
    assertEquals(
      destination.incompleteNote(),
      "the upload to s3://bucket/failed.raw was cut short; no object was written",
    );
  });
  await fake.bodyFailed();
  assertEquals(fake.objects.size, 0);
  // Part of the body had been sent: the failure came in the middle of the upload.
  assertEquals(fake.received.length, 1);
  assertOk(fake.received[0]! >= 8 * MiB && fake.received[0]! < size, `${fake.received[0]}`);
});
