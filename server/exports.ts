/**
 * The export table of a server: a plugin, its filter stack, and how export
 * names resolve to opened backends.
 *
 * @module
 */

import type {
  Backend,
  ExportInfo,
  FilterInstance,
  OpenContext,
  PluginInstance,
} from "../core/backend.ts";
import {
  HeldLock,
  SerializedBackend,
  strictestModel,
  type ThreadModel,
} from "../core/thread_model.ts";
import { Mutex } from "../util/locks.ts";
import { CheckingBackend, debugLayersFromEnv } from "../core/checking.ts";

/** Options of an export table. */
export interface ExportsOptions {
  /** The configured plugin. */
  plugin: PluginInstance;
  /** Configured filters, outermost (nearest the client) first. */
  filters?: FilterInstance[];
  /** Name of the single export when the plugin does not list exports (default ""). */
  exportName?: string;
  /** Description of that export. */
  description?: string;
  /**
   * Insert a checking layer between every two layers (core/checking.ts);
   * default: the NBD_DEBUG_LAYERS environment variable.
   */
  debugLayers?: boolean;
  /** Names of the layers for the checking layer's reports: the plugin's, the filters' (outermost first). */
  layerNames?: { plugin: string; filters: string[] };
}

/** Resolves names, lists exports and opens the backend stack for a connection. */
export class Exports {
  readonly #plugin: PluginInstance;
  readonly #filters: FilterInstance[];
  readonly #exportName: string;
  readonly #description: string | undefined;
  readonly #threadModel: ThreadModel;
  /** Layer names for the checking layer; undefined = no checking (the default). */
  readonly #checkNames: string[] | undefined;
  /** Serializes every request of every connection (serialize_all_requests). */
  readonly #allRequests = new Mutex();
  /** Held by the one open connection (serialize_connections). */
  readonly #connection = new HeldLock();

  /** Creates the table. */
  constructor(options: ExportsOptions) {
    this.#plugin = options.plugin;
    this.#filters = options.filters ?? [];
    this.#exportName = options.exportName ?? "";
    this.#description = options.description;
    if (options.debugLayers ?? debugLayersFromEnv()) {
      const names = options.layerNames;
      // Index i names the caller of layer i: the client, then each filter; the plugin last.
      this.#checkNames = [
        "the client",
        ...this.#filters.map((_, i) => `filter ${names?.filters[i] ?? `#${i + 1}`}`),
        `plugin ${names?.plugin ?? ""}`.trim(),
      ];
    }
    this.#threadModel = strictestModel([
      this.#plugin.threadModel,
      ...this.#filters.map((f) => f.threadModel),
    ]);
  }

  /** The strictest thread model of the layers, which the server enforces. */
  get threadModel(): ThreadModel {
    return this.#threadModel;
  }

  /** Every export, as NBD_OPT_LIST shows them. */
  async list(): Promise<ExportInfo[]> {
    let lister: () => Promise<ExportInfo[]> = this.#plugin.listExports
      ? () => this.#plugin.listExports!()
      : () => Promise.resolve([{ name: this.#exportName, description: this.#description }]);
    // The filter nearest the plugin adjusts the list first.
    for (let i = this.#filters.length - 1; i >= 0; i--) {
      const filter = this.#filters[i]!;
      if (filter.listExports) {
        const below = lister;
        lister = () => filter.listExports!(below);
      }
    }
    return await lister();
  }

  /**
   * Resolves a requested name to an export: "" means the default export.
   * Returns undefined when there is no such export.
   */
  async resolve(name: string): Promise<ExportInfo | undefined> {
    const exports = await this.list();
    if (name === "") {
      if (this.#plugin.defaultExport) {
        const defaultName = await this.#plugin.defaultExport();
        return exports.find((e) => e.name === defaultName) ?? { name: defaultName };
      }
      return exports[0];
    }
    return exports.find((e) => e.name === name);
  }

  /**
   * Opens the plugin and wraps it in the filters, innermost first, then
   * enforces the thread model around the whole stack (a parallel stack is
   * returned as it is).
   */
  async open(context: OpenContext): Promise<Backend> {
    switch (this.#threadModel) {
      case "parallel":
        return await this.#openBelow(0, context);
      case "serialize_requests":
        return new SerializedBackend(await this.#openBelow(0, context), new Mutex());
      case "serialize_all_requests": {
        // Opening calls into the layers too: it waits its turn like a request.
        const backend = await this.#allRequests.run(() => this.#openBelow(0, context));
        return new SerializedBackend(backend, this.#allRequests);
      }
      case "serialize_connections": {
        const release = await this.#connection.acquire();
        try {
          return new SerializedBackend(await this.#openBelow(0, context), new Mutex(), release);
        } catch (error) {
          release();
          throw error;
        }
      }
    }
  }

  /** Opens the plugin and the filters from `index` inwards (so a filter can reopen what is below it). */
  async #openBelow(index: number, context: OpenContext): Promise<Backend> {
    let backend = await this.#plugin.open(context);
    const names = this.#checkNames;
    if (names) backend = this.#checked(backend, names.length - 2, names.length - 1);
    for (let i = this.#filters.length - 1; i >= index; i--) {
      const below = i + 1;
      try {
        backend = await this.#filters[i]!.wrap(
          backend,
          context,
          (reopenContext) => this.#openBelow(below, reopenContext),
        );
        if (names) backend = this.#checked(backend, i, i + 1);
      } catch (error) {
        await backend.close().catch(() => {});
        throw error;
      }
    }
    return backend;
  }

  /** The checking layer between caller `above` and layer `below` (indexes into the names). */
  #checked(backend: Backend, above: number, below: number): Backend {
    const names = this.#checkNames!;
    try {
      return new CheckingBackend(backend, names[above]!, names[below]!);
    } catch (error) {
      // The layer is open: close it, as for any failure to open the stack.
      backend.close().catch(() => {});
      throw error;
    }
  }

  /** Closes the filters and the plugin (at server shutdown). */
  async close(): Promise<void> {
    for (const filter of this.#filters) await filter.close?.();
    await this.#plugin.close?.();
  }
}
