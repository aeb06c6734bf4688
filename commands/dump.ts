/**
 * `nbd dump URI`: a hexdump of an export with an ASCII column, in
 * nbddump's layout. Repeated lines collapse into one `*`; zero regions the
 * server reports through block status are not even read.
 *
 * @module
 */

import { NbdClient } from "../client/client.ts";
import { BASE_ALLOCATION, NBD_STATE_ZERO } from "../protocol/constants.ts";
import { parseSize } from "../util/parse.ts";
import { TLS_OPTIONS, TLS_USAGE, withTlsFlags } from "./tls_options.ts";
import {
  CLIENT_OPTIONS,
  CLIENT_USAGE,
  type ClientTimeouts,
  clientTimeouts,
} from "./client_options.ts";
import { withUriArgument } from "./uri_argument.ts";
import { type Command, formatOptions, parseOptions } from "./command.ts";
import { BufferedTextWriter, writeStdout } from "./output.ts";

const OWN_OPTIONS = {
  offset: {
    type: "string",
    value: "N",
    help: "start at byte N (default 0; 512, 4K, 1M... accepted)",
  },
  length: { type: "string", short: "n", value: "N", help: "dump at most N bytes" },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const OPTIONS = { ...OWN_OPTIONS, ...CLIENT_OPTIONS, ...TLS_OPTIONS } as const;

const USAGE = `Usage: nbd dump [OPTIONS] URI

Print the content of an export as a hexdump: offset, 16 bytes in hex and
the same bytes as ASCII. A "*" line stands for lines equal to the one
before it.

Options:
${formatOptions(OWN_OPTIONS)}

URI may also be a server command, started for the command by socket activation
and stopped afterwards: nbd dump [OPTIONS] -- [ CMD ARGS ... ]

${CLIENT_USAGE}

${TLS_USAGE}

Examples:
  nbd dump nbd://localhost/disk
  nbd dump --offset 1M --length 4K "nbd+unix:///?socket=/tmp/nbd.sock"
`;

/** Bytes per read request. */
const CHUNK = 1024 * 1024;
/** Reads kept in flight ahead of the one being printed. */
const READ_AHEAD = 8;

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));
const ASCII = Array.from(
  { length: 256 },
  (_, i) => i >= 0x20 && i < 0x7f ? String.fromCharCode(i) : ".",
);

/** Formats one line of up to 16 bytes at `address`. */
export function formatLine(address: number, bytes: Uint8Array, count: number): string {
  let hex = "";
  let ascii = "";
  for (let j = 0; j < 16; j++) {
    if (j < count) {
      hex += HEX[bytes[j]!] + " ";
      ascii += ASCII[bytes[j]!];
    } else {
      hex += "   ";
      ascii += " ";
    }
    if (j === 7) hex += " ";
  }
  return `${address.toString(16).padStart(10, "0")}: ${hex}|${ascii}|\n`;
}

function allZero(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

function sameLine(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < 16; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * Turns a byte range into hexdump text. Feed it data and zero runs in
 * order, take the text as it accumulates, and call `finish` at the end.
 * A line equal to the previous one is replaced by a single `*` unless it
 * is the first or the last line of the range, as nbddump does.
 */
export class HexDumper {
  #address: number;
  readonly #end: number;
  readonly #line = new Uint8Array(16);
  #fill = 0;
  readonly #previous = new Uint8Array(16);
  #hasPrevious = false;
  #previousZero = false;
  #splat = false;
  #out: string[] = [];

  /** Dumps the range [start, end). */
  constructor(start: number, end: number) {
    this.#address = start;
    this.#end = end;
  }

  /** Takes the text produced so far. */
  take(): string {
    const text = this.#out.join("");
    this.#out = [];
    return text;
  }

  /** Feeds the next bytes of the range. */
  data(bytes: Uint8Array): void {
    let pos = 0;
    while (pos < bytes.length) {
      const n = Math.min(16 - this.#fill, bytes.length - pos);
      this.#line.set(bytes.subarray(pos, pos + n), this.#fill);
      this.#fill += n;
      pos += n;
      if (this.#fill === 16) this.#emit(16);
    }
  }

  /** Feeds `n` zero bytes without materialising them when the lines would collapse anyway. */
  zeros(n: number): void {
    while (n > 0) {
      if (this.#fill > 0 || !this.#hasPrevious || !this.#previousZero || n < 16) {
        const take = Math.min(n, 16 - this.#fill);
        this.#line.fill(0, this.#fill, this.#fill + take);
        this.#fill += take;
        n -= take;
        if (this.#fill === 16) this.#emit(16);
        continue;
      }
      // The previous line was all zeroes: whole zero lines collapse, except
      // the last line of the range, which is always printed.
      let lines = Math.floor(n / 16);
      if (this.#address + lines * 16 >= this.#end) lines--;
      if (lines === 0) {
        this.#line.fill(0);
        this.#fill = 16;
        n -= 16;
        this.#emit(16);
        continue;
      }
      if (!this.#splat) {
        this.#out.push("*\n");
        this.#splat = true;
      }
      this.#address += lines * 16;
      n -= lines * 16;
    }
  }

  /** Prints the last, partial line if there is one. */
  finish(): void {
    if (this.#fill > 0) this.#emit(this.#fill);
  }

  #emit(count: number): void {
    const line = this.#line;
    const last = this.#address + count >= this.#end;
    if (this.#hasPrevious && !last && count === 16 && sameLine(line, this.#previous)) {
      if (!this.#splat) {
        this.#out.push("*\n");
        this.#splat = true;
      }
    } else {
      this.#splat = false;
      this.#previous.set(line);
      this.#hasPrevious = true;
      this.#previousZero = allZero(line.subarray(0, count)) && count === 16;
      this.#out.push(formatLine(this.#address, line, count));
    }
    this.#address += count;
    this.#fill = 0;
  }
}

/** A piece of the range: bytes to read, or a run the server says reads as zeroes. */
interface Segment {
  offset: number;
  length: number;
  zero: boolean;
}

async function* segments(client: NbdClient, start: number, end: number): AsyncGenerator<Segment> {
  const split = function* (offset: number, length: number): Generator<Segment> {
    for (let pos = offset; pos < offset + length; pos += CHUNK) {
      yield { offset: pos, length: Math.min(CHUNK, offset + length - pos), zero: false };
    }
  };
  if (!client.canMetaContext(BASE_ALLOCATION) || end === start) {
    yield* split(start, end - start);
    return;
  }
  for await (const extent of client.iterateExtents(start, end - start)) {
    if (extent.flags & NBD_STATE_ZERO) yield { ...extent, zero: true };
    else yield* split(extent.offset, extent.length);
  }
}

/** Reads a range, widening it to the server's minimum block size where needed. */
async function readRange(client: NbdClient, offset: number, length: number): Promise<Uint8Array> {
  const minimum = client.blockSize.minimum;
  const from = Math.floor(offset / minimum) * minimum;
  const to = Math.min(client.size(), Math.ceil((offset + length) / minimum) * minimum);
  const buf = new Uint8Array(to - from);
  await client.pread(buf, from);
  return buf.subarray(offset - from, offset - from + length);
}

/** Options of `dumpExport`. */
export interface DumpOptions {
  /** First byte to dump. */
  offset: number;
  /** Bytes to dump (default: to the end of the export). */
  length?: number;
  /** Connect, handshake and request timeouts (defaults when absent). */
  timeouts?: ClientTimeouts;
}

/** Connects and prints the hexdump; resolves to the exit status. */
async function dumpExport(uri: string, options: DumpOptions): Promise<number> {
  await using client = await NbdClient.connect(uri, { ...options.timeouts });
  const size = client.size();
  if (options.offset > size) {
    throw new Error(`offset ${options.offset} is beyond the end of the export (size ${size})`);
  }
  const start = options.offset;
  const end = options.length === undefined ? size : Math.min(size, start + options.length);
  const dumper = new HexDumper(start, end);
  const output = new BufferedTextWriter();
  const queue: Array<{ segment: Segment; data?: Promise<Uint8Array> }> = [];
  const print = async (item: { segment: Segment; data?: Promise<Uint8Array> }) => {
    if (item.data) dumper.data(await item.data);
    else dumper.zeros(item.segment.length);
    await output.write(dumper.take());
  };
  try {
    for await (const segment of segments(client, start, end)) {
      const item: { segment: Segment; data?: Promise<Uint8Array> } = { segment };
      if (!segment.zero) {
        item.data = readRange(client, segment.offset, segment.length);
        // Errors are reported when the read's turn comes, not as unhandled rejections.
        item.data.catch(() => {});
      }
      queue.push(item);
      while (queue.length > READ_AHEAD) await print(queue.shift()!);
    }
    while (queue.length > 0) await print(queue.shift()!);
  } finally {
    // Whatever was dumped before a failure is still worth seeing.
    await output.flush();
  }
  dumper.finish();
  await writeStdout(dumper.take());
  return 0;
}

/** The `nbd dump` command. */
export const dumpCommand: Command = {
  name: "dump",
  summary: "hexdump the content of an export (like nbddump)",
  usage: USAGE,
  options: OPTIONS,
  async run(argv: string[]): Promise<number> {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      await writeStdout(USAGE);
      return 0;
    }
    const options = {
      offset: values.offset === undefined ? 0 : parseSize(values.offset, "--offset"),
      length: values.length === undefined ? undefined : parseSize(values.length, "--length"),
      timeouts: clientTimeouts(values),
    };
    return await withUriArgument(
      positionals,
      "dump",
      (uri) => dumpExport(withTlsFlags(uri, values), options),
    );
  },
};
