/**
 * What the page reads from the view server: the parts of the `/events`
 * stream's payloads and of `POST /replay`'s answer that it uses. The
 * server's own types (ActivityFrame, StatsSnapshot, ReplayState) must be
 * assignable to these; view/page_script_test.ts fails to type-check when
 * they drift apart.
 *
 * @module
 */

/** A "frame" event: cells touched since the previous frame, per kind. */
export interface PageFrame {
  /** Export size in bytes. */
  size: number;
  /** Bytes per cell. */
  block: number;
  /** Number of cells. */
  cells: number;
  /** Kind and its runs of cells, as flat pairs [start, count, ...]. */
  kinds: Array<[string, number[]]>;
  /** Requests per command in this frame. */
  requests: Record<string, number>;
}

/** Latency percentiles in microseconds, null without requests. */
export interface PageLatency {
  /** Median. */
  p50: number | null;
  /** 90th percentile. */
  p90: number | null;
  /** 99th percentile. */
  p99: number | null;
}

/** The counters of one command of an export. */
export interface PageCommand {
  /** Requests received. */
  received: number;
  /** Received and not yet answered. */
  inFlight: number;
  /** Answered successfully. */
  completed: number;
  /** Answered with an error. */
  failed: number;
  /** Bytes covered by successful requests. */
  bytes: number;
  /** Latency percentiles. */
  latencyMicros: PageLatency;
}

/** One export of a "stats" event. */
export interface PageExport {
  /** Export name ("" = the default export). */
  name: string;
  /** Size in bytes, null until a client has opened it. */
  size: number | null;
  /** Per-command counters. */
  commands: Record<string, PageCommand>;
  /** Seconds since the last request, or null. */
  secondsSinceLastRequest: number | null;
  /** Seconds since the last reply, or null. */
  secondsSinceLastReply: number | null;
  /** Totals over all commands. */
  requests: { inFlight: number };
  /** Injected faults, when the server offers control. */
  faults?: PageFaults;
}

/** An export's injected faults (`/control`, and the stats of a server with `--view-control`). */
export interface PageFaults {
  /** Requests are failing now. */
  enabled: boolean;
  /** read, write or all. */
  kinds: string;
  /** The error. */
  errno: string;
  /** Share of those requests that fail, 0..1. */
  rate: number;
}

/** One open connection of a "stats" event. */
export interface PageConnection {
  /** Connection number. */
  id: number;
  /** Peer address. */
  peer: string;
  /** Export chosen, or null during the handshake. */
  export: string | null;
  /** TLS negotiated. */
  tls: boolean;
  /** Negotiated features. */
  features: string[];
  /** Totals over all commands. */
  requests: { completed: number; inFlight: number };
  /** Seconds since it connected. */
  secondsConnected: number;
}

/** A "stats" event (the `/stats` document). */
export interface PageStats {
  /** "replay" for a log replay. */
  mode: string;
  /** Seconds since the start. */
  uptimeSeconds: number;
  /** Connections open now. */
  connectionsOpen: number;
  /** Connections accepted since the start. */
  connectionsTotal: number;
  /** Exports. */
  exports: PageExport[];
  /** Open connections. */
  connections: PageConnection[];
  /** Present when the server offers fault injection. */
  control?: { tokenRequired: boolean };
}

/** A "replay" event, and the answer to `POST /replay`. */
export interface PageReplay {
  /** Position in the log, in seconds. */
  position: number;
  /** Length of the log in seconds. */
  duration: number;
  /** Log seconds replayed per second. */
  speed: number;
  /** Paused. */
  paused: boolean;
  /** Every line has been replayed. */
  done: boolean;
  /** Requests replayed so far. */
  replayed: number;
  /** Requests in the log. */
  requests: number;
}

/** A "hello" event: the export this stream follows. */
export interface PageHello {
  /** Export name. */
  export: string;
  /** The source replays a log. */
  replay?: boolean;
}

/** A "failure" event: why the stream ends. */
export interface PageFailure {
  /** One-line reason. */
  message: string;
}

/** One source of the page (`GET /sources`). */
export interface PageSource {
  /** Shown above its map. */
  label: string;
  /** Path prefix of its routes ("" = the root). */
  base: string;
  /** "serve" or "replay". */
  kind: string;
}

/** One owned range of `/files`. */
export interface PageOwnedExtent {
  /** Offset in bytes. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** Path or structure. */
  owner: string;
  /** file, directory or metadata. */
  kind: string;
}

/** The `/files` document: who owns each block of an export. */
export interface PageOwners {
  /** The export analysed. */
  export: string;
  /** Filesystems found. */
  filesystems: Array<{ partition: number; type: string; error?: string }>;
  /** Owned ranges by offset. */
  extents: PageOwnedExtent[];
}
