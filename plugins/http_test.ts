import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { NbdError } from "../protocol/errors.ts";
import { UsageError } from "../util/usage_error.ts";
import { peers, randomBytes, runOk } from "../tests/helpers.ts";
import { openPlugin, read } from "../filters/_test_utils.ts";
import { curlPlugin, httpPlugin } from "./http.ts";
import { serveImage } from "../tests/http_server.ts";

interface Behaviour {
  /** Answer this many requests with 503 first. */
  failures: number;
  /** Send 200 and the whole body, ignoring Range. */
  ignoreRange: boolean;
  /** Refuse HEAD. */
  noHead: boolean;
}

/** A small HTTP server with Range support and scripted misbehaviour. */
function imageServer(data: Uint8Array, behaviour: Partial<Behaviour> = {}) {
  const state = { requests: 0, inFlight: 0, maxInFlight: 0, failures: behaviour.failures ?? 0 };
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    state.requests++;
    if (state.failures > 0) {
      state.failures--;
      return new Response("busy", { status: 503 });
    }
    if (req.method === "HEAD") {
      if (behaviour.noHead) return new Response(null, { status: 405 });
      return new Response(null, { headers: { "Content-Length": String(data.length) } });
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
    if (!range || behaviour.ignoreRange) return new Response(data.slice());
    state.inFlight++;
    state.maxInFlight = Math.max(state.maxInFlight, state.inFlight);
    await new Promise((r) => setTimeout(r, 5));
    state.inFlight--;
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), data.length - 1);
    return new Response(data.slice(start, end + 1), {
      status: 206,
      headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
    });
  });
  const url = `http://127.0.0.1:${server.addr.port}/disk.img`;
  return { state, url, [Symbol.asyncDispose]: () => server.shutdown() };
}

Deno.test("http plugin reads ranges, several in flight, byte-exact", async () => {
  const data = randomBytes(1 << 20, 8);
  await using server = imageServer(data);
  const { backend, instance } = await openPlugin(httpPlugin, [server.url, "connections=3"]);
  assertEquals(backend.size(), data.length);
  assertEquals(backend.capabilities().writable, false);
  const reads = Array.from({ length: 12 }, (_, i) => read(backend, i * 70000, 65536));
  const results = await Promise.all(reads);
  results.forEach((r, i) => assertBytes(r, data.subarray(i * 70000, i * 70000 + 65536)));
  assertEquals(server.state.maxInFlight, 3);
  await instance.close?.();
});

Deno.test("http plugin retries transient failures with back-off", async () => {
  const data = randomBytes(4096, 9);
  await using server = imageServer(data, { failures: 3 });
  const start = performance.now();
  const { backend, instance } = await openPlugin(curlPlugin, [
    `url=${server.url}`,
    "http-retry-delay=10ms",
  ]);
  // 10 + 20 + 40 ms of back-off before the HEAD succeeded.
  assertOk(performance.now() - start >= 65);
  assertBytes(await read(backend, 100, 200), data.subarray(100, 300));
  await instance.close?.();
});

Deno.test("http plugin gives up after http-retries", async () => {
  await using server = imageServer(new Uint8Array(10), { failures: 100 });
  await assertRejects(
    () => openPlugin(httpPlugin, [server.url, "http-retries=2", "http-retry-delay=1ms"]),
    (e) => e instanceof UsageError && /503/.test(e.message),
  );
  assertEquals(server.state.requests, 3);
});

Deno.test("http plugin refuses servers that ignore Range, and finds the size without HEAD", async () => {
  await using ignoring = imageServer(new Uint8Array(100), { ignoreRange: true });
  await assertRejects(() => openPlugin(httpPlugin, [ignoring.url]), Error, /ignores Range/);
  await using noHead = imageServer(randomBytes(5000, 1), { noHead: true });
  const { backend, instance } = await openPlugin(httpPlugin, [noHead.url]);
  assertEquals(backend.size(), 5000);
  await instance.close?.();
  await assertRejects(() => openPlugin(httpPlugin, ["ftp://example.com/x"]), UsageError);
});

Deno.test("http plugin turns a failed read into EIO", async () => {
  const data = randomBytes(4096, 2);
  await using server = imageServer(data);
  const { backend, instance } = await openPlugin(httpPlugin, [
    server.url,
    "http-retries=1",
    "http-retry-delay=1ms",
  ]);
  server.state.failures = 10;
  await assertRejects(
    () => read(backend, 0, 10),
    (e) => e instanceof NbdError && e.errno === "EIO",
  );
  await instance.close?.();
});

/** A CA and a server certificate for localhost signed by it, made with openssl. */
async function makeCertificates(dir: string): Promise<{ ca: string; cert: string; key: string }> {
  const sh = (script: string) => runOk("sh", ["-c", script], { cwd: dir });
  await sh(
    "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=TestCA " +
      "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null",
  );
  await sh(
    "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null",
  );
  await Deno.writeTextFile(
    `${dir}/ext.cnf`,
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
  );
  await sh(
    "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem " +
      "-days 2 -extfile ext.cnf 2>/dev/null",
  );
  return {
    ca: `${dir}/ca.pem`,
    cert: await Deno.readTextFile(`${dir}/server.pem`),
    key: await Deno.readTextFile(`${dir}/server.key`),
  };
}

Deno.test({
  name: "http plugin over HTTPS trusts the CA given by cainfo= and refuses an unknown one",
  ...peers("openssl"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "nbd-https-test" });
    try {
      const { ca, cert, key } = await makeCertificates(dir);
      const data = randomBytes(10000, 6);
      const server = Deno.serve(
        { hostname: "127.0.0.1", port: 0, cert, key, onListen() {} },
        (req) => {
          const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range") ?? "");
          if (req.method === "HEAD") {
            return new Response(null, { headers: { "Content-Length": String(data.length) } });
          }
          const start = Number(range![1]);
          const end = Math.min(Number(range![2]), data.length - 1);
          return new Response(data.slice(start, end + 1), {
            status: 206,
            headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
          });
        },
      );
      try {
        const url = `https://localhost:${server.addr.port}/disk.img`;
        const { backend, instance } = await openPlugin(httpPlugin, [url, `cainfo=${ca}`]);
        assertBytes(await read(backend, 5000, 100), data.subarray(5000, 5100));
        await instance.close?.();
        // Without the CA the certificate is refused at once (no retries: default back-off
        // would take half a minute).
        const start = performance.now();
        await assertRejects(
          () => openPlugin(httpPlugin, [url]),
          (e) => e instanceof UsageError && /certificate/i.test(e.message),
        );
        assertOk(performance.now() - start < 900);
      } finally {
        await server.shutdown();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("http plugin resolves a redirect once, then reads the final URL", async () => {
  const data = randomBytes(1 << 20, 23);
  await using server = serveImage(data);
  const { backend, instance } = await openPlugin(httpPlugin, [server.redirectUrl]);
  assertEquals(backend.size(), data.length);
  const reads = Array.from({ length: 16 }, (_, i) => read(backend, i * 65536, 65536));
  assertBytes(concat(await Promise.all(reads)), data);
  assertEquals(server.counts.get("/redirect/disk.img"), 1);
  assertEquals(server.counts.get("GET /signed/1/disk.img"), 17); // the 1-byte probe and 16 reads
  await instance.close?.();
});

Deno.test("http plugin resolves the redirect again when its target expires", async () => {
  const data = randomBytes(1 << 20, 24);
  await using server = serveImage(data);
  const { backend, instance } = await openPlugin(httpPlugin, [server.redirectUrl]);
  assertBytes(await read(backend, 0, 4096), data.subarray(0, 4096));
  server.expire();
  // Several reads find the target stale at once: one resolution serves them all.
  const reads = Array.from({ length: 8 }, (_, i) => read(backend, i * 4096, 4096));
  assertBytes(concat(await Promise.all(reads)), data.subarray(0, 8 * 4096));
  assertEquals(server.counts.get("/redirect/disk.img"), 2);
  assertEquals(server.counts.get("GET /signed/2/disk.img"), 8);
  assertBytes(await read(backend, 100000, 10), data.subarray(100000, 100010));
  assertEquals(server.counts.get("/redirect/disk.img"), 2);
  await instance.close?.();
});

Deno.test("http plugin with followlocation=false reads nothing through a redirect", async () => {
  await using server = serveImage(randomBytes(4096, 25));
  await assertRejects(
    () => openPlugin(httpPlugin, [server.redirectUrl, "followlocation=false", "http-retries=0"]),
    UsageError,
  );
  assertEquals(server.counts.get("/signed/1/disk.img"), undefined);
});

Deno.test("http plugin keeps credentials from a redirect's target on another origin", async () => {
  const data = randomBytes(8192, 26);
  await using target = serveImage(data);
  const authorizations: (string | null)[] = [];
  const redirector = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    authorizations.push(req.headers.get("Authorization"));
    return new Response(null, { status: 302, headers: { Location: target.directUrl } });
  });
  try {
    const url = `http://127.0.0.1:${redirector.addr.port}/disk.img`;
    const { backend, instance } = await openPlugin(httpPlugin, [url, "user=u", "password=p"]);
    assertBytes(await read(backend, 4000, 100), data.subarray(4000, 4100));
    assertEquals(authorizations, [`Basic ${btoa("u:p")}`]);
    assertEquals(target.counts.get("GET /disk.img"), 2);
    await instance.close?.();
  } finally {
    await redirector.shutdown();
  }
});

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

Deno.test("http plugin reads ranges sent chunked (no Content-Length), byte-exact", async () => {
  const data = randomBytes(200000, 27);
  let chunked = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    if (req.method === "HEAD") {
      return new Response(null, { headers: { "Content-Length": String(data.length) } });
    }
    const [, start, end] = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range")!)!.map(Number);
    chunked++;
    const body = data.slice(start, end! + 1);
    return new Response(
      new ReadableStream({
        start(controller) {
          controller.enqueue(body.subarray(0, 1000));
          controller.enqueue(body.subarray(1000));
          controller.close();
        },
      }),
      { status: 206, headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` } },
    );
  });
  try {
    const url = `http://127.0.0.1:${server.addr.port}/disk.img`;
    const { backend, instance } = await openPlugin(httpPlugin, [url]);
    assertBytes(await read(backend, 70000, 100000), data.subarray(70000, 170000));
    // The probe and the read, each twice: plainly, then again through fetch.
    assertEquals(chunked, 4);
    await instance.close?.();
  } finally {
    await server.shutdown();
  }
});

Deno.test("http plugin sends the HEAD, the redirect and the probe over its reads' connection", async () => {
  const data = new Uint8Array(randomBytes(65536, 28));
  const requests: string[] = [];
  const clients = new Set<number>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req, info) => {
    clients.add(info.remoteAddr.port);
    const path = new URL(req.url).pathname;
    requests.push(`${req.method} ${path}`);
    if (path === "/redirect") {
      return new Response(null, { status: 302, headers: { Location: "/disk.img?sig=1" } });
    }
    if (req.method === "HEAD") {
      return new Response(null, { headers: { "Content-Length": String(data.length) } });
    }
    const [, start, end] = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("Range")!)!.map(Number);
    return new Response(data.slice(start!, end! + 1), {
      status: 206,
      headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
    });
  });
  try {
    const url = `http://127.0.0.1:${server.addr.port}/redirect`;
    const { backend, instance } = await openPlugin(httpPlugin, [url, "connections=1"]);
    assertEquals(backend.size(), data.length);
    for (let i = 0; i < 3; i++) {
      assertBytes(await read(backend, i * 4096, 4096), data.subarray(i * 4096, (i + 1) * 4096));
    }
    assertEquals(requests, [
      "HEAD /redirect",
      "HEAD /disk.img",
      "GET /disk.img",
      "GET /disk.img",
      "GET /disk.img",
      "GET /disk.img",
    ]);
    assertEquals(clients.size, 1);
    await instance.close?.();
  } finally {
    await server.shutdown();
  }
});
