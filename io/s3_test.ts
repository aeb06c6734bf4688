import { assertEquals, assertRejects } from "../tests/assert.ts";
import { findCredentials, type S3Credentials, signV4 } from "./s3.ts";

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
