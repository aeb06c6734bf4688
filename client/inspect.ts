/**
 * Gathering what a server says about its exports, the way `nbd info`
 * reports it: handshake style, then per export its size, flags, block
 * sizes, description and metadata contexts, mostly in option mode (without
 * selecting the export), falling back to selecting it where the server
 * offers no NBD_OPT_INFO.
 *
 * @module
 */

import { NBD_REP_ERR_UNSUP } from "../protocol/constants.ts";
import type { BlockSize } from "../protocol/handshake.ts";
import type { NbdUri } from "../protocol/uri.ts";
import { NbdClient } from "./client.ts";
import { toNbdUri } from "./connect.ts";
import { NbdOptionError } from "./errors.ts";
import type { ClientOptions } from "./client.ts";
import {
  type ExportDetails,
  type HandshakeOptions,
  type HandshakeStyle,
  NbdHandshake,
} from "./handshake.ts";

/** What is known about one export. */
export interface ExportReport {
  /** The name the export was asked for by. */
  requestedName: string;
  /** The name to show: the server's canonical name if it sent one. */
  name: string;
  /** Description from the export list or NBD_INFO_DESCRIPTION. */
  description?: string;
  /** Size in bytes. */
  size: number;
  /** Transmission flags. */
  flags: number;
  /** Block sizes, when the server advertised them. */
  blockSize?: BlockSize;
  /** Metadata contexts the server offers; undefined when it cannot list them. */
  contexts?: string[];
  /** Result of the content probe, when one ran and produced something. */
  content?: string;
}

/** What is known about a server. */
export interface ServerReport {
  /** Handshake style. */
  protocol: HandshakeStyle;
  /** TLS was negotiated. */
  tls: boolean;
  /** Structured replies were negotiated. */
  structuredReplies: boolean;
  /** Extended headers were negotiated. */
  extendedHeaders: boolean;
  /** The exports (one unless listing). */
  exports: ExportReport[];
  /** Exports of the list that could not be queried, with the reason. */
  failures: Array<{ name: string; error: Error }>;
}

/** Options of `inspectServer`. */
export interface InspectOptions extends HandshakeOptions, ClientOptions {
  /** Report every export the server lists, not just the one the URI names. */
  list?: boolean;
  /**
   * Looks at an export's data once it is selected (e.g. the first sectors);
   * its result becomes `content`. Without it exports are not selected
   * unless the server leaves no other way to learn about them.
   */
  probe?: (client: NbdClient) => Promise<string | undefined>;
}

/**
 * Connects and reports on the server: on the export the URI names, or with
 * `list` on every export it lists.
 *
 * @example
 * ```ts
 * const report = await inspectServer("nbd+unix:///?socket=/tmp/s.sock", { list: true });
 * for (const e of report.exports) console.log(e.name, e.size);
 * ```
 */
export async function inspectServer(
  uri: string | NbdUri,
  options: InspectOptions = {},
): Promise<ServerReport> {
  const parsed = toNbdUri(uri);
  const session = await NbdHandshake.open(parsed, options);
  const report: ServerReport = {
    protocol: session.protocol,
    tls: session.tls,
    structuredReplies: session.structuredReplies,
    extendedHeaders: session.extendedHeaders,
    exports: [],
    failures: [],
  };
  let handedOver = false;
  try {
    if (!options.list) {
      // One export: whatever option mode cannot tell (no INFO at all, the
      // content, or nbd-server's size 0 from INFO) is learnt by selecting it
      // on this same connection, as there is nothing else left to ask.
      const entry = session.canSendOptions
        ? await reportInOptionMode(session, parsed.exportName, undefined)
        : undefined;
      if (entry && !options.probe && entry.size !== 0) {
        report.exports.push(entry);
      } else {
        handedOver = true;
        report.exports.push(await reportBySelecting(session, parsed.exportName, options, entry));
      }
      return report;
    }
    const listed = await session.list();
    const entries: Array<{ name: string; entry?: ExportReport }> = [];
    for (const item of listed) {
      try {
        const entry = await reportInOptionMode(session, item.name, item.description || undefined);
        entries.push({ name: item.name, entry });
      } catch (error) {
        if (!(error instanceof NbdOptionError)) throw error;
        report.failures.push({ name: item.name, error });
      }
    }
    // Exports that must be selected get connections of their own, one at a
    // time and only after this one is closed: some servers (nbd-server -d,
    // qemu-nbd without -e) serve a single connection at once.
    await session.abort();
    for (const { name, entry } of entries) {
      if (entry && !options.probe && entry.size !== 0) {
        report.exports.push(entry);
        continue;
      }
      try {
        report.exports.push(await reportOnNewConnection(parsed, name, options, entry));
      } catch (error) {
        if (!(error instanceof NbdOptionError)) throw error;
        report.failures.push({ name, error });
      }
    }
    return report;
  } finally {
    if (!handedOver) await session.abort();
  }
}

/** Asks about an export with NBD_OPT_INFO; undefined when the server lacks INFO. */
async function reportInOptionMode(
  session: NbdHandshake,
  name: string,
  listedDescription: string | undefined,
): Promise<ExportReport | undefined> {
  let details: ExportDetails;
  try {
    details = await session.info(name);
  } catch (error) {
    if (error instanceof NbdOptionError && error.replyType === NBD_REP_ERR_UNSUP) return undefined;
    throw error;
  }
  const entry = fromDetails(details, listedDescription);
  if (session.structuredReplies) {
    try {
      entry.contexts = await session.listMetaContexts(name);
    } catch (error) {
      if (!(error instanceof NbdOptionError)) throw error;
    }
  }
  return entry;
}

function fromDetails(details: ExportDetails, listedDescription?: string): ExportReport {
  const entry: ExportReport = {
    requestedName: details.name,
    name: details.canonicalName || details.name,
    size: details.size,
    flags: details.flags,
  };
  const description = listedDescription || details.description;
  if (description) entry.description = description;
  if (details.blockSize) entry.blockSize = details.blockSize;
  return entry;
}

/**
 * Selects the export on the session's connection (which ends option mode)
 * and reports what GO said, keeping what option mode learnt (contexts).
 */
async function reportBySelecting(
  session: NbdHandshake,
  name: string,
  options: InspectOptions,
  known?: ExportReport,
): Promise<ExportReport> {
  let client: NbdClient;
  try {
    client = await NbdClient.fromHandshake(session, {
      exportName: name,
      metaContexts: [],
      requestTimeout: options.requestTimeout,
      signal: options.signal,
    });
  } catch (error) {
    await session.abort();
    throw error;
  }
  try {
    const entry = fromDetails(client.details, known?.description);
    if (known?.contexts) entry.contexts = known.contexts;
    if (options.probe) {
      const content = await options.probe(client);
      if (content !== undefined) entry.content = content;
    }
    return entry;
  } finally {
    await client.close();
  }
}

async function reportOnNewConnection(
  uri: NbdUri,
  name: string,
  options: InspectOptions,
  known?: ExportReport,
): Promise<ExportReport> {
  const session = await NbdHandshake.open({ ...uri, exportName: name }, options);
  return await reportBySelecting(session, name, options, known);
}
