/**
 * The view of several sources in one page (`nbd view SOURCE...`): each
 * source is a log replayed here, or a live server's view (`nbd serve
 * --view`, `nbd proxy --view`) whose `/events`, `/stats`, `/metrics`,
 * `/replay` and `/control` this server relays, so the page talks to one
 * origin only (its security policy allows nothing else) and works without
 * any other network.
 *
 * - `GET /sources` lists the sources, each with its base path `/s/N`;
 * - `/s/N/events`, `/s/N/stats`, ... are source N's routes.
 *
 * Requests that change something (`POST /s/N/replay`, `POST /s/N/control`)
 * are relayed only for loopback peers: the servers behind would otherwise
 * see this server's loopback address and trust anyone who can reach it.
 *
 * @module
 */

import {
  json,
  listenView,
  pageResponse,
  peerOf,
  problem,
  type SourceInfo,
  type SourceRoutes,
  sourceRoutes,
  type ViewServer,
  type ViewServerOptions,
  type ViewSource,
  withPeer,
} from "./view_server.ts";

/** A source of a combined view: a local one (a log replay) or a remote view server. */
export type CombinedSource =
  | { label: string; local: ViewSource }
  | { label: string; remote: RemoteView };

/** A live server's view: its base URL and the token its control endpoint wants, if any. */
export interface RemoteView {
  /** Base URL, e.g. http://127.0.0.1:8080/. */
  url: URL;
  /** Sent as `Authorization: Bearer TOKEN`. */
  token?: string;
}

/** Paths of a source that are relayed to a remote view. */
const RELAYED = new Set(["/events", "/stats", "/metrics", "/replay", "/control", "/files"]);
const RELAY_TIMEOUT_MS = 10_000;

/**
 * Parses a remote source given on the command line: an http(s) URL of a
 * view, optionally with `?token=SECRET` for its control endpoint.
 */
export function parseRemoteView(text: string): RemoteView {
  const url = new URL(text);
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new RangeError(`expected an http:// URL, got "${text}"`);
  }
  const token = url.searchParams.get("token") ?? undefined;
  url.search = "";
  url.hash = "";
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  return { url, token };
}

/** Whether an address is the loopback interface. */
export function isLoopback(address: string | undefined): boolean {
  if (address === undefined) return false;
  return address === "::1" || /^127\./.test(address) || address === "::ffff:127.0.0.1" ||
    /^::ffff:127\./.test(address);
}

/** Relays requests for one source to a remote view server. */
class RemoteRoutes implements SourceRoutes {
  readonly #remote: RemoteView;
  readonly #open = new Set<AbortController>();

  constructor(remote: RemoteView) {
    this.#remote = remote;
  }

  get subscribers(): number {
    return this.#open.size;
  }

  async handle(request: Request, path: string, url: URL): Promise<Response | undefined> {
    if (!RELAYED.has(path)) return undefined;
    const changes = request.method !== "GET" && request.method !== "HEAD";
    if (changes && !isLoopback(peerOf(request))) {
      return problem(403, "changes are relayed only for pages on this machine (loopback)");
    }
    const target = new URL(path.slice(1), this.#remote.url);
    target.search = url.search;
    const abort = new AbortController();
    const streaming = path === "/events";
    // Not request.signal: a page that goes away cancels the relayed body instead.
    const signals = [abort.signal];
    // Naming the blocks of a large disk takes a while.
    if (!streaming) {
      signals.push(AbortSignal.timeout(path === "/files" ? 600_000 : RELAY_TIMEOUT_MS));
    }
    const headers = new Headers();
    const type = request.headers.get("content-type");
    if (type) headers.set("content-type", type);
    if (this.#remote.token) headers.set("authorization", `Bearer ${this.#remote.token}`);
    let upstream: Response;
    try {
      upstream = await fetch(target, {
        method: request.method,
        headers,
        body: changes ? await request.arrayBuffer() : undefined,
        signal: AbortSignal.any(signals),
      });
    } catch (error) {
      return problem(502, `Cannot reach ${this.#remote.url.origin}: ${(error as Error).message}`);
    }
    const out = new Headers();
    for (const name of ["content-type", "cache-control", "x-accel-buffering"]) {
      const value = upstream.headers.get(name);
      if (value) out.set(name, value);
    }
    if (!streaming || !upstream.ok || !upstream.body) {
      return new Response(await upstream.arrayBuffer(), { status: upstream.status, headers: out });
    }
    // An event stream lasts until the page or the remote ends it, or this server closes.
    this.#open.add(abort);
    const reader = upstream.body.getReader();
    const open = this.#open;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        try {
          const { done, value } = await reader.read();
          if (done) {
            open.delete(abort);
            controller.close();
          } else controller.enqueue(value);
        } catch {
          open.delete(abort);
          try {
            controller.close();
          } catch { /* cancelled already */ }
        }
      },
      cancel() {
        open.delete(abort);
        abort.abort();
        reader.cancel().catch(() => {});
      },
    });
    return new Response(body, { status: upstream.status, headers: out });
  }

  close(): void {
    for (const abort of this.#open) abort.abort();
    this.#open.clear();
  }
}

/** Starts a view server showing every source of `sources` side by side. */
export async function startCombinedView(
  sources: readonly CombinedSource[],
  options: ViewServerOptions = {},
): Promise<ViewServer> {
  const streams = new Set<() => void>();
  const routes: SourceRoutes[] = [];
  for (const source of sources) {
    routes.push(
      "local" in source
        ? await sourceRoutes(source.local, { frameInterval: options.frameInterval, streams })
        : new RemoteRoutes(source.remote),
    );
  }
  const list: SourceInfo[] = sources.map((source, i) => ({
    label: source.label,
    base: `/s/${i}`,
    kind: "local" in source && source.local.replay ? "replay" : "serve",
  }));
  const handler = async (
    request: Request,
    info: Deno.ServeHandlerInfo<Deno.NetAddr>,
  ): Promise<Response> => {
    const url = new URL(request.url);
    const m = /^\/s\/(\d+)(\/.*)$/.exec(url.pathname);
    if (m) {
      const route = routes[Number(m[1])];
      if (!route) return problem(404, `no source ${m[1]} (there are ${routes.length})`);
      const answer = await route.handle(withPeer(request, info), m[2]!, url);
      if (answer) return answer;
      return problem(404, `no such page: ${url.pathname}`);
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return problem(405, "only GET is served here (changes go to /s/N/...)");
    }
    if (url.pathname === "/sources") return json(list);
    if (url.pathname === "/stats" || url.pathname === "/metrics") {
      return problem(404, `several sources: each has its own, at /s/N${url.pathname}`);
    }
    return pageResponse(url.pathname) ?? problem(404, `no such page: ${url.pathname}`);
  };
  return await listenView(
    handler,
    options,
    () => routes.reduce((n, r) => n + r.subscribers, 0),
    () => routes.forEach((r) => r.close()),
  );
}
