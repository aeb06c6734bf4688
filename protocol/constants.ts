/**
 * Wire constants of the NBD protocol, named as in the protocol specification
 * so they can be searched for in the spec and in other implementations.
 *
 * @module
 */

/** "NBDMAGIC": the first eight bytes the server sends. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle greeting magic and prefix of every option request. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Oldstyle greeting magic (obsolete handshake; recognised by clients only). */
export const NBD_OLD_MAGIC = 0x00420281861253n;
/** Prefix of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;

/** Compact (28-byte) request magic. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Extended (32-byte) request magic. */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
/** Simple reply magic. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Structured reply chunk magic. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Extended reply chunk magic. */
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Handshake flags sent by the server. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME. */
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flag: the client speaks fixed newstyle. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
/** Client flag: the server must omit the 124 zero bytes. */
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Option numbers. */
export const NBD_OPT_EXPORT_NAME = 1;
/** Soft disconnect during the handshake. */
export const NBD_OPT_ABORT = 2;
/** List exports. */
export const NBD_OPT_LIST = 3;
/** Upgrade the connection to TLS. */
export const NBD_OPT_STARTTLS = 5;
/** Query an export without entering transmission. */
export const NBD_OPT_INFO = 6;
/** Select an export and enter transmission. */
export const NBD_OPT_GO = 7;
/** Enable structured replies. */
export const NBD_OPT_STRUCTURED_REPLY = 8;
/** List metadata contexts. */
export const NBD_OPT_LIST_META_CONTEXT = 9;
/** Select metadata contexts. */
export const NBD_OPT_SET_META_CONTEXT = 10;
/** Enable 64-bit extended headers. */
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** Option reply types. */
export const NBD_REP_ACK = 1;
/** One export in a LIST reply. */
export const NBD_REP_SERVER = 2;
/** One NBD_INFO_* item of an INFO/GO reply. */
export const NBD_REP_INFO = 3;
/** One metadata context of a *_META_CONTEXT reply. */
export const NBD_REP_META_CONTEXT = 4;
/** Bit 31 marks an error reply. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
/** Option not known to the server. */
export const NBD_REP_ERR_UNSUP = 0x80000001;
/** Forbidden by server policy. */
export const NBD_REP_ERR_POLICY = 0x80000002;
/** Invalid option (bad length, unexpected data...). */
export const NBD_REP_ERR_INVALID = 0x80000003;
/** Not supported on this platform. */
export const NBD_REP_ERR_PLATFORM = 0x80000004;
/** TLS must be negotiated first. */
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
/** No such export. */
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
/** Server shutting down. */
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
/** The server requires NBD_INFO_BLOCK_SIZE to be requested. */
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
/** Request or reply too large. */
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
/** Extended headers are required. */
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

/** NBD_INFO_* types inside NBD_REP_INFO. */
export const NBD_INFO_EXPORT = 0;
/** Canonical export name. */
export const NBD_INFO_NAME = 1;
/** Human-readable export description. */
export const NBD_INFO_DESCRIPTION = 2;
/** Block size constraints. */
export const NBD_INFO_BLOCK_SIZE = 3;

/** Transmission flags (16 bits). */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
/** Export is read-only. */
export const NBD_FLAG_READ_ONLY = 1 << 1;
/** FLUSH supported. */
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
/** FUA supported. */
export const NBD_FLAG_SEND_FUA = 1 << 3;
/** Rotational media hint. */
export const NBD_FLAG_ROTATIONAL = 1 << 4;
/** TRIM supported. */
export const NBD_FLAG_SEND_TRIM = 1 << 5;
/** WRITE_ZEROES supported. */
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
/** DF (don't fragment) supported on READ. */
export const NBD_FLAG_SEND_DF = 1 << 7;
/** Safe to use several connections. */
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
/** CACHE supported. */
export const NBD_FLAG_SEND_CACHE = 1 << 10;
/** FAST_ZERO supported. */
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
/** BLOCK_STATUS accepts a context-id payload (extended headers only). */
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

/** Command types. */
export const NBD_CMD_READ = 0;
/** Write data. */
export const NBD_CMD_WRITE = 1;
/** Soft disconnect. */
export const NBD_CMD_DISC = 2;
/** Flush to stable storage. */
export const NBD_CMD_FLUSH = 3;
/** Discard a range. */
export const NBD_CMD_TRIM = 4;
/** Prefetch a range. */
export const NBD_CMD_CACHE = 5;
/** Write zeroes to a range. */
export const NBD_CMD_WRITE_ZEROES = 6;
/** Query block status. */
export const NBD_CMD_BLOCK_STATUS = 7;

/** Command flags (16 bits). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** WRITE_ZEROES must not punch a hole. */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
/** READ must not be fragmented. */
export const NBD_CMD_FLAG_DF = 1 << 2;
/** BLOCK_STATUS: return one extent only. */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
/** WRITE_ZEROES: fail with ENOTSUP unless fast. */
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
/** Extended headers: length is a payload length. */
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

/** Structured reply flag: last chunk of the reply. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** Structured reply chunk types. */
export const NBD_REPLY_TYPE_NONE = 0;
/** Data at an offset. */
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
/** A hole (reads as zeroes) at an offset. */
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
/** Block status descriptors (32-bit). */
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Block status descriptors (64-bit, extended headers). */
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
/** Bit 15 marks an error chunk. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
/** Error for the whole request. */
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;

/** base:allocation status bit: not allocated. */
export const NBD_STATE_HOLE = 1 << 0;
/** base:allocation status bit: reads as zeroes. */
export const NBD_STATE_ZERO = 1 << 1;

/** The one metadata context every server offers. */
export const BASE_ALLOCATION = "base:allocation";

/** Error numbers of the protocol (equal to common Linux errno values). */
export const NBD_EPERM = 1;
/** I/O error. */
export const NBD_EIO = 5;
/** Out of memory. */
export const NBD_ENOMEM = 12;
/** Invalid argument. */
export const NBD_EINVAL = 22;
/** No space left. */
export const NBD_ENOSPC = 28;
/** Value too large. */
export const NBD_EOVERFLOW = 75;
/** Operation not supported (fast zero). */
export const NBD_ENOTSUP = 95;
/** Server shutting down. */
export const NBD_ESHUTDOWN = 108;

/** Default TCP port. */
export const NBD_DEFAULT_PORT = 10809;

/** Names of the protocol's errors, keyed by their wire value. */
export const ERRNO_NAMES: Readonly<Record<number, string>> = {
  [NBD_EPERM]: "EPERM",
  [NBD_EIO]: "EIO",
  [NBD_ENOMEM]: "ENOMEM",
  [NBD_EINVAL]: "EINVAL",
  [NBD_ENOSPC]: "ENOSPC",
  [NBD_EOVERFLOW]: "EOVERFLOW",
  [NBD_ENOTSUP]: "ENOTSUP",
  [NBD_ESHUTDOWN]: "ESHUTDOWN",
};

/** Error names a backend may throw, with their wire values. */
export const ERRNO_VALUES = {
  EPERM: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
} as const;

/** An error name known to the protocol. */
export type ErrnoName = keyof typeof ERRNO_VALUES;

const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: "EXPORT_NAME",
  [NBD_OPT_ABORT]: "ABORT",
  [NBD_OPT_LIST]: "LIST",
  [NBD_OPT_STARTTLS]: "STARTTLS",
  [NBD_OPT_INFO]: "INFO",
  [NBD_OPT_GO]: "GO",
  [NBD_OPT_STRUCTURED_REPLY]: "STRUCTURED_REPLY",
  [NBD_OPT_LIST_META_CONTEXT]: "LIST_META_CONTEXT",
  [NBD_OPT_SET_META_CONTEXT]: "SET_META_CONTEXT",
  [NBD_OPT_EXTENDED_HEADERS]: "EXTENDED_HEADERS",
};

const REPLY_NAMES: Record<number, string> = {
  [NBD_REP_ACK]: "ACK",
  [NBD_REP_SERVER]: "SERVER",
  [NBD_REP_INFO]: "INFO",
  [NBD_REP_META_CONTEXT]: "META_CONTEXT",
  [NBD_REP_ERR_UNSUP]: "ERR_UNSUP",
  [NBD_REP_ERR_POLICY]: "ERR_POLICY",
  [NBD_REP_ERR_INVALID]: "ERR_INVALID",
  [NBD_REP_ERR_PLATFORM]: "ERR_PLATFORM",
  [NBD_REP_ERR_TLS_REQD]: "ERR_TLS_REQD",
  [NBD_REP_ERR_UNKNOWN]: "ERR_UNKNOWN",
  [NBD_REP_ERR_SHUTDOWN]: "ERR_SHUTDOWN",
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: "ERR_BLOCK_SIZE_REQD",
  [NBD_REP_ERR_TOO_BIG]: "ERR_TOO_BIG",
  [NBD_REP_ERR_EXT_HEADER_REQD]: "ERR_EXT_HEADER_REQD",
};

const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: "READ",
  [NBD_CMD_WRITE]: "WRITE",
  [NBD_CMD_DISC]: "DISC",
  [NBD_CMD_FLUSH]: "FLUSH",
  [NBD_CMD_TRIM]: "TRIM",
  [NBD_CMD_CACHE]: "CACHE",
  [NBD_CMD_WRITE_ZEROES]: "WRITE_ZEROES",
  [NBD_CMD_BLOCK_STATUS]: "BLOCK_STATUS",
};

/** Name of an option number, e.g. "GO", or "OPT_<n>" when unknown. */
export function optionName(option: number): string {
  return OPTION_NAMES[option] ?? `OPT_${option}`;
}

/** Name of an option reply type, e.g. "ERR_UNKNOWN". */
export function replyTypeName(type: number): string {
  return REPLY_NAMES[type] ?? `REP_0x${type.toString(16)}`;
}

/** Name of a command type, e.g. "READ", or "CMD_<n>" when unknown. */
export function commandName(command: number): string {
  return COMMAND_NAMES[command] ?? `CMD_${command}`;
}

/** Name of a protocol error value, e.g. "EIO"; unknown values print as numbers. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}
