import { assertEquals, assertMatch, assertOk, assertRejects } from "../tests/assert.ts";
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "../protocol/constants.ts";
import { ProtocolError } from "../protocol/errors.ts";
import {
  decodeInfoRequest,
  decodeMetaContextQuery,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeServerReply,
  encodeString,
} from "../protocol/handshake.ts";
import { NbdConnectionError, NbdOptionError } from "./errors.ts";
import { NbdHandshake } from "./handshake.ts";
import { NbdClient } from "./client.ts";
import { scriptedServer } from "./_test_utils.ts";

const FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;

Deno.test("NbdHandshake lists, queries and aborts without entering transmission", async () => {
  await using server = await scriptedServer(async (peer) => {
    const clientFlags = await peer.greet();
    assertEquals(clientFlags, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    assertEquals((await peer.option()).option, NBD_OPT_EXTENDED_HEADERS);
    await peer.reply(NBD_OPT_EXTENDED_HEADERS, NBD_REP_ERR_UNSUP);
    assertEquals((await peer.option()).option, NBD_OPT_STRUCTURED_REPLY);
    await peer.reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);

    assertEquals((await peer.option()).option, NBD_OPT_LIST);
    await peer.reply(NBD_OPT_LIST, NBD_REP_SERVER, encodeServerReply("a", "first disk"));
    await peer.reply(NBD_OPT_LIST, NBD_REP_SERVER, encodeServerReply("b"));
    await peer.reply(NBD_OPT_LIST, NBD_REP_ACK);

    const info = await peer.option();
    assertEquals(info.option, NBD_OPT_INFO);
    const request = decodeInfoRequest(info.data);
    assertEquals(request.name, "b");
    assertEquals(
      request.infos.sort(),
      [
        NBD_INFO_NAME,
        NBD_INFO_DESCRIPTION,
        NBD_INFO_BLOCK_SIZE,
      ].sort(),
    );
    await peer.reply(NBD_OPT_INFO, NBD_REP_INFO, new Uint8Array([0, 99, 1, 2])); // unknown type
    await peer.reply(NBD_OPT_INFO, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, "canonical-b"));
    await peer.reply(NBD_OPT_INFO, NBD_REP_INFO, encodeInfoExport(5 * 512, FLAGS));
    await peer.reply(NBD_OPT_INFO, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, "bee"));
    await peer.reply(
      NBD_OPT_INFO,
      NBD_REP_INFO,
      encodeInfoBlockSize({ minimum: 512, preferred: 4096, maximum: 1 << 20 }),
    );
    await peer.reply(NBD_OPT_INFO, NBD_REP_ACK);

    const list = await peer.option();
    assertEquals(list.option, NBD_OPT_LIST_META_CONTEXT);
    assertEquals(decodeMetaContextQuery(list.data), { exportName: "b", queries: [] });
    for (const name of ["base:allocation", "qemu:allocation-depth"]) {
      await peer.reply(list.option, NBD_REP_META_CONTEXT, encodeMetaContextReply(0, name));
    }
    await peer.reply(list.option, NBD_REP_ACK);

    assertEquals((await peer.option()).option, NBD_OPT_ABORT);
    await peer.reply(NBD_OPT_ABORT, NBD_REP_ACK);
  });
  const session = await NbdHandshake.open(server.uri);
  assertEquals(session.protocol, "newstyle-fixed");
  assertEquals(session.structuredReplies, true);
  assertEquals(session.extendedHeaders, false);
  assertEquals(await session.list(), [
    { name: "a", description: "first disk" },
    { name: "b", description: "" },
  ]);
  assertEquals(await session.info("b"), {
    name: "b",
    canonicalName: "canonical-b",
    description: "bee",
    size: 2560,
    flags: FLAGS,
    blockSize: { minimum: 512, preferred: 4096, maximum: 1 << 20 },
  });
  assertEquals(await session.listMetaContexts("b"), [
    "base:allocation",
    "qemu:allocation-depth",
  ]);
  await session.abort();
  await server.done;
});

Deno.test("NbdHandshake tolerates a server that hangs up on ABORT instead of acknowledging", async () => {
  const seen: number[] = [];
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.option();
    await peer.reply(NBD_OPT_EXTENDED_HEADERS, NBD_REP_ERR_UNSUP);
    await peer.option();
    await peer.reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
    seen.push((await peer.option()).option);
    peer.close(); // hang up instead of acknowledging
  });
  const session = await NbdHandshake.open(server.uri);
  await session.abort(); // resolves although no acknowledgement came
  await server.done;
  assertEquals(seen, [NBD_OPT_ABORT]);
});

Deno.test("NbdHandshake names the missing export and stays usable", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    await peer.option();
    await peer.reply(NBD_OPT_EXTENDED_HEADERS, NBD_REP_ERR_UNSUP);
    await peer.option();
    await peer.reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK);
    // base:allocation for an export that does not exist: refused as well.
    const meta = await peer.option();
    await peer.reply(meta.option, NBD_REP_ERR_UNKNOWN);
    const go = await peer.option();
    assertEquals(go.option, NBD_OPT_GO);
    await peer.reply(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, encodeString("no such thing"));
    assertEquals((await peer.option()).option, NBD_OPT_LIST);
    await peer.reply(NBD_OPT_LIST, NBD_REP_ACK);
    await peer.option();
    await peer.reply(NBD_OPT_ABORT, NBD_REP_ACK);
  });
  const session = await NbdHandshake.open(server.uri);
  const error = await NbdClient.fromHandshake(session, { exportName: "nope" }).catch((e) => e);
  assertOk(error instanceof NbdOptionError, String(error));
  assertEquals(error.reply, "ERR_UNKNOWN");
  assertEquals(error.option, "GO");
  assertEquals(error.message, `the server has no export named "nope" (server said: no such thing)`);
  assertEquals(await session.list(), []);
  await session.abort();
  await server.done;
});

Deno.test("NbdHandshake explains a server that requires TLS or rejects an option", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    for (const type of [NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TLS_REQD]) {
      const { option } = await peer.option();
      await peer.reply(option, type);
    }
    await peer.option();
    await peer.reply(NBD_OPT_LIST, NBD_REP_ERR_TLS_REQD, encodeString("TLS first"));
    await peer.option();
    await peer.reply(NBD_OPT_INFO, NBD_REP_ERR_INVALID, encodeString("bad"));
    await peer.option();
    await peer.reply(NBD_OPT_ABORT, NBD_REP_ACK);
  });
  const session = await NbdHandshake.open(server.uri);
  assertEquals(session.structuredReplies, false);
  await assertRejects(
    session.list(),
    Error,
    /the server requires TLS: connect with an nbds:\/\/ URI/,
  );
  await assertRejects(
    session.info("x"),
    (e) =>
      e instanceof NbdOptionError && e.reply === "ERR_INVALID" &&
      e.message === "server refused option INFO: ERR_INVALID (bad)",
  );
  await session.abort();
  await server.done;
});

Deno.test("NbdHandshake falls back to EXPORT_NAME when the server has no GO", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet();
    let option = await peer.option();
    while (option.option !== NBD_OPT_GO) {
      await peer.reply(option.option, NBD_REP_ERR_UNSUP);
      option = await peer.option();
    }
    await peer.reply(NBD_OPT_GO, NBD_REP_ERR_UNSUP);
    const exportName = await peer.option();
    assertEquals(exportName.option, NBD_OPT_EXPORT_NAME);
    assertEquals(new TextDecoder().decode(exportName.data), "disk");
    await peer.write(encodeExportNameReply(12345, FLAGS | NBD_FLAG_READ_ONLY, true));
    const read = await peer.request();
    await peer.simple(read, 0, new Uint8Array(read.length).fill(4));
    await peer.request();
  });
  const client = await NbdClient.connect(server.uri.replace("///", "///disk"));
  assertEquals(client.size(), 12345);
  assertEquals(client.readOnly, true);
  assertEquals(client.exportName, "disk");
  const buf = new Uint8Array(45);
  await client.pread(buf, 12300);
  assertEquals(buf, new Uint8Array(45).fill(4));
  await client.close();
  await server.done;
});

Deno.test("NbdHandshake speaks plain (non-fixed) newstyle with the 124 zero bytes", async () => {
  await using server = await scriptedServer(async (peer) => {
    const clientFlags = await peer.greet(0);
    assertEquals(clientFlags, 0);
    const option = await peer.option();
    assertEquals(option.option, NBD_OPT_EXPORT_NAME);
    await peer.write(encodeExportNameReply(4096, FLAGS, false));
    await peer.request();
  });
  const session = await NbdHandshake.open(server.uri);
  assertEquals(session.protocol, "newstyle");
  assertEquals(session.canSendOptions, false);
  await assertRejects(session.list(), Error, /newstyle handshake, which has no LIST option/);
  const client = await NbdClient.fromHandshake(session);
  assertEquals(client.size(), 4096);
  assertEquals(client.structuredReplies, false);
  await client.close();
  await server.done;
});

Deno.test("NbdHandshake recognises an oldstyle server", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.oldstyle(1 << 20, FLAGS);
    const read = await peer.request();
    await peer.simple(read, 0, new Uint8Array(read.length).fill(1));
    await peer.request();
  });
  const session = await NbdHandshake.open(server.uri);
  assertEquals(session.protocol, "oldstyle");
  await assertRejects(session.info(), Error, /oldstyle handshake, which has no INFO option/);
  const client = await NbdClient.fromHandshake(session);
  assertEquals(client.protocol, "oldstyle");
  assertEquals(client.size(), 1 << 20);
  assertEquals(client.canFlush, true);
  const buf = new Uint8Array(10);
  await client.pread(buf, 0);
  assertEquals(buf, new Uint8Array(10).fill(1));
  await client.close();
  await server.done;
});

Deno.test("NbdHandshake reports a server that closes after EXPORT_NAME as a missing export", async () => {
  await using server = await scriptedServer(async (peer) => {
    await peer.greet(NBD_FLAG_NO_ZEROES);
    await peer.option();
  });
  const error = await NbdClient.connect(server.uri.replace("///", "///gone")).catch((e) => e);
  assertOk(error instanceof NbdConnectionError, String(error));
  assertMatch(error.message, /probably has no export named "gone"/);
  await server.done;
});

Deno.test("NbdHandshake rejects peers that are not NBD servers", async () => {
  await using silent = await scriptedServer(() => Promise.resolve());
  await assertRejects(
    NbdHandshake.open(silent.uri),
    (e) => e instanceof NbdConnectionError && /before sending a greeting/.test(e.message),
  );
  await using chatty = await scriptedServer(async (peer) => {
    await peer.write(encodeString("SSH-2.0-OpenSSH_9.2 hello there\r\n"));
  });
  await assertRejects(NbdHandshake.open(chatty.uri), ProtocolError);
  await using truncated = await scriptedServer(async (peer) => {
    await peer.write(encodeString("NBDMAGIC").subarray(0, 8));
    await peer.write(new Uint8Array([0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54]));
    await peer.write(new Uint8Array([0, NBD_FLAG_FIXED_NEWSTYLE]));
    await peer.reader.readExact(4);
    await peer.option(); // EXTENDED_HEADERS, then hang up mid-handshake
  });
  await assertRejects(
    NbdHandshake.open(truncated.uri),
    (e) => e instanceof NbdConnectionError && /closed the connection/.test(e.message),
  );
});

Deno.test("NbdHandshake reports unreachable servers with one-line errors, TLS or not", async () => {
  await assertRejects(
    NbdHandshake.open("nbds+unix:///?socket=/nonexistent"),
    (e) =>
      e instanceof NbdConnectionError &&
      e.message === "Cannot connect to NBD server at Unix socket /nonexistent: no such socket",
  );
  const dir = await Deno.makeTempDir();
  try {
    await assertRejects(
      NbdHandshake.open(`nbd+unix:///?socket=${dir}/missing.sock`),
      (e) =>
        e instanceof NbdConnectionError &&
        e.message ===
          `Cannot connect to NBD server at Unix socket ${dir}/missing.sock: no such socket`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  await assertRejects(NbdHandshake.open("nbd://localhost:bad/"), SyntaxError);
});
