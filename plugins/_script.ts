/**
 * The engine shared by the `sh` and `eval` plugins: nbdkit's calling
 * convention for plugins written as scripts. Every plugin method runs a
 * script with the method name and its arguments; the exit status says
 * what happened (0 ok, 1 and 8-127 error, 2 method missing, 3 false),
 * errors are read from stderr as "ERRNO message", data flows through
 * stdout (pread and friends) and stdin (pwrite).
 *
 * @module
 */

import { NbdError } from "../protocol/errors.ts";
import {
  type Backend,
  type BlockSize,
  completeBackend,
  type ExportInfo,
  type Extent,
  type OpenContext,
  type PluginBackend,
  type PluginInstance,
  type Support,
  type ThreadModel,
} from "../core/backend.ts";
import type { Params } from "../core/params.ts";
import { parseSize } from "../util/parse.ts";
import { UsageError } from "../util/usage_error.ts";
import { isThreadModel } from "../core/thread_model.ts";
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from "../protocol/constants.ts";

/** What a script call came back with. */
export interface CallResult {
  /** "ok" (0), "missing" (2), "false" (3) or "error" (anything else). */
  status: "ok" | "missing" | "false" | "error";
  /** Standard output. */
  stdout: Uint8Array;
  /** Standard error as text. */
  stderr: string;
}

/** Runs one method of a script plugin. */
export interface ScriptInvoker {
  /** Runs `method` with `args`, feeding `stdin` if given. */
  call(method: string, args: string[], stdin?: Uint8Array): Promise<CallResult>;
  /**
   * Whether the plugin defines `method`, when that can be known without
   * running it (eval); undefined for sh, where a missing `can_*` is false.
   */
  defines?(method: string): boolean;
}

const ERRNO_WORDS: Record<string, string> = {
  EPERM: "EPERM",
  EACCES: "EPERM",
  EROFS: "EPERM",
  EIO: "EIO",
  ENOMEM: "ENOMEM",
  EINVAL: "EINVAL",
  ENOSPC: "ENOSPC",
  EDQUOT: "ENOSPC",
  EFBIG: "ENOSPC",
  ESHUTDOWN: "ESHUTDOWN",
  ENOTSUP: "ENOTSUP",
  EOPNOTSUPP: "ENOTSUP",
  EOVERFLOW: "EOVERFLOW",
};

/** Turns a failed call into an NbdError from its "ERRNO message" stderr (EIO if unparsable). */
export function scriptError(method: string, result: CallResult): NbdError {
  const text = result.stderr.trim();
  const match = /^(E[A-Z]+)\b\s*(.*)$/s.exec(text);
  const errno = match ? ERRNO_WORDS[match[1]!.toUpperCase()] : undefined;
  if (errno) return new NbdError(errno as "EIO", match![2]!.trim() || `${method} failed`);
  return new NbdError("EIO", text ? `${method}: ${text}` : `${method} failed`);
}

/** Maps a process exit code to a call status. */
function statusOf(code: number): CallResult["status"] {
  if (code === 0) return "ok";
  if (code === 2) return "missing";
  if (code === 3) return "false";
  return "error";
}

/** Runs a command with arguments and optional stdin, collecting its output. */
export async function runProcess(
  command: string,
  args: string[],
  env: Record<string, string>,
  stdin?: Uint8Array,
): Promise<CallResult> {
  const child = new Deno.Command(command, {
    args,
    env,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const writer = child.stdin.getWriter();
    // A script may exit without reading its input: that is not our error.
    await writer.write(stdin).catch(() => {});
    await writer.close().catch(() => {});
  }
  const out = await child.output();
  return {
    status: out.signal ? "error" : statusOf(out.code),
    stdout: out.stdout,
    stderr: new TextDecoder().decode(out.stderr),
  };
}

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** Parses the output of list_exports (NAMES, INTERLEAVED or NAMES+DESCRIPTIONS). */
export function parseExportList(output: string): ExportInfo[] {
  const lines = output.split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  const mode = lines[0];
  if (mode === "INTERLEAVED") {
    const out: ExportInfo[] = [];
    for (let i = 1; i < lines.length; i += 2) {
      out.push({ name: lines[i]!, description: lines[i + 1] });
    }
    return out;
  }
  if (mode === "NAMES+DESCRIPTIONS") {
    const rest = lines.slice(1);
    const half = Math.floor(rest.length / 2);
    return rest.slice(0, half).map((name, i) => ({ name, description: rest[half + i] }));
  }
  return (mode === "NAMES" ? lines.slice(1) : lines).map((name) => ({ name }));
}

/** Parses the output of extents: "offset length [type]" lines. */
export function parseExtents(output: string, offset: number, length: number): Extent[] {
  const out: Extent[] = [];
  let pos = offset;
  const end = offset + length;
  const rows = output.split("\n").map((l) => l.trim()).filter((l) => l !== "").map((line) => {
    const [start, len, type] = line.split(/\s+/);
    const flags = type === undefined || type === ""
      ? 0
      : /^\d+$/.test(type)
      ? Number(type)
      : type.split(",").reduce((f, word) => {
        if (word === "hole") return f | NBD_STATE_HOLE;
        if (word === "zero") return f | NBD_STATE_ZERO;
        if (word === "") return f;
        throw new NbdError("EIO", `extents: unknown extent type "${word}"`);
      }, 0);
    return {
      start: parseSize(start!, "extents offset"),
      length: parseSize(len!, "extents length"),
      flags,
    };
  }).sort((a, b) => a.start - b.start);
  for (const row of rows) {
    const rowEnd = row.start + row.length;
    if (rowEnd <= pos) continue;
    if (row.start > pos) break; // a gap: stop at what is known
    const n = Math.min(rowEnd, end) - pos;
    if (n <= 0) break;
    out.push({ length: n, flags: row.flags });
    pos += n;
    if (pos >= end) break;
  }
  if (out.length === 0) {
    throw new NbdError("EIO", "extents: the script returned no extent for the offset");
  }
  return out;
}

/** A configured script plugin: shared state for every connection. */
export class ScriptPlugin {
  readonly #invoker: ScriptInvoker;
  readonly #tmpdir: string;
  /** nbdkit's default for scripts; the server enforces it (server/exports.ts). */
  #model: ThreadModel = "serialize_all_requests";

  private constructor(invoker: ScriptInvoker, tmpdir: string) {
    this.#invoker = invoker;
    this.#tmpdir = tmpdir;
  }

  /**
   * Runs the configuration methods (load, config for every parameter left,
   * config_complete, thread_model, get_ready, after_fork) and returns the
   * configured plugin. `tmpdir` is removed on close.
   */
  static async configure(
    invoker: ScriptInvoker,
    tmpdir: string,
    params: Params,
    options: { load: boolean; name: string },
  ): Promise<PluginInstance> {
    const plugin = new ScriptPlugin(invoker, tmpdir);
    const must = async (method: string, args: string[] = []) => {
      const r = await invoker.call(method, args);
      if (r.status === "error") {
        throw new UsageError(`${options.name}: ${scriptError(method, r).message}`);
      }
      return r;
    };
    try {
      if (options.load) await must("load");
      for (const key of params.keys()) {
        for (const value of params.takeAll(key)) {
          const r = await must("config", [key, value]);
          if (r.status === "missing") {
            throw new UsageError(
              `${options.name}: unknown parameter ${key}= (the script has no config method)`,
            );
          }
        }
      }
      await must("config_complete");
      const model = await must("thread_model");
      if (model.status === "ok") {
        const name = text(model.stdout).trim();
        if (isThreadModel(name)) plugin.#model = name;
      }
      await must("get_ready");
      await must("after_fork");
      // Only a script that lists exports (or names a default) takes over export names.
      const lists = (await invoker.call("list_exports", ["false", "false"])).status !== "missing";
      const names = (await invoker.call("default_export", ["false", "false"])).status !== "missing";
      const instance: PluginInstance = {
        open: (context) => plugin.open(context),
        close: () => plugin.close(),
        threadModel: plugin.#model,
      };
      if (lists || names) {
        instance.listExports = () => plugin.listExports();
        instance.defaultExport = () => plugin.defaultExport();
      }
      return instance;
    } catch (error) {
      await Deno.remove(tmpdir, { recursive: true }).catch(() => {});
      throw error;
    }
  }

  /** Exports the script lists (list_exports), or undefined to use the server's. */
  async listExports(): Promise<ExportInfo[]> {
    const r = await this.#invoker.call("list_exports", ["false", "false"]);
    if (r.status === "missing") return [{ name: await this.defaultExport() }];
    if (r.status !== "ok") throw scriptError("list_exports", r);
    return parseExportList(text(r.stdout));
  }

  /** The default export name (default_export), "" when missing. */
  async defaultExport(): Promise<string> {
    const r = await this.#invoker.call("default_export", ["false", "false"]);
    if (r.status === "missing") return "";
    if (r.status !== "ok") throw scriptError("default_export", r);
    return parseExportList(text(r.stdout))[0]?.name ?? "";
  }

  /** Opens a connection: open, get_size, then the capability queries. */
  async open(context: OpenContext): Promise<Backend> {
    const inv = this.#invoker;
    const call = (method: string, args: string[], stdin?: Uint8Array) =>
      inv.call(method, args, stdin);
    const opened = await call("open", [
      String(context.readonly),
      context.exportName,
      String(context.tls),
    ]);
    if (opened.status === "error") throw scriptError("open", opened);
    const handle = opened.status === "ok" ? text(opened.stdout).replace(/\n$/, "") : "";

    const required = async (method: string, args: string[], stdin?: Uint8Array) => {
      const r = await call(method, [handle, ...args], stdin);
      if (r.status === "missing") throw new NbdError("EIO", `the script has no ${method} method`);
      if (r.status !== "ok") throw scriptError(method, r);
      return r;
    };
    const sizeResult = await required("get_size", []);
    const size = parseSize(text(sizeResult.stdout).trim(), "get_size");
    /** A boolean query: 0 true, 3 false; missing = `fallback`. */
    const ask = async (method: string, fallback: boolean) => {
      const r = await call(method, [handle]);
      if (r.status === "ok") return true;
      if (r.status === "false") return false;
      if (r.status === "missing") return fallback;
      throw scriptError(method, r);
    };
    const defines = (m: string) => inv.defines?.(m) ?? false;
    const canWrite = await ask("can_write", defines("pwrite"));
    const canFlush = await ask("can_flush", defines("flush"));
    const canTrim = await ask("can_trim", defines("trim"));
    const canZero = await ask("can_zero", defines("zero"));
    const canExtents = await ask("can_extents", defines("extents"));
    const canFastZero = await ask("can_fast_zero", canZero);
    const multiConn = await ask("can_multi_conn", false);
    const rotational = await ask("is_rotational", false);
    const support = async (method: string, fallback: Support): Promise<Support> => {
      const r = await call(method, [handle]);
      if (r.status === "missing") return fallback;
      if (r.status !== "ok") throw scriptError(method, r);
      const value = text(r.stdout).trim();
      if (value !== "none" && value !== "emulate" && value !== "native") {
        throw new NbdError(
          "EIO",
          `${method} printed "${value}" (expected none, emulate or native)`,
        );
      }
      return value;
    };
    const fua = canWrite ? await support("can_fua", canFlush ? "emulate" : "none") : "none";
    const cache = await support("can_cache", defines("cache") ? "native" : "none");
    const blockSizeResult = await call("block_size", [handle]);
    let blockSize: BlockSize | undefined;
    if (blockSizeResult.status === "ok") {
      const [min, pref, max] = text(blockSizeResult.stdout).trim().split(/\s+/).map((v) =>
        parseSize(v, "block_size")
      );
      if (min !== undefined && pref !== undefined && max !== undefined) {
        blockSize = { minimum: min, preferred: pref, maximum: max };
      }
    } else if (blockSizeResult.status === "error") {
      throw scriptError("block_size", blockSizeResult);
    }

    const range = (count: number, offset: number) => [String(count), String(offset)];
    const backend: PluginBackend = {
      size: () => size,
      capabilities: () => ({
        writable: canWrite,
        flush: canFlush,
        trim: canTrim,
        fastZero: canFastZero,
        fua,
        cache,
        extents: canExtents,
        multiConn,
        rotational,
        ...(blockSize ? { blockSize } : {}),
      }),
      async pread(buf, offset) {
        const r = await required("pread", range(buf.length, offset));
        if (r.stdout.length !== buf.length) {
          throw new NbdError(
            "EIO",
            `pread printed ${r.stdout.length} bytes, ${buf.length} were asked for`,
          );
        }
        buf.set(r.stdout);
      },
      async close() {
        const r = await call("close", [handle]);
        if (r.status === "error") throw scriptError("close", r);
      },
    };
    if (canWrite) {
      backend.pwrite = async (buf, offset, flags) => {
        await required("pwrite", [...range(buf.length, offset), flags.fua ? "fua" : ""], buf);
      };
    }
    if (canFlush) backend.flush = async () => void await required("flush", []);
    if (canTrim) {
      backend.trim = async (offset, length, flags) =>
        void await required("trim", [...range(length, offset), flags.fua ? "fua" : ""]);
    }
    if (canZero) {
      backend.zero = async (offset, length, flags) => {
        if (flags.fast && !canFastZero) {
          throw new NbdError("ENOTSUP", "the script cannot zero fast");
        }
        const words = [
          flags.fua ? "fua" : "",
          flags.mayTrim ? "may_trim" : "",
          flags.fast ? "fast" : "",
        ]
          .filter(Boolean).join(",");
        const r = await call("zero", [handle, ...range(length, offset), words]);
        if (r.status === "missing") throw new NbdError("ENOTSUP", "the script has no zero method");
        if (r.status !== "ok") throw scriptError("zero", r);
      };
    }
    if (canExtents) {
      backend.extents = async (offset, length, flags) => {
        const r = await required("extents", [
          ...range(length, offset),
          flags.reqOne ? "req_one" : "",
        ]);
        return parseExtents(text(r.stdout), offset, length);
      };
    }
    if (cache === "native") {
      backend.cache = async (offset, length) => void await required("cache", range(length, offset));
    }
    return completeBackend(backend);
  }

  /** Runs unload and removes the temporary directory. */
  async close(): Promise<void> {
    await this.#invoker.call("unload", []).catch(() => {});
    await Deno.remove(this.#tmpdir, { recursive: true }).catch(() => {});
  }
}
