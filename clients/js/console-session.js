// The web console's session: one MBWS client (mbws.js), its subscriptions and its sends, with
// what the page shows handed over in batches. console.html runs it in a dedicated module Worker,
// so that the WebSocket's per-message tasks (one per MESSAGE frame, plus decoding and acks) run
// off the page's main thread, and the page pays one task per batch; where there is no Worker, the
// page imports it and runs it itself (`serve`), speaking the same messages.
//
// Page to session:
//   {type: 'connect', request, url, options}   {type: 'close', request}
//   {type: 'subscribe', request, address, mode, ack, credit}   {type: 'unsubscribe', subscription}
//   {type: 'send', address, template, headers, contentType, count}   {type: 'shown', batch}
// Session to page:
//   {type: 'ready'}   {type: 'reply', request, value | error}   {type: 'state', state, error}
//   {type: 'error', message}   {type: 'ended', subscription, message}   {type: 'batch', ...Batch}
//
// Batches: at most one is with the page at a time, and at most one per BATCH_INTERVAL_MS; the page
// answers each with `shown`, and only then are its client-ack deliveries acknowledged. So a page
// that falls behind holds the broker back by credit (the subscription's unacknowledged
// deliveries), not by a growing queue here. What waits for the page is bounded: at most
// MAX_BATCH_ENTRIES entries (the page keeps that many; older ones are counted, not shown), and one
// entry per delivery keeps only what the list shows (a body cut to BODY_CHARS).

import { connect, LIGHT } from './mbws.js';

/** Shortest time between two batches to the page: about two animation frames (the page draws at most ten times a second). */
const BATCH_INTERVAL_MS = 33;
/** Entries waiting for the page, at most (the page's history keeps as many). */
const MAX_BATCH_ENTRIES = 10000;
/** Characters of a body shown; bytes beyond BODY_BYTES_DECODED are not decoded. */
const BODY_CHARS = 300;
const BODY_BYTES_DECODED = 1200;
/** Receipt latencies kept for the median and p99 shown. */
const LATENCY_SAMPLES = 1000;
/** SENDs issued per task when sending many, so that receipts and deliveries are read between. */
const SEND_BATCH = 200;

/**
 * @typedef {string} Entry what the message list shows of one delivery, as one string: the
 * address, the subscription id, the message id and the headers ("name: value, ..."), each without
 * ENTRY_SEPARATOR, then the body as text (cut to BODY_CHARS, or its size when not UTF-8), joined
 * by ENTRY_SEPARATOR. One string per delivery is the cheapest thing to hand the page: the
 * structured clone of a batch copies strings, not an object of five per message, and the page
 * takes the fields apart only for the rows it draws.
 */

/** Between an entry's fields (the ASCII unit separator); where a field has one, it shows as U+241F. */
export const ENTRY_SEPARATOR = '\u001f';
/** @param {string} text */
const field = (text) => (text.includes(ENTRY_SEPARATOR) ? text.replaceAll(ENTRY_SEPARATOR, '\u241f') : text);

/**
 * @typedef {object} Batch what happened since the last batch
 * @property {number} batch its number (the page's `shown` names it)
 * @property {Entry[]} entries the newest deliveries, oldest first (at most MAX_BATCH_ENTRIES)
 * @property {number} received deliveries, `entries` and those left out
 * @property {number} sent SENDs issued
 * @property {number} receipted
 * @property {number} refused
 * @property {string} refusal the last refusal's reason, or ''
 * @property {string} latency receipt latency, median and p99, or '' when unchanged
 * @property {Array<{count: number, address: string, ms: number}>} finished send jobs ended
 */

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const lenientUtf8 = new TextDecoder('utf-8');

/** The body as text (its first BODY_CHARS characters), or its size when it is not UTF-8.
 * @param {string | Uint8Array} data */
function shownBody(data) {
  let text;
  let cut = false;
  if (typeof data === 'string') {
    text = data;
  } else {
    cut = data.length > BODY_BYTES_DECODED; // Decoded in part: the cut may split a character.
    try {
      text = cut ? lenientUtf8.decode(data.subarray(0, BODY_BYTES_DECODED)) : strictUtf8.decode(data);
    } catch {
      return `(${data.length} bytes, not UTF-8)`;
    }
  }
  return text.length > BODY_CHARS || cut ? `${text.slice(0, BODY_CHARS)}...` : text;
}

/** @param {any} error */
const reason = (error) => (error instanceof Error ? error.message : String(error));

/**
 * Runs a console session that talks to its page through `post`; returns the function that takes
 * the page's messages.
 * @param {(message: any) => void} post
 * @returns {(message: any) => void}
 */
export function serve(post) {
  /** @type {import('./mbws.js').Client | null} */
  let client = null;
  /** @type {Map<number, import('./mbws.js').Subscription>} the current client's subscriptions */
  const subscriptions = new Map();

  // The batch being gathered, and the client-ack deliveries each batch with the page holds.
  /** @type {Entry[]} */
  let entries = [];
  let entriesStart = 0; // entries before it were left out (over MAX_BATCH_ENTRIES)
  let received = 0, sent = 0, receipted = 0, refused = 0;
  let refusal = '';
  let latencyChanged = false;
  /** @type {Array<{count: number, address: string, ms: number}>} */
  let finished = [];
  /** @type {import('./mbws.js').Message[]} client-ack deliveries of the batch being gathered */
  let toAck = [];
  /** @type {{batch: number, messages: import('./mbws.js').Message[]} | null} the batch with the page */
  let withPage = null;
  let nextBatch = 1;
  let lastBatchAt = -Infinity;
  /** @type {ReturnType<typeof setTimeout> | null} */
  let timer = null;
  /** @type {number[]} */
  const latencies = [];

  const gathered = () => received > 0 || sent > 0 || receipted > 0 || refused > 0 || latencyChanged || finished.length > 0;

  /** Sends the batch if the page is ready for one and it is time, else makes sure it will be. */
  function schedule() {
    if (withPage || timer || !gathered()) return;
    const wait = lastBatchAt + BATCH_INTERVAL_MS - performance.now();
    if (wait > 0) {
      timer = setTimeout(() => { timer = null; schedule(); }, wait);
      return;
    }
    lastBatchAt = performance.now();
    const batch = nextBatch++;
    withPage = { batch, messages: toAck };
    let latency = '';
    if (latencyChanged && latencies.length > 0) {
      const sorted = [...latencies].sort((a, b) => a - b);
      const at = (/** @type {number} */ q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))].toFixed(1);
      latency = `median ${at(0.5)} ms, p99 ${at(0.99)} ms (last ${sorted.length})`;
    }
    /** @type {Batch} */
    const message = {
      batch, entries: entriesStart > 0 ? entries.slice(entriesStart) : entries, received, sent, receipted, refused,
      refusal, latency, finished,
    };
    entries = [];
    entriesStart = 0;
    toAck = [];
    finished = [];
    received = sent = receipted = refused = 0;
    refusal = '';
    latencyChanged = false;
    post({ type: 'batch', ...message });
  }

  /** The page has shown batch `batch`: its client-ack deliveries are acknowledged. @param {number} batch */
  function shown(batch) {
    if (!withPage || withPage.batch !== batch) return;
    for (const message of withPage.messages) message.ack();
    withPage = null;
    schedule();
  }

  /** @param {import('./mbws.js').Message} message */
  function onMessage(message) {
    received += 1;
    const headers = message.headers.map(([name, value]) => `${name}: ${value}`).join(', ');
    entries.push(`${field(message.address)}${ENTRY_SEPARATOR}${message.subscription.id}${ENTRY_SEPARATOR}${field(message.messageId)}`
      + `${ENTRY_SEPARATOR}${field(headers)}${ENTRY_SEPARATOR}${shownBody(message.data)}`);
    if (entries.length - entriesStart > MAX_BATCH_ENTRIES) {
      entriesStart += 1;
      if (entriesStart >= MAX_BATCH_ENTRIES) { // Compact now and then, not on every delivery.
        entries = entries.slice(entriesStart);
        entriesStart = 0;
      }
    }
    if (!message.settled) toAck.push(message);
    schedule();
  }

  /** @param {number} ms */
  function sample(ms) {
    if (latencies.length === LATENCY_SAMPLES) latencies.shift();
    latencies.push(ms);
    latencyChanged = true;
  }

  /** @param {string} url @param {import('./mbws.js').ConnectOptions} options */
  async function open(url, options) {
    const previous = client;
    client = null;
    subscriptions.clear();
    if (previous) await previous.close().catch(() => {});
    const current = await connect(url, options);
    client = current;
    current.on('state', ({ state, error }) => {
      if (client === current) post({ type: 'state', state, error: error ? reason(error) : '' });
    });
    current.on('error', (error) => { if (client === current) post({ type: 'error', message: reason(error) }); });
    return { server: current.server, sessionId: current.sessionId, light: current.subprotocol === LIGHT };
  }

  async function close() {
    const closing = client;
    client = null;
    subscriptions.clear();
    await closing?.close();
  }

  /** @param {any} request */
  async function subscribe(request) {
    if (!client) throw new Error('connect first');
    const current = client;
    const subscription = await current.subscribe(request.address, {
      mode: request.mode, ack: request.ack, credit: request.credit, manualAck: request.ack === 'client',
      onMessage,
      onError: (error) => {
        subscriptions.delete(subscription.id);
        post({ type: 'ended', subscription: subscription.id, message: reason(error) });
      },
    });
    if (client === current) subscriptions.set(subscription.id, subscription);
    return subscription.id;
  }

  /** Sends `count` messages, the body `template` with {i} replaced by the index. @param {any} job */
  async function send(job) {
    const current = client;
    const started = performance.now();
    const sends = [];
    for (let i = 0; i < job.count; i++) {
      if (i > 0 && i % SEND_BATCH === 0) await new Promise((resolve) => setTimeout(resolve, 0));
      const begun = performance.now();
      sent += 1;
      const body = job.template.replaceAll('{i}', String(i));
      const options = { headers: job.headers, contentType: job.contentType };
      const sending = current ? current.send(job.address, body, options) : Promise.reject(new Error('not connected'));
      sends.push(sending.then(() => {
        receipted += 1;
        sample(performance.now() - begun);
        schedule();
      }, (error) => {
        refused += 1;
        refusal = reason(error);
        schedule();
      }));
      schedule();
    }
    await Promise.all(sends);
    finished.push({ count: job.count, address: job.address, ms: performance.now() - started });
    schedule();
  }

  /** @param {number} request @param {Promise<any>} answer */
  const reply = (request, answer) => answer.then(
    (value) => post({ type: 'reply', request, value }),
    (error) => post({ type: 'reply', request, error: reason(error) }),
  );

  return (message) => {
    switch (message.type) {
      case 'connect': return reply(message.request, open(message.url, message.options));
      case 'close': return reply(message.request, close());
      case 'subscribe': return reply(message.request, subscribe(message));
      case 'unsubscribe': {
        const subscription = subscriptions.get(message.subscription);
        subscriptions.delete(message.subscription);
        return subscription?.unsubscribe();
      }
      case 'send': return send(message);
      case 'shown': return shown(message.batch);
    }
  };
}

// Started as a Worker: serve the page that started it.
const scope = /** @type {any} */ (globalThis);
if (typeof scope.WorkerGlobalScope === 'function' && scope instanceof scope.WorkerGlobalScope) {
  const handle = serve((message) => scope.postMessage(message));
  scope.onmessage = (/** @type {MessageEvent} */ event) => handle(event.data);
  scope.postMessage({ type: 'ready' });
}
