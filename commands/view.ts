/**
 * `nbd view LOGFILE`: replays a `log` filter file in the block-activity
 * page, at an adjustable speed.
 *
 * @module
 */

import { terminationSignal, whenAborted } from "../util/signals.ts";
import { UsageError } from "../util/usage_error.ts";
import { ServerStats } from "../server/stats.ts";
import { MAX_SPEED, Replayer, ReplayLog } from "../view/replay.ts";
import { DEFAULT_VIEW_ADDRESS, parseViewAddress, startViewServer } from "../view/view_server.ts";
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

const USAGE = `Usage: nbd view [OPTIONS] LOGFILE

Replay a file written by the log filter (nbd serve --filter=log ... logfile=FILE)
in the block-activity page: the map, counters and connections move as they did
when the log was written, at the chosen speed. /stats and /metrics work as for
a live server, so "nbd stats" reads the replay too.

Options:
${formatOptions(OPTIONS)}

Examples:
  nbd serve --filter=log memory 1G logfile=requests.log
  nbd view requests.log
  nbd view --speed 10 --listen 9000 requests.log
`;

/** `nbd view`. */
export const viewCommand: Command = {
  name: "view",
  summary: "replay a log filter file in the block-activity page",
  usage: USAGE,
  options: OPTIONS,
  async run(argv) {
    const { values, positionals } = parseOptions(argv, OPTIONS);
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (positionals.length !== 1) throw new UsageError("expected one LOGFILE");
    const file = positionals[0]!;
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
    const stats = new ServerStats();
    const replayer = new Replayer(log, stats, { file, speed, paused: values.paused ?? false });
    const view = await startViewServer({
      stats,
      listExports: () => Promise.resolve(log.exportNames),
      replay: replayer,
    }, address).catch((error) => {
      throw new Error(
        `Cannot serve the view on ${address.hostname}:${address.port}: ${error.message}`,
      );
    });
    printError(
      `view at ${view.url} (replaying ${log.requests} requests over ${
        (log.duration / 1000).toFixed(3)
      } s)`,
    );
    replayer.start();
    // Until the process's first stop signal (SIGINT, SIGTERM, SIGHUP: util/signals.ts).
    const stopped = whenAborted(terminationSignal());
    await stopped.promise;
    stopped.dispose();
    replayer.stop();
    await view.close();
    return 0;
  },
};
