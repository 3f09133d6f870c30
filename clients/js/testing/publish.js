// A paced publisher (not a test; the console's load test and measure-console.js run it as a child
// process): sends COUNT messages "p0", "p1"... to ADDRESS at RATE messages per second with this
// repository's client (mbws.js, in Node), every SEND receipted, and prints one JSON line with what
// it did. Pacing: every TICK_MS it sends what the schedule says is due by now (never a backlog of
// more than one tick's worth at once), so the broker and the page see a steady stream, not a burst.
// Usage: node testing/publish.js URL ADDRESS COUNT RATE
// Output: {"sent": COUNT, "ms": ..., "perSecond": ..., "behindMs": most it fell behind the schedule}

import { connect } from '../mbws.js';

const TICK_MS = 5;
const [url, address, countText, rateText] = process.argv.slice(2);
const count = Number(countText);
const rate = Number(rateText);
if (!url || !address || !(count > 0) || !(rate > 0)) {
  console.error('usage: node testing/publish.js URL ADDRESS COUNT RATE (COUNT and RATE above 0)');
  process.exit(2);
}

const client = await connect(url);
const started = performance.now();
let sent = 0;
let behindMs = 0;
/** @type {Promise<unknown>[]} */
const receipts = [];
while (sent < count) {
  const elapsed = performance.now() - started;
  const due = Math.min(count, Math.floor((elapsed / 1000) * rate));
  // How far the sends lag the schedule (a publisher that cannot keep up says so).
  behindMs = Math.max(behindMs, ((due - sent) / rate) * 1000 - TICK_MS);
  const upTo = Math.min(due, sent + Math.ceil((rate * TICK_MS) / 1000) * 2);
  for (; sent < upTo; sent++) receipts.push(client.send(address, `p${sent}`));
  if (sent < count) await new Promise((resolve) => setTimeout(resolve, TICK_MS));
}
await Promise.all(receipts);
const ms = performance.now() - started;
await client.close();
console.log(JSON.stringify({ sent, ms: Math.round(ms), perSecond: Math.round(sent / (ms / 1000)), behindMs: Math.round(Math.max(0, behindMs)) }));
