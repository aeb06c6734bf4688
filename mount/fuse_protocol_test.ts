import { assertEquals } from "../tests/assert.ts";
import {
  ATTR_OUT_SIZE,
  decodeInitIn,
  decodeName,
  decodeRequestHeader,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeError,
  encodeInitOut,
  encodeOpenOut,
  encodeWriteOut,
  ENTRY_OUT_SIZE,
  FUSE_INIT,
  IN_HEADER_SIZE,
  OUT_HEADER_SIZE,
  S_IFREG,
} from "./fuse_protocol.ts";

const ATTR = {
  ino: 2,
  size: 1 << 30,
  blocks: (1 << 30) / 512,
  atimeMs: 1_700_000_000_123,
  mtimeMs: 1_700_000_001_000,
  ctimeMs: 1_700_000_002_500,
  mode: S_IFREG | 0o644,
  nlink: 1,
  uid: 0,
  gid: 0,
  blksize: 4096,
};

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

Deno.test("decodeRequestHeader() reads fuse_in_header fields", () => {
  const bytes = new Uint8Array(IN_HEADER_SIZE + 16);
  const v = view(bytes);
  v.setUint32(0, bytes.length, true);
  v.setUint32(4, FUSE_INIT, true);
  v.setBigUint64(8, 0x1234_5678_9abcn, true);
  v.setBigUint64(16, 1n, true);
  v.setUint32(24, 1000, true);
  v.setUint32(28, 100, true);
  v.setUint32(32, 4242, true);
  v.setUint32(40, 7, true);
  v.setUint32(44, 45, true);
  v.setUint32(48, 131072, true);
  v.setUint32(52, 0xdead, true);
  const header = decodeRequestHeader(v);
  assertEquals(header, {
    length: bytes.length,
    opcode: FUSE_INIT,
    unique: 0x1234_5678_9abcn,
    nodeid: 1,
    uid: 1000,
    gid: 100,
    pid: 4242,
  });
  assertEquals(decodeInitIn(v), { major: 7, minor: 45, maxReadahead: 131072, flags: 0xdead });
});

Deno.test("encodeError() is a bare header with the negated errno", () => {
  const bytes = encodeError(99n, 5);
  assertEquals(bytes.length, OUT_HEADER_SIZE);
  const v = view(bytes);
  assertEquals(v.getUint32(0, true), OUT_HEADER_SIZE);
  assertEquals(v.getInt32(4, true), -5);
  assertEquals(v.getBigUint64(8, true), 99n);
});

Deno.test("encodeInitOut() fills the 64-byte reply of minor 23 and later", () => {
  const bytes = encodeInitOut(1n, {
    minor: 31,
    maxReadahead: 1 << 20,
    flags: 0x41,
    maxBackground: 64,
    congestionThreshold: 48,
    maxWrite: 1 << 20,
    maxPages: 256,
  });
  assertEquals(bytes.length, OUT_HEADER_SIZE + 64);
  const v = view(bytes);
  const at = OUT_HEADER_SIZE;
  assertEquals(v.getUint32(at, true), 7);
  assertEquals(v.getUint32(at + 4, true), 31);
  assertEquals(v.getUint32(at + 8, true), 1 << 20);
  assertEquals(v.getUint32(at + 12, true), 0x41);
  assertEquals(v.getUint16(at + 16, true), 64);
  assertEquals(v.getUint16(at + 18, true), 48);
  assertEquals(v.getUint32(at + 20, true), 1 << 20);
  assertEquals(v.getUint16(at + 28, true), 256);
  // An old kernel gets the old, shorter reply.
  assertEquals(
    encodeInitOut(1n, {
      minor: 12,
      maxReadahead: 0,
      flags: 0,
      maxBackground: 0,
      congestionThreshold: 0,
      maxWrite: 4096,
      maxPages: 0,
    }).length,
    OUT_HEADER_SIZE + 24,
  );
});

Deno.test("encodeAttrOut() and encodeEntryOut() place fuse_attr where the kernel reads it", () => {
  const attrOut = encodeAttrOut(3n, ATTR, 1.5);
  assertEquals(attrOut.length, OUT_HEADER_SIZE + ATTR_OUT_SIZE);
  let v = view(attrOut);
  let at = OUT_HEADER_SIZE;
  assertEquals(v.getBigUint64(at, true), 1n); // attr_valid seconds
  assertEquals(v.getUint32(at + 8, true), 500_000_000); // and nanoseconds
  at += 16;
  assertEquals(v.getBigUint64(at, true), 2n);
  assertEquals(v.getBigUint64(at + 8, true), BigInt(1 << 30));
  assertEquals(v.getBigUint64(at + 16, true), BigInt((1 << 30) / 512));
  assertEquals(v.getBigUint64(at + 24, true), 1_700_000_000n); // atime
  assertEquals(v.getUint32(at + 48, true), 123_000_000); // atimensec
  assertEquals(v.getBigUint64(at + 40, true), 1_700_000_002n); // ctime
  assertEquals(v.getUint32(at + 56, true), 500_000_000); // ctimensec
  assertEquals(v.getUint32(at + 60, true), S_IFREG | 0o644);
  assertEquals(v.getUint32(at + 64, true), 1);
  assertEquals(v.getUint32(at + 80, true), 4096);

  const entry = encodeEntryOut(4n, ATTR, 3600);
  assertEquals(entry.length, OUT_HEADER_SIZE + ENTRY_OUT_SIZE);
  v = view(entry);
  at = OUT_HEADER_SIZE;
  assertEquals(v.getBigUint64(at, true), 2n); // nodeid
  assertEquals(v.getBigUint64(at + 16, true), 3600n); // entry_valid
  assertEquals(v.getBigUint64(at + 24, true), 3600n); // attr_valid
  assertEquals(v.getBigUint64(at + 40 + 8, true), BigInt(1 << 30)); // attr.size
});

Deno.test("encodeOpenOut() and encodeWriteOut() carry the handle, flags and count", () => {
  let v = view(encodeOpenOut(5n, 17, 0x40));
  assertEquals(v.getBigUint64(OUT_HEADER_SIZE, true), 17n);
  assertEquals(v.getUint32(OUT_HEADER_SIZE + 8, true), 0x40);
  v = view(encodeWriteOut(6n, 1 << 20));
  assertEquals(v.byteLength, OUT_HEADER_SIZE + 8);
  assertEquals(v.getUint32(OUT_HEADER_SIZE, true), 1 << 20);
});

Deno.test("encodeDirents() pads entries to 8 bytes and resumes from an offset", () => {
  const entries = [
    { ino: 1, name: ".", type: 4 },
    { ino: 1, name: "..", type: 4 },
    { ino: 2, name: "disk", type: 8 },
  ];
  const all = encodeDirents(7n, entries, 0, 4096);
  // 24-byte fixed part + name, rounded up to 8: 32 + 32 + 32.
  assertEquals(all.length, OUT_HEADER_SIZE + 96);
  const v = view(all);
  const third = OUT_HEADER_SIZE + 64;
  assertEquals(v.getBigUint64(third, true), 2n);
  assertEquals(v.getBigUint64(third + 8, true), 3n); // offset of the next entry
  assertEquals(v.getUint32(third + 16, true), 4);
  assertEquals(v.getUint32(third + 20, true), 8);
  assertEquals(new TextDecoder().decode(all.subarray(third + 24, third + 28)), "disk");
  // From offset 2 only "disk"; nothing past the end; a small buffer gets what fits.
  assertEquals(encodeDirents(7n, entries, 2, 4096).length, OUT_HEADER_SIZE + 32);
  assertEquals(encodeDirents(7n, entries, 3, 4096).length, OUT_HEADER_SIZE);
  assertEquals(encodeDirents(7n, entries, 0, 70).length, OUT_HEADER_SIZE + 64);
});

Deno.test("decodeName() stops at the NUL terminator", () => {
  const bytes = new Uint8Array([0, 0, 100, 105, 115, 107, 0, 99]);
  assertEquals(decodeName(bytes, 2, bytes.length), "disk");
});
