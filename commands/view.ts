/**
 * `nbd view SOURCE...`: the block-activity page for log filter files
 * (replayed at an adjustable speed) and live servers' views, one map per
 * source side by side.
 *
 * @module
 */

import { terminationSignal, whenAborted } from "../util/signals.ts";
import { UsageError } from "../util/usage_error.ts";
import { ServerStats } from "../server/stats.ts";
import { MAX_SPEED, Replayer, ReplayLog } from "../view/replay.ts";
import {
  DEFAULT_VIEW_ADDRESS,
  parseViewAddress,
  startViewServer,
  type ViewServer,
} from "../view/view_server.ts";
import { type CombinedSource, parseRemoteView, startCombinedView } from "../view/combined_view.ts";
import { type Command, formatOptions, parseOptions, printError } from "./command.ts";

const OPTIONS = {
  listen: {
    type: "string",
    short: "l",
    value: "ADDR",
    help: `where to serve the page (default ${DEFAULT_VIEW_ADDRESS}; HOST:PORT, :PORT or PORT)`,
  },
  speed: {
    type: "string",
    value: "X",
    help: `log seconds per second (default 1; up to ${MAX_SPEED})`,
  },
  paused: { type: "boolean", help: "start paused (press Play on the page)" },
  help: { type: "boolean", short: "h", help: "show this help" },
} as const;

const USAGE = `Usage: nbd view [OPTIONS] SOURCE...

Show one or more sources in the block-activity page, one block map each,
side by side. A SOURCE is a file written by the log filter (nbd serve
--filter=log ... logfile=FILE), replayed at the chosen speed as if it were
happening now, or the view of a live server (nbd serve --view, nbd proxy
--view) given as its URL, http://HOST:PORT (add ?token=SECRET when that
server has --view-token). With one log file, /stats and /metrics work as for
a live server, so "nbd stats" reads the replay too; with several sources,
source N's are under /s/N/.

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd serve --filter=log memory 1G logfile=requests.log
  nbd view requests.log
  nbd view --speed 10 --listen 9000 requests.log
  nbd view --listen 9000 http://127.0.0.1:8081 http://127.0.0.1:8082 requests.log
`;

/** `nbd view`. */
export const viewCommand: Command = {
  name: "view",
  summary: "show log files and live servers in the block-activity page",
  usage: USAGE,
  options: OPTIONS,
  async run(argv) {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (positionals.length === 0) throw new UsageError("expected at least one SOURCE");
    let address;
    try {
      address = parseViewAddress(values.listen ?? DEFAULT_VIEW_ADDRESS);
    } catch (error) {
      throw new UsageError(`--listen: ${(error as Error).message}`);
    }
    const speed = values.speed === undefined ? 1 : Number(values.speed);
    if (!(speed > 0 && speed <= MAX_SPEED)) {
      throw new UsageError(`--speed: expected a number above 0 and up to ${MAX_SPEED}`);
    }
    const sources: CombinedSource[] = [];
    const replayers: Replayer[] = [];
    let requests = 0;
    for (const word of positionals) {
      if (/^https?:\/\//i.test(word)) {
        let remote;
        try {
          remote = parseRemoteView(word);
        } catch (error) {
          throw new UsageError(`${word}: ${(error as Error).message}`);
        }
        sources.push({ label: remote.url.host, remote });
        continue;
      }
      const log = await readLog(word);
      const stats = new ServerStats();
      const replayer = new Replayer(log, stats, {
        file: word,
        speed,
        paused: values.paused ?? false,
      });
      replayers.push(replayer);
      requests += log.requests;
      sources.push({
        label: word.replace(/^.*\//, ""),
        local: {
          stats,
          listExports: () => Promise.resolve(log.exportNames),
          replay: replayer,
        },
      });
    }
    let view: ViewServer;
    try {
      const only = sources[0]!;
      view = sources.length === 1 && "local" in only
        ? await startViewServer(only.local, address)
        : await startCombinedView(sources, address);
    } catch (error) {
      throw new Error(
        `Cannot serve the view on ${address.hostname}:${address.port}: ${(error as Error).message}`,
      );
    }
    printError(
      `view at ${view.url} (${sources.length} source${sources.length === 1 ? "" : "s"}${
        replayers.length ? `; replaying ${requests} requests` : ""
      })`,
    );
    for (const replayer of replayers) replayer.start();
    // Until the process's first stop signal (SIGINT, SIGTERM, SIGHUP: util/signals.ts).
    const stopped = whenAborted(terminationSignal());
    await stopped.promise;
    stopped.dispose();
    for (const replayer of replayers) replayer.stop();
    await view.close();
    return 0;
  },
};

/** Reads a log filter file for replay; one-line errors when it cannot be replayed. */
async function readLog(file: string): Promise<ReplayLog> {
  let log: ReplayLog;
  try {
    log = await ReplayLog.fromFile(file);
  } catch (error) {
    throw new Error(`Cannot read ${file}: ${(error as Error).message}`);
  }
  if (log.length === 0) {
    throw new Error(`Cannot replay ${file}: no log filter lines in it`);
  }
  if (log.skipped > 0) {
    printError(`${file}: skipped ${log.skipped} line(s) that are not log filter lines`);
  }
  return log;
}
