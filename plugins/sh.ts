/**
 * The `sh` plugin: a plugin written as a script (or any executable), with
 * nbdkit's calling convention. For every method the script runs as
 * `SCRIPT METHOD ARGS...`: e.g. `get_size HANDLE`, `pread HANDLE COUNT
 * OFFSET` (data on stdout), `pwrite HANDLE COUNT OFFSET FLAGS` (data on
 * stdin). Exit status 0 = ok, 1 = error (stderr: "ERRNO message"),
 * 2 = method not implemented, 3 = false (for `can_*` queries). The
 * `can_*` methods must be written for writes, flush, trim, zero and
 * extents to be used. `$tmpdir` is a directory for the script's state.
 * With `-` as the script it is read from standard input (run by /bin/sh
 * unless it starts with `#!`).
 *
 * ```
 * nbd serve sh ./plugin.sh file=disk.img
 * nbd serve sh - <<'EOF'
 *   case "$1" in
 *     get_size) echo 1M ;;
 *     pread) dd if=/dev/zero count=$3 iflag=count_bytes ;;
 *     *) exit 2 ;;
 *   esac
 * EOF
 * ```
 *
 * Parameters: `[script=]PATH` (or `-`); every other `key=value` is passed
 * to the script's `config` method.
 *
 * @module
 */

import type { Plugin } from "../core/backend.ts";
import { UsageError } from "../util/usage_error.ts";
import { runProcess, ScriptPlugin } from "./_script.ts";

async function readStdin(): Promise<Uint8Array> {
  return new Uint8Array(await new Response(Deno.stdin.readable).arrayBuffer());
}

/** The sh plugin. */
export const shPlugin: Plugin = {
  name: "sh",
  summary: "plugin written as a shell script or any executable (nbdkit's calling convention)",
  description: "The script runs as SCRIPT METHOD ARGS... for every method; exit 0 = ok,\n" +
    "1 = error (stderr: ERRNO message), 2 = not implemented, 3 = false.\n" +
    "get_size and pread are required; can_write, can_flush, can_trim, can_zero and\n" +
    "can_extents must exit 0 for pwrite, flush, trim, zero and extents to be used.\n\n" +
    "Example:\n  nbd serve sh - <<'EOF'\n    case \"$1\" in\n      get_size) echo 1M ;;\n" +
    "      pread) dd if=/dev/zero count=$3 iflag=count_bytes ;;\n      *) exit 2 ;;\n" +
    "    esac\n  EOF",
  params: [
    {
      name: "script",
      value: "PATH|-",
      type: "path",
      description: "the script; - reads it from standard input",
      required: true,
    },
    {
      name: "KEY",
      value: "VALUE",
      type: "string",
      description: "anything else is passed to the script's config method",
      anyKey: true,
      repeatable: true,
    },
  ],
  magicParam: "script",
  async create(params) {
    const script = params.take("script")!;
    const tmpdir = await Deno.makeTempDir({ prefix: "nbd-sh-" });
    let command = script;
    let prefix: string[] = [];
    if (script === "-") {
      const source = await readStdin();
      if (source.length === 0) {
        await Deno.remove(tmpdir, { recursive: true }).catch(() => {});
        throw new UsageError(
          "sh: the script on standard input is empty (nbd serve sh - <<'EOF' ...)",
        );
      }
      const path = `${tmpdir}/inline-script`;
      await Deno.writeFile(path, source, { mode: 0o700 });
      const shebang = source[0] === 0x23 && source[1] === 0x21; // "#!"
      command = shebang ? path : "/bin/sh";
      prefix = shebang ? [] : [path];
    } else {
      try {
        const info = await Deno.stat(script);
        if (!info.isFile) throw new Error("not a file");
      } catch {
        await Deno.remove(tmpdir, { recursive: true }).catch(() => {});
        throw new UsageError(`sh: cannot find the script ${script}`);
      }
      // A relative path must keep working whatever directory the calls run in.
      if (!script.includes("/")) command = `./${script}`;
    }
    const env = { tmpdir };
    return await ScriptPlugin.configure(
      {
        call: (method, args, stdin) =>
          runProcess(command, [...prefix, method, ...args], env, stdin),
      },
      tmpdir,
      params,
      { load: true, name: "sh" },
    );
  },
};
