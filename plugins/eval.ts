/**
 * The `eval` plugin: like `sh`, but each method is a shell snippet given
 * on the command line (`get_size='echo 64M'`), run by /bin/sh with the
 * method name as `$1` and its arguments as `$2...`. A `can_*` query that
 * is not given is answered from whether its method is given. `missing=`
 * runs for every method not given (default: `exit 2`).
 *
 * ```
 * nbd serve eval get_size='echo 64M' pread='dd if=/dev/zero count=$3 iflag=count_bytes'
 * ```
 *
 * Parameters: one per method (get_size, pread, pwrite, flush, trim, zero,
 * extents, cache, can_write, can_flush, can_trim, can_zero, can_fast_zero,
 * can_extents, can_fua, can_cache, can_multi_conn, is_rotational,
 * block_size, open, close, config, config_complete, thread_model,
 * get_ready, after_fork, list_exports, default_export, unload), and
 * `missing`. Any other `key=value` goes to the `config` snippet.
 *
 * @module
 */

import type { Plugin } from "../core/backend.ts";
import type { ParamSpec } from "../core/params.ts";
import { runProcess, ScriptPlugin } from "./_script.ts";

/** The methods an eval snippet can define. */
const EVAL_METHODS = [
  "after_fork",
  "block_size",
  "cache",
  "can_cache",
  "can_extents",
  "can_fast_zero",
  "can_flush",
  "can_fua",
  "can_multi_conn",
  "can_trim",
  "can_write",
  "can_zero",
  "close",
  "config",
  "config_complete",
  "default_export",
  "export_description",
  "extents",
  "flush",
  "get_ready",
  "get_size",
  "is_rotational",
  "list_exports",
  "open",
  "pread",
  "preconnect",
  "pwrite",
  "thread_model",
  "trim",
  "unload",
  "zero",
] as const;

/** The eval plugin. */
export const evalPlugin: Plugin = {
  name: "eval",
  summary: "plugin whose methods are shell snippets given on the command line",
  description: "Each METHOD='snippet' runs under /bin/sh with $1 = method, $2... = arguments.\n\n" +
    "Example:\n  nbd serve eval get_size='echo 64M' \\\n" +
    "    pread='dd if=/dev/zero count=$3 iflag=count_bytes'",
  params: [
    ...EVAL_METHODS.map((m): ParamSpec => ({
      name: m,
      value: "SCRIPT",
      type: "string",
      description: `shell snippet for the ${m} method`,
      required: m === "get_size" || m === "pread",
    })),
    {
      name: "missing",
      value: "SCRIPT",
      type: "string",
      default: "exit 2 (not implemented)",
      description: "snippet for methods not given",
    },
    {
      name: "KEY",
      value: "VALUE",
      type: "string",
      description: "anything else is passed to the config snippet",
      anyKey: true,
      repeatable: true,
    },
  ],
  async create(params) {
    const snippets = new Map<string, string>();
    for (const method of [...EVAL_METHODS, "missing"]) {
      const value = params.take(method);
      if (value !== undefined) snippets.set(method, value);
    }
    const tmpdir = await Deno.makeTempDir({ prefix: "nbd-eval-" });
    const env = { tmpdir };
    const missing = snippets.get("missing");
    return await ScriptPlugin.configure(
      {
        call(method, args, stdin) {
          const snippet = snippets.get(method) ?? missing;
          if (snippet === undefined) {
            return Promise.resolve({ status: "missing", stdout: new Uint8Array(), stderr: "" });
          }
          return runProcess("/bin/sh", ["-c", snippet, "eval", method, ...args], env, stdin);
        },
        defines: (method) => snippets.has(method),
      },
      tmpdir,
      params,
      { load: false, name: "eval" },
    );
  },
};
