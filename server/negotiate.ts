/**
 * The server side of the fixed newstyle handshake: greeting, option haggling
 * and the choice of export. Ends either in transmission (GO or EXPORT_NAME)
 * or with the connection closed.
 *
 * @module
 */

import {
  BASE_ALLOCATION,
  NBD_FLAG_BLOCK_STATUS_PAYLOAD,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  optionName,
  replyTypeName,
} from "../protocol/constants.ts";
import { ProtocolError } from "../protocol/errors.ts";
import {
  decodeInfoRequest,
  decodeMetaContextQuery,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerReply,
  encodeString,
  MAX_STRING_LENGTH,
  OPTION_HEADER_SIZE,
} from "../protocol/handshake.ts";
import type { Backend, Capabilities, ExportInfo } from "../core/backend.ts";
import type { ConnectionContext } from "./context.ts";

/** Largest option payload read into memory; larger ones are skipped and refused. */
const MAX_OPTION_LENGTH = 1024 * 1024;
/** Option payloads beyond this are treated as an attack: the connection is dropped. */
const HARD_OPTION_LENGTH = 64 * 1024 * 1024;
/** Id of base:allocation in SET_META_CONTEXT replies. */
export const BASE_ALLOCATION_ID = 1;
/** Id of the first other metadata context (the rest follow in the export's order). */
const OTHER_CONTEXT_IDS = 2;

/** The outcome of a successful handshake. */
export interface Negotiated {
  /** The opened backend stack. */
  backend: Backend;
  /** The export that was chosen. */
  export: ExportInfo;
  /** Transmission flags sent to the client. */
  flags: number;
  /** Structured replies negotiated. */
  structured: boolean;
  /** Extended headers negotiated. */
  extended: boolean;
  /** base:allocation selected for this export. */
  baseAllocation: boolean;
  /** Other metadata contexts selected for this export, with their ids. */
  contexts: MetaContext[];
}

/** A metadata context other than base:allocation, as selected by SET_META_CONTEXT. */
export interface MetaContext {
  /** The id sent in replies. */
  id: number;
  /** Its name, e.g. `qemu:allocation-depth`. */
  name: string;
}

/** Whether a LIST/SET query names `context`: exactly, or (LIST only) by its namespace. */
function queryMatches(query: string, context: string, set: boolean): boolean {
  if (query === context) return true;
  return !set && query.endsWith(":") && context.startsWith(query);
}

/** Computes the transmission flags for an export. */
function transmissionFlags(
  caps: Capabilities,
  readonly: boolean,
  structured: boolean,
  extended: boolean,
  metaContexts: boolean,
): number {
  const writable = caps.writable && !readonly;
  let flags = NBD_FLAG_HAS_FLAGS;
  if (!writable) flags |= NBD_FLAG_READ_ONLY;
  if (caps.flush) flags |= NBD_FLAG_SEND_FLUSH;
  if (writable && caps.fua !== "none") flags |= NBD_FLAG_SEND_FUA;
  if (caps.rotational) flags |= NBD_FLAG_ROTATIONAL;
  if (writable && caps.trim) flags |= NBD_FLAG_SEND_TRIM;
  if (writable && caps.zero) {
    flags |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structured || extended) flags |= NBD_FLAG_SEND_DF;
  if (caps.multiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  if (caps.cache !== "none") flags |= NBD_FLAG_SEND_CACHE;
  if (extended && metaContexts) flags |= NBD_FLAG_BLOCK_STATUS_PAYLOAD;
  return flags;
}

/**
 * Runs the handshake on a connection. Resolves to the negotiated export, or
 * to undefined when the client aborted or the connection was closed.
 */
export async function negotiate(conn: ConnectionContext): Promise<Negotiated | undefined> {
  const server = conn.server;
  conn.writer.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  if (!(await conn.reader.ensure(4, "client flags"))) return undefined;
  const clientFlags = conn.reader.view.getUint32(conn.reader.position);
  conn.reader.consume(4);
  if ((clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
    conn.log(`unknown client flags 0x${clientFlags.toString(16)}: closing`);
    return undefined;
  }
  const fixed = (clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;

  let structured = false;
  let extended = false;
  // The last SET_META_CONTEXT: which export it named and whether it chose base:allocation.
  let meta: { exportName: string; baseAllocation: boolean; contexts: MetaContext[] } | undefined;

  // The other contexts an export offers: its backend is opened to ask (only when a query needs it).
  const offeredContexts = async (name: string): Promise<string[]> => {
    let backend: Backend | undefined;
    try {
      backend = await conn.openBackend(name);
      return backend.extraContexts?.() ?? [];
    } catch {
      return [];
    } finally {
      await backend?.close().catch(() => {});
    }
  };

  const reply = (option: number, type: number, data?: Uint8Array) => {
    if (conn.verbose) conn.log(`option ${optionName(option)} → ${replyTypeName(type)}`);
    conn.writer.write(encodeOptionReply(option, type, data));
  };
  const error = (option: number, type: number, message: string) => {
    if (conn.verbose) conn.log(`option ${optionName(option)} → ${replyTypeName(type)}: ${message}`);
    conn.writer.write(encodeOptionReply(option, type, encodeString(message)));
  };

  while (true) {
    // The reader and writer change when STARTTLS upgrades the stream.
    const { reader, writer } = conn;
    await writer.flush();
    if (!(await reader.ensure(OPTION_HEADER_SIZE, "an option"))) return undefined;
    const header = decodeOptionHeader(reader.peek(OPTION_HEADER_SIZE));
    reader.consume(OPTION_HEADER_SIZE);
    if (!header.magicOk) {
      conn.log("option with a bad magic: closing");
      return undefined;
    }
    const { option, length } = header;
    if (length > HARD_OPTION_LENGTH) {
      conn.log(`option ${optionName(option)} with ${length} bytes of data: closing`);
      return undefined;
    }
    if (length > MAX_OPTION_LENGTH) {
      await reader.skip(length, "option data");
      if (option === NBD_OPT_EXPORT_NAME) return undefined;
      error(option, NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is too large`);
      continue;
    }
    const data = await reader.readExact(length, "option data");
    if (conn.verbose) conn.log(`option ${optionName(option)} (${length} bytes)`);

    if (server.shuttingDown && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) return undefined;
      error(option, NBD_REP_ERR_SHUTDOWN, "the server is shutting down");
      continue;
    }
    if (!fixed && option !== NBD_OPT_EXPORT_NAME) {
      // Non-fixed newstyle clients may only send EXPORT_NAME.
      error(
        option,
        NBD_REP_ERR_INVALID,
        "only NBD_OPT_EXPORT_NAME is allowed without fixed newstyle",
      );
      continue;
    }
    if (
      server.tlsMode === "require" && !conn.tls && option !== NBD_OPT_STARTTLS &&
      option !== NBD_OPT_ABORT
    ) {
      if (option === NBD_OPT_EXPORT_NAME) {
        conn.log("EXPORT_NAME before TLS: closing");
        return undefined;
      }
      error(option, NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
      continue;
    }

    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: {
          if (extended) {
            conn.log("EXPORT_NAME after EXTENDED_HEADERS: closing");
            return undefined;
          }
          if (length > MAX_STRING_LENGTH) {
            conn.log("EXPORT_NAME with an over-long name: closing");
            return undefined;
          }
          let name: string;
          try {
            name = new TextDecoder("utf-8", { fatal: true }).decode(data);
          } catch {
            conn.log("EXPORT_NAME with a name that is not UTF-8: closing");
            return undefined;
          }
          const info = await server.exports.resolve(name);
          if (!info) {
            conn.log(`EXPORT_NAME "${name}": no such export, closing`);
            return undefined;
          }
          const backend = await conn.openBackend(info.name);
          const flags = transmissionFlags(
            backend.capabilities(),
            server.readonly,
            structured,
            false,
            false,
          );
          writer.write(encodeExportNameReply(backend.size(), flags, noZeroes));
          return {
            backend,
            export: info,
            flags,
            structured,
            extended: false,
            baseAllocation: false,
            contexts: [],
          };
        }
        case NBD_OPT_ABORT:
          reply(option, NBD_REP_ACK);
          await writer.flush().catch(() => {});
          return undefined;
        case NBD_OPT_LIST: {
          if (length !== 0) {
            error(option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            break;
          }
          for (const e of await server.exports.list()) {
            reply(option, NBD_REP_SERVER, encodeServerReply(e.name, e.description ?? ""));
          }
          reply(option, NBD_REP_ACK);
          break;
        }
        case NBD_OPT_STARTTLS: {
          if (length !== 0) {
            error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
            break;
          }
          if (conn.tls) {
            error(option, NBD_REP_ERR_INVALID, "TLS is already negotiated");
            break;
          }
          if (server.tlsMode === "off" || !conn.canStartTls) {
            error(option, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
            break;
          }
          await writer.flush();
          if (conn.verbose) conn.log("option STARTTLS → ACK, starting TLS");
          await conn.startTls(encodeOptionReply(option, NBD_REP_ACK));
          if (conn.verbose) conn.log("TLS established");
          // STARTTLS resets every stateful option.
          structured = false;
          extended = false;
          meta = undefined;
          break;
        }
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const request = decodeInfoRequest(data);
          const info = await server.exports.resolve(request.name);
          if (!info) {
            error(option, NBD_REP_ERR_UNKNOWN, `there is no export named "${request.name}"`);
            break;
          }
          const backend = await conn.openBackend(info.name);
          let keep = false;
          try {
            const caps = backend.capabilities();
            const sameExport = meta !== undefined &&
              (meta.exportName === request.name || meta.exportName === info.name);
            const baseAllocation = sameExport && meta!.baseAllocation;
            const offered = backend.extraContexts?.() ?? [];
            const contexts = sameExport
              ? meta!.contexts.filter((c) => offered.includes(c.name))
              : [];
            const flags = transmissionFlags(
              caps,
              server.readonly,
              structured,
              extended,
              baseAllocation || contexts.length > 0,
            );
            reply(option, NBD_REP_INFO, encodeInfoExport(backend.size(), flags));
            if (request.infos.includes(NBD_INFO_NAME)) {
              reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, info.name));
            }
            if (request.infos.includes(NBD_INFO_DESCRIPTION) && info.description) {
              reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, info.description));
            }
            // Block sizes are always sent (unrequested items are allowed).
            reply(
              option,
              NBD_REP_INFO,
              encodeInfoBlockSize({
                ...caps.blockSize,
                maximum: Math.max(
                  caps.blockSize.preferred,
                  Math.min(caps.blockSize.maximum, server.maxPayload),
                ),
              }),
            );
            reply(option, NBD_REP_ACK);
            if (option === NBD_OPT_GO) {
              keep = true;
              return {
                backend,
                export: info,
                flags,
                structured,
                extended,
                baseAllocation,
                contexts,
              };
            }
          } finally {
            if (!keep) await backend.close().catch(() => {});
          }
          break;
        }
        case NBD_OPT_STRUCTURED_REPLY:
          if (length !== 0) {
            error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
            break;
          }
          // A repeat is harmless; with extended headers structured replies are implied.
          if (!extended) structured = true;
          reply(option, NBD_REP_ACK);
          break;
        case NBD_OPT_EXTENDED_HEADERS:
          if (length !== 0) {
            error(option, NBD_REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
            break;
          }
          extended = true;
          structured = true;
          reply(option, NBD_REP_ACK);
          break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: {
          const set = option === NBD_OPT_SET_META_CONTEXT;
          if (!structured) {
            if (set) meta = undefined;
            error(option, NBD_REP_ERR_INVALID, "negotiate structured replies first");
            break;
          }
          const query = decodeMetaContextQuery(data);
          if (set) meta = undefined;
          if (!(await server.exports.resolve(query.exportName))) {
            error(option, NBD_REP_ERR_UNKNOWN, `there is no export named "${query.exportName}"`);
            break;
          }
          let matched = false;
          const others = query.queries.some((q) => q !== BASE_ALLOCATION && q !== "base:") ||
              (!set && query.queries.length === 0)
            ? await offeredContexts(query.exportName)
            : [];
          const chosen: MetaContext[] = [];
          if (query.queries.length === 0) {
            // LIST with no queries lists everything; SET selects nothing.
            matched = !set;
            if (!set) others.forEach((name, i) => chosen.push({ id: OTHER_CONTEXT_IDS + i, name }));
          } else {
            for (const q of query.queries) {
              if (q === BASE_ALLOCATION || (!set && q === "base:")) matched = true;
              others.forEach((name, i) => {
                if (queryMatches(q, name, set) && !chosen.some((c) => c.name === name)) {
                  chosen.push({ id: OTHER_CONTEXT_IDS + i, name });
                }
              });
            }
          }
          if (matched) {
            reply(
              option,
              NBD_REP_META_CONTEXT,
              encodeMetaContextReply(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION),
            );
          }
          for (const c of chosen) {
            reply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(set ? c.id : 0, c.name));
          }
          if (set) {
            meta = { exportName: query.exportName, baseAllocation: matched, contexts: chosen };
          }
          reply(option, NBD_REP_ACK);
          break;
        }
        default:
          error(option, NBD_REP_ERR_UNSUP, `option ${optionName(option)} is not supported`);
      }
    } catch (e) {
      if (e instanceof ProtocolError) {
        if (option === NBD_OPT_EXPORT_NAME) return undefined;
        error(option, NBD_REP_ERR_INVALID, e.message);
        continue;
      }
      if (option === NBD_OPT_INFO || option === NBD_OPT_GO) {
        // Opening the export failed (e.g. the upstream of the nbd plugin is down).
        conn.log(`cannot open the export: ${(e as Error).message}`);
        error(option, NBD_REP_ERR_POLICY, `cannot open the export: ${(e as Error).message}`);
        continue;
      }
      throw e;
    }
  }
}
