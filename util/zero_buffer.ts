/**
 * One shared megabyte of zeroes, for emulated zeroing, holes in simple
 * replies and zero-filled writes. Nothing may ever write into it.
 *
 * @module
 */

/** A shared buffer of zeroes for emulated zeroing and simple-reply holes; never written. */
export const ZERO_BUFFER: Uint8Array = new Uint8Array(1024 * 1024);
