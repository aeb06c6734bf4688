/**
 * The uncompressed contents of the .xz test fixtures in testdata/: text
 * lines followed by pseudo-random bytes, generated so tests can compare
 * byte for byte without storing the original.
 *
 * Regenerate the fixtures with:
 * `deno run filters/_xz_fixture.ts > x && xz -k --block-size=64KiB -c x > testdata/blocks.xz`
 * (and `-C crc32` / `-C sha256` / `-C none` single-block variants).
 *
 * @module
 */

import { randomBytes } from "../tests/helpers.ts";

/** The fixture's uncompressed bytes. */
export function xzFixtureContent(): Uint8Array {
  const lines: string[] = [];
  for (let i = 1; i <= 5000; i++) lines.push(`line ${i}: the quick brown fox ${i % 7} jumps\n`);
  const text = new TextEncoder().encode(lines.join(""));
  const out = new Uint8Array(text.length + 20000);
  out.set(text);
  out.set(randomBytes(20000, 7), text.length);
  return out;
}

if (import.meta.main) await Deno.stdout.write(xzFixtureContent());
