// mbws.js: a dependency-free MBWS client for browsers and Node (docs/PROTOCOL.md).
//
// What it owns: one session with a broker over one WebSocket at a time. Both subprotocols
// (MBWS.huawei.com, reliable; MBLWS.huawei.com, light) and both bindings (binary, text) are
// spoken with the same frame model: `encode` and `decode` below turn frames into WebSocket
// messages and back, without IO.
//
// Invariants and bounds:
// - SEND seqs are 1, 2, 3, ... per session; every SEND not yet receipted is kept (to resend
//   after a resume) and at most `max-inflight-sends` (from OPENED) are kept: `send` waits for a
//   receipt beyond that, so a resume never needs an ERROR the broker has forgotten (PROTOCOL 11).
// - Deliveries are numbered by the broker; the highest `delivery-seq` seen is the watermark,
//   and a MESSAGE at or below it is a duplicate (a resend after a resume) and is dropped.
// - ACK, NACK, FLOW and UNSUBSCRIBE frames are kept until a PONG proves the broker read past
//   them (a PING follows every 128 of them), and are sent again after a resume: a settlement lost
//   with a connection would otherwise hold its delivery (and its credit) forever.
// - Settlements are coalesced: `ack()` and `nack()` queue, and one macrotask after the burst of
//   MESSAGE events writes the queue: NACKs singly, then one cumulative ACK through the highest
//   queued delivery-seq below the oldest unsettled client-ack delivery (PROTOCOL 7.5: it settles
//   every unacknowledged delivery at or below it, so it is sent only when all of them are
//   settled here), then single ACKs for the rest. The client-ack deliveries not yet settled are
//   kept in arrival order (= delivery-seq order), settled ones removed in amortized constant
//   time; both lists are bounded by what the application holds unsettled (the list by twice
//   that, or 1,024), which the broker bounds by credit. FLOW and UNSUBSCRIBE write the queue
//   first, so frames keep the order the application called in.
// - A subscription's buffer for its async iterator is bounded by its credit for client-ack
//   subscriptions (a delivery holds credit until settled). The broker settles auto-ack
//   deliveries once written, so there the client pauses the subscription (FLOW 0) when the buffer
//   reaches the credit and resumes it at half; what was already in flight still arrives.
//
// Resume (MBWS only): after a lost connection the client reconnects with exponential backoff
// and jitter, for at most the session expiry the broker announced, sends OPEN with its session
// id and watermark, resends every SEND above OPENED's `last-received-seq`, repeats SUBSCRIBEs
// not yet confirmed and unconfirmed settlements. The application sees every SEND published once
// and every delivery once.

/** The reliable subprotocol: receipts, resume. */
export const RELIABLE = 'MBWS.huawei.com';
/** The light subprotocol: the same frames, at most once, no resume. */
export const LIGHT = 'MBLWS.huawei.com';

const VERSION = 1;
const KINDS = ['', 'OPEN', 'OPENED', 'SEND', 'RECEIPT', 'SUBSCRIBE', 'SUBSCRIBED', 'UNSUBSCRIBE', 'MESSAGE',
  'ACK', 'NACK', 'FLOW', 'PING', 'PONG', 'ERROR', 'CLOSE'];
const KIND_CODE = Object.fromEntries(KINDS.map((name, code) => [name, code]));
const TWO_32 = 4294967296;
/** Settlements sent between two PINGs that prove them read (see the module comment). */
const SETTLEMENTS_PER_PING = 128;
/** Length of the unsettled-deliveries list at which its settled entries are first removed. */
const UNSETTLED_COMPACT_AT = 1024;

const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder('utf-8', { fatal: true });

/**
 * @typedef {'binary' | 'text'} Binding
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closing' | 'closed'} ConnectionState
 * @typedef {Array<[string, string]> | Record<string, string>} HeadersInit
 * @typedef {string | Uint8Array | ArrayBuffer} Body
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} [subprotocol] `RELIABLE` (default) or `LIGHT`.
 * @property {Binding} [binding] the binding of the frames this client sends (default binary).
 * @property {string} [token] credentials for the URL's query string (`?token=...`).
 * @property {string} [login] OPEN's `login` field.
 * @property {string} [passcode] OPEN's `passcode` field.
 * @property {number} [heartbeatMs] heartbeat interval to ask for; 0 for none (default 10000).
 * @property {number} [connectTimeoutMs] bound on each connection attempt up to OPENED (default 10000).
 * @property {boolean} [reconnect] resume after a lost connection (MBWS only; default true).
 * @property {number} [reconnectDelayMs] first reconnect delay, doubled per attempt (default 100).
 * @property {number} [maxReconnectDelayMs] largest reconnect delay (default 5000).
 * @property {number} [closeTimeoutMs] how long `close` waits for receipts and the broker's CLOSE (default 5000).
 * @property {any} [WebSocket] a WebSocket constructor (default: the global one, else the `ws` package).
 */

/**
 * @typedef {object} SendOptions
 * @property {string} [contentType]
 * @property {string} [correlationId]
 * @property {string} [replyTo]
 * @property {HeadersInit} [headers] application headers; names start with `x-`.
 * @property {boolean} [durable] receipted only once on disk (PROTOCOL 7.2).
 * @property {number} [ttlMs] time to live; 0 for none.
 * @property {boolean} [receipt] MBLWS only: false sends seq 0 (no receipt wanted).
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {'anycast' | 'multicast'} [mode] default anycast.
 * @property {'client' | 'auto'} [ack] client (default: every delivery is acknowledged) or auto
 *   (the broker settles a delivery once written: at most once).
 * @property {boolean} [manualAck] with ack client: the application calls `message.ack()` or
 *   `message.nack()`; otherwise the client acknowledges once the handler returned (or its
 *   promise resolved), or once the iterator is asked for the next message.
 * @property {number} [credit] unacknowledged deliveries the subscription may hold (default 100).
 * @property {(message: Message) => unknown} [onMessage] handler; without it, iterate the subscription.
 * @property {(error: MbwsError) => void} [onError] called when the broker ends the subscription.
 */

/**
 * @typedef {object} Limits the limits the broker announced in OPENED (PROTOCOL 9).
 * @property {number} heartbeatMs
 * @property {number} sessionExpiryMs
 * @property {number} maxFrameBytes
 * @property {number} maxAddressBytes
 * @property {number} maxHeaders
 * @property {number} maxHeaderBytes
 * @property {number} maxCredit
 * @property {number} maxSubscriptions
 * @property {number} maxInflightSends
 * @property {number} maxQueuedMessages
 */

/** An MBWS error: a refused frame, a fatal session error, or a lost connection. */
export class MbwsError extends Error {
  /**
   * @param {number} code MBWS code (4000-4999), or the WebSocket close code of a lost connection.
   * @param {string} reason the broker's (or this client's) reason.
   * @param {{fatal?: boolean, seq?: number, subscriptionId?: number}} [details]
   */
  constructor(code, reason, details = {}) {
    super(`MBWS ${code}: ${reason}`);
    this.name = 'MbwsError';
    /** @type {number} */
    this.code = code;
    /** @type {string} */
    this.reason = reason;
    /** @type {boolean} */
    this.fatal = details.fatal ?? false;
    /** @type {number} */
    this.seq = details.seq ?? 0;
    /** @type {number} */
    this.subscriptionId = details.subscriptionId ?? 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Codec: frames are plain objects `{ kind: 'SEND', ... }` with the fields of PROTOCOL 6.3 in
// camelCase. `encode` checks what would make the broker end the session (CR/LF in a field,
// over-long strings) and throws a TypeError naming the field instead.

/**
 * @param {string} kind
 * @param {string} field
 * @param {string} value
 * @param {number} maxBytes
 */
function fieldBytes(kind, field, value, maxBytes) {
  const text = String(value ?? '');
  if (/[\r\n\0]/.test(text)) {
    throw new TypeError(`${kind}: field ${field} contains CR, LF or NUL, which MBWS fields cannot carry`);
  }
  const bytes = utf8.encode(text);
  if (bytes.length > maxBytes) {
    throw new TypeError(`${kind}: field ${field} is ${bytes.length} bytes, over the ${maxBytes} the frame allows`);
  }
  return bytes;
}

/** @param {HeadersInit | undefined} headers @returns {Array<[string, string]>} */
function headerPairs(headers) {
  const pairs = Array.isArray(headers) ? headers : Object.entries(headers ?? {});
  for (const [name] of pairs) {
    if (!/^x-[a-z0-9\-_.]+$/.test(name)) {
      throw new TypeError(`header name ${JSON.stringify(name)}: application headers are x- then a-z 0-9 - _ .`);
    }
  }
  return pairs.map(([name, value]) => [name, String(value)]);
}

/** @param {Body | undefined} body @returns {Uint8Array} */
function bodyBytes(body) {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (typeof body === 'string') return utf8.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  throw new TypeError('a message body is a string, a Uint8Array or an ArrayBuffer');
}

/** Grows as bytes are written; big-endian integers (PROTOCOL 2). */
class Writer {
  /** @param {number} capacity */
  constructor(capacity) {
    this.bytes = new Uint8Array(capacity);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }
  /** @param {number} extra */
  reserve(extra) {
    if (this.length + extra <= this.bytes.length) return;
    const grown = new Uint8Array(Math.max(this.bytes.length * 2, this.length + extra));
    grown.set(this.bytes.subarray(0, this.length));
    this.bytes = grown;
    this.view = new DataView(grown.buffer);
  }
  /** @param {number} value */
  u8(value) { this.reserve(1); this.bytes[this.length++] = value; }
  /** @param {number} value */
  u16(value) { this.reserve(2); this.view.setUint16(this.length, value); this.length += 2; }
  /** @param {number} value */
  u32(value) { this.reserve(4); this.view.setUint32(this.length, value >>> 0); this.length += 4; }
  /** @param {number} value an integer up to 2^53 */
  u64(value) { this.u32(Math.floor(value / TWO_32)); this.u32(value % TWO_32); }
  /** @param {Uint8Array} bytes */
  raw(bytes) { this.reserve(bytes.length); this.bytes.set(bytes, this.length); this.length += bytes.length; }
  /** @param {Uint8Array} bytes */
  str8(bytes) { this.u8(bytes.length); this.raw(bytes); }
  /** @param {Uint8Array} bytes */
  str16(bytes) { this.u16(bytes.length); this.raw(bytes); }
  /**
   * A string field (`str8` or `str16`), checked as `fieldBytes` checks it. Printable ASCII, the
   * common case, is copied without a TextEncoder call (which costs microseconds in browsers).
   * @param {string} kind @param {string} field @param {unknown} value @param {1 | 2} prefixBytes
   */
  text(kind, field, value, prefixBytes) {
    const text = value === undefined || value === null ? '' : String(value);
    const max = prefixBytes === 1 ? 255 : 65535;
    let ascii = text.length <= max;
    for (let i = 0; ascii && i < text.length; i++) {
      const c = text.charCodeAt(i);
      ascii = c < 0x80 && c !== 10 && c !== 13 && c !== 0;
    }
    if (!ascii) {
      const bytes = fieldBytes(kind, field, text, max);
      if (prefixBytes === 1) this.str8(bytes); else this.str16(bytes);
      return;
    }
    if (prefixBytes === 1) this.u8(text.length); else this.u16(text.length);
    this.reserve(text.length);
    for (let i = 0; i < text.length; i++) this.bytes[this.length + i] = text.charCodeAt(i);
    this.length += text.length;
  }
  done() { return this.bytes.subarray(0, this.length); }
}

/**
 * Encodes `frame` in `binding`: a Uint8Array (binary) or a string (text). A text SEND whose
 * body is bytes goes binary (a text message must be UTF-8; PROTOCOL 6.1 allows mixing).
 * @param {any} frame
 * @param {Binding} binding
 * @returns {Uint8Array | string}
 */
export function encode(frame, binding) {
  const kind = frame.kind;
  if (binding === 'text' && !(kind === 'SEND' && typeof frame.body !== 'string' && frame.body !== undefined)) {
    return encodeText(frame);
  }
  const code = KIND_CODE[kind];
  const body = kind === 'SEND' ? bodyBytes(frame.body) : new Uint8Array(0);
  const w = new Writer(64 + body.length);
  w.u8(VERSION);
  w.u8(code);
  switch (kind) {
    case 'OPEN':
      w.u8(0);
      w.u64(frame.lastReceivedSeq ?? 0);
      w.u32(frame.heartbeatMs ?? 0);
      w.text(kind, 'session-id', frame.sessionId, 1);
      w.text(kind, 'login', frame.login, 1);
      w.text(kind, 'passcode', frame.passcode, 2);
      break;
    case 'SEND':
      w.u8(frame.durable ? 1 : 0);
      w.u64(frame.seq);
      w.u32(frame.ttlMs ?? 0);
      w.text(kind, 'address', frame.address, 1);
      w.text(kind, 'content-type', frame.contentType, 1);
      w.text(kind, 'correlation-id', frame.correlationId, 1);
      w.text(kind, 'reply-to', frame.replyTo, 1);
      w.u8(frame.headers.length);
      for (const [name, value] of frame.headers) {
        w.text(kind, name, name, 1);
        w.text(kind, name, value, 2);
      }
      w.raw(body);
      break;
    case 'SUBSCRIBE':
      w.u8((frame.mode === 'multicast' ? 1 : 0) | (frame.ack === 'auto' ? 2 : 0));
      w.u32(frame.subscriptionId);
      w.u32(frame.credit ?? 0);
      w.text(kind, 'address', frame.address, 1);
      break;
    case 'UNSUBSCRIBE':
      w.u8(0);
      w.u32(frame.subscriptionId);
      break;
    case 'ACK':
      w.u8(frame.cumulative ? 1 : 0);
      w.u64(frame.deliverySeq);
      break;
    case 'NACK':
      w.u8(frame.requeue ? 1 : 0);
      w.u64(frame.deliverySeq);
      break;
    case 'FLOW':
      w.u8(0);
      w.u32(frame.subscriptionId);
      w.u32(frame.credit);
      break;
    case 'PING':
    case 'PONG':
      w.u8(0);
      w.u64(frame.token ?? 0);
      break;
    case 'ERROR':
      w.u8(frame.fatal ? 1 : 0);
      w.u16(frame.code);
      w.u64(frame.seq ?? 0);
      w.u32(frame.subscriptionId ?? 0);
      w.text(kind, 'reason', frame.reason, 2);
      break;
    case 'CLOSE':
      w.u8(0);
      break;
    default:
      throw new TypeError(`a client does not send ${kind} frames`);
  }
  return w.done();
}

/** @param {any} frame @returns {string} */
function encodeText(frame) {
  const kind = frame.kind;
  /** @type {string[]} */
  const lines = [kind];
  /** @param {string} name @param {unknown} value @param {unknown} [skip] */
  const field = (name, value, skip) => {
    if (value === undefined || value === null || value === skip) return;
    const text = String(value);
    fieldBytes(kind, name, text, name === 'passcode' || name === 'reason' ? 65535 : 255);
    lines.push(`${name}:${text}`);
  };
  switch (kind) {
    case 'OPEN':
      field('version', VERSION);
      field('session-id', frame.sessionId, '');
      field('last-received-seq', frame.lastReceivedSeq, 0);
      field('heartbeat-ms', frame.heartbeatMs, 0);
      field('login', frame.login, '');
      field('passcode', frame.passcode, '');
      break;
    case 'SEND':
      field('seq', frame.seq, 0);
      field('address', frame.address);
      field('durable', frame.durable ? 'true' : undefined);
      field('ttl-ms', frame.ttlMs, 0);
      field('content-type', frame.contentType, '');
      field('correlation-id', frame.correlationId, '');
      field('reply-to', frame.replyTo, '');
      for (const [name, value] of frame.headers) field(name, value);
      break;
    case 'SUBSCRIBE':
      field('subscription-id', frame.subscriptionId);
      field('address', frame.address);
      field('mode', frame.mode, 'anycast');
      field('ack', frame.ack, 'client');
      field('credit', frame.credit, 0);
      break;
    case 'UNSUBSCRIBE':
      field('subscription-id', frame.subscriptionId);
      break;
    case 'ACK':
      field('delivery-seq', frame.deliverySeq);
      field('cumulative', frame.cumulative ? 'true' : undefined);
      break;
    case 'NACK':
      field('delivery-seq', frame.deliverySeq);
      field('requeue', frame.requeue ? 'true' : 'false');
      break;
    case 'FLOW':
      field('subscription-id', frame.subscriptionId);
      field('credit', frame.credit);
      break;
    case 'PING':
    case 'PONG':
      field('token', frame.token, 0);
      break;
    case 'ERROR':
      field('code', frame.code);
      field('fatal', frame.fatal ? 'true' : undefined);
      field('seq', frame.seq, 0);
      field('subscription-id', frame.subscriptionId, 0);
      field('reason', frame.reason, '');
      break;
    case 'CLOSE':
      break;
    default:
      throw new TypeError(`a client does not send ${kind} frames`);
  }
  return `${lines.join('\n')}\n\n${kind === 'SEND' ? frame.body ?? '' : ''}`;
}

/** Reads a binary frame; every read is bounds-checked (a short frame throws). */
class Reader {
  /** @param {Uint8Array} bytes */
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.offset = 0;
  }
  /** @param {number} size */
  need(size) {
    if (this.offset + size > this.bytes.length) throw new Error(`binary frame truncated at byte ${this.offset}`);
    const at = this.offset;
    this.offset += size;
    return at;
  }
  u8() { return this.view.getUint8(this.need(1)); }
  u16() { return this.view.getUint16(this.need(2)); }
  u32() { return this.view.getUint32(this.need(4)); }
  u64() { const hi = this.u32(); return hi * TWO_32 + this.u32(); }
  u64String() { return this.view.getBigUint64(this.need(8)).toString(); }
  str8() { const n = this.u8(); return utf8Strict.decode(this.bytes.subarray(this.need(n), this.offset)); }
  str16() { const n = this.u16(); return utf8Strict.decode(this.bytes.subarray(this.need(n), this.offset)); }
  rest() { const at = this.offset; this.offset = this.bytes.length; return this.bytes.subarray(at); }
}

/** @param {Reader} r @param {any} frame */
function readProperties(r, frame) {
  frame.contentType = r.str8();
  frame.correlationId = r.str8();
  frame.replyTo = r.str8();
  const count = r.u8();
  frame.headers = [];
  for (let i = 0; i < count; i++) frame.headers.push([r.str8(), r.str16()]);
  frame.body = r.rest();
}

/**
 * Decodes one WebSocket message (a string for text, bytes for binary) into a frame object.
 * Throws an Error saying what is wrong with a malformed frame.
 * @param {string | Uint8Array | ArrayBuffer} data
 * @returns {any}
 */
export function decode(data) {
  if (typeof data === 'string') return decodeText(data);
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  const r = new Reader(bytes);
  const version = r.u8();
  if (version !== VERSION) throw new Error(`binary frame of version ${version}; this client speaks ${VERSION}`);
  const kind = KINDS[r.u8()];
  if (!kind) throw new Error(`unknown binary frame kind ${bytes[1]}`);
  const flags = r.u8();
  /** @type {any} */
  const frame = { kind, binding: 'binary' };
  switch (kind) {
    case 'OPENED':
      frame.version = version;
      frame.resumed = (flags & 1) !== 0;
      frame.lastReceivedSeq = r.u64();
      frame.heartbeatMs = r.u32();
      frame.sessionExpiryMs = r.u32();
      frame.maxFrameBytes = r.u32();
      frame.maxAddressBytes = r.u16();
      frame.maxHeaders = r.u16();
      frame.maxHeaderBytes = r.u32();
      frame.maxCredit = r.u32();
      frame.maxSubscriptions = r.u32();
      frame.maxInflightSends = r.u32();
      frame.maxQueuedMessages = r.u32();
      frame.sessionId = r.str8();
      frame.server = r.str8();
      break;
    case 'RECEIPT':
      frame.seq = r.u64();
      break;
    case 'SUBSCRIBED':
      frame.subscriptionId = r.u32();
      break;
    case 'MESSAGE':
      frame.redelivered = (flags & 1) !== 0;
      frame.durable = (flags & 2) !== 0;
      frame.subscriptionId = r.u32();
      frame.deliverySeq = r.u64();
      frame.messageId = r.u64String();
      frame.address = r.str8();
      readProperties(r, frame);
      break;
    case 'PING':
    case 'PONG':
      frame.token = r.u64();
      break;
    case 'ERROR':
      frame.fatal = (flags & 1) !== 0;
      frame.code = r.u16();
      frame.seq = r.u64();
      frame.subscriptionId = r.u32();
      frame.reason = r.str16();
      break;
    case 'CLOSE':
      break;
    default:
      throw new Error(`a broker does not send ${kind} frames`);
  }
  return frame;
}

const TEXT_INTEGERS = new Set(['version', 'last-received-seq', 'heartbeat-ms', 'session-expiry-ms', 'max-frame-bytes',
  'max-address-bytes', 'max-headers', 'max-header-bytes', 'max-credit', 'max-subscriptions', 'max-inflight-sends',
  'max-queued-messages', 'seq', 'subscription-id', 'delivery-seq', 'code', 'token']);
const TEXT_BOOLEANS = new Set(['resumed', 'redelivered', 'durable', 'fatal']);

/** @param {string} text */
function decodeText(text) {
  let at = text.indexOf('\n');
  if (at < 0) throw new Error('text frame without a header');
  const kind = text.slice(0, at).replace(/\r$/, '');
  if (!KIND_CODE[kind]) throw new Error(`unknown text frame kind ${JSON.stringify(kind.slice(0, 40))}`);
  /** @type {any} */
  const frame = { kind, binding: 'text', headers: [] };
  for (;;) {
    const start = at + 1;
    at = text.indexOf('\n', start);
    if (at < 0) throw new Error(`${kind}: the header does not end with an empty line`);
    const line = text.slice(start, at).replace(/\r$/, '');
    if (line === '') break;
    const colon = line.indexOf(':');
    if (colon < 0) throw new Error(`${kind}: header line without a colon`);
    const name = line.slice(0, colon);
    const value = line.slice(colon + 1);
    if (name.startsWith('x-')) {
      frame.headers.push([name, value]);
    } else {
      const key = name.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
      if (name === 'message-id') frame.messageId = value;
      else if (TEXT_INTEGERS.has(name)) frame[key] = Number(value);
      else if (TEXT_BOOLEANS.has(name)) frame[key] = value === 'true';
      else frame[key] = value;
    }
  }
  if (kind === 'MESSAGE') {
    frame.body = text.slice(at + 1);
    frame.redelivered ??= false;
    frame.durable ??= false;
    frame.contentType ??= '';
    frame.correlationId ??= '';
    frame.replyTo ??= '';
  } else if (kind === 'ERROR') {
    frame.fatal ??= false;
    frame.seq ??= 0;
    frame.subscriptionId ??= 0;
    frame.reason ??= '';
  } else if (kind === 'OPENED') {
    frame.resumed ??= false;
    frame.lastReceivedSeq ??= 0;
    frame.heartbeatMs ??= 0;
    frame.sessionExpiryMs ??= 0;
  } else if (kind === 'PING' || kind === 'PONG') {
    frame.token ??= 0;
  }
  return frame;
}

// ---------------------------------------------------------------------------------------------
// Messages and subscriptions.

/** A delivered message. */
export class Message {
  /** @param {Subscription} subscription @param {any} frame */
  constructor(subscription, frame) {
    /** @type {Subscription} */
    this.subscription = subscription;
    /** @type {string} */
    this.address = frame.address;
    /** @type {number} the session's delivery sequence (ACK and NACK name it) */
    this.deliverySeq = frame.deliverySeq;
    /** @type {string} unique within the address, also across broker restarts (decimal u64) */
    this.messageId = frame.messageId;
    /** @type {boolean} */
    this.redelivered = frame.redelivered;
    /** @type {boolean} */
    this.durable = frame.durable;
    /** @type {string} */
    this.contentType = frame.contentType;
    /** @type {string} */
    this.correlationId = frame.correlationId;
    /** @type {string} */
    this.replyTo = frame.replyTo;
    /** @type {Array<[string, string]>} application headers, in order */
    this.headers = frame.headers;
    /** @type {string | Uint8Array} */
    this.data = frame.body;
    /** @type {boolean} */
    this.settled = subscription.ack === 'auto';
  }
  /** The body as bytes. */
  get body() { return typeof this.data === 'string' ? utf8.encode(this.data) : this.data; }
  /** The body as text (UTF-8). */
  text() { return typeof this.data === 'string' ? this.data : new TextDecoder().decode(this.data); }
  /** The body parsed as JSON. */
  json() { return JSON.parse(this.text()); }
  /** The first application header called `name`, if any. @param {string} name */
  header(name) { return this.headers.find(([n]) => n === name)?.[1]; }
  /** Acknowledges the delivery (client-ack subscriptions; once). */
  ack() { this.subscription._settle(this, { kind: 'ACK', deliverySeq: this.deliverySeq }); }
  /** Gives the delivery back: requeued (default) or dead-lettered. @param {boolean} [requeue] */
  nack(requeue = true) { this.subscription._settle(this, { kind: 'NACK', deliverySeq: this.deliverySeq, requeue }); }
}

/** A live subscription: a handler is called per message, or it is iterated (`for await`). */
export class Subscription {
  /**
   * @param {Client} client
   * @param {number} id
   * @param {string} address
   * @param {SubscribeOptions} options
   */
  constructor(client, id, address, options) {
    this.client = client;
    /** @type {number} */
    this.id = id;
    /** @type {string} */
    this.address = address;
    /** @type {'anycast' | 'multicast'} */
    this.mode = options.mode ?? 'anycast';
    /** @type {'client' | 'auto'} */
    this.ack = options.ack ?? 'client';
    this.manualAck = options.manualAck ?? false;
    /** @type {number} */
    this.credit = options.credit ?? 100;
    this.onMessage = options.onMessage;
    this.onError = options.onError;
    this.confirmed = false;
    /** @type {MbwsError | null} why the subscription ended, or null while it lives */
    this.error = null;
    this.ended = false;
    /** @type {Message[]} delivered, not yet taken by the iterator (bounded by credit) */
    this.buffer = [];
    /** @type {((result: IteratorResult<Message>) => void) | null} */
    this.waiting = null;
    /** @type {((error: MbwsError) => void) | null} */
    this.rejectWaiting = null;
    /** @type {Message | null} the message the iterator handed out last (acknowledged on the next call) */
    this.handedOut = null;
    this.paused = false;
    /** @type {{resolve: (s: Subscription) => void, reject: (e: MbwsError) => void} | null} */
    this.pending = null;
  }

  /** The SUBSCRIBE frame (sent again after a resume until confirmed). */
  frame() {
    return { kind: 'SUBSCRIBE', subscriptionId: this.id, address: this.address, mode: this.mode, ack: this.ack,
      credit: this.credit };
  }

  /** Sets the credit (FLOW, absolute). @param {number} credit */
  setCredit(credit) {
    this.credit = credit;
    this.paused = false;
    this.client._order({ kind: 'FLOW', subscriptionId: this.id, credit });
  }

  /** Ends the subscription; its unacknowledged anycast deliveries go back to the queue. */
  unsubscribe() {
    if (this.ended) return;
    this.client._order({ kind: 'UNSUBSCRIBE', subscriptionId: this.id });
    this._end(null);
  }

  /** @param {Message} message @param {any} frame */
  _settle(message, frame) {
    if (message.settled || this.ended) return;
    message.settled = true;
    this.client._queueSettlement(frame);
  }

  /** @param {Message} message */
  _deliver(message) {
    if (this.onMessage) {
      let result;
      try {
        result = this.onMessage(message);
      } catch (error) {
        this._handlerFailed(message, error);
        return;
      }
      if (this.manualAck) return;
      if (result && typeof (/** @type {any} */ (result).then) === 'function') {
        /** @type {Promise<unknown>} */ (result).then(() => message.ack(), (error) => this._handlerFailed(message, error));
      } else {
        message.ack();
      }
      return;
    }
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = this.rejectWaiting = null;
      this.handedOut = message;
      resolve({ value: message, done: false });
      return;
    }
    this.buffer.push(message);
    if (this.ack === 'auto' && !this.paused && this.buffer.length >= this.credit) {
      this.paused = true;
      this.client._order({ kind: 'FLOW', subscriptionId: this.id, credit: 0 });
    }
  }

  /** A handler threw: the delivery goes back to the queue (client ack), and the client reports it.
   * @param {Message} message @param {unknown} error */
  _handlerFailed(message, error) {
    if (!this.manualAck) message.nack(true);
    this.client._emit('error', error);
  }

  /** @param {MbwsError | null} error */
  _end(error) {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    this.client.subscriptions.delete(this.id);
    if (this.pending) {
      const pending = this.pending;
      this.pending = null;
      pending.reject(error ?? new MbwsError(0, 'unsubscribed before the broker confirmed'));
    } else if (error && this.onError) {
      this.onError(error);
    } else if (error && this.onMessage) {
      this.client._emit('error', error);
    }
    if (this.waiting) {
      const resolve = this.waiting;
      const reject = this.rejectWaiting;
      this.waiting = this.rejectWaiting = null;
      if (error && reject) reject(error);
      else resolve({ value: undefined, done: true });
    }
  }

  /** @returns {AsyncIterator<Message>} */
  [Symbol.asyncIterator]() {
    if (this.onMessage) throw new TypeError('this subscription has a handler (onMessage); it cannot be iterated');
    return {
      next: () => this._next(),
      return: async () => {
        this._ackHandedOut();
        return { value: undefined, done: true };
      },
    };
  }

  _ackHandedOut() {
    if (this.handedOut && !this.manualAck) this.handedOut.ack();
    this.handedOut = null;
  }

  /** @returns {Promise<IteratorResult<Message>>} */
  _next() {
    this._ackHandedOut();
    if (this.buffer.length > 0) {
      const message = /** @type {Message} */ (this.buffer.shift());
      this.handedOut = message;
      if (this.paused && this.buffer.length <= this.credit / 2) {
        this.paused = false;
        this.client._order({ kind: 'FLOW', subscriptionId: this.id, credit: this.credit });
      }
      return Promise.resolve({ value: message, done: false });
    }
    if (this.ended) {
      return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiting = resolve;
      this.rejectWaiting = reject;
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The client.

/**
 * Connects and opens a session; resolves once the broker answered OPENED.
 * @param {string} url `ws://host:port/` (or `wss://`)
 * @param {ConnectOptions} [options]
 * @returns {Promise<Client>}
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client._start();
  return client;
}

/** @param {any} option */
async function webSocketClass(option) {
  if (option) return option;
  if (typeof globalThis.WebSocket === 'function') return globalThis.WebSocket;
  const name = 'ws'; // Through a variable, so that bundlers for the browser leave it alone.
  try {
    const module = await import(name);
    return module.WebSocket ?? module.default;
  } catch {
    throw new Error('no WebSocket here: use Node 22 or later, Node 20 with --experimental-websocket, or `npm install ws`');
  }
}

/**
 * Runs `task` as a macrotask, after the events already queued: Node's setImmediate, else a
 * MessageChannel message (not setTimeout, which browsers may delay by milliseconds).
 * @type {(task: () => void) => void}
 */
const macrotask = (() => {
  const immediate = /** @type {any} */ (globalThis).setImmediate;
  if (typeof immediate === 'function') return (task) => { immediate(task); };
  if (typeof MessageChannel !== 'function') return (task) => { setTimeout(task, 0); };
  const channel = new MessageChannel();
  /** @type {Array<() => void>} */
  let tasks = [];
  channel.port1.onmessage = () => {
    const ready = tasks;
    tasks = [];
    for (const task of ready) task();
  };
  return (task) => {
    tasks.push(task);
    if (tasks.length === 1) channel.port2.postMessage(null);
  };
})();

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * One MBWS session. Events (`on`): `state` (a ConnectionState, with the error that closed it),
 * `error` (an ERROR that no promise could carry, or a handler that threw).
 */
export class Client {
  /** @param {string} url @param {ConnectOptions} options */
  constructor(url, options) {
    const subprotocol = options.subprotocol ?? RELIABLE;
    if (subprotocol !== RELIABLE && subprotocol !== LIGHT) {
      throw new TypeError(`subprotocol ${JSON.stringify(subprotocol)}: use ${RELIABLE} or ${LIGHT}`);
    }
    const binding = options.binding ?? 'binary';
    if (binding !== 'binary' && binding !== 'text') throw new TypeError(`binding ${binding}: use binary or text`);
    this.url = options.token ? `${url}${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(options.token)}` : url;
    this.options = options;
    /** @type {string} */
    this.subprotocol = subprotocol;
    /** @type {Binding} */
    this.binding = binding;
    this.reliable = subprotocol === RELIABLE;
    /** @type {ConnectionState} */
    this.state = 'connecting';
    /** @type {string} */
    this.sessionId = '';
    /** @type {string} */
    this.server = '';
    /** @type {Limits | null} */
    this.limits = null;
    /** @type {any} */
    this.ws = null;
    /** @type {any} */
    this.WebSocket = null;
    this.nextSeq = 1;
    /** @type {Map<number, {frame: any, resolve: (r: {seq: number}) => void, reject: (e: MbwsError) => void}>} */
    this.unreceipted = new Map();
    /** @type {Array<() => void>} sends waiting for a slot under max-inflight-sends */
    this.sendWaiters = [];
    this.reservedSlots = 0;
    /** @type {Map<number, Subscription>} */
    this.subscriptions = new Map();
    this.nextSubscriptionId = 1;
    /** Highest delivery-seq received (the resume watermark). */
    this.lastDeliverySeq = 0;
    /** @type {Array<{frame: any, token: number}>} settlements and FLOWs not yet proven read */
    this.unconfirmed = [];
    /** @type {any[]} control frames written while no connection was open */
    this.queuedControl = [];
    /** @type {Message[]} client-ack deliveries in arrival order; settled ones leave from the front */
    this.unsettled = [];
    /** Index of the first entry of `unsettled` that may still be unsettled. */
    this.unsettledHead = 0;
    /** Length of `unsettled` at which its settled entries are removed. */
    this.unsettledCompactAt = UNSETTLED_COMPACT_AT;
    /** @type {any[]} ACKs and NACKs queued by the application, written by `_flushSettlements` */
    this.pendingSettlements = [];
    this.flushScheduled = false;
    this.nextPingToken = 1;
    this.lastSentAt = 0;
    this.lastReceivedAt = 0;
    /** @type {ReturnType<typeof setInterval> | null} */
    this.heartbeatTimer = null;
    /** @type {MbwsError | null} the fatal ERROR received on the current connection */
    this.fatal = null;
    /** @type {Record<string, Array<(value: any) => void>>} */
    this.listeners = { state: [], error: [] };
    /** @type {((error: MbwsError | null) => void) | null} settles the current connection attempt */
    this.opening = null;
    /** @type {(() => void) | null} */
    this.closed = null;
    /** @type {MbwsError | null} why the session ended, once it has */
    this.failure = null;
    /** @type {Array<() => void>} woken when no SEND is unreceipted (close waits for it) */
    this.drainWaiters = [];
  }

  /**
   * Listens to `state` or `error`; returns a function that stops listening.
   * @param {'state' | 'error'} event
   * @param {(value: any) => void} listener
   */
  on(event, listener) {
    this.listeners[event].push(listener);
    return () => { this.listeners[event] = this.listeners[event].filter((l) => l !== listener); };
  }

  /** @param {string} event @param {any} value */
  _emit(event, value) {
    for (const listener of this.listeners[event] ?? []) {
      try { listener(value); } catch (error) { setTimeout(() => { throw error; }); }
    }
  }

  /** @param {ConnectionState} state @param {MbwsError | null} [error] @param {boolean} [resumed] */
  _setState(state, error = null, resumed = false) {
    if (this.state === state && !error) return;
    this.state = state;
    this._emit('state', { state, error, resumed });
  }

  async _start() {
    this.WebSocket = await webSocketClass(this.options.WebSocket);
    this._setState('connecting');
    const error = await this._attempt();
    if (error) {
      this._fail(error);
      throw error;
    }
  }

  /**
   * One connection up to OPENED, bounded by connectTimeoutMs. Resolves null when open, or the
   * error that ended the attempt.
   * @returns {Promise<MbwsError | null>}
   */
  _attempt() {
    return new Promise((resolve) => {
      const timeoutMs = this.options.connectTimeoutMs ?? 10000;
      const timer = setTimeout(() => {
        this._dropSocket();
        settle(new MbwsError(4408, `no OPENED within ${timeoutMs} ms (connectTimeoutMs)`));
      }, timeoutMs);
      /** @param {MbwsError | null} error */
      const settle = (error) => {
        clearTimeout(timer);
        if (this.opening === settle) this.opening = null;
        resolve(error);
      };
      this.opening = settle;
      this.fatal = null;
      let ws;
      try {
        ws = new this.WebSocket(this.url, [this.subprotocol]);
      } catch (error) {
        settle(new MbwsError(1006, `cannot connect to ${this.url}: ${/** @type {Error} */ (error).message}`));
        return;
      }
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      ws.onopen = () => {
        if (ws !== this.ws) return;
        if (ws.protocol !== this.subprotocol) {
          this._dropSocket();
          settle(new MbwsError(1002, `the broker answered subprotocol ${JSON.stringify(ws.protocol)}, not ${this.subprotocol}`));
          return;
        }
        const resume = this.reliable && this.sessionId !== '';
        this._write({ kind: 'OPEN', sessionId: resume ? this.sessionId : '', lastReceivedSeq: resume ? this.lastDeliverySeq : 0,
          heartbeatMs: this.options.heartbeatMs ?? 10000, login: this.options.login ?? '', passcode: this.options.passcode ?? '' });
      };
      ws.onmessage = (/** @type {{data: any}} */ event) => { if (ws === this.ws) this._onData(event.data); };
      // Some WebSocket implementations (Node 20's) report a failed connection as an error only.
      ws.onerror = () => {
        if (ws === this.ws && ws.readyState !== 1) this._onClose({ code: 1006, reason: `cannot connect to ${this.url}` });
      };
      ws.onclose = (/** @type {{code: number, reason: string}} */ event) => { if (ws === this.ws) this._onClose(event); };
    });
  }

  /** Forgets the current socket (its events are ignored from now on) and closes it. */
  _dropSocket() {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(); } catch { /* already closing */ }
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  /** @param {any} frame */
  _write(frame) {
    const data = encode(frame, this.binding);
    this.ws.send(data);
    this.lastSentAt = Date.now();
  }

  /** @param {any} data */
  _onData(data) {
    this.lastReceivedAt = Date.now();
    let frame;
    try {
      frame = decode(data);
    } catch (error) {
      // A frame this client cannot read: the session's numbering cannot be trusted any more.
      const reason = `undecodable frame from the broker: ${/** @type {Error} */ (error).message}`;
      try { this.ws.send(encode({ kind: 'ERROR', code: 4400, fatal: true, reason: reason.slice(0, 200) }, this.binding)); } catch { /* closing */ }
      this.fatal = new MbwsError(4400, reason, { fatal: true });
      this.ws.close(4400);
      return;
    }
    switch (frame.kind) {
      case 'OPENED': return this._onOpened(frame);
      case 'RECEIPT': return this._onReceipt(frame.seq);
      case 'SUBSCRIBED': {
        const subscription = this.subscriptions.get(frame.subscriptionId);
        if (subscription && !subscription.confirmed) {
          subscription.confirmed = true;
          const pending = subscription.pending;
          subscription.pending = null;
          pending?.resolve(subscription);
        }
        return;
      }
      case 'MESSAGE': return this._onMessage(frame);
      case 'PING':
        this.ws.send(encode({ kind: 'PONG', token: frame.token }, frame.binding));
        return;
      case 'PONG':
        while (this.unconfirmed.length > 0 && this.unconfirmed[0].token <= frame.token) this.unconfirmed.shift();
        return;
      case 'ERROR': return this._onError(frame);
      case 'CLOSE': return; // The broker closes the WebSocket next.
    }
  }

  /** @param {any} frame */
  _onOpened(frame) {
    const settle = this.opening;
    if (!settle) return;
    const resumed = this.sessionId !== '';
    this.sessionId = frame.sessionId;
    this.server = frame.server ?? '';
    this.limits = {
      heartbeatMs: frame.heartbeatMs, sessionExpiryMs: frame.sessionExpiryMs, maxFrameBytes: frame.maxFrameBytes,
      maxAddressBytes: frame.maxAddressBytes, maxHeaders: frame.maxHeaders, maxHeaderBytes: frame.maxHeaderBytes,
      maxCredit: frame.maxCredit, maxSubscriptions: frame.maxSubscriptions, maxInflightSends: frame.maxInflightSends,
      maxQueuedMessages: frame.maxQueuedMessages,
    };
    if (resumed) {
      // Everything the broker has not taken goes again, in order: SENDs above its
      // last-received-seq, SUBSCRIBEs it has not confirmed, settlements it may not have read.
      for (const [seq, entry] of this.unreceipted) if (seq > frame.lastReceivedSeq) this._write(entry.frame);
      for (const subscription of this.subscriptions.values()) if (!subscription.confirmed) this._write(subscription.frame());
      const control = this.queuedControl;
      this.queuedControl = [];
      for (const controlFrame of control) this._writeControl(controlFrame);
    }
    this._startHeartbeat(frame.heartbeatMs);
    this._setState('open', null, resumed);
    settle(null);
  }

  /** @param {number} heartbeatMs */
  _startHeartbeat(heartbeatMs) {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (!heartbeatMs) return;
    const tickMs = Math.max(100, Math.floor(heartbeatMs / 3));
    this.lastReceivedAt = Date.now();
    this.heartbeatTimer = setInterval(() => {
      const now = Date.now();
      // A full send window is exempt: the broker may be holding receipts back and not reading
      // (PROTOCOL 7.2, backpressure), which is not a dead connection.
      const stalled = this.unreceipted.size >= this._sendWindow();
      if (!stalled && now - this.lastReceivedAt > 2 * heartbeatMs + tickMs) {
        // Our PINGs went unanswered: the connection is dead even if the socket has not noticed.
        this._onClose({ code: 4408, reason: `nothing from the broker in ${now - this.lastReceivedAt} ms` });
      } else if (now - this.lastSentAt >= tickMs || this.unconfirmed.length > 0) {
        this._ping();
      }
    }, tickMs);
  }

  _ping() {
    this._write({ kind: 'PING', token: this.nextPingToken++ });
  }

  /** @param {number} seq */
  _onReceipt(seq) {
    for (const [entrySeq, entry] of this.unreceipted) {
      if (entrySeq > seq) break;
      this.unreceipted.delete(entrySeq);
      entry.resolve({ seq: entrySeq });
    }
    this._releaseSendSlots();
  }

  _releaseSendSlots() {
    if (this.unreceipted.size === 0) this.drainWaiters.splice(0).forEach((wake) => wake());
    const limit = this._sendWindow();
    while (this.sendWaiters.length > 0 && this.unreceipted.size + this.reservedSlots < limit) {
      this.reservedSlots += 1;
      /** @type {() => void} */ (this.sendWaiters.shift())();
    }
  }

  _sendWindow() { return Math.max(1, this.limits?.maxInflightSends ?? 1); }

  /** @param {any} frame */
  _onMessage(frame) {
    if (frame.deliverySeq <= this.lastDeliverySeq) return; // Resent after a resume: seen already.
    this.lastDeliverySeq = frame.deliverySeq;
    const subscription = this.subscriptions.get(frame.subscriptionId);
    if (!subscription) return; // Unsubscribed; already on its way (PROTOCOL 7.3).
    const message = new Message(subscription, frame);
    if (!message.settled) this.unsettled.push(message);
    subscription._deliver(message);
  }

  /** @param {any} frame */
  _onError(frame) {
    const error = new MbwsError(frame.code, frame.reason, frame);
    if (frame.fatal) {
      this.fatal = error;
      return; // The close follows; _onClose decides what it means.
    }
    if (frame.seq !== 0) {
      const entry = this.unreceipted.get(frame.seq);
      if (!entry) return; // Replayed after a resume, and seen already.
      this.unreceipted.delete(frame.seq);
      entry.reject(error);
      this._releaseSendSlots();
      return;
    }
    if (frame.subscriptionId !== 0) {
      this.subscriptions.get(frame.subscriptionId)?._end(error);
      return; // Not live: an UNSUBSCRIBE or FLOW repeated after a resume.
    }
    this._emit('error', error);
  }

  /** @param {{code: number, reason: string}} event */
  _onClose(event) {
    const fatal = this.fatal;
    this._dropSocket();
    const error = fatal ?? new MbwsError(event.code || 1006, event.reason || 'the connection was lost');
    if (this.closed) {
      this._finish();
      return;
    }
    if (this.opening) {
      this.opening(error);
      return;
    }
    // Lost connection: MBWS resumes unless the session is over (a fatal ERROR other than the
    // heartbeat timeout, or no session expiry), MBLWS ends.
    const resumable = this.reliable && this.options.reconnect !== false && (this.limits?.sessionExpiryMs ?? 0) > 0
      && (!fatal || fatal.code === 4408);
    if (!resumable) {
      this._fail(error);
      return;
    }
    this.unconfirmed.forEach((entry) => this.queuedControl.push(entry.frame));
    this.unconfirmed = [];
    this._reconnect(error);
  }

  /** @param {MbwsError} cause */
  async _reconnect(cause) {
    this._setState('reconnecting', cause);
    const deadline = Date.now() + /** @type {Limits} */ (this.limits).sessionExpiryMs;
    const firstDelayMs = this.options.reconnectDelayMs ?? 100;
    const maxDelayMs = this.options.maxReconnectDelayMs ?? 5000;
    let lastError = cause;
    for (let attempt = 0; Date.now() < deadline; attempt++) {
      const delayMs = Math.min(maxDelayMs, firstDelayMs * 2 ** Math.min(attempt, 20));
      await sleep(delayMs / 2 + Math.random() * (delayMs / 2)); // Jitter: reconnects do not come in waves.
      if (this.state !== 'reconnecting') return; // Closed meanwhile.
      const error = await this._attempt();
      if (!error) return;
      lastError = error;
      if (error.fatal && error.code !== 4408) break; // 4404 expired, 4409 superseded: no session left.
    }
    this._fail(new MbwsError(lastError.code, `the session could not be resumed: ${lastError.reason}`, { fatal: true }));
  }

  /**
   * Ends the session: every pending promise is rejected with `error`; subscriptions end with
   * it, or normally (iterators finish) after `close`.
   * @param {MbwsError} error
   * @param {boolean} [graceful]
   */
  _fail(error, graceful = false) {
    this._dropSocket();
    this.opening?.(error); // A connection attempt in flight ends now, not at its timeout.
    this.failure = error;
    for (const entry of this.unreceipted.values()) entry.reject(error);
    this.unreceipted.clear();
    this.queuedControl = [];
    this.unconfirmed = [];
    this.pendingSettlements = [];
    this.unsettled = [];
    this.unsettledHead = 0;
    for (const subscription of [...this.subscriptions.values()]) subscription._end(graceful ? null : error);
    this.sendWaiters.splice(0).forEach((wake) => wake());
    this.drainWaiters.splice(0).forEach((wake) => wake());
    this._setState('closed', graceful ? null : error);
  }

  _finish() {
    const done = this.closed;
    this.closed = null;
    this._fail(new MbwsError(1000, 'the client closed the session'), true);
    done?.();
  }

  /** Queues an ACK or NACK for the next `_flushSettlements`. @param {any} frame */
  _queueSettlement(frame) {
    if (this.state === 'closed') return;
    this.pendingSettlements.push(frame);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    macrotask(() => this._flushSettlements());
  }

  /**
   * Writes the queued settlements (see the module comment): NACKs, then one cumulative ACK for
   * the queued ACKs below the oldest unsettled delivery, then single ACKs for the others.
   */
  _flushSettlements() {
    this.flushScheduled = false;
    const pending = this.pendingSettlements;
    if (pending.length === 0) return;
    this.pendingSettlements = [];
    // Settled here, or of a subscription that ended (its UNSUBSCRIBE was written before anything
    // queued now, or the broker ended it): nothing the broker holds for them needs this client.
    /** @param {Message} message */
    const done = (message) => message.settled || message.subscription.ended;
    let head = this.unsettledHead;
    while (head < this.unsettled.length && done(this.unsettled[head])) head++;
    this.unsettledHead = head;
    if (this.unsettled.length >= this.unsettledCompactAt) {
      // Settled entries behind an old unsettled one (say, one the ack timeout took back and the
      // application never settles) go too: the list stays within twice what is unsettled.
      this.unsettled = this.unsettled.filter((message) => !done(message));
      this.unsettledHead = head = 0;
      this.unsettledCompactAt = Math.max(UNSETTLED_COMPACT_AT, 2 * this.unsettled.length);
    }
    const oldestUnsettled = head < this.unsettled.length ? this.unsettled[head].deliverySeq : Infinity;
    let through = 0;
    let covered = 0;
    for (const frame of pending) {
      if (frame.kind === 'NACK') {
        this._control(frame); // Before the cumulative ACK, which would otherwise settle it.
      } else if (frame.deliverySeq < oldestUnsettled) {
        through = Math.max(through, frame.deliverySeq);
        covered += 1;
      }
    }
    if (covered > 0) this._control({ kind: 'ACK', deliverySeq: through, cumulative: covered > 1 });
    for (const frame of pending) {
      if (frame.kind === 'ACK' && frame.deliverySeq > oldestUnsettled) this._control(frame);
    }
  }

  /** Sends a FLOW or UNSUBSCRIBE (after the queued settlements) now, or after the resume. @param {any} frame */
  _order(frame) {
    this._flushSettlements();
    this._control(frame);
  }

  /** Sends a settlement, FLOW or UNSUBSCRIBE now, or after the resume. @param {any} frame */
  _control(frame) {
    if (this.state === 'closed') return;
    if (!this.ws || this.state !== 'open') {
      this.queuedControl.push(frame);
      return;
    }
    this._writeControl(frame);
  }

  /** @param {any} frame */
  _writeControl(frame) {
    this._write(frame);
    if (this.reliable) {
      this.unconfirmed.push({ frame, token: this.nextPingToken });
      if (this.unconfirmed.length % SETTLEMENTS_PER_PING === 0) this._ping();
    }
  }

  /**
   * Sends a message. Resolves with its seq once the broker receipted it; rejects with an
   * MbwsError (code and reason) if the broker refused it or the session ended first. Waits
   * while `max-inflight-sends` SENDs are unreceipted.
   * @param {string} address
   * @param {Body} [body]
   * @param {SendOptions} [options]
   * @returns {Promise<{seq: number}>}
   */
  async send(address, body, options = {}) {
    if (!this.failure && (this.sendWaiters.length > 0 || this.unreceipted.size + this.reservedSlots >= this._sendWindow())) {
      await new Promise((resolve) => this.sendWaiters.push(() => resolve(undefined)));
      this.reservedSlots = Math.max(0, this.reservedSlots - 1);
    }
    if (this.failure || this.closed) throw this.failure ?? new MbwsError(1000, 'the client is closing');
    const numbered = this.reliable || options.receipt !== false;
    const frame = {
      kind: 'SEND', seq: numbered ? this.nextSeq : 0, address, durable: options.durable ?? false,
      ttlMs: options.ttlMs ?? 0, contentType: options.contentType ?? '', correlationId: options.correlationId ?? '',
      replyTo: options.replyTo ?? '', headers: headerPairs(options.headers),
      body: this.binding === 'text' && typeof body === 'string' ? body : bodyBytes(body),
    };
    this._checkAddress('SEND', address);
    const data = encode(frame, this.binding); // Throws on a bad field before a seq is spent.
    const size = typeof data === 'string' ? utf8.encode(data).length : data.length;
    if (size > /** @type {Limits} */ (this.limits).maxFrameBytes) {
      throw new MbwsError(4413, `SEND to ${address} is ${size} bytes, over the broker's max-frame-bytes ${this.limits?.maxFrameBytes}; send a smaller body`);
    }
    if (!numbered) {
      if (this.state !== 'open') throw new MbwsError(1006, 'not connected: an unreceipted SEND cannot wait for a resume');
      this.ws.send(data);
      this.lastSentAt = Date.now();
      return { seq: 0 };
    }
    this.nextSeq += 1;
    return new Promise((resolve, reject) => {
      this.unreceipted.set(frame.seq, { frame, resolve, reject });
      if (this.state === 'open') {
        this.ws.send(data);
        this.lastSentAt = Date.now();
      }
    });
  }

  /**
   * What the broker would refuse with a fatal 4400 or 4413 (PROTOCOL 6.4) is a TypeError here.
   * @param {string} kind @param {string} address
   */
  _checkAddress(kind, address) {
    const bytes = utf8.encode(String(address ?? '')).length;
    const max = Math.min(255, this.limits?.maxAddressBytes ?? 255);
    if (bytes === 0) throw new TypeError(`${kind}: the address is empty; name an address`);
    if (bytes > max) throw new TypeError(`${kind}: address is ${bytes} bytes, over max-address-bytes ${max}`);
    if (/[\x00-\x1f\x7f]/.test(address)) throw new TypeError(`${kind}: address ${JSON.stringify(address)} has a control character`);
  }

  /**
   * Subscribes to `address`; resolves once the broker confirmed it (SUBSCRIBED), rejects with
   * the MbwsError of a refusal.
   * @param {string} address
   * @param {SubscribeOptions | ((message: Message) => unknown)} [options] options, or just a handler
   * @returns {Promise<Subscription>}
   */
  subscribe(address, options = {}) {
    if (typeof options === 'function') options = { onMessage: options };
    if (this.failure) return Promise.reject(this.failure);
    const subscription = new Subscription(this, this.nextSubscriptionId++, address, options);
    const frame = subscription.frame();
    this._checkAddress('SUBSCRIBE', address);
    encode(frame, this.binding); // Throws on a bad field before anything is registered.
    this.subscriptions.set(subscription.id, subscription);
    return new Promise((resolve, reject) => {
      subscription.pending = { resolve, reject };
      if (this.state === 'open') this._write(frame); // Otherwise sent after the resume.
    });
  }

  /**
   * Ends the session (CLOSE): waits (bounded by closeTimeoutMs) for the receipts of pending
   * SENDs, then closes; what is still unreceipted is rejected.
   */
  async close() {
    if (this.state === 'closed' || this.closed) return;
    const timeoutMs = this.options.closeTimeoutMs ?? 5000;
    if (this.unreceipted.size > 0 && this.state === 'open') {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      await new Promise((resolve) => {
        this.drainWaiters.push(() => resolve(undefined));
        timer = setTimeout(resolve, timeoutMs);
      });
      clearTimeout(timer);
    }
    if (this.failure || this.closed) return; // Ended, or closed by another call, meanwhile.
    this._flushSettlements(); // Settled before the CLOSE, which gives back what is not.
    const closed = new Promise((resolve) => { this.closed = () => resolve(undefined); });
    this._setState('closing');
    if (this.ws && this.ws.readyState === 1) {
      this._write({ kind: 'CLOSE' });
      const timer = setTimeout(() => this._finish(), timeoutMs);
      await closed;
      clearTimeout(timer);
    } else {
      this._finish();
    }
  }
}
