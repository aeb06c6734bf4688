/**
 * The observability HTTP server that `nbd serve --view` and `nbd view`
 * run in the same process as the data they show:
 *
 * - `GET /` the block-activity page (its script and style at `/view.js`
 *   and `/view.css`, all compiled into the program);
 * - `GET /stats` the counters as JSON;
 * - `GET /metrics` the counters in the Prometheus text format;
 * - `GET /events?export=NAME&cells=N|block=N` a Server-Sent Events stream
 *   of block-map frames (every 80 ms while something happens), counter
 *   snapshots (twice a second) and, for a replay, its position;
 * - `GET /replay`, `POST /replay` the replay position and controls;
 * - `GET /files?export=NAME[&refresh]` the file, directory or structure
 *   owning each block (formats/block_owners.ts), for live servers;
 * - `GET /sources` the sources the page shows (here one, at the root;
 *   view/combined_view.ts serves several under `/s/N/`).
 *
 * Nothing is recorded for the map unless a page is subscribed: each
 * subscriber hooks `ServerStats.listeners` for as long as its stream lasts.
 *
 * @module
 */

import type { ServerStats } from "../server/stats.ts";
import { ActivityAggregator, MAX_CELLS } from "./activity.ts";
import { formatMetrics, METRICS_CONTENT_TYPE } from "./metrics.ts";
import { PAGE_HTML } from "./page_html.ts";
import { PAGE_SCRIPT } from "./page_script.ts";
import { PAGE_STYLE } from "./page_style.ts";
import { type StatsSnapshot, statsSnapshot } from "./stats_snapshot.ts";
import type { DiskReader } from "../formats/disk_reader.ts";
import { type BlockOwners, blockOwners } from "../formats/block_owners.ts";

/** Where a replay stands, as `GET /replay` and the page's controls show it. */
export interface ReplayState {
  /** Log file being replayed. */
  file: string;
  /** Position in the log, in seconds from its first line. */
  position: number;
  /** Length of the log in seconds. */
  duration: number;
  /** Log seconds replayed per wall-clock second. */
  speed: number;
  /** Paused. */
  paused: boolean;
  /** Every line has been replayed. */
  done: boolean;
  /** Requests replayed so far, of `requests` in the log. */
  replayed: number;
  /** Requests in the log. */
  requests: number;
  /** Increments at every restart (the page clears its map). */
  run: number;
}

/** Changes to a replay, as `POST /replay` takes them. */
export interface ReplayChange {
  /** New speed (log seconds per second, > 0). */
  speed?: number;
  /** Pause or resume. */
  paused?: boolean;
  /** Start again from the first line. */
  restart?: boolean;
}

/** What a replay offers the view server. */
export interface ReplayControl {
  /** The current state. */
  state(): ReplayState;
  /** Applies a change; throws RangeError for a bad speed. */
  change(change: ReplayChange): ReplayState;
}

/** What the view shows: the counters, the export list and, for a replay, its controls. */
export interface ViewSource {
  /** The counters (also the event hook). */
  readonly stats: ServerStats;
  /** Names of the exports the server offers. */
  listExports(): Promise<string[]>;
  /** Present when replaying a log. */
  readonly replay?: ReplayControl;
  /** Shown above the source's map when several sources share a page. */
  readonly label?: string;
  /** More routes of this source (e.g. `/control`), tried before the standard ones. */
  routes?(request: Request, path: string): Promise<Response | undefined>;
  /** Adds to a `/stats` snapshot what the source knows besides the counters. */
  annotate?(snapshot: StatsSnapshot): StatsSnapshot;
  /** Opens an export for reading, for `/files` (absent: a log has no data to read). */
  openDisk?(exportName: string): Promise<OpenDisk>;
}

/** An export opened for analysis. */
export interface OpenDisk {
  /** Reads it. */
  reader: DiskReader;
  /** Releases it. */
  close(): Promise<void>;
}

/** The `/stats` document of `source`, as `/stats` and the event stream send it. */
export function sourceSnapshot(source: ViewSource, exports: readonly string[]): StatsSnapshot {
  const snapshot = statsSnapshot(source.stats, exports, source.replay ? "replay" : "serve");
  return source.annotate ? source.annotate(snapshot) : snapshot;
}

/** Options of `startViewServer`. */
export interface ViewServerOptions {
  /** Address to listen on (default 127.0.0.1). */
  hostname?: string;
  /** Port (default 8080; 0 = any free port). */
  port?: number;
  /** Frame interval in milliseconds (default 80: 12.5 frames a second). */
  frameInterval?: number;
}

/** A running view server. */
export interface ViewServer extends AsyncDisposable {
  /** Base URL, e.g. http://127.0.0.1:8080/. */
  readonly url: string;
  /** Pages currently subscribed to the event stream. */
  readonly subscribers: number;
  /** Ends every event stream and stops listening. */
  close(): Promise<void>;
}

/** Most event streams at once; more are refused with 503, which bounds memory. */
const MAX_SUBSCRIBERS = 16;
const STATS_EVERY = 10; // frames: twice a second at the default interval
const REPLAY_EVERY = 5;
const EXPORT_LIST_TTL_MS = 2000;

/** The default view address. */
export const DEFAULT_VIEW_ADDRESS = "127.0.0.1:8080";

/**
 * Parses a view address: `HOST:PORT`, `[IPV6]:PORT`, `:PORT` or `PORT`
 * (host 127.0.0.1), or `HOST` (port 8080). Throws RangeError when invalid.
 *
 * @example
 * ```ts
 * parseViewAddress("0.0.0.0:9000"); // { hostname: "0.0.0.0", port: 9000 }
 * parseViewAddress("8081");         // { hostname: "127.0.0.1", port: 8081 }
 * ```
 */
export function parseViewAddress(text: string): { hostname: string; port: number } {
  let host = "127.0.0.1";
  let port = "8080";
  const v6 = /^\[([0-9a-fA-F:.]+)\](?::(\d+))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    port = v6[2] ?? port;
  } else if (/^\d+$/.test(text)) {
    port = text;
  } else {
    const m = /^([^:\s]*):(\d+)$/.exec(text) ?? /^([^:\s]+)()$/.exec(text);
    if (!m) throw new RangeError(`Cannot parse view address: "${text}" is not HOST:PORT`);
    if (m[1]) host = m[1];
    if (m[2]) port = m[2];
  }
  const n = Number(port);
  if (n > 65535) throw new RangeError(`Cannot parse view address: bad port "${port}"`);
  return { hostname: host, port: n };
}

/** Whether a command-line word looks like a view address (so `--view ADDR` may take it). */
export function looksLikeViewAddress(word: string): boolean {
  return /^(\[[0-9a-fA-F:.]+\]:\d+|[^:\s/=]*:\d+|\d+)$/.test(word);
}

const encoder = new TextEncoder();

function sse(event: string, data: unknown): Uint8Array {
  return encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

/** One page's event stream. */
class Subscriber {
  readonly #source: ViewSource;
  readonly #aggregator: ActivityAggregator;
  readonly #controller: ReadableStreamDefaultController<Uint8Array>;
  readonly #exports: () => string[];
  readonly #onClose: () => void;
  readonly #listener: (event: Parameters<ActivityAggregator["add"]>[0]) => void;
  readonly #timer: ReturnType<typeof setInterval>;
  #ticks = 0;
  #layoutSent = "";
  #run = -1;
  #closed = false;

  constructor(
    source: ViewSource,
    aggregator: ActivityAggregator,
    controller: ReadableStreamDefaultController<Uint8Array>,
    options: { interval: number; exports: () => string[]; onClose: () => void },
  ) {
    this.#source = source;
    this.#aggregator = aggregator;
    this.#controller = controller;
    this.#exports = options.exports;
    this.#onClose = options.onClose;
    const sizes = source.stats.exportSizes;
    const name = aggregator.exportName;
    // The data-path hook: a name check, then bit setting in the aggregator.
    this.#listener = (event) => {
      if (event.exportName !== name) return;
      if (aggregator.cells === 0) {
        const size = sizes.get(name);
        if (size === undefined || !this.#layout(size)) return;
      }
      aggregator.add(event);
    };
    source.stats.listeners.add(this.#listener);
    this.#run = source.replay?.state().run ?? -1;
    this.#send("hello", { export: name, replay: source.replay !== undefined });
    this.#sendStats();
    this.#tick();
    this.#timer = setInterval(() => this.#tick(), options.interval);
  }

  /** Lays the map out for `size`; on failure tells the page and closes. */
  #layout(size: number): boolean {
    try {
      this.#aggregator.resize(size);
      return true;
    } catch (error) {
      this.#send("failure", { message: (error as Error).message });
      this.close();
      return false;
    }
  }

  #send(event: string, data: unknown): void {
    if (this.#closed) return;
    try {
      this.#controller.enqueue(sse(event, data));
    } catch {
      this.close();
    }
  }

  #sendStats(): void {
    this.#send("stats", sourceSnapshot(this.#source, this.#exports()));
  }

  #tick(): void {
    if (this.#closed) return;
    // A page that does not keep up gets no new frames until it does: the
    // bits keep accumulating, so the next frame still covers everything.
    if ((this.#controller.desiredSize ?? 1) <= 0) return;
    const ticks = this.#ticks++;
    const replay = this.#source.replay?.state();
    if (replay && replay.run !== this.#run) {
      this.#run = replay.run;
      this.#aggregator.take(); // what is pending belongs to the previous run
      this.#send("reset", { run: replay.run });
    }
    const aggregator = this.#aggregator;
    const size = this.#source.stats.exportSizes.get(aggregator.exportName);
    if (size !== undefined && size !== aggregator.size) {
      if (aggregator.pending) this.#send("frame", aggregator.take());
      if (!this.#layout(size)) return;
    }
    const layout = `${aggregator.size}/${aggregator.block}`;
    if (aggregator.cells > 0 && (aggregator.pending || layout !== this.#layoutSent)) {
      this.#layoutSent = layout;
      this.#send("frame", aggregator.take());
    }
    if (replay && ticks % REPLAY_EVERY === 0) this.#send("replay", replay);
    if (ticks % STATS_EVERY === 0 && ticks > 0) this.#sendStats();
  }

  get closed(): boolean {
    return this.#closed;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    this.#source.stats.listeners.delete(this.#listener);
    try {
      this.#controller.close();
    } catch { /* the page went away first */ }
    this.#onClose();
  }
}

/** Options of `eventStream`. */
export interface EventStreamOptions {
  /** Export whose block map is streamed. */
  exportName: string;
  /** Fixed bytes per cell; otherwise chosen from `maxCells`. */
  block?: number;
  /** Most cells the page can show (when `block` is not given). */
  maxCells?: number;
  /** Frame interval in milliseconds (default 80). */
  interval?: number;
  /** Export names for the counter snapshots (synchronous: a cached list). */
  exports?: () => string[];
  /** Called once the stream starts, with a function that ends it. */
  onOpen?: (close: () => void) => void;
  /** Called when the stream ends, whichever side ended it. */
  onClose?: () => void;
}

/** Chunks a page may leave unread before frames are held back (and merged). */
export const EVENT_QUEUE_CHUNKS = 8;

/**
 * The `/events` stream of one page: "hello", then "frame" events (block
 * runs per kind, at most every `interval` ms while something happens),
 * "stats" snapshots twice a second, and for a replay "replay" positions and
 * a "reset" at each restart. At most EVENT_QUEUE_CHUNKS chunks wait unread;
 * beyond that, frames are held back and merged into the next one, so a
 * slow page costs bounded memory and still sees every block.
 */
export function eventStream(
  source: ViewSource,
  options: EventStreamOptions,
): ReadableStream<Uint8Array> {
  const aggregator = new ActivityAggregator(options.exportName, {
    block: options.block,
    maxCells: options.maxCells,
  });
  let subscriber: Subscriber | undefined;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      subscriber = new Subscriber(source, aggregator, controller, {
        interval: options.interval ?? 80,
        exports: options.exports ?? (() => []),
        onClose: () => options.onClose?.(),
      });
      const s = subscriber;
      // It may have ended already (an export too large for a fixed block size).
      if (!s.closed) options.onOpen?.(() => s.close());
    },
    cancel() {
      subscriber?.close();
    },
  }, new CountQueuingStrategy({ highWaterMark: EVENT_QUEUE_CHUNKS }));
}

function text(body: string, type: string, status = 200): Response {
  return new Response(body, {
    status,
    headers: {
      "content-type": type,
      "cache-control": "no-store",
      "x-content-type-options": "nosniff",
    },
  });
}

/** A JSON response. */
export function json(body: unknown, status = 200): Response {
  return text(JSON.stringify(body, null, 2) + "\n", "application/json; charset=utf-8", status);
}

/** A one-line plain-text error response. */
export function problem(status: number, message: string): Response {
  return text(`${message}\n`, "text/plain; charset=utf-8", status);
}

/** Parses an optional positive integer query parameter; undefined when absent. */
function integerParam(
  params: URLSearchParams,
  name: string,
  min: number,
  max: number,
): number | undefined {
  const value = params.get(name);
  if (value === null || value === "" || value === "auto") return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < min || n > max) {
    throw new RangeError(`${name}: expected an integer from ${min} to ${max}, got "${value}"`);
  }
  return n;
}

/** One source as the page lists it (`GET /sources`). */
export interface SourceInfo {
  /** What the page shows above the source's map. */
  label: string;
  /** Path prefix of the source's `/events`, `/stats`, `/replay`... ("" = the root). */
  base: string;
  /** "serve" for a live server (local or remote), "replay" for a log. */
  kind: "serve" | "replay";
}

/**
 * The per-source part of the view: `/stats`, `/metrics`, `/events`,
 * `/replay` (and what a source adds, such as `/control`), answered for
 * paths relative to the source's base.
 */
export interface SourceRoutes {
  /** Answers `request` for `path` (relative to the source's base), or undefined when not its. */
  handle(request: Request, path: string, url: URL): Promise<Response | undefined>;
  /** Open event streams. */
  readonly subscribers: number;
  /** Ends every event stream. */
  close(): void;
}

/** Options of `sourceRoutes`. */
export interface SourceRoutesOptions {
  /** Frame interval in milliseconds (default 80). */
  frameInterval?: number;
  /** Counts event streams across sources (MAX_SUBSCRIBERS bounds their sum). */
  streams?: Set<() => void>;
}

/** Serves one local source: its counters, event streams and replay controls. */
export async function sourceRoutes(
  source: ViewSource,
  options: SourceRoutesOptions = {},
): Promise<SourceRoutes> {
  const interval = options.frameInterval ?? 80;
  const all = options.streams ?? new Set<() => void>();
  const mine = new Set<() => void>();
  // Listing exports may be expensive (a proxy asks its upstream), so the
  // list is cached for a while and shared by every page and scrape.
  let exportList: string[] = [];
  let exportListAt = -Infinity;
  let refreshing: Promise<string[]> | undefined;
  const currentExports = (): Promise<string[]> => {
    if (performance.now() - exportListAt <= EXPORT_LIST_TTL_MS) return Promise.resolve(exportList);
    refreshing ??= source.listExports()
      .then((list) => exportList = list, () => exportList) // keep the old list on failure
      .finally(() => {
        exportListAt = performance.now();
        refreshing = undefined;
      });
    return refreshing;
  };
  // Subscribers read the cached list synchronously; it is refreshed in the background.
  const cachedExports = (): string[] => {
    currentExports().catch(() => {});
    return exportList;
  };
  await currentExports();

  const events = (params: URLSearchParams): Response => {
    if (all.size >= MAX_SUBSCRIBERS) {
      return problem(503, `too many pages open (at most ${MAX_SUBSCRIBERS})`);
    }
    let block: number | undefined;
    let cells: number | undefined;
    try {
      block = integerParam(params, "block", 512, 2 ** 50);
      cells = integerParam(params, "cells", 1, MAX_CELLS);
    } catch (error) {
      return problem(400, (error as Error).message);
    }
    let closer: (() => void) | undefined;
    const body = eventStream(source, {
      exportName: params.get("export") ?? cachedExports()[0] ?? "",
      block,
      maxCells: cells,
      interval,
      exports: cachedExports,
      onOpen: (close) => {
        closer = close;
        all.add(close);
        mine.add(close);
      },
      onClose: () => {
        if (!closer) return;
        all.delete(closer);
        mine.delete(closer);
      },
    });
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-store",
        "x-accel-buffering": "no",
      },
    });
  };

  // Block owners per export: computed when first asked for, again when asked to refresh.
  const owners = new Map<string, Promise<BlockOwners & { analysedAt: string }>>();
  const files = async (params: URLSearchParams): Promise<Response> => {
    const open = source.openDisk;
    if (!open) return problem(404, "no data to name blocks from (a log replay)");
    const name = params.get("export") ?? cachedExports()[0] ?? "";
    let pending = owners.get(name);
    if (!pending || params.has("refresh")) {
      pending = (async () => {
        const disk = await open(name);
        try {
          return { ...await blockOwners(disk.reader), analysedAt: new Date().toISOString() };
        } finally {
          await disk.close();
        }
      })();
      owners.set(name, pending);
      // A failure is not kept: the next request tries again.
      pending.catch(() => owners.get(name) === pending && owners.delete(name));
    }
    try {
      return json({ export: name, ...await pending });
    } catch (error) {
      return problem(
        500,
        `Cannot name the blocks of ${JSON.stringify(name)}: ${(error as Error).message}`,
      );
    }
  };

  const replay = async (request: Request): Promise<Response> => {
    const control = source.replay;
    if (!control) return problem(404, "not replaying a log (this is a live server)");
    if (request.method === "GET" || request.method === "HEAD") return json(control.state());
    if (request.method !== "POST") return problem(405, "use GET or POST");
    let change: ReplayChange;
    try {
      change = await request.json();
      if (typeof change !== "object" || change === null) throw new TypeError("not an object");
    } catch (error) {
      return problem(400, `expected a JSON object: ${(error as Error).message}`);
    }
    try {
      return json(control.change(change));
    } catch (error) {
      return problem(400, (error as Error).message);
    }
  };

  return {
    async handle(request, path, url) {
      if (path === "/replay") return await replay(request);
      if (source.routes) {
        const answer = await source.routes(request, path);
        if (answer) return answer;
      }
      if (path === "/control") {
        return problem(404, "no fault control here (nbd serve --view --view-control offers it)");
      }
      if (request.method !== "GET" && request.method !== "HEAD") return undefined;
      switch (path) {
        case "/stats":
          return json(sourceSnapshot(source, await currentExports()));
        case "/metrics":
          return text(formatMetrics(source.stats, await currentExports()), METRICS_CONTENT_TYPE);
        case "/events":
          return events(url.searchParams);
        case "/files":
          return await files(url.searchParams);
        default:
          return undefined;
      }
    },
    get subscribers() {
      return mine.size;
    },
    close() {
      for (const close of [...mine]) close();
    },
  };
}

/** The page itself: HTML, script, style; undefined for other paths. */
export function pageResponse(path: string): Response | undefined {
  switch (path) {
    case "/":
    case "/index.html":
      return new Response(PAGE_HTML, {
        headers: {
          "content-type": "text/html; charset=utf-8",
          "cache-control": "no-store",
          // The page needs nothing from elsewhere: forbid it outright.
          "content-security-policy":
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:",
        },
      });
    case "/view.js":
      return text(PAGE_SCRIPT, "text/javascript; charset=utf-8");
    case "/view.css":
      return text(PAGE_STYLE, "text/css; charset=utf-8");
    case "/favicon.ico":
      return new Response(null, { status: 204 });
    default:
      return undefined;
  }
}

/**
 * Listens with `handler` and returns the running server; `beforeClose`
 * ends what would keep a response open (event streams) before shutdown
 * waits for the responses to finish.
 */
export async function listenView(
  handler: (request: Request, info: Deno.ServeHandlerInfo<Deno.NetAddr>) => Promise<Response>,
  options: ViewServerOptions,
  subscribers: () => number,
  beforeClose: () => void,
): Promise<ViewServer> {
  const { promise: listening, resolve: onListening } = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname: options.hostname ?? "127.0.0.1",
    port: options.port ?? 8080,
    onListen: (addr) => onListening(addr as Deno.NetAddr),
    onError: (error) => problem(500, (error as Error).message),
  }, handler);
  const addr = await listening;
  const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
  const url = `http://${host}:${addr.port}/`;
  let closed: Promise<void> | undefined;
  const close = () => {
    closed ??= (async () => {
      beforeClose();
      await server.shutdown();
    })();
    return closed;
  };
  return {
    url,
    get subscribers() {
      return subscribers();
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** Starts the view server for `source`. */
export async function startViewServer(
  source: ViewSource,
  options: ViewServerOptions = {},
): Promise<ViewServer> {
  const routes = await sourceRoutes(source, { frameInterval: options.frameInterval });
  const sources: SourceInfo[] = [{
    label: source.label ?? "",
    base: "",
    kind: source.replay ? "replay" : "serve",
  }];
  const handler = async (
    request: Request,
    info: Deno.ServeHandlerInfo<Deno.NetAddr>,
  ): Promise<Response> => {
    const url = new URL(request.url);
    const answer = await routes.handle(withPeer(request, info), url.pathname, url);
    if (answer) return answer;
    if (request.method !== "GET" && request.method !== "HEAD") {
      return problem(405, "only GET (and POST /replay) are served");
    }
    if (url.pathname === "/sources") return json(sources);
    return pageResponse(url.pathname) ?? problem(404, `no such page: ${url.pathname}`);
  };
  return await listenView(handler, options, () => routes.subscribers, () => routes.close());
}

const PEERS = new WeakMap<Request, string>();

/** Remembers the peer address of `request` (for checks that only loopback may pass). */
export function withPeer(request: Request, info: Deno.ServeHandlerInfo<Deno.NetAddr>): Request {
  PEERS.set(request, info.remoteAddr.hostname);
  return request;
}

/** The peer address `withPeer` remembered for `request`, or undefined. */
export function peerOf(request: Request): string | undefined {
  return PEERS.get(request);
}
