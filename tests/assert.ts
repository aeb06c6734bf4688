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

/** An error class, or a predicate the error must satisfy. */
export type ErrorExpectation =
  | (abstract new (...args: never[]) => Error)
  | ((error: unknown) => boolean);

function checkError(thrown: unknown, expected: ErrorExpectation, includes?: string | RegExp): void {
  if (expected === Error || expected.prototype instanceof Error) {
    const type = expected as abstract new (...args: never[]) => Error;
    assert.ok(thrown instanceof type, `expected ${type.name}, got ${thrown}`);
  } else {
    assert.ok((expected as (error: unknown) => boolean)(thrown), `unexpected error: ${thrown}`);
  }
  if (includes === undefined) return;
  const message = thrown instanceof Error ? thrown.message : String(thrown);
  assert.ok(
    typeof includes === "string" ? message.includes(includes) : includes.test(message),
    `"${message}" lacks ${includes}`,
  );
}

/**
 * Asserts that `fn` throws an error of `expected` (a class or a predicate)
 * whose message contains `includes` (a substring or a pattern).
 */
export function assertThrows(
  fn: () => unknown,
  expected: ErrorExpectation = Error,
  includes?: string | RegExp,
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
  checkError(thrown, expected, includes);
  return thrown as Error;
}

/** Async version of assertThrows: `fn` (or the promise itself) must reject. */
export async function assertRejects(
  fn: Promise<unknown> | (() => Promise<unknown>),
  expected: ErrorExpectation = Error,
  includes?: string | RegExp,
): Promise<Error> {
  let thrown: unknown;
  let rejected = false;
  try {
    await (typeof fn === "function" ? fn() : fn);
  } catch (error) {
    thrown = error;
    rejected = true;
  }
  if (!rejected) {
    throw new assert.AssertionError({ message: "expected the promise to reject" });
  }
  checkError(thrown, expected, includes);
  return thrown as Error;
}

/** Asserts that a string matches a pattern. */
export function assertMatch(text: string, pattern: RegExp, message?: string): void {
  assert.match(text, pattern, message);
}

/** Asserts that a string does not match a pattern. */
export function assertNotMatch(text: string, pattern: RegExp, message?: string): void {
  assert.doesNotMatch(text, pattern, message);
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
