import {
  assertBytes,
  assertEquals,
  assertMatch,
  assertOk,
  assertRejects,
} from "../tests/assert.ts";
import { createHash, createHmac } from "node:crypto";
import {
  findCredentials,
  S3Client,
  type S3Credentials,
  S3Error,
  sha256Base64,
  sha256Hex,
  signV4,
} from "./s3.ts";

const EXAMPLE: S3Credentials = {
  accessKeyId: "AKIAIOSFODNN7EXAMPLE",
  secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
  source: "test",
};

Deno.test("signV4 matches the published GET-object example", async () => {
  const headers = new Headers({ Range: "bytes=0-9" });
  await signV4(
    {
      method: "GET",
      url: new URL("https://examplebucket.s3.amazonaws.com/test.txt"),
      headers,
      payloadHash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      date: new Date("2013-05-24T00:00:00Z"),
    },
    EXAMPLE,
    "us-east-1",
  );
  assertEquals(
    headers.get("Authorization"),
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, " +
      "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, " +
      "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
  );
  assertEquals(headers.get("x-amz-date"), "20130524T000000Z");
});

Deno.test("signV4 sorts and encodes the query", async () => {
  // The published ListObjects example: GET /?max-keys=2&prefix=J.
  const headers = new Headers();
  await signV4(
    {
      method: "GET",
      url: new URL("https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2"),
      headers,
      payloadHash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      date: new Date("2013-05-24T00:00:00Z"),
    },
    EXAMPLE,
    "us-east-1",
  );
  assertEquals(
    headers.get("Authorization")!.split("Signature=")[1],
    "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
  );
});

Deno.test("credentials: environment first, then the profile in the shared file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/credentials`;
    await Deno.writeTextFile(
      file,
      "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n" +
        "[work]\naws_access_key_id=W\naws_secret_access_key=WS\naws_session_token=T\n",
    );
    const env = (vars: Record<string, string>) => (name: string) => vars[name];
    const base = { AWS_SHARED_CREDENTIALS_FILE: file };
    assertEquals(
      (await findCredentials(
        undefined,
        env({ ...base, AWS_ACCESS_KEY_ID: "E", AWS_SECRET_ACCESS_KEY: "ES" }),
      ))
        ?.accessKeyId,
      "E",
    );
    assertEquals((await findCredentials(undefined, env(base)))?.accessKeyId, "D");
    const work = await findCredentials(undefined, env({ ...base, AWS_PROFILE: "work" }));
    assertEquals([work?.accessKeyId, work?.sessionToken], ["W", "T"]);
    assertEquals((await findCredentials("work", env(base)))?.secretAccessKey, "WS");
    await assertRejects(() => findCredentials("nope", env(base)), Error, 'profile "nope"');
    assertEquals(
      await findCredentials(undefined, env({ AWS_SHARED_CREDENTIALS_FILE: `${dir}/x` })),
      undefined,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readObject over http: signed ranged GETs on kept-alive connections", async () => {
  const data = new Uint8Array(300_000).map((_, i) => (i * 7 + (i >> 9)) & 0xff);
  const seen: Array<{ range: string | null; auth: string; client: string }> = [];
  // Ranges are honoured only for the first key: the other answers 200 with the whole
  // object, which the client must still cut to the range.
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    (req, info) => {
      const client = `${info.remoteAddr.hostname}:${info.remoteAddr.port}`;
      const url = new URL(req.url);
      const range = req.headers.get("range");
      seen.push({ range, auth: req.headers.get("authorization") ?? "", client });
      const match = /^bytes=(\d+)-(\d+)$/.exec(range ?? "");
      if (url.pathname === "/bucket/disk" && match) {
        const [start, end] = [Number(match[1]), Number(match[2])];
        return new Response(data.slice(start, end + 1), {
          status: 206,
          headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
        });
      }
      return new Response(data);
    },
  );
  const s3 = new S3Client({
    endpoint: `http://127.0.0.1:${server.addr.port}`,
    credentials: EXAMPLE,
    connections: 1,
  });
  try {
    for (const [offset, length] of [[0, 65536], [65536, 100_000], [299_000, 1000]]) {
      const buf = new Uint8Array(length!);
      assertEquals(await s3.readObject("bucket", "disk", buf, offset!), length);
      assertBytes(buf, data.subarray(offset!, offset! + length!));
    }
    const other = new Uint8Array(5000);
    assertEquals(await s3.readObject("bucket", "whole", other, 1234), 5000);
    assertBytes(other, data.subarray(1234, 6234));
  } finally {
    s3.close();
  }
  // One Range header each (not sent twice), and signed.
  assertEquals(seen.slice(0, 3).map((r) => r.range), [
    "bytes=0-65535",
    "bytes=65536-165535",
    "bytes=299000-299999",
  ]);
  for (const request of seen) {
    assertOk(/SignedHeaders=[^,]*\brange\b/.test(request.auth), request.auth);
  }
  // The three ranged reads went over one kept-alive connection.
  assertEquals(new Set(seen.slice(0, 3).map((r) => r.client)).size, 1);
});

Deno.test("sha256 of small and large bodies, hex and base64", async () => {
  for (const length of [0, 3, 65535, 65536, 300_000]) {
    const data = new Uint8Array(length).map((_, i) => (i * 31 + 7) & 0xff);
    assertEquals(await sha256Hex(data), createHash("sha256").update(data).digest("hex"));
    assertEquals(await sha256Base64(data), createHash("sha256").update(data).digest("base64"));
  }
  assertEquals(await sha256Hex("abc"), createHash("sha256").update("abc").digest("hex"));
});

Deno.test("signV4 derives a new signing key when the day or the region changes", async () => {
  const sign = async (date: string, region: string) => {
    const headers = new Headers();
    await signV4(
      {
        method: "GET",
        url: new URL("http://127.0.0.1:9000/bucket/key"),
        headers,
        payloadHash: "UNSIGNED-PAYLOAD",
        date: new Date(date),
      },
      EXAMPLE,
      region,
    );
    return headers;
  };
  for (
    const [date, region] of [
      ["2024-01-01T10:00:00Z", "us-east-1"],
      ["2024-01-01T11:00:00Z", "eu-west-1"],
      ["2024-01-02T00:00:00Z", "eu-west-1"],
      ["2024-01-02T00:00:01Z", "eu-west-1"],
    ]
  ) {
    const headers = await sign(date!, region!);
    const [, scope, names, signature] =
      /Credential=[^/]+\/([^,]+), SignedHeaders=([^,]+), Signature=(\w+)$/
        .exec(headers.get("Authorization")!)!;
    const amzDate = headers.get("x-amz-date")!;
    const canonical = [
      "GET",
      "/bucket/key",
      "",
      names!.split(";").map((n) => `${n}:${n === "host" ? "127.0.0.1:9000" : headers.get(n)}\n`)
        .join(""),
      names,
      "UNSIGNED-PAYLOAD",
    ].join("\n");
    const toSign = [
      "AWS4-HMAC-SHA256",
      amzDate,
      scope,
      createHash("sha256").update(canonical).digest("hex"),
    ].join("\n");
    let key: Buffer = createHmac("sha256", `AWS4${EXAMPLE.secretAccessKey}`)
      .update(amzDate.slice(0, 8)).digest();
    for (const part of [region!, "s3", "aws4_request"]) {
      key = createHmac("sha256", key).update(part).digest();
    }
    assertEquals(signature, createHmac("sha256", key).update(toSign).digest("hex"));
    assertEquals(scope, `${amzDate.slice(0, 8)}/${region}/s3/aws4_request`);
  }
});

Deno.test("headObject over http: signed HEADs on the reads' kept-alive connection", async () => {
  const data = new Uint8Array(10_000).map((_, i) => i & 0xff);
  const seen: Array<{ method: string; auth: string; client: string }> = [];
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    (req, info) => {
      const client = `${info.remoteAddr.hostname}:${info.remoteAddr.port}`;
      seen.push({ method: req.method, auth: req.headers.get("authorization") ?? "", client });
      if (new URL(req.url).pathname !== "/bucket/disk") return new Response(null, { status: 404 });
      const match = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("range") ?? "");
      if (!match) {
        return new Response(req.method === "HEAD" ? null : data, {
          headers: { "Content-Length": `${data.length}` },
        });
      }
      const [start, end] = [Number(match[1]), Number(match[2])];
      return new Response(data.slice(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
      });
    },
  );
  const s3 = new S3Client({
    endpoint: `http://127.0.0.1:${server.addr.port}`,
    credentials: EXAMPLE,
    connections: 1,
  });
  try {
    assertEquals(await s3.headObject("bucket", "disk"), data.length);
    assertEquals(await s3.headObject("bucket", "missing"), undefined);
    const buf = new Uint8Array(1000);
    assertEquals(await s3.readObject("bucket", "disk", buf, 500), 1000);
    assertBytes(buf, data.subarray(500, 1500));
  } finally {
    s3.close();
  }
  assertEquals(seen.map((r) => r.method), ["HEAD", "HEAD", "GET"]);
  for (const request of seen) assertOk(/^AWS4-HMAC-SHA256 Credential=/.test(request.auth));
  assertEquals(new Set(seen.map((r) => r.client)).size, 1);
});

Deno.test("startPut over http: one PUT, body streamed, UNSIGNED-PAYLOAD signed", async () => {
  const seen: Array<{ method: string; path: string; headers: Headers; body: Uint8Array }> = [];
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (req) => {
      const url = new URL(req.url);
      const body = new Uint8Array(await req.arrayBuffer());
      seen.push({
        method: req.method,
        path: url.pathname + url.search,
        headers: req.headers,
        body,
      });
      return new Response(null, { headers: { ETag: '"e"' } });
    },
  );
  const host = `127.0.0.1:${server.addr.port}`;
  const s3 = new S3Client({
    endpoint: `http://${host}`,
    credentials: EXAMPLE,
    region: "eu-west-1",
  });
  const data = new Uint8Array(200_000).map((_, i) => (i * 11) & 0xff);
  try {
    assertOk(s3.canStreamPut);
    const upload = await s3.startPut("bucket", "a dir/disk.raw", data.length);
    for (const [start, end] of [[0, 1], [1, 65536], [65536, 200_000]]) {
      await upload.write(data.subarray(start!, end!));
    }
    await upload.finish();
  } finally {
    s3.close();
  }
  assertEquals(seen.map((r) => `${r.method} ${r.path}`), ["PUT /bucket/a%20dir/disk.raw"]);
  const { headers, body } = seen[0]!;
  assertBytes(body, data);
  assertEquals(headers.get("content-length"), String(data.length));
  assertEquals(headers.get("x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
  // The signature, computed here from what the server received.
  const [, scope, names, signature] =
    /Credential=AKIAIOSFODNN7EXAMPLE\/([^,]+), SignedHeaders=([^,]+), Signature=(\w+)$/
      .exec(headers.get("authorization")!)!;
  assertEquals(names, "host;x-amz-content-sha256;x-amz-date");
  const amzDate = headers.get("x-amz-date")!;
  const canonical = [
    "PUT",
    "/bucket/a%20dir/disk.raw",
    "",
    `host:${host}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:${amzDate}\n`,
    names,
    "UNSIGNED-PAYLOAD",
  ].join("\n");
  const toSign = [
    "AWS4-HMAC-SHA256",
    amzDate,
    scope,
    createHash("sha256").update(canonical).digest("hex"),
  ].join("\n");
  let key: Buffer = createHmac("sha256", `AWS4${EXAMPLE.secretAccessKey}`)
    .update(amzDate.slice(0, 8)).digest();
  for (const part of ["eu-west-1", "s3", "aws4_request"]) {
    key = createHmac("sha256", key).update(part).digest();
  }
  assertEquals(scope, `${amzDate.slice(0, 8)}/eu-west-1/s3/aws4_request`);
  assertEquals(signature, createHmac("sha256", key).update(toSign).digest("hex"));
});

Deno.test("startPut: a refusal is the service's error, early or after the body", async () => {
  // The server refuses at once, without reading the body, and closes the connection.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const serving = (async () => {
    for await (const conn of listener) {
      const head = new Uint8Array(8192);
      await conn.read(head);
      const xml = "<Error><Code>SignatureDoesNotMatch</Code></Error>";
      await conn.write(
        new TextEncoder().encode(
          `HTTP/1.1 403 Forbidden\r\nContent-Length: ${xml.length}\r\nConnection: close\r\n\r\n${xml}`,
        ),
      );
      conn.close();
    }
  })();
  const s3 = new S3Client({
    endpoint: `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    credentials: EXAMPLE,
  });
  try {
    const upload = await s3.startPut("bucket", "key", 64 << 20);
    const chunk = new Uint8Array(1 << 20);
    const error = await assertRejects(async () => {
      for (let i = 0; i < 64; i++) await upload.write(chunk);
      await upload.finish();
    }, S3Error) as S3Error;
    assertEquals([error.status, error.code], [403, "SignatureDoesNotMatch"]);
    assertMatch(error.message, /access to s3:\/\/bucket\/key denied \(SignatureDoesNotMatch\)/);
  } finally {
    s3.close();
    listener.close();
    await serving.catch(() => {});
  }
});
