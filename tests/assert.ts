/**
 * Assertions for tests, on top of node:assert/strict, with the argument
 * order of Deno's std (actual, expected).
 *
 * @module
 */

import assert from "node:assert/strict";

/** Deep strict equality. */
export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  assert.deepStrictEqual(actual, expected, message);
}

/** Asserts a truthy value. */
export function assertOk(value: unknown, message?: string): asserts value {
  assert.ok(value, message);
}

/** Asserts that `fn` throws an instance of `type` whose message contains `includes`. */
export function assertThrows(
  fn: () => unknown,
  type: abstract new (...args: never[]) => Error = Error,
  includes?: string,
): Error {
  let thrown: unknown;
  try {
    fn();
  } catch (error) {
    thrown = error;
  }
  if (thrown === undefined) {
    throw new assert.AssertionError({ message: "expected the function to throw" });
  }
  assert.ok(thrown instanceof type, `expected ${type.name}, got ${thrown}`);
  if (includes !== undefined) {
    assert.ok(
      (thrown as Error).message.includes(includes),
      `"${(thrown as Error).message}" lacks "${includes}"`,
    );
  }
  return thrown as Error;
}

/** Async version of assertThrows. */
export async function assertRejects(
  fn: () => Promise<unknown>,
  type: abstract new (...args: never[]) => Error = Error,
  includes?: string,
): Promise<Error> {
  let thrown: unknown;
  try {
    await fn();
  } catch (error) {
    thrown = error;
  }
  if (thrown === undefined) {
    throw new assert.AssertionError({ message: "expected the promise to reject" });
  }
  assert.ok(thrown instanceof type, `expected ${type.name}, got ${thrown}`);
  if (includes !== undefined) {
    assert.ok(
      (thrown as Error).message.includes(includes),
      `"${(thrown as Error).message}" lacks "${includes}"`,
    );
  }
  return thrown as Error;
}

/** Asserts that a string contains a substring. */
export function assertIncludes(text: string, part: string, message?: string): void {
  assert.ok(
    text.includes(part),
    message ?? `expected ${JSON.stringify(text)} to include ${JSON.stringify(part)}`,
  );
}

/** Asserts that two byte arrays are equal, reporting the first difference. */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, message?: string): void {
  const n = Math.min(actual.length, expected.length);
  for (let i = 0; i < n; i++) {
    if (actual[i] !== expected[i]) {
      throw new assert.AssertionError({
        message: `${message ? message + ": " : ""}bytes differ at offset ${i}: ${actual[i]} != ${
          expected[i]
        }`,
      });
    }
  }
  if (actual.length !== expected.length) {
    throw new assert.AssertionError({ message: `length ${actual.length} != ${expected.length}` });
  }
}
