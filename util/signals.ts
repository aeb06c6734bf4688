/**
 * How the process stops on SIGINT, SIGTERM and SIGHUP, in one place.
 * `installSignalHandlers` (called by main.ts before anything else) turns
 * the first signal into an aborted `terminationSignal()`, which every
 * connection attempt, handshake and copy honours, so a command stops
 * gracefully whatever it is waiting for; commands that must tidy up
 * listen to the same signal. A command still running `HARD_STOP_MS` after
 * the first signal, or any second signal, stops the process at once after
 * running the synchronous clean-ups registered with `registerCleanup`.
 *
 * @module
 */

/** The signals that stop a command. */
export const STOP_SIGNALS: readonly Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];

/** How long requests in flight may take to finish once stopping, before they are abandoned. */
export const GRACE_MS = 5_000;

/** How long after the first signal the process stops, whatever it is doing. */
export const HARD_STOP_MS = 10_000;

const NUMBERS: Partial<Record<Deno.Signal, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGSEGV: 11,
  SIGPIPE: 13,
  SIGTERM: 15,
};

/** The number of a signal (0 when unknown). */
export function signalNumber(signal: Deno.Signal): number {
  return NUMBERS[signal] ?? 0;
}

/** The conventional exit status after `signal`: 128 plus its number (130 for SIGINT). */
export function signalExitCode(signal: Deno.Signal): number {
  return 128 + signalNumber(signal);
}

/** The reason of an aborted `terminationSignal()`: the process was asked to stop. */
export class Interrupted extends Error {
  /** The signal that stopped the work. */
  readonly signal: Deno.Signal;
  /** The exit status that goes with it. */
  readonly exitCode: number;

  /** Creates the error for `signal`; `detail` says what was going on ("while connecting to ..."). */
  constructor(signal: Deno.Signal = "SIGINT", detail?: string) {
    super(`interrupted by ${signal}${detail ? ` ${detail}` : ""}`);
    this.name = "Interrupted";
    this.signal = signal;
    this.exitCode = signalExitCode(signal);
  }
}

const controller = new AbortController();
let received: Deno.Signal | undefined;
let installed: (() => void) | undefined;
const cleanups = new Set<() => void>();

/**
 * Aborted (with an `Interrupted` reason) when the process receives its
 * first stop signal; never aborted unless `installSignalHandlers` ran.
 */
export function terminationSignal(): AbortSignal {
  return controller.signal;
}

/** The first stop signal received, if any. */
export function receivedSignal(): Deno.Signal | undefined {
  return received;
}

/**
 * Registers a synchronous, quick clean-up to run when the process stops at
 * once (a second signal, or the hard stop): stop servers started for the
 * command, remove a temporary file. The returned function unregisters it.
 */
export function registerCleanup(fn: () => void): () => void {
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

/** Runs every registered clean-up now, ignoring their errors. */
export function runCleanupsNow(): void {
  for (const fn of [...cleanups]) {
    cleanups.delete(fn);
    try {
      fn();
    } catch { /* best effort: the process is going away */ }
  }
}

/** Options of `installSignalHandlers`. */
export interface SignalHandlerOptions {
  /** Ends the process with a status (main.ts passes Deno.exit). */
  exit: (code: number) => void;
  /** Writes one line to stderr. */
  report: (message: string) => void;
  /** Milliseconds from the first signal to the forced stop (default `HARD_STOP_MS`). */
  hardStopMs?: number;
}

/**
 * Installs the stop-signal handlers once for the process: the first signal
 * aborts `terminationSignal()` and arms the hard stop; a second one stops
 * at once. Returns a function that removes them.
 */
export function installSignalHandlers(options: SignalHandlerOptions): () => void {
  if (installed) return installed;
  const hardStopMs = options.hardStopMs ?? HARD_STOP_MS;
  const stopNow = (signal: Deno.Signal, why: string) => {
    options.report(why);
    runCleanupsNow();
    options.exit(signalExitCode(signal));
  };
  const handlers = STOP_SIGNALS.map((signal) => {
    const handler = () => {
      if (received === undefined) {
        received = signal;
        controller.abort(new Interrupted(signal));
        const timer = setTimeout(
          () =>
            stopNow(
              signal,
              `still stopping ${hardStopMs / 1000} s after ${signal}: stopping at once`,
            ),
          hardStopMs,
        );
        // The timer must not by itself keep a finished command alive.
        Deno.unrefTimer(timer);
        return;
      }
      stopNow(received, "interrupted again: stopping at once");
    };
    try {
      Deno.addSignalListener(signal, handler);
    } catch { /* the platform lacks this signal */ }
    return [signal, handler] as const;
  });
  installed = () => {
    for (const [signal, handler] of handlers) {
      try {
        Deno.removeSignalListener(signal, handler);
      } catch { /* already removed */ }
    }
    installed = undefined;
  };
  return installed;
}

/**
 * Resolves when `signal` aborts (at once if it already has), with its
 * reason; `dispose` stops listening. For loops that otherwise wait forever
 * (a server, a mount).
 */
export function whenAborted(
  signal: AbortSignal,
): { promise: Promise<unknown>; dispose: () => void } {
  let onAbort = () => {};
  const promise = new Promise<unknown>((resolve) => {
    if (signal.aborted) return resolve(signal.reason);
    onAbort = () => resolve(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
  });
  return { promise, dispose: () => signal.removeEventListener("abort", onAbort) };
}

/**
 * Resolves `work` or, after `ms`, undefined (the work goes on unobserved):
 * bounds a wait on a peer that may never answer.
 */
export async function within<T>(ms: number, work: Promise<T>): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      work,
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The error to throw when `signal` stopped some work: an `Interrupted`
 * reason gets `detail` added; other reasons pass unchanged.
 */
export function abortError(signal: AbortSignal, detail?: string): Error {
  const reason = signal.reason;
  if (reason instanceof Interrupted) return new Interrupted(reason.signal, detail);
  if (reason instanceof Error) return reason;
  return new DOMException(detail ? `aborted ${detail}` : "aborted", "AbortError");
}
