/**
 * A RAM disk written with the authoring API, like the built-in `memory`
 * plugin: 64 KiB pages allocated on first write, holes for the rest,
 * zero-copy reads through `readView`. The benchmark `deno task
 * bench:plugin-api` compares it with the built-in.
 *
 * ```
 * nbd serve ./examples/ram_disk.ts 1G
 * ```
 *
 * @module
 */

import {
  definePlugin,
  type Extent,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type ReadSegment,
} from "../mod.ts";

/** Bytes per page. */
const PAGE = 64 * 1024;

export default definePlugin({
  name: "ramdisk",
  summary: "sparse RAM disk written with the plugin API",
  params: [
    { name: "size", value: "SIZE", type: "size", description: "virtual size", required: true },
  ],
  magicParam: "size",
  create(params) {
    const size = params.takeSize("size")!;
    const pages = new Map<number, Uint8Array>();
    /** Calls `fn` for each page piece of a range. */
    const each = (
      offset: number,
      length: number,
      fn: (index: number, within: number, n: number, done: number) => void,
    ) => {
      for (let done = 0; done < length;) {
        const pos = offset + done;
        const index = Math.floor(pos / PAGE);
        const within = pos - index * PAGE;
        const n = Math.min(PAGE - within, length - done);
        fn(index, within, n, done);
        done += n;
      }
    };
    const clear = (offset: number, length: number) =>
      each(offset, length, (index, within, n) => {
        if (n === PAGE) pages.delete(index);
        else pages.get(index)?.fill(0, within, within + n);
      });
    return {
      size: () => size,
      capabilities: () => ({ multiConn: true, fua: "native", cache: "native" }),
      readView(offset, length) {
        const out: ReadSegment[] = [];
        each(offset, length, (index, within, n) => {
          const page = pages.get(index);
          if (page) out.push(page.subarray(within, within + n));
          else if (typeof out[out.length - 1] === "number") (out[out.length - 1] as number) += n;
          else out.push(n);
        });
        return out;
      },
      pread(buf, offset) {
        each(offset, buf.length, (index, within, n, done) => {
          const page = pages.get(index);
          if (page) buf.set(page.subarray(within, within + n), done);
          else buf.fill(0, done, done + n);
        });
        return Promise.resolve();
      },
      pwrite(buf, offset) {
        each(offset, buf.length, (index, within, n, done) => {
          let page = pages.get(index);
          if (!page) pages.set(index, page = new Uint8Array(PAGE));
          page.set(buf.subarray(done, done + n), within);
        });
        return Promise.resolve();
      },
      flush: () => Promise.resolve(),
      trim(offset, length) {
        clear(offset, length);
        return Promise.resolve();
      },
      zero(offset, length) {
        clear(offset, length);
        return Promise.resolve();
      },
      extents(offset, length) {
        const out: Extent[] = [];
        each(offset, length, (index, _within, n) => {
          const flags = pages.has(index) ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO;
          const last = out[out.length - 1];
          if (last && last.flags === flags) last.length += n;
          else out.push({ length: n, flags });
        });
        return Promise.resolve(out);
      },
      cache: () => Promise.resolve(),
    };
  },
});
