/**
 * The `error` filter: injects errors into replies, at a chosen rate, per
 * kind of request, optionally only while a trigger file exists. For
 * testing how clients cope with failures.
 *
 * ```
 * nbd serve --filter=error memory 1G error-rate=1%
 * nbd serve --filter=error memory 1G error=ENOSPC error-pwrite-rate=100% error-zero-rate=100%
 * nbd serve --filter=error memory 1G error-rate=100% error-file=/tmp/inject
 * ```
 *
 * Parameters:
 * - `error=ERRNO`: the error to return (EIO by default; EPERM, ENOMEM,
 *   EINVAL, ENOSPC, ESHUTDOWN, ENOTSUP, EOVERFLOW).
 * - `error-rate=N%` or `0..1`: the share of requests that fail (default 0).
 * - `error-file=PATH`: inject errors only while PATH exists.
 * - `error-pread`, `error-pwrite`, `error-trim`, `error-zero`,
 *   `error-extents`, `error-cache`, `error-flush` (each also with `-rate`
 *   and `-file`): the same for one kind of request, overriding the
 *   general settings.
 *
 * @module
 */

import { ERRNO_VALUES, type ErrnoName } from "../protocol/constants.ts";
import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type Extent,
  type ExtentsFlags,
  type Filter,
  PassthroughBackend,
  type WriteFlags,
  type ZeroFlags,
} from "../core/backend.ts";
import type { Params, ParamSpec } from "../core/params.ts";
import { UsageError } from "../util/usage_error.ts";

/** The kinds of request the filter can fail, by the suffix of their parameters. */
export const ERROR_COMMANDS = [
  "pread",
  "pwrite",
  "trim",
  "zero",
  "extents",
  "cache",
  "flush",
] as const;
/** One kind of request. */
export type ErrorCommand = typeof ERROR_COMMANDS[number];

/** When and how one kind of request fails. */
export interface ErrorSetting {
  /** The error returned. */
  errno: ErrnoName;
  /** Probability of failing, 0..1. */
  rate: number;
  /** Fail only while this file exists. */
  file?: string;
}

/** Parses `10%` or `0.1` as a probability. */
export function parseRate(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$/.exec(text);
  const value = match ? Number(match[1]) / (match[2] ? 100 : 1) : NaN;
  if (!(value >= 0 && value <= 1)) {
    throw new UsageError(`${what}: expected a percentage 0%..100% or a number 0..1, got "${text}"`);
  }
  return value;
}

function parseErrno(text: string, what: string): ErrnoName {
  const name = text.toUpperCase();
  if (!(name in ERRNO_VALUES)) {
    throw new UsageError(
      `${what}: unknown error "${text}" (one of ${Object.keys(ERRNO_VALUES).join(", ")})`,
    );
  }
  return name as ErrnoName;
}

function fileExists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Reads the general and per-command settings from the parameters. */
function errorSettings(params: Params): Record<ErrorCommand, ErrorSetting> {
  const take = (prefix: string) => {
    const errno = params.take(prefix);
    const rate = params.take(`${prefix}-rate`);
    return {
      errno: errno === undefined ? undefined : parseErrno(errno, prefix),
      rate: rate === undefined ? undefined : parseRate(rate, `${prefix}-rate`),
      file: params.take(`${prefix}-file`),
    };
  };
  const general = take("error");
  const out = {} as Record<ErrorCommand, ErrorSetting>;
  for (const command of ERROR_COMMANDS) {
    const own = take(`error-${command}`);
    out[command] = {
      errno: own.errno ?? general.errno ?? "EIO",
      rate: own.rate ?? general.rate ?? 0,
      file: own.file ?? general.file,
    };
  }
  return out;
}

/** Settings per kind of request, or undefined when nothing is to fail right now. */
export type ErrorSettings = Record<ErrorCommand, ErrorSetting> | undefined;

/**
 * Fails requests as `settings()` says at the time of each request (the
 * error filter's fixed settings, or the view's run-time switch); passes
 * everything else through.
 */
export class ErrorBackend extends PassthroughBackend {
  readonly #settings: () => ErrorSettings;
  constructor(next: Backend, settings: () => ErrorSettings) {
    super(next);
    this.#settings = settings;
  }
  /** Throws the configured error if this request is chosen to fail. */
  #maybeFail(command: ErrorCommand): void {
    const settings = this.#settings();
    if (settings === undefined) return;
    const { errno, rate, file } = settings[command];
    if (rate <= 0) return;
    if (file !== undefined && !fileExists(file)) return;
    if (rate < 1 && Math.random() >= rate) return;
    throw new NbdError(errno, `injected ${errno} error into ${command}`);
  }
  override async pread(buf: Uint8Array, offset: number): Promise<void> {
    this.#maybeFail("pread");
    return await this.next.pread(buf, offset);
  }
  override async pwrite(buf: Uint8Array, offset: number, flags: WriteFlags): Promise<void> {
    this.#maybeFail("pwrite");
    return await this.next.pwrite(buf, offset, flags);
  }
  override async flush(): Promise<void> {
    this.#maybeFail("flush");
    return await this.next.flush();
  }
  override async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    this.#maybeFail("trim");
    return await this.next.trim(offset, length, flags);
  }
  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#maybeFail("zero");
    return await this.next.zero(offset, length, flags);
  }
  override async extents(offset: number, length: number, flags: ExtentsFlags): Promise<Extent[]> {
    this.#maybeFail("extents");
    return await this.next.extents(offset, length, flags);
  }
  override async cache(offset: number, length: number): Promise<void> {
    this.#maybeFail("cache");
    return await this.next.cache(offset, length);
  }
}

const ERRNO_CHOICES = Object.keys(ERRNO_VALUES);

const perCommand = ERROR_COMMANDS.flatMap((c): ParamSpec[] => [
  {
    name: `error-${c}`,
    value: "ERRNO",
    type: "enum",
    choices: ERRNO_CHOICES,
    default: "error=",
    description: `error for ${c} requests`,
  },
  {
    name: `error-${c}-rate`,
    value: "N%|0..1",
    type: "string",
    default: "error-rate=",
    description: `rate of errors for ${c} requests`,
  },
  {
    name: `error-${c}-file`,
    value: "PATH",
    type: "path",
    default: "error-file=",
    description: `trigger file for ${c} requests`,
  },
]);

/** The error filter. */
export const errorFilter: Filter = {
  name: "error",
  summary: "inject errors (chosen error, rate, per request kind, trigger file)",
  description: "Errors are injected only for request kinds whose rate is above 0.\n\nExamples:\n" +
    "  nbd serve --filter=error memory 1G error-rate=1%\n" +
    "  nbd serve --filter=error memory 1G error=ENOSPC error-pwrite-rate=100%\n" +
    "  nbd serve --filter=error memory 1G error-rate=100% error-file=/tmp/inject",
  params: [
    {
      name: "error",
      value: "ERRNO",
      type: "enum",
      choices: ERRNO_CHOICES,
      default: "EIO",
      description: "error to inject",
    },
    {
      name: "error-rate",
      value: "N%|0..1",
      type: "string",
      default: "0",
      description: "share of requests that fail",
    },
    {
      name: "error-file",
      value: "PATH",
      type: "path",
      description: "inject errors only while PATH exists",
    },
    ...perCommand,
  ],
  create(params) {
    const settings = errorSettings(params);
    return Promise.resolve({
      wrap: (next) => Promise.resolve(new ErrorBackend(next, () => settings)),
    });
  },
};
