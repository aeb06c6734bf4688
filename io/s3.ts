/**
 * A small S3 client: objects, ranged reads, listing, multipart uploads,
 * signed with AWS Signature Version 4 (written here with crypto.subtle: the
 * algorithm is short and fully specified, and a dependency would bring more
 * than it saves). Credentials come from the usual places in the usual
 * order; secrets never appear in messages.
 *
 * Transient failures (network errors, 429, 5xx) are retried with
 * exponential back-off; other failures throw `S3Error` carrying the
 * service's error code.
 *
 * @module
 */

import { sleep } from "../util/sleep.ts";
import { Http1Error, Http1Pool } from "./http1.ts";

/** Access credentials. */
export interface S3Credentials {
  /** The access key id. */
  accessKeyId: string;
  /** The secret access key. */
  secretAccessKey: string;
  /** A session token (temporary credentials). */
  sessionToken?: string;
  /** Where they came from, for messages (never the values). */
  source: string;
}

/** Settings of a client. */
export interface S3Options {
  /** Endpoint URL (http[s]://host[:port]); absent = AWS (https://s3.REGION.amazonaws.com). */
  endpoint?: string;
  /** Region used in signatures (default us-east-1). */
  region?: string;
  /** Credentials; absent = anonymous requests. */
  credentials?: S3Credentials;
  /** Requests in flight at once (default 16). */
  connections?: number;
  /** Retries of a transient failure (default 5). */
  retries?: number;
  /** First back-off wait in milliseconds, doubling (default 100). */
  retryDelay?: number;
  /** Per-request timeout in milliseconds (default 60 s). */
  timeout?: number;
}

/** A failed request: HTTP status and the service's error code (e.g. NoSuchBucket). */
export class S3Error extends Error {
  /** HTTP status (0 when the request never got an answer). */
  readonly status: number;
  /** The service's error code, when it sent one. */
  readonly code: string;

  /** Creates the error. */
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "S3Error";
    this.status = status;
    this.code = code;
  }
}

function parseIni(text: string): Map<string, Map<string, string>> {
  const sections = new Map<string, Map<string, string>>();
  let current: Map<string, string> | undefined;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const header = /^\[\s*(.+?)\s*\]$/.exec(line);
    if (header) {
      current = new Map();
      sections.set(header[1]!.replace(/^profile\s+/, ""), current);
      continue;
    }
    const eq = line.indexOf("=");
    if (eq > 0 && current) current.set(line.slice(0, eq).trim(), line.slice(eq + 1).trim());
  }
  return sections;
}

/**
 * Finds credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
 * AWS_SESSION_TOKEN, then the shared credentials file
 * (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials) in the section
 * `profile` (default: AWS_PROFILE, then "default"). Undefined when none.
 */
export async function findCredentials(
  profile?: string,
  env: (name: string) => string | undefined = (name) => Deno.env.get(name),
): Promise<S3Credentials | undefined> {
  const id = env("AWS_ACCESS_KEY_ID");
  const secret = env("AWS_SECRET_ACCESS_KEY");
  if (profile === undefined && id && secret) {
    return {
      accessKeyId: id,
      secretAccessKey: secret,
      sessionToken: env("AWS_SESSION_TOKEN") || undefined,
      source: "the environment",
    };
  }
  const home = env("HOME");
  const file = env("AWS_SHARED_CREDENTIALS_FILE") ??
    (home ? `${home}/.aws/credentials` : undefined);
  const name = profile ?? env("AWS_PROFILE") ?? "default";
  if (file === undefined) return undefined;
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound && profile === undefined) return undefined;
    throw new Error(`cannot read the credentials file ${file}: ${(error as Error).message}`);
  }
  const section = parseIni(text).get(name);
  const key = section?.get("aws_access_key_id");
  const secretKey = section?.get("aws_secret_access_key");
  if (!key || !secretKey) {
    if (profile === undefined && env("AWS_PROFILE") === undefined) return undefined;
    throw new Error(`no credentials for the profile "${name}" in ${file}`);
  }
  return {
    accessKeyId: key,
    secretAccessKey: secretKey,
    sessionToken: section?.get("aws_session_token") || undefined,
    source: `the profile "${name}" in ${file}`,
  };
}

const encoder = new TextEncoder();

function hex(bytes: ArrayBuffer): string {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** node:crypto, loaded on first use: its loading costs start-up, and only uploads need it. */
let nodeCrypto: Promise<typeof import("node:crypto")> | undefined;

/** Bodies from this size up are hashed through node:crypto; smaller ones through crypto.subtle. */
const NODE_HASH_FROM = 64 * 1024;

/** SHA-256 of `data`, as hex or base64. */
async function sha256(data: Uint8Array | string, encoding: "hex" | "base64"): Promise<string> {
  if (data.length >= NODE_HASH_FROM) {
    // About three times faster than crypto.subtle on part-sized bodies (docs/performance.md).
    nodeCrypto ??= import("node:crypto");
    return (await nodeCrypto).createHash("sha256").update(data).digest(encoding);
  }
  const bytes = typeof data === "string" ? encoder.encode(data) : data;
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return encoding === "hex" ? hex(digest) : btoa(String.fromCharCode(...new Uint8Array(digest)));
}

/** Lowercase hex SHA-256 of `data`. */
export function sha256Hex(data: Uint8Array | string): Promise<string> {
  return sha256(data, "hex");
}

/** Base64 SHA-256 of `data` (the x-amz-checksum-sha256 header). */
export function sha256Base64(data: Uint8Array): Promise<string> {
  return sha256(data, "base64");
}

function hmacKey(raw: Uint8Array): Promise<CryptoKey> {
  return crypto.subtle.importKey(
    "raw",
    raw as Uint8Array<ArrayBuffer>,
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
}

async function hmac(key: Uint8Array | string, data: string): Promise<Uint8Array> {
  const raw = typeof key === "string" ? encoder.encode(key) : key;
  return new Uint8Array(await crypto.subtle.sign("HMAC", await hmacKey(raw), encoder.encode(data)));
}

/**
 * Signing keys by secret, day and region: derived once a day rather than
 * with four HMACs per request. Only the last one is kept.
 */
let signingKey: { id: string; key: Promise<CryptoKey> } | undefined;

function signingKeyFor(secret: string, day: string, region: string): Promise<CryptoKey> {
  const id = `${day}/${region}/${secret}`;
  if (signingKey?.id !== id) {
    const key = (async () => {
      let derived = await hmac(`AWS4${secret}`, day);
      derived = await hmac(derived, region);
      derived = await hmac(derived, "s3");
      derived = await hmac(derived, "aws4_request");
      return await hmacKey(derived);
    })();
    signingKey = { id, key };
  }
  return signingKey.key;
}

/** RFC 3986 encoding as SigV4 wants it (unreserved characters kept). */
function uriEncode(text: string, keepSlash: boolean): string {
  const encoded = encodeURIComponent(text).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
  return keepSlash ? encoded.replaceAll("%2F", "/") : encoded;
}

/** A request to sign; every header in `headers` is signed. */
export interface SignInput {
  /** HTTP method. */
  method: string;
  /** Full URL (the query is part of the signature). */
  url: URL;
  /** Headers to send; x-amz-date, x-amz-content-sha256 and Authorization are added. */
  headers: Headers;
  /** Hex SHA-256 of the body (or "UNSIGNED-PAYLOAD"). */
  payloadHash: string;
  /** Signing time. */
  date: Date;
}

/**
 * Signs a request with AWS Signature Version 4 (service s3): adds
 * x-amz-date, x-amz-content-sha256, x-amz-security-token (with a session
 * token) and Authorization to `input.headers`.
 */
export async function signV4(
  input: SignInput,
  credentials: S3Credentials,
  region: string,
): Promise<void> {
  const amzDate = input.date.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");
  const day = amzDate.slice(0, 8);
  const headers = input.headers;
  headers.set("x-amz-date", amzDate);
  headers.set("x-amz-content-sha256", input.payloadHash);
  if (credentials.sessionToken) headers.set("x-amz-security-token", credentials.sessionToken);
  const signed = new Map<string, string>([["host", input.url.host]]);
  // Every header sent is signed, so none can be altered on the way.
  for (const [name, value] of headers) signed.set(name, value.trim().replace(/\s+/g, " "));
  const names = [...signed.keys()].sort();
  const query = [...input.url.searchParams]
    .map(([k, v]) => [uriEncode(k, false), uriEncode(v, false)])
    .sort(([a, x], [b, y]) => a! < b! ? -1 : a! > b! ? 1 : x! < y! ? -1 : x! > y! ? 1 : 0)
    .map(([k, v]) => `${k}=${v}`)
    .join("&");
  const path = decodeURIComponent(input.url.pathname);
  const canonical = [
    input.method,
    uriEncode(path, true),
    query,
    names.map((n) => `${n}:${signed.get(n)}\n`).join(""),
    names.join(";"),
    input.payloadHash,
  ].join("\n");
  const scope = `${day}/${region}/s3/aws4_request`;
  const toSign = ["AWS4-HMAC-SHA256", amzDate, scope, await sha256Hex(canonical)].join("\n");
  const key = await signingKeyFor(credentials.secretAccessKey, day, region);
  const signature = hex(await crypto.subtle.sign("HMAC", key, encoder.encode(toSign)));
  headers.set(
    "Authorization",
    `AWS4-HMAC-SHA256 Credential=${credentials.accessKeyId}/${scope}, ` +
      `SignedHeaders=${names.join(";")}, Signature=${signature}`,
  );
}

/** The hash of an empty body. */
const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/** The payload hash of a request whose body is not signed. */
const UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD";

/** An object being stored by one streamed PUT (`S3Client.startPut`). */
export interface S3Upload {
  /** Sends the next bytes of the body, in order; throws the service's refusal if it stopped reading. */
  write(bytes: Uint8Array): Promise<void>;
  /** After the last byte: waits for the answer; throws `S3Error` when the object was not stored. */
  finish(): Promise<void>;
  /** Drops the connection: the service keeps nothing of a body cut short. */
  abort(reason: Error): void;
}

/** An object in a listing. */
export interface S3Object {
  /** Its key. */
  key: string;
  /** Its size in bytes. */
  size: number;
}

function xmlText(xml: string, tag: string): string | undefined {
  const match = new RegExp(`<${tag}>([^<]*)</${tag}>`).exec(xml);
  return match ? unescapeXml(match[1]!) : undefined;
}

function unescapeXml(text: string): string {
  return text.replace(/&(lt|gt|amp|quot|apos|#\d+|#x[0-9a-fA-F]+);/g, (_, e: string) => {
    if (e === "lt") return "<";
    if (e === "gt") return ">";
    if (e === "amp") return "&";
    if (e === "quot") return '"';
    if (e === "apos") return "'";
    return String.fromCodePoint(e[1] === "x" ? parseInt(e.slice(2), 16) : parseInt(e.slice(1)));
  });
}

function escapeXml(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** A counting semaphore bounding the requests in flight. */
class Slots {
  #free: number;
  #waiters: Array<() => void> = [];
  constructor(n: number) {
    this.#free = n;
  }
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#free > 0) this.#free--;
    else await new Promise<void>((resolve) => this.#waiters.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.#waiters.shift();
      if (next) next();
      else this.#free++;
    }
  }
}

interface RequestInput {
  method: string;
  bucket: string;
  key?: string;
  query?: Record<string, string>;
  headers?: Record<string, string>;
  body?: Uint8Array;
  /** Hex SHA-256 of `body`, when the caller already knows it. */
  bodyHash?: string;
  /** Statuses that are answers, not failures (e.g. 404 for a missing object). */
  accept?: number[];
}

/** An S3 client bound to an endpoint, a region and credentials. */
export class S3Client {
  /** The settings. */
  readonly options: Required<Omit<S3Options, "credentials" | "endpoint">> & S3Options;
  #slots: Slots;
  /** Kept-alive connections for ranged reads from an `http://` endpoint. */
  #http1: Http1Pool | undefined;

  /** Creates a client. */
  constructor(options: S3Options) {
    this.options = {
      region: "us-east-1",
      connections: 16,
      retries: 5,
      retryDelay: 100,
      timeout: 60_000,
      ...options,
    };
    this.#slots = new Slots(this.options.connections);
    if (this.options.endpoint && /^http:/i.test(this.options.endpoint)) {
      this.#http1 = new Http1Pool(new URL(this.options.endpoint), this.options.timeout);
    }
  }

  /** Closes the idle connections of ranged reads. */
  close(): void {
    this.#http1?.close();
  }

  /** The URL of an object (path style with an endpoint, virtual-hosted on AWS). */
  url(bucket: string, key?: string): URL {
    const path = key === undefined ? "" : uriEncode(key, true);
    if (this.options.endpoint) {
      const base = this.options.endpoint.replace(/\/+$/, "");
      return new URL(`${base}/${uriEncode(bucket, false)}/${path}`);
    }
    return new URL(`https://${bucket}.s3.${this.options.region}.amazonaws.com/${path}`);
  }

  /** Sends one request (retrying transient failures) and returns the response. */
  async request(input: RequestInput): Promise<Response> {
    return await this.#slots.run(() => this.#requestWithRetries(input));
  }

  async #requestWithRetries(input: RequestInput): Promise<Response> {
    const url = this.url(input.bucket, input.key);
    for (const [k, v] of Object.entries(input.query ?? {})) url.searchParams.set(k, v);
    const payloadHash = input.bodyHash ??
      (input.body ? await sha256Hex(input.body) : EMPTY_SHA256);
    let delay = this.options.retryDelay;
    for (let attempt = 0;; attempt++) {
      const headers = new Headers(input.headers);
      if (this.options.credentials) {
        await signV4(
          { method: input.method, url, headers, payloadHash, date: new Date() },
          this.options.credentials,
          this.options.region,
        );
      }
      let response: Response | undefined;
      let failure: S3Error;
      try {
        response = await fetch(url, {
          method: input.method,
          headers,
          body: input.body as Uint8Array<ArrayBuffer> | undefined,
          signal: AbortSignal.timeout(this.options.timeout),
        });
      } catch (error) {
        failure = new S3Error(0, "NetworkError", `${url.host}: ${(error as Error).message}`);
      }
      if (response) {
        if (response.ok || input.accept?.includes(response.status)) return response;
        failure = await this.#failure(response, input);
        const transient = response.status >= 500 || response.status === 429 ||
          failure.code === "SlowDown" || failure.code === "RequestTimeout";
        if (!transient) throw failure;
      }
      if (attempt >= this.options.retries) {
        // Say that it was retried: a failure after retries is not a first refusal.
        if (attempt > 0) failure!.message += ` (gave up after ${attempt + 1} attempts)`;
        throw failure!;
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  }

  async #failure(response: Response, input: RequestInput): Promise<S3Error> {
    const text = input.method === "HEAD" ? "" : await response.text().catch(() => "");
    return this.#describe(response.status, response.statusText, text, input);
  }

  /** The error of a refused request, from its status and error document. */
  #describe(status: number, statusText: string, text: string, input: RequestInput): S3Error {
    const response = { status, statusText };
    const code = xmlText(text, "Code") ?? response.statusText.replace(/\s+/g, "") ??
      `HTTP${response.status}`;
    const what = input.key === undefined
      ? `bucket ${input.bucket}`
      : `s3://${input.bucket}/${input.key}`;
    let message: string;
    if (code === "NoSuchBucket") message = `the bucket ${input.bucket} does not exist`;
    else if (code === "NoSuchKey") message = `${what} does not exist`;
    else if (
      code === "InvalidAccessKeyId" || code === "SignatureDoesNotMatch" ||
      code === "AccessDenied" || response.status === 403
    ) {
      const source = this.options.credentials
        ? ` with the credentials from ${this.options.credentials.source}`
        : " without credentials";
      message = `access to ${what} denied (${code})${source}`;
    } else {
      const detail = xmlText(text, "Message");
      message = `${input.method} ${what}: HTTP ${response.status} ${code}${
        detail ? `: ${detail}` : ""
      }`;
    }
    return new S3Error(response.status, code, message);
  }

  /** Size of an object, or undefined when it does not exist. */
  async headObject(bucket: string, key: string): Promise<number | undefined> {
    if (this.#http1) {
      const size = await this.#slots.run(() => this.#headDirect(bucket, key));
      if (size !== false) return size;
    }
    const response = await this.request({ method: "HEAD", bucket, key, accept: [404] });
    await response.body?.cancel();
    if (response.status === 404) return undefined;
    return Number(response.headers.get("Content-Length") ?? "0");
  }

  /**
   * Reads `buf.length` bytes of an object from `offset` into `buf`. Returns
   * the count read (short when the object ends first), or -1 when the
   * object does not exist.
   */
  async readObject(bucket: string, key: string, buf: Uint8Array, offset: number): Promise<number> {
    if (buf.length === 0) return 0;
    if (this.#http1 && await this.#slots.run(() => this.#readDirect(bucket, key, buf, offset))) {
      return buf.length;
    }
    const response = await this.request({
      method: "GET",
      bucket,
      key,
      headers: { Range: `bytes=${offset}-${offset + buf.length - 1}` },
      accept: [404, 416],
    });
    if (response.status === 404) {
      const text = await response.text();
      if (xmlText(text, "Code") === "NoSuchBucket") {
        throw new S3Error(404, "NoSuchBucket", `the bucket ${bucket} does not exist`);
      }
      return -1;
    }
    if (response.status === 416) {
      await response.body?.cancel();
      return 0;
    }
    let n = 0;
    // A server that ignores Range sends the whole object: skip to the range.
    let skip = response.status === 206 ? 0 : offset;
    const reader = response.body!.getReader();
    while (n < buf.length) {
      const { done, value } = await reader.read();
      if (done) break;
      let chunk = value;
      if (skip > 0) {
        const s = Math.min(skip, chunk.length);
        chunk = chunk.subarray(s);
        skip -= s;
      }
      const take = Math.min(chunk.length, buf.length - n);
      buf.set(chunk.subarray(0, take), n);
      n += take;
    }
    if (n >= buf.length) await reader.cancel().catch(() => {});
    return n;
  }

  /**
   * A HEAD on the kept-alive connections the reads use (fetch would open
   * one more): the size, undefined for a missing object, or false for any
   * other answer or a broken connection, which the caller asks again
   * through `fetch`.
   */
  async #headDirect(bucket: string, key: string): Promise<number | undefined | false> {
    const url = this.url(bucket, key);
    const headers = new Headers();
    if (this.options.credentials) {
      await signV4(
        { method: "HEAD", url, headers, payloadHash: EMPTY_SHA256, date: new Date() },
        this.options.credentials,
        this.options.region,
      );
    }
    try {
      const answer = await this.#http1!.head(url.pathname + url.search, headers);
      const length = answer.headers.get("Content-Length");
      if (answer.status === 200 && length !== null && /^\d+$/.test(length)) return Number(length);
      return answer.status === 404 ? undefined : false;
    } catch (error) {
      if (error instanceof Http1Error) return false;
      throw error;
    }
  }

  /**
   * One ranged GET on a kept-alive connection of our own, the body read
   * straight into `buf`. False for any answer but the plain 206 asked for,
   * or a broken connection: the caller asks again through `fetch`, which
   * retries and explains failures.
   */
  async #readDirect(bucket: string, key: string, buf: Uint8Array, offset: number) {
    const url = this.url(bucket, key);
    const range = `bytes=${offset}-${offset + buf.length - 1}`;
    const headers = new Headers({ Range: range });
    if (this.options.credentials) {
      await signV4(
        { method: "GET", url, headers, payloadHash: EMPTY_SHA256, date: new Date() },
        this.options.credentials,
        this.options.region,
      );
    }
    // Signed with the range; the pool sends the same Range header itself.
    headers.delete("Range");
    try {
      const answer = await this.#http1!.getRange(url.pathname + url.search, headers, offset, buf);
      return answer.filled;
    } catch (error) {
      if (error instanceof Http1Error) return false;
      throw error;
    }
  }

  /**
   * One PUT on a kept-alive connection of our own, the body written from
   * the caller's buffer (`fetch` copies it first). Returns the ETag, or
   * undefined for any answer but a success or a broken connection: the
   * caller sends it again through `fetch`, which retries and explains
   * failures.
   */
  async #putDirect(
    bucket: string,
    key: string,
    query: Record<string, string>,
    body: Uint8Array,
    bodyHash?: string,
  ): Promise<string | undefined> {
    const url = this.url(bucket, key);
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    const headers = new Headers();
    if (this.options.credentials) {
      await signV4(
        {
          method: "PUT",
          url,
          headers,
          payloadHash: bodyHash ?? await sha256Hex(body),
          date: new Date(),
        },
        this.options.credentials,
        this.options.region,
      );
    }
    try {
      const answer = await this.#http1!.put(url.pathname + url.search, headers, body);
      return answer.filled ? answer.headers.get("ETag") ?? "" : undefined;
    } catch (error) {
      if (error instanceof Http1Error) return undefined;
      throw error;
    }
  }

  /** Whether `startPut` can be used: a plain `http://` endpoint, sent on our own connections. */
  get canStreamPut(): boolean {
    return this.#http1 !== undefined;
  }

  /**
   * Starts storing an object of `length` bytes with one PUT whose body the
   * caller streams, in order, without holding it whole: signed with
   * `UNSIGNED-PAYLOAD` (the body cannot be hashed before it is sent). It is
   * not retried: the body is not kept. The object exists only once the
   * whole body arrived; an aborted upload leaves none.
   */
  async startPut(bucket: string, key: string, length: number): Promise<S3Upload> {
    if (!this.#http1) throw new Error("a streamed PUT needs an http:// endpoint");
    const url = this.url(bucket, key);
    const headers = new Headers();
    if (this.options.credentials) {
      await signV4(
        { method: "PUT", url, headers, payloadHash: UNSIGNED_PAYLOAD, date: new Date() },
        this.options.credentials,
        this.options.region,
      );
    }
    const upload = this.#http1.putStream(url.pathname + url.search, headers, length);
    // The service's answer, as an error when it is not a success (or never came).
    const refusal = async (): Promise<S3Error | undefined> => {
      try {
        const answer = await upload.answer;
        if (answer.filled) return undefined;
        const text = new TextDecoder().decode(answer.body ?? new Uint8Array());
        return this.#describe(answer.status, answer.statusText, text, {
          method: "PUT",
          bucket,
          key,
        });
      } catch (error) {
        return new S3Error(0, "NetworkError", (error as Error).message);
      }
    };
    return {
      write: async (bytes) => {
        try {
          await upload.write(bytes);
        } catch (error) {
          throw await refusal() ?? error;
        }
      },
      finish: async () => {
        const error = await refusal();
        if (error) throw error;
      },
      abort: (reason) => upload.abort(reason),
    };
  }

  /** Stores an object. */
  async putObject(bucket: string, key: string, body: Uint8Array): Promise<void> {
    const response = await this.request({ method: "PUT", bucket, key, body });
    await response.body?.cancel();
  }

  /** Deletes an object (a missing one is not an error). */
  async deleteObject(bucket: string, key: string): Promise<void> {
    const response = await this.request({ method: "DELETE", bucket, key, accept: [404] });
    await response.body?.cancel();
  }

  /** Lists objects under `prefix`, in key order, from after `startAfter`. */
  async *list(bucket: string, prefix: string, startAfter?: string): AsyncGenerator<S3Object> {
    let token: string | undefined;
    while (true) {
      const query: Record<string, string> = { "list-type": "2", prefix };
      if (token) query["continuation-token"] = token;
      else if (startAfter) query["start-after"] = startAfter;
      const response = await this.request({ method: "GET", bucket, query });
      const xml = await response.text();
      for (const match of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
        const key = xmlText(match[1]!, "Key");
        if (key !== undefined) yield { key, size: Number(xmlText(match[1]!, "Size") ?? 0) };
      }
      token = xmlText(xml, "NextContinuationToken");
      if (xmlText(xml, "IsTruncated") !== "true" || !token) return;
    }
  }

  /** Checks that the bucket exists and the credentials may list it. */
  async checkBucket(bucket: string): Promise<void> {
    const response = await this.request({
      method: "GET",
      bucket,
      query: { "list-type": "2", "max-keys": "1" },
    });
    await response.body?.cancel();
  }

  /** Starts a multipart upload; returns its id. */
  async createMultipartUpload(bucket: string, key: string): Promise<string> {
    const response = await this.request({
      method: "POST",
      bucket,
      key,
      query: { uploads: "" },
    });
    const id = xmlText(await response.text(), "UploadId");
    if (!id) throw new S3Error(response.status, "BadResponse", "no UploadId in the answer");
    return id;
  }

  /** Uploads one part (numbered from 1) with its SHA-256 checksum; returns its ETag. */
  async uploadPart(
    bucket: string,
    key: string,
    uploadId: string,
    part: number,
    body: Uint8Array,
    bodyHash?: string,
  ): Promise<string> {
    const query = { partNumber: String(part), uploadId };
    if (this.#http1) {
      const etag = await this.#slots.run(() => this.#putDirect(bucket, key, query, body, bodyHash));
      if (etag !== undefined) return etag;
    }
    const response = await this.request({
      method: "PUT",
      bucket,
      key,
      query: { partNumber: String(part), uploadId },
      body,
      bodyHash,
    });
    await response.body?.cancel();
    return response.headers.get("ETag") ?? "";
  }

  /** Completes a multipart upload from the parts' ETags, in order. */
  async completeMultipartUpload(
    bucket: string,
    key: string,
    uploadId: string,
    etags: string[],
  ): Promise<void> {
    const xml = `<CompleteMultipartUpload>${
      etags.map((etag, i) =>
        `<Part><PartNumber>${i + 1}</PartNumber><ETag>${escapeXml(etag)}</ETag></Part>`
      ).join("")
    }</CompleteMultipartUpload>`;
    const response = await this.request({
      method: "POST",
      bucket,
      key,
      query: { uploadId },
      body: encoder.encode(xml),
    });
    // A 200 can still carry an error that happened while the parts were assembled.
    const text = await response.text();
    const code = xmlText(text, "Code");
    if (/<Error>/.test(text) && code) {
      throw new S3Error(response.status, code, `completing s3://${bucket}/${key}: ${code}`);
    }
  }

  /** Abandons a multipart upload (its parts are removed). */
  async abortMultipartUpload(bucket: string, key: string, uploadId: string): Promise<void> {
    const response = await this.request({
      method: "DELETE",
      bucket,
      key,
      query: { uploadId },
      accept: [404],
    });
    await response.body?.cancel();
  }
}
