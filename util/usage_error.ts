/**
 * The error of a bad command line or parameter, reported as `nbd: message`
 * with exit status 2.
 *
 * @module
 */

/** A bad command line: reported as `nbd: message` with exit status 2. */
export class UsageError extends Error {
  /** Creates a usage error. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}
