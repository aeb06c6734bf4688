/**
 * What inline plugins (`nbd serve ts CODE`) have in scope: a small module,
 * so that loading one does not load the whole library.
 *
 * @module
 */

export { defineFilter, definePlugin } from "./authoring.ts";
export { NbdError } from "../protocol/errors.ts";
