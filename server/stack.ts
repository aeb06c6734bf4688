/**
 * Starting the layers of an export (its filters, then its plugin) as one
 * unit: when a layer fails to start, the layers started before it are
 * closed again, so nothing they hold (files, connections) is left behind.
 *
 * @module
 */

import type { Filter, FilterInstance, Plugin, PluginInstance } from "../core/backend.ts";
import { checkRequired, type Params } from "../core/params.ts";

/** The started layers of an export. */
export interface Layers {
  /** Started filters, outermost (nearest the client) first. */
  filters: FilterInstance[];
  /** The started plugin. */
  plugin: PluginInstance;
}

/**
 * Starts the filters (outermost first, so each takes its parameters before
 * the plugin sees them), then the plugin, and checks that every parameter
 * was taken. On any failure every layer already started is closed, the
 * last started first, and the error is rethrown.
 */
export async function startLayers(
  filters: readonly Filter[],
  plugin: Plugin,
  params: Params,
): Promise<Layers> {
  // Every layer's required parameters, before any layer is created: nothing to undo.
  for (const layer of [...filters, plugin]) checkRequired(layer.name, layer.params, params);
  const started: Array<FilterInstance | PluginInstance> = [];
  try {
    const filterInstances: FilterInstance[] = [];
    for (const filter of filters) {
      const instance = await filter.create(params);
      instance.threadModel ??= filter.threadModel;
      started.push(instance);
      filterInstances.push(instance);
    }
    const pluginInstance = await plugin.create(params);
    pluginInstance.threadModel ??= plugin.threadModel;
    started.push(pluginInstance);
    params.assertEmpty();
    return { filters: filterInstances, plugin: pluginInstance };
  } catch (error) {
    for (const layer of started.reverse()) {
      // The start failure is what the user must see, not a failure to undo it.
      await Promise.resolve().then(() => layer.close?.()).catch(() => {});
    }
    throw error;
  }
}
