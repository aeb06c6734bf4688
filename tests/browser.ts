/**
 * Headless Chromium for tests and benchmarks: Debian's `chromium` driven by
 * playwright-core (an npm package locked in deno.lock; it never downloads a
 * browser of its own).
 *
 * @module
 */

import type { Browser } from "playwright-core";

/** The Chromium executable (NBD_CHROMIUM overrides). */
export const CHROMIUM: string = Deno.env.get("NBD_CHROMIUM") ?? "/usr/bin/chromium";

/** Flags for a quiet, sandbox-less headless run on a machine without internet. */
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Starts headless Chromium with a fresh profile (playwright makes a temporary one). */
export async function launchChromium(): Promise<Browser & AsyncDisposable> {
  // Loaded here, not at the top: suites that skip the browser never fetch it.
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
  return Object.assign(browser, {
    async [Symbol.asyncDispose]() {
      await browser.close();
    },
  });
}

/** Where tests leave artifacts (screenshots): `.artifacts/` at the repository root. */
export async function artifactPath(name: string): Promise<string> {
  const dir = new URL("../.artifacts/", import.meta.url);
  await Deno.mkdir(dir, { recursive: true });
  return new URL(name, dir).pathname;
}
