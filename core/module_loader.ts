/**
 * Plugins and filters from modules outside the tree: `nbd serve ./disk.ts`,
 * `--filter=./slow.ts`, a `file:` or `https:` URL, or inline code (the `ts`
 * plugin). The module's default export is checked against the shape of a
 * built-in plugin or filter once, at start-up, so that every mistake there
 * is one line before anything listens; what it returns at run time goes
 * through `guardBackend`, so a wrong answer fails one request, never the
 * server.
 *
 * @module
 */

import type {
  Backend,
  Filter,
  FilterInstance,
  OpenContext,
  Plugin,
  PluginInstance,
  Reopen,
} from "./backend.ts";
import { completeBackend, type PluginBackend } from "./backend.ts";
import type { ParamSpec, ParamType } from "./params.ts";
import { guardBackend, toNbdError } from "./guard.ts";
import { isThreadModel } from "./thread_model.ts";

/** Extensions of module files that `nbd serve` loads instead of looking up a built-in name. */
const MODULE_EXTENSION = /\.(?:ts|mts|js|mjs)$/;

/** URL schemes that name a module. */
const MODULE_SCHEME = /^(?:file|https|http|data):/;

const PARAM_TYPES: readonly ParamType[] = [
  "string",
  "size",
  "boolean",
  "integer",
  "duration",
  "enum",
  "path",
];

/** Whether a plugin or filter argument names a module rather than a built-in. */
export function isModuleSpecifier(word: string): boolean {
  return MODULE_EXTENSION.test(word) || MODULE_SCHEME.test(word);
}

/** The URL to import for a module argument: URLs as they are, paths made absolute. */
export function moduleUrl(word: string, cwd: string = Deno.cwd()): string {
  if (MODULE_SCHEME.test(word)) return word;
  const path = word.startsWith("/") ? word : `${cwd.replace(/\/$/, "")}/${word}`;
  const url = new URL("file://");
  url.pathname = path;
  return url.href;
}

/** A short name for a module in messages: the path as given, or the URL without a data: payload. */
export function moduleLabel(word: string): string {
  return word.startsWith("data:") ? "inline code" : word;
}

/**
 * Whether this process can load `url`, and if not, the one-line reason
 * with the way to run such a plugin. A compiled binary (`deno compile`)
 * loads local files and data: URLs, transpiling TypeScript, but has no
 * module fetcher for remote URLs.
 */
export function loadRefusal(url: string, standalone: boolean = isCompiled()): string | undefined {
  if (!standalone) return undefined;
  if (/^https?:/.test(url)) {
    return `${url}: a compiled nbd cannot load remote modules; download it and serve the file ` +
      `(nbd serve ./plugin.ts), or run nbd from source: deno run -A main.ts serve ${url}`;
  }
  return undefined;
}

/** Whether this is a `deno compile`d binary. */
export function isCompiled(): boolean {
  return (Deno.build as { standalone?: boolean }).standalone === true;
}

/** First line of an error's message (load errors can carry a code frame). */
function firstLine(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.split("\n").find((line) => line.trim() !== "")?.trim() ?? "error";
}

/** Imports a module and returns its default export; every failure is one line. */
async function importDefault(url: string, label: string): Promise<unknown> {
  const refusal = loadRefusal(url);
  if (refusal) throw new Error(refusal);
  let module: Record<string, unknown>;
  try {
    module = await import(url);
  } catch (error) {
    const hint = isCompiled()
      ? " (a compiled nbd loads local .ts/.js files and inline code only; or run nbd from source: deno run -A main.ts serve ...)"
      : "";
    throw new Error(`${label}: cannot load the module: ${firstLine(error)}${hint}`);
  }
  if (module.default === undefined) {
    const names = Object.keys(module);
    throw new Error(
      `${label}: the module has no default export${
        names.length ? ` (it exports ${names.join(", ")}; use export default)` : ""
      }`,
    );
  }
  return module.default;
}

/** Checks and completes parameter declarations written by hand. */
function checkParams(label: string, value: unknown): ParamSpec[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new Error(`${label}: params must be an array`);
  return value.map((spec, i) => {
    if (typeof spec !== "object" || spec === null || typeof spec.name !== "string" || !spec.name) {
      throw new Error(`${label}: params[${i}] needs a name`);
    }
    const type = spec.type ?? "string";
    if (!PARAM_TYPES.includes(type)) {
      throw new Error(
        `${label}: parameter ${spec.name}: type must be one of ${PARAM_TYPES.join(", ")}`,
      );
    }
    if (type === "enum" && !(Array.isArray(spec.choices) && spec.choices.length > 0)) {
      throw new Error(`${label}: parameter ${spec.name}: an enum needs choices`);
    }
    return {
      ...spec,
      type,
      value: typeof spec.value === "string" ? spec.value : spec.name.toUpperCase(),
      description: typeof spec.description === "string" ? spec.description : "",
    } as ParamSpec;
  });
}

/** Checks the fields a plugin and a filter share. */
function checkCommon(label: string, kind: "plugin" | "filter", value: unknown) {
  if (typeof value !== "object" || value === null) {
    throw new Error(`${label}: the default export must be a ${kind} object, not ${typeof value}`);
  }
  const object = value as Record<string, unknown>;
  if (typeof object.name !== "string" || !/^[A-Za-z0-9_.-]+$/.test(object.name)) {
    throw new Error(`${label}: the ${kind} needs a name (letters, digits, _ . -)`);
  }
  if (typeof object.create !== "function") {
    throw new Error(`${label}: the ${kind} needs a create(params) method`);
  }
  if (object.threadModel !== undefined && !isThreadModel(object.threadModel)) {
    throw new Error(
      `${label}: threadModel must be parallel, serialize_requests, serialize_all_requests or serialize_connections`,
    );
  }
  return object;
}

/** Calls a module's create and checks what it returns. */
async function created<T>(label: string, run: () => Promise<T>, check: (v: T) => void) {
  let instance: T;
  try {
    instance = await run();
  } catch (error) {
    throw error instanceof Error && error.name === "UsageError"
      ? error
      : toStartError(label, error);
  }
  check(instance);
  return instance;
}

function toStartError(label: string, error: unknown): Error {
  return new Error(`${label}: ${firstLine(error)}`);
}

/**
 * A plugin instance of a module, guarded: `open` may return a full
 * backend or only what a plugin implements (size and pread at least); the
 * result is completed and wrapped in the run-time guard.
 */
function guardPluginInstance(label: string, instance: PluginInstance): PluginInstance {
  const guarded: PluginInstance = {
    async open(context: OpenContext): Promise<Backend> {
      const raw = await Promise.resolve().then(() => instance.open(context)).catch((error) => {
        throw toNbdError(error);
      });
      return guardBackend(asBackend(label, raw), label);
    },
  };
  if (instance.listExports) guarded.listExports = () => instance.listExports!();
  if (instance.defaultExport) guarded.defaultExport = () => instance.defaultExport!();
  if (instance.close) guarded.close = () => instance.close!();
  if (instance.threadModel) guarded.threadModel = instance.threadModel;
  return guarded;
}

const BACKEND_METHODS = [
  "size",
  "capabilities",
  "pread",
  "pwrite",
  "flush",
  "trim",
  "zero",
  "extents",
  "cache",
  "close",
] as const;

/**
 * A full backend as it is; an object with only some methods is what a
 * plugin implements and gets the central defaults.
 */
export function asBackend(label: string, value: unknown): Backend {
  if (typeof value !== "object" || value === null) {
    throw toNbdError(
      new Error(`${label}: open() returned ${value === null ? "null" : typeof value}`),
    );
  }
  const object = value as Record<string, unknown>;
  if (BACKEND_METHODS.every((m) => typeof object[m] === "function")) {
    // Its capabilities must be a whole set: check them once, here.
    const caps = (object as unknown as Backend).capabilities();
    if (typeof caps !== "object" || caps === null || typeof caps.writable !== "boolean") {
      throw toNbdError(new Error(`${label}: capabilities() must return a Capabilities object`));
    }
    return object as unknown as Backend;
  }
  if (typeof object.size !== "function" || typeof object.pread !== "function") {
    throw toNbdError(new Error(`${label}: open() must return an object with size() and pread()`));
  }
  return completeBackend(object as unknown as PluginBackend);
}

/** Loads a plugin module; every problem is an error with one line. */
export async function loadPlugin(word: string, url: string = moduleUrl(word)): Promise<Plugin> {
  const label = moduleLabel(word);
  return pluginFromObject(label, await importDefault(url, label));
}

/** Checks a plugin object (a module's default export) and wraps it in the guards. */
export function pluginFromObject(label: string, value: unknown): Plugin {
  const object = checkCommon(label, "plugin", value);
  const params = checkParams(label, object.params);
  const magic = object.magicParam;
  if (magic !== undefined && !params.some((p) => p.name === magic)) {
    throw new Error(`${label}: magicParam ${String(magic)} is not among the params`);
  }
  const create = object.create as Plugin["create"];
  const plugin: Plugin = {
    name: object.name as string,
    summary: typeof object.summary === "string" ? object.summary : `plugin from ${label}`,
    params,
    create: async (values) => {
      const instance = await created(label, () => create.call(object, values), (v) => {
        if (typeof v !== "object" || v === null || typeof v.open !== "function") {
          throw new Error(`${label}: create() must return an object with open(context)`);
        }
      });
      const guarded = guardPluginInstance(label, instance);
      guarded.threadModel ??= object.threadModel as Plugin["threadModel"];
      return guarded;
    },
  };
  if (typeof object.description === "string") plugin.description = object.description;
  if (typeof magic === "string") plugin.magicParam = magic;
  if (object.threadModel) plugin.threadModel = object.threadModel as Plugin["threadModel"];
  return plugin;
}

/** Loads a filter module; every problem is an error with one line. */
export async function loadFilter(word: string, url: string = moduleUrl(word)): Promise<Filter> {
  const label = moduleLabel(word);
  const object = checkCommon(label, "filter", await importDefault(url, label));
  const params = checkParams(label, object.params);
  const create = object.create as Filter["create"];
  const filter: Filter = {
    name: object.name as string,
    summary: typeof object.summary === "string" ? object.summary : `filter from ${label}`,
    params,
    create: async (values) => {
      const instance = await created(label, () => create.call(object, values), (v) => {
        if (typeof v !== "object" || v === null || typeof v.wrap !== "function") {
          throw new Error(`${label}: create() must return an object with wrap(next, context)`);
        }
      });
      const guarded: FilterInstance = {
        async wrap(next: Backend, context: OpenContext, reopen: Reopen): Promise<Backend> {
          const raw = await Promise.resolve().then(() => instance.wrap(next, context, reopen))
            .catch((error) => {
              throw toNbdError(error);
            });
          return guardBackend(asBackend(label, raw), label);
        },
      };
      if (instance.listExports) guarded.listExports = (below) => instance.listExports!(below);
      if (instance.close) guarded.close = () => instance.close!();
      guarded.threadModel = instance.threadModel ?? object.threadModel as Filter["threadModel"];
      return guarded;
    },
  };
  if (typeof object.description === "string") filter.description = object.description;
  if (object.threadModel) filter.threadModel = object.threadModel as Filter["threadModel"];
  return filter;
}
