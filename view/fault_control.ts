/**
 * The view's control endpoint (`nbd serve --view --view-control`):
 * `GET /control` gives every export's fault state, `POST /control` with
 * `{"export", "enabled", "kinds", "errno", "rate"}` changes one.
 *
 * Who may change it: without a token, only peers on loopback; with
 * `--view-token`, only requests carrying it (`Authorization: Bearer
 * TOKEN`), compared in constant time. In both cases the request must be
 * JSON (`content-type: application/json`, which a page of another origin
 * cannot send without a preflight this server never grants) and must not
 * come from a page of another origin (`Origin`, `Sec-Fetch-Site`). Every
 * change is logged.
 *
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";
import {
  describeFaults,
  type FaultChange,
  type FaultState,
  type FaultSwitch,
} from "../filters/fault_switch.ts";
import type { StatsSnapshot } from "./stats_snapshot.ts";
import { isLoopback } from "./combined_view.ts";
import { json, peerOf, problem } from "./view_server.ts";

/** Options of `faultControl`. */
export interface FaultControlOptions {
  /** Required on every change when set. */
  token?: string;
  /** Where each change is reported (one line). */
  log: (line: string) => void;
}

/** What a view source gains from the control endpoint. */
export interface FaultControl {
  /** Answers `/control`. */
  routes(request: Request, path: string): Promise<Response | undefined>;
  /** Adds each export's fault state (and that control is offered) to a snapshot. */
  annotate(snapshot: StatsSnapshot): StatsSnapshot;
}

function digest(text: string): Uint8Array {
  return createHash("sha256").update(text).digest();
}

/** Compares two secrets in time independent of where they differ (hashes first: equal lengths). */
export function sameSecret(given: string, expected: string): boolean {
  return timingSafeEqual(digest(given), digest(expected));
}

/** Why `request` may not change anything, or undefined when it may. */
export function refusal(request: Request, token: string | undefined): string | undefined {
  const type = request.headers.get("content-type") ?? "";
  if (!/^application\/json\b/i.test(type)) return "expected content-type: application/json";
  const site = request.headers.get("sec-fetch-site");
  if (site && site !== "same-origin" && site !== "none") return "refused: another site's page";
  const origin = request.headers.get("origin");
  const host = request.headers.get("host");
  if (origin && origin !== "null") {
    let originHost = "";
    try {
      originHost = new URL(origin).host;
    } catch { /* not a URL: refused below */ }
    if (originHost !== host) return "refused: another site's page";
  }
  if (token !== undefined) {
    const m = /^Bearer\s+(\S+)$/i.exec(request.headers.get("authorization") ?? "");
    if (!m || !sameSecret(m[1]!, token)) return "a valid token is required (--view-token)";
    return undefined;
  }
  if (!isLoopback(peerOf(request))) {
    return "changes are accepted only from loopback (or with --view-token)";
  }
  return undefined;
}

/** The control endpoint over `faults`. */
export function faultControl(faults: FaultSwitch, options: FaultControlOptions): FaultControl {
  const tokenRequired = options.token !== undefined;
  const all = (): Record<string, FaultState> => Object.fromEntries(faults.states());
  return {
    async routes(request, path) {
      if (path !== "/control") return undefined;
      if (request.method === "GET" || request.method === "HEAD") {
        return json({ tokenRequired, exports: all() });
      }
      if (request.method !== "POST") return problem(405, "use GET or POST");
      const why = refusal(request, options.token);
      if (why) return problem(403, why);
      let change: FaultChange;
      try {
        change = await request.json();
      } catch (error) {
        return problem(400, `expected a JSON object: ${(error as Error).message}`);
      }
      let result;
      try {
        result = faults.change(change);
      } catch (error) {
        return problem(400, (error as Error).message);
      }
      const who = peerOf(request) ?? "?";
      options.log(
        `view control: export ${JSON.stringify(result.export)} faults ${
          describeFaults(result.state)
        } (from ${who})`,
      );
      return json(result);
    },
    annotate(snapshot) {
      return {
        ...snapshot,
        control: { tokenRequired },
        exports: snapshot.exports.map((e) => ({ ...e, faults: faults.state(e.name) })),
      };
    },
  };
}
