import { assertBytes, assertEquals, assertOk, assertRejects } from "../tests/assert.ts";
import { randomBytes } from "../tests/helpers.ts";
import { Http1Error, Http1Pool } from "./http1.ts";

type Reply = (range: [number, number], data: Uint8Array) => Uint8Array | "silent" | "close";

/** A raw HTTP/1.1 server on 127.0.0.1 whose answers `reply` writes byte for byte. */
function rawServer(data: Uint8Array, reply: Reply) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const state = { connections: 0, requests: [] as string[] };
  const open = new Set<Deno.Conn>();
  (async () => {
    for await (const conn of listener) {
      state.connections++;
      open.add(conn);
      (async () => {
        const buf = new Uint8Array(65536);
        let text = "";
        try {
          while (true) {
            const n = await conn.read(buf);
            if (n === null) break;
            text += new TextDecoder().decode(buf.subarray(0, n));
            let end;
            while ((end = text.indexOf("\r\n\r\n")) >= 0) {
              const head = text.slice(0, end);
              text = text.slice(end + 4);
              state.requests.push(head);
              const m = /Range: bytes=(\d+)-(\d+)/i.exec(head)!;
              const answer = reply([Number(m[1]), Number(m[2])], data);
              if (answer === "close") throw new Error("closing");
              if (answer !== "silent") await conn.write(answer);
            }
          }
        } catch { /* closed */ }
        open.delete(conn);
        try {
          conn.close();
        } catch { /* closed */ }
      })();
    }
  })();
  const port = (listener.addr as Deno.NetAddr).port;
  return {
    state,
    url: new URL(`http://127.0.0.1:${port}/disk.img?sig=1`),
    [Symbol.dispose]() {
      listener.close();
      for (const conn of open) {
        try {
          conn.close();
        } catch { /* closed */ }
      }
    },
  };
}

const encoder = new TextEncoder();

/** A 206 answer for `range` of `data`, with `extra` header lines. */
function partial([start, end]: [number, number], data: Uint8Array, extra = ""): Uint8Array {
  const body = data.subarray(start, end + 1);
  const head = encoder.encode(
    `HTTP/1.1 206 Partial Content\r\nContent-Range: bytes ${start}-${end}/${data.length}\r\n` +
      `Content-Length: ${body.length}\r\n${extra}\r\n`,
  );
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

Deno.test("http1: ranged reads into the buffer over one kept-alive connection", async () => {
  const data = randomBytes(1 << 20, 61);
  using server = rawServer(data, partial);
  const pool = new Http1Pool(server.url, 5000);
  for (let i = 0; i < 16; i++) {
    const buf = new Uint8Array(65536);
    const answer = await pool.getRange(
      "/disk.img?sig=1",
      new Headers({ "X-A": "b" }),
      i * 65536,
      buf,
    );
    assertEquals([answer.status, answer.filled], [206, true]);
    assertBytes(buf, data.subarray(i * 65536, (i + 1) * 65536));
  }
  assertEquals(server.state.connections, 1);
  assertOk(server.state.requests[0]!.startsWith("GET /disk.img?sig=1 HTTP/1.1\r\n"));
  assertOk(/\r\nHost: 127\.0\.0\.1:\d+\r\n/.test(server.state.requests[0]!));
  assertOk(/\r\nx-a: b\r\n/i.test(server.state.requests[0]!));
  pool.close();
});

Deno.test("http1: a connection the server closed while idle is replaced at once", async () => {
  const data = randomBytes(65536, 62);
  let answered = 0;
  using server = rawServer(data, (range, d) => answered++ === 1 ? "close" : partial(range, d));
  const pool = new Http1Pool(server.url, 5000);
  const buf = new Uint8Array(4096);
  await pool.getRange("/disk.img", new Headers(), 0, buf);
  await pool.getRange("/disk.img", new Headers(), 4096, buf);
  assertBytes(buf, data.subarray(4096, 8192));
  assertEquals(server.state.connections, 2);
  pool.close();
});

Deno.test("http1: answers other than a plain 206 come back with their body unread", async () => {
  const data = randomBytes(65536, 63);
  const replies: Array<Reply> = [
    () => encoder.encode("HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nexpired"),
    (range, d) => partial(range, d, "Transfer-Encoding: chunked\r\n"),
    () => encoder.encode("HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"),
    ([start], d) => partial([start + 1, start + 4096], d),
  ];
  let next = 0;
  using server = rawServer(data, (range, d) => replies[next++]!(range, d));
  const pool = new Http1Pool(server.url, 5000);
  const statuses = [];
  for (let i = 0; i < replies.length; i++) {
    const answer = await pool.getRange("/disk.img", new Headers(), 0, new Uint8Array(4096));
    statuses.push(answer.status);
    assertEquals(answer.filled, false);
    if (i === 2) assertEquals(answer.headers.get("Location"), "/elsewhere");
  }
  assertEquals(statuses, [403, 206, 302, 206]);
  // Each of those connections was closed rather than reused with a body left in it.
  assertEquals(server.state.connections, 4);
  pool.close();
});

Deno.test("http1: a body cut short and a server that never answers fail with Http1Error", async () => {
  const data = randomBytes(65536, 64);
  let next = 0;
  using server = rawServer(data, (range, d) => {
    if (next++ === 0) return partial(range, d).subarray(0, 1000);
    return "silent";
  });
  const pool = new Http1Pool(server.url, 300);
  await assertRejects(
    () => pool.getRange("/disk.img", new Headers(), 0, new Uint8Array(4096)),
    (e) => e instanceof Http1Error && /no answer within|short read/.test(e.message),
  );
  const start = performance.now();
  await assertRejects(
    () => pool.getRange("/disk.img", new Headers(), 0, new Uint8Array(4096)),
    (e) => e instanceof Http1Error && /no answer within 300 ms/.test(e.message),
  );
  assertOk(performance.now() - start >= 290);
  pool.close();
});

Deno.test("http1: an HTTP/1.0 answer's connection is not reused", async () => {
  const data = randomBytes(65536, 65);
  using server = rawServer(data, (range, d) => {
    const answer = partial(range, d);
    answer.set(encoder.encode("HTTP/1.0"));
    return answer;
  });
  const pool = new Http1Pool(server.url, 5000);
  for (let i = 0; i < 3; i++) {
    const buf = new Uint8Array(4096);
    assertEquals((await pool.getRange("/disk.img", new Headers(), i * 4096, buf)).filled, true);
    assertBytes(buf, data.subarray(i * 4096, (i + 1) * 4096));
  }
  assertEquals(server.state.connections, 3);
  pool.close();
});

Deno.test("http1: PUTs go over one kept-alive connection; a refusal comes back unfilled", async () => {
  const stored = new Map<string, Uint8Array>();
  const clients: string[] = [];
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (req, info) => {
      clients.push(`${info.remoteAddr.port}`);
      const path = new URL(req.url).pathname;
      if (path === "/refused") {
        return new Response("<Error><Code>X</Code></Error>", { status: 403 });
      }
      stored.set(path, new Uint8Array(await req.arrayBuffer()));
      return new Response(null, { headers: { ETag: `"${path}"` } });
    },
  );
  const pool = new Http1Pool(new URL(`http://127.0.0.1:${server.addr.port}/`), 5000);
  try {
    const bodies = [randomBytes(3 << 20, 71), randomBytes(1000, 72), new Uint8Array(0)];
    for (const [i, body] of bodies.entries()) {
      const answer = await pool.put(`/part${i}?uploadId=u`, new Headers({ "x-test": "1" }), body);
      assertEquals([answer.filled, answer.status], [true, 200]);
      assertEquals(answer.headers.get("ETag"), `"/part${i}"`);
      assertBytes(stored.get(`/part${i}`)!, body);
    }
    assertEquals(new Set(clients).size, 1);
    const refused = await pool.put("/refused", new Headers(), new Uint8Array(10));
    assertEquals([refused.filled, refused.status], [false, 403]);
  } finally {
    pool.close();
  }
});

Deno.test("http1: HEADs share the kept-alive connection of the ranged GETs", async () => {
  const data: Uint8Array<ArrayBuffer> = new Uint8Array(randomBytes(8192, 73));
  const clients: string[] = [];
  await using server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    (req, info) => {
      clients.push(`${info.remoteAddr.port}`);
      if (new URL(req.url).pathname === "/moved") {
        return new Response(null, { status: 302, headers: { Location: "/disk.img" } });
      }
      const range = /bytes=(\d+)-(\d+)/.exec(req.headers.get("Range") ?? "");
      if (!range) {
        return new Response(req.method === "HEAD" ? null : data, {
          headers: { "Content-Length": `${data.length}`, "X-Method": req.method },
        });
      }
      const [start, end] = [Number(range[1]), Number(range[2])];
      return new Response(data.subarray(start, end + 1), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${end}/${data.length}` },
      });
    },
  );
  const pool = new Http1Pool(new URL(`http://127.0.0.1:${server.addr.port}/`), 5000);
  try {
    const moved = await pool.head("/moved", new Headers());
    assertEquals([moved.filled, moved.status], [true, 302]);
    assertEquals(moved.headers.get("Location"), "/disk.img");
    const head = await pool.head("/disk.img", new Headers({ "x-test": "1" }));
    assertEquals([head.filled, head.status], [true, 200]);
    assertEquals(head.headers.get("Content-Length"), `${data.length}`);
    assertEquals(head.headers.get("X-Method"), "HEAD");
    const buf = new Uint8Array(4096);
    assertEquals((await pool.getRange("/disk.img", new Headers(), 4096, buf)).filled, true);
    assertBytes(buf, data.subarray(4096));
    assertEquals(new Set(clients).size, 1);
  } finally {
    pool.close();
  }
});
