/**
 * The `ts` plugin: a plugin written inline in TypeScript, the twin of
 * `sh -`. The code comes from the command line or, with `-`, from stdin.
 *
 * ```
 * nbd serve ts 'definePlugin({ name: "fives", size: () => 1048576, pread: async (b) => void b.fill(0x55) })'
 * nbd serve ts - size=1M <<'EOF'
 * export default definePlugin({ ... });
 * EOF
 * ```
 *
 * The rule: code with a line that starts with `export` or `import` is a
 * whole module, whose default export is the plugin; anything else is one
 * expression that evaluates to the plugin, wrapped as
 * `export default (CODE);`. Either way `definePlugin`, `defineFilter` and
 * `NbdError` are in scope. The module is imported from a data: URL: no
 * temporary file to write or clean up, and no write permission needed.
 *
 * @module
 */

import type { Plugin } from "../core/backend.ts";
import { checkRequired, type ParamSpec } from "../core/params.ts";
import { pluginFromObject } from "../core/module_loader.ts";
import { UsageError } from "../util/usage_error.ts";
// Statically imported so that it is part of the program (and of a compiled binary's embedded modules).
import "../core/inline_api.ts";

/** The names every inline plugin has in scope. */
export const INLINE_NAMES = ["definePlugin", "defineFilter", "NbdError"] as const;

/** Whether inline code is a whole module (a line starts with export or import). */
export function isModuleCode(code: string): boolean {
  return /^\s*(?:export|import)\b/m.test(code);
}

/**
 * The module text for inline code: the helpers imported, then the code as
 * it is (a module) or as `export default (CODE);` (an expression).
 */
export function inlineModule(code: string): string {
  const api = new URL("../core/inline_api.ts", import.meta.url).href;
  const prelude = `import { ${INLINE_NAMES.join(", ")} } from ${JSON.stringify(api)};\n`;
  if (isModuleCode(code)) return prelude + code + "\n";
  // The expression on its own lines, so that a trailing // comment cannot swallow the ");".
  return `${prelude}export default (\n${code.replace(/;\s*$/, "")}\n);\n`;
}

/** The data: URL a module text is imported from. */
export function dataUrl(text: string): string {
  return `data:application/typescript;charset=utf-8,${encodeURIComponent(text)}`;
}

/** Loads inline code as a plugin (checked like a module file). */
export async function loadInlinePlugin(code: string): Promise<Plugin> {
  let module: Record<string, unknown>;
  try {
    module = await import(dataUrl(inlineModule(code)));
  } catch (error) {
    const text = error instanceof Error ? error.message : String(error);
    throw new Error(`ts: cannot load the code: ${text.split("\n")[0]}`);
  }
  if (module.default === undefined) {
    throw new Error("ts: the code has no default export (export default definePlugin({...}))");
  }
  return pluginFromObject("ts", module.default);
}

async function readStdin(): Promise<string> {
  return await new Response(Deno.stdin.readable).text();
}

const SCRIPT_PARAM: ParamSpec = {
  name: "script",
  value: "CODE",
  type: "string",
  description: 'the plugin\'s code, or "-" to read it from stdin',
  required: true,
};

/** The ts plugin. */
export const tsPlugin: Plugin = {
  name: "ts",
  summary: "plugin written inline in TypeScript (code on the command line or stdin)",
  description: "Examples:\n" +
    '  nbd serve ts \'definePlugin({ name: "fives", size: () => 1048576,\n' +
    "      pread: async (buf) => void buf.fill(0x55) })'\n" +
    "  nbd serve ts - size=1M < plugin.ts\n\n" +
    "Code with a line starting with export or import is a module (its default export is\n" +
    "the plugin); anything else is an expression for the plugin. definePlugin,\n" +
    "defineFilter and NbdError are in scope.",
  params: [
    SCRIPT_PARAM,
    {
      name: "KEY",
      value: "VALUE",
      type: "string",
      description: "parameters of the inline plugin",
      anyKey: true,
      repeatable: true,
    },
  ],
  magicParam: "script",
  async create(params) {
    const script = params.take("script")!;
    const code = script === "-" ? await readStdin() : script;
    if (code.trim() === "") throw new UsageError("ts: the code is empty");
    const plugin = await loadInlinePlugin(code);
    checkRequired(plugin.name, plugin.params, params);
    const instance = await plugin.create(params);
    instance.threadModel ??= plugin.threadModel;
    return instance;
  },
};
