/**
 * Faults switched at run time: the error filter's behaviour (requests of
 * some kinds fail with an errno at a rate), turned on and off per export
 * while the server runs, by the view's control endpoint (`nbd serve
 * --view --view-control`). The layer is inserted only then; while an
 * export's faults are off, a request costs one map lookup.
 *
 * @module
 */

import { ERRNO_VALUES, type ErrnoName } from "../protocol/constants.ts";
import type { FilterInstance } from "../core/backend.ts";
import {
  ERROR_COMMANDS,
  ErrorBackend,
  type ErrorCommand,
  type ErrorSetting,
  type ErrorSettings,
} from "./error.ts";

/** Which requests fail: reads (READ, CACHE), writes (WRITE, WRITE_ZEROES, TRIM, FLUSH) or all. */
export type FaultKinds = "read" | "write" | "all";

/** The kinds of request each choice fails. */
export const FAULT_COMMANDS: Readonly<Record<FaultKinds, readonly ErrorCommand[]>> = {
  read: ["pread", "cache"],
  write: ["pwrite", "zero", "trim", "flush"],
  all: ERROR_COMMANDS,
};

/** One export's fault state, as `/control` and `/stats` show it. */
export interface FaultState {
  /** Requests are failing now. */
  enabled: boolean;
  /** Which requests. */
  kinds: FaultKinds;
  /** The error they fail with. */
  errno: ErrnoName;
  /** Share of those requests that fail, 0..1. */
  rate: number;
}

/** A change to an export's fault state (`POST /control`). */
export interface FaultChange {
  /** Export name ("" = the default export). */
  export?: string;
  /** Turn the faults on or off. */
  enabled?: boolean;
  /** Which requests fail. */
  kinds?: FaultKinds;
  /** The error. */
  errno?: string;
  /** Share of requests that fail, 0..1. */
  rate?: number;
}

/** The state of an export nobody has switched yet. */
export const DEFAULT_FAULT_STATE: Readonly<FaultState> = Object.freeze({
  enabled: false,
  kinds: "all",
  errno: "EIO",
  rate: 1,
});

function settingsOf(state: FaultState): Record<ErrorCommand, ErrorSetting> {
  const failing = new Set<ErrorCommand>(FAULT_COMMANDS[state.kinds]);
  const out = {} as Record<ErrorCommand, ErrorSetting>;
  for (const command of ERROR_COMMANDS) {
    out[command] = { errno: state.errno, rate: failing.has(command) ? state.rate : 0 };
  }
  return out;
}

/** The fault state of every export of a server, switched at run time. */
export class FaultSwitch {
  readonly #states = new Map<string, FaultState>();
  // What the data path reads: present only for exports whose faults are on.
  readonly #active = new Map<string, Record<ErrorCommand, ErrorSetting>>();

  /** The state of `exportName`. */
  state(exportName: string): FaultState {
    return { ...(this.#states.get(exportName) ?? DEFAULT_FAULT_STATE) };
  }

  /** Every export switched so far. */
  states(): Map<string, FaultState> {
    return new Map([...this.#states].map(([name, state]) => [name, { ...state }]));
  }

  /** The settings requests of `exportName` follow now (undefined = none fail). */
  settings(exportName: string): ErrorSettings {
    return this.#active.get(exportName);
  }

  /**
   * Applies a change (the export defaults to ""); throws RangeError when a
   * field is invalid, changing nothing. Returns the export's new state.
   */
  change(change: FaultChange): { export: string; state: FaultState } {
    if (typeof change !== "object" || change === null) {
      throw new RangeError("expected a JSON object");
    }
    const name = change.export ?? "";
    if (typeof name !== "string") throw new RangeError("export: expected a string");
    const state = this.state(name);
    if (change.enabled !== undefined) {
      if (typeof change.enabled !== "boolean") {
        throw new RangeError("enabled: expected true or false");
      }
      state.enabled = change.enabled;
    }
    if (change.kinds !== undefined) {
      if (!(change.kinds in FAULT_COMMANDS)) {
        throw new RangeError(
          `kinds: expected read, write or all, got ${JSON.stringify(change.kinds)}`,
        );
      }
      state.kinds = change.kinds;
    }
    if (change.errno !== undefined) {
      const errno = String(change.errno).toUpperCase();
      if (!(errno in ERRNO_VALUES)) {
        throw new RangeError(
          `errno: expected one of ${Object.keys(ERRNO_VALUES).join(", ")}, got ${
            JSON.stringify(change.errno)
          }`,
        );
      }
      state.errno = errno as ErrnoName;
    }
    if (change.rate !== undefined) {
      if (typeof change.rate !== "number" || !(change.rate >= 0 && change.rate <= 1)) {
        throw new RangeError("rate: expected a number from 0 to 1");
      }
      state.rate = change.rate;
    }
    this.#states.set(name, state);
    if (state.enabled && state.rate > 0) this.#active.set(name, settingsOf(state));
    else this.#active.delete(name);
    return { export: name, state: { ...state } };
  }

  /** The layer that fails requests as this switch says, for the outermost place of each export. */
  layer(): FilterInstance {
    return {
      wrap: (next, context) => {
        const name = context.exportName;
        return Promise.resolve(new ErrorBackend(next, () => this.#active.get(name)));
      },
    };
  }
}

/** One line describing a fault state, for logs and `nbd stats`. */
export function describeFaults(state: FaultState): string {
  if (!state.enabled) return "off";
  const what = state.kinds === "all" ? "all requests" : `${state.kinds} requests`;
  return `on: ${what} fail with ${state.errno} at ${+(state.rate * 100).toFixed(2)}%`;
}
