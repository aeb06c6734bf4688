/**
 * Helpers for writing plugins and filters outside the tree: an author
 * writes only the methods that matter and gets the rest from the same
 * central defaults the built-ins use (`completeBackend` for plugins,
 * `PassthroughBackend` for filters).
 *
 * @example A read-only disk of 1 MiB where every byte is 0x55
 * ```ts
 * import { definePlugin } from "./mod.ts";
 * export default definePlugin({
 *   name: "fives",
 *   size: () => 1024 * 1024,
 *   pread: (buf) => { buf.fill(0x55); return Promise.resolve(); },
 * });
 * ```
 *
 * @module
 */

import {
  type Backend,
  completeBackend,
  type ExportInfo,
  type Filter,
  type FilterInstance,
  type OpenContext,
  PassthroughBackend,
  type Plugin,
  type PluginBackend,
  type PluginInstance,
  type Reopen,
  type ThreadModel,
} from "./backend.ts";
import type { Params, ParamSpec } from "./params.ts";
import { UsageError } from "../util/usage_error.ts";

/** What `create` of a plugin definition returns: the methods shared by every connection, or `open`. */
export type PluginSetup =
  | PluginBackend
  | {
    /** Opens one connection: its own methods (size and pread at least). */
    open(context: OpenContext): PluginBackend | Promise<PluginBackend>;
    /** Exports served (NBD_OPT_LIST); absent = one export named by `-e`. */
    listExports?(): Promise<ExportInfo[]>;
    /** Name of the export a client gets when it asks for "". */
    defaultExport?(): Promise<string>;
    /** Releases shared resources when the server stops. */
    close?(): Promise<void>;
  };

/** A plugin as an author writes it. */
export interface PluginDefinition extends Partial<PluginBackend> {
  /** Name shown in help and logs. */
  name: string;
  /** One-line summary (default: the name). */
  summary?: string;
  /** Longer help text. */
  description?: string;
  /** Parameters (`key=value`), declared as the built-ins declare theirs. */
  params?: ParamSpec[];
  /** The parameter a bare value sets (`nbd serve ./disk.ts 1G` sets size). */
  magicParam?: string;
  /** Concurrency the plugin takes (default parallel). */
  threadModel?: ThreadModel;
  /**
   * Takes the parameters and returns the plugin's methods (shared by all
   * connections) or an object with `open(context)` for per-connection
   * state. Absent: the methods written next to `name` are used.
   */
  create?(params: Params): PluginSetup | Promise<PluginSetup>;
}

/** Checks the values of enum parameters against their choices (the rest each plugin parses). */
function checkChoices(owner: string, specs: readonly ParamSpec[], params: Params): void {
  for (const spec of specs) {
    if (spec.type !== "enum" || !spec.choices) continue;
    const value = params.peek(spec.name);
    if (value !== undefined && !spec.choices.includes(value)) {
      throw new UsageError(
        `${owner}: ${spec.name}=${value}: expected one of ${spec.choices.join(", ")}`,
      );
    }
  }
}

/** Turns a plugin definition into a plugin, filling every default centrally. */
export function definePlugin(definition: PluginDefinition): Plugin {
  const params = definition.params ?? [];
  const plugin: Plugin = {
    name: definition.name,
    summary: definition.summary ?? definition.name,
    params,
    async create(values: Params): Promise<PluginInstance> {
      checkChoices(definition.name, params, values);
      const setup: PluginSetup = definition.create
        ? await definition.create(values)
        : (definition as PluginBackend);
      if ("open" in setup && typeof setup.open === "function") {
        const instance: PluginInstance = {
          open: async (context) => completeBackend(await setup.open(context)),
        };
        if (setup.listExports) instance.listExports = () => setup.listExports!();
        if (setup.defaultExport) instance.defaultExport = () => setup.defaultExport!();
        if (setup.close) instance.close = () => setup.close!();
        return instance;
      }
      const methods = setup as PluginBackend;
      return { open: () => Promise.resolve(completeBackend(methods)) };
    },
  };
  if (definition.description) plugin.description = definition.description;
  if (definition.magicParam) plugin.magicParam = definition.magicParam;
  if (definition.threadModel) plugin.threadModel = definition.threadModel;
  return plugin;
}

/**
 * What a filter method sees as `this`: the layer below (`next`), what
 * `create` returned (`config`), and the connection's context.
 */
export interface FilterThis<C> extends Backend {
  /** The layer below. */
  readonly next: Backend;
  /** What the filter's `create` returned. */
  readonly config: C;
  /** The connection's open context. */
  readonly context: OpenContext;
  /** Opens the layers below again (e.g. after an error). */
  readonly reopen: Reopen;
}

/** The methods a filter may override; the rest pass through to the layer below. */
export type FilterMethods = Partial<Omit<Backend, "close">>;

/** A filter as an author writes it: overrides only what it changes. */
export interface FilterDefinition<C = undefined> extends FilterMethods {
  /** Name shown in help and logs. */
  name: string;
  /** One-line summary (default: the name). */
  summary?: string;
  /** Longer help text. */
  description?: string;
  /** Parameters (`key=value`), declared as the built-ins declare theirs. */
  params?: ParamSpec[];
  /** Concurrency the filter takes (default parallel). */
  threadModel?: ThreadModel;
  /** Takes the parameters; what it returns is `this.config` in every method. */
  create?(params: Params): C | Promise<C>;
  /** Per-connection set-up, after the layer below is open (`this` as in the methods). */
  open?(): void | Promise<void>;
  /** Adjusts the export list of the layer below. */
  listExports?(next: () => Promise<ExportInfo[]>): Promise<ExportInfo[]>;
  /** Releases shared resources when the server stops. */
  close?(): Promise<void>;
}

/** Backend methods a filter definition can override. */
const FILTER_METHODS = [
  "size",
  "capabilities",
  "pread",
  "readView",
  "pwrite",
  "flush",
  "trim",
  "zero",
  "extents",
  "cache",
] as const;

/**
 * Turns a filter definition into a filter: its methods override those of
 * a `PassthroughBackend`, so everything it does not write forwards to the
 * layer below (and the zero-copy read is kept only while pread is not
 * overridden).
 */
export function defineFilter<C = undefined>(
  definition: FilterDefinition<C> & ThisType<FilterThis<C> & Record<string, unknown>>,
): Filter {
  const params = definition.params ?? [];
  class DefinedFilter extends PassthroughBackend {
    readonly config: C;
    readonly context: OpenContext;
    readonly reopen: Reopen;
    constructor(next: Backend, config: C, context: OpenContext, reopen: Reopen) {
      super(next);
      this.config = config;
      this.context = context;
      this.reopen = reopen;
    }
  }
  const proto = DefinedFilter.prototype as unknown as Record<string, unknown>;
  for (const method of FILTER_METHODS) {
    if (definition[method] !== undefined) proto[method] = definition[method];
  }
  const filter: Filter = {
    name: definition.name,
    summary: definition.summary ?? definition.name,
    params,
    async create(values: Params): Promise<FilterInstance> {
      checkChoices(definition.name, params, values);
      const config = definition.create ? await definition.create(values) : (undefined as C);
      const instance: FilterInstance = {
        async wrap(next, context, reopen) {
          const backend = new DefinedFilter(next, config, context, reopen);
          if (definition.open) await definition.open.call(backend as never);
          return backend;
        },
      };
      if (definition.listExports) {
        instance.listExports = (below) => definition.listExports!(below);
      }
      if (definition.close) instance.close = () => definition.close!();
      return instance;
    },
  };
  if (definition.description) filter.description = definition.description;
  if (definition.threadModel) filter.threadModel = definition.threadModel;
  return filter;
}
