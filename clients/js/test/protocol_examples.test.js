// The codec against the examples of docs/PROTOCOL.md section 13 (the same examples the Rust
// codec is checked against in tests/protocol_examples.rs): every frame a client sends encodes to
// exactly the example's bytes and text, and every frame a broker sends decodes to the same frame
// from both bindings.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { decode, encode } from '../mbws.js';

const protocol = readFileSync(
  path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../docs/PROTOCOL.md'),
  'utf8',
);

/** @type {Map<string, Uint8Array | string>} "binary OPEN" -> its bytes, "text OPEN" -> its text */
const examples = new Map();
for (const match of protocol.matchAll(/<!-- example: (binary|text) (\w+) -->\n```text\n([\s\S]*?)```/g)) {
  const [, binding, kind, block] = match;
  if (binding === 'binary') {
    const hex = block.split('\n').map((line) => line.split('#')[0]).join(' ').trim().split(/\s+/);
    examples.set(`binary ${kind}`, Uint8Array.from(hex, (pair) => parseInt(pair, 16)));
  } else {
    examples.set(`text ${kind}`, block);
  }
}

const headers = /** @type {Array<[string, string]>} */ ([['x-trace', 'abc123']]);
const body = '{"order":42}\n';
/** Frames a client sends, as the examples show them. @type {Record<string, any>} */
const clientFrames = {
  OPEN: { kind: 'OPEN', heartbeatMs: 30000, login: 'alice', passcode: 's3cret' },
  SEND: { kind: 'SEND', seq: 1, address: 'orders', contentType: 'application/json', headers, body },
  SUBSCRIBE: { kind: 'SUBSCRIBE', subscriptionId: 1, address: 'orders', mode: 'anycast', ack: 'client', credit: 10 },
  UNSUBSCRIBE: { kind: 'UNSUBSCRIBE', subscriptionId: 1 },
  ACK: { kind: 'ACK', deliverySeq: 1, cumulative: true },
  NACK: { kind: 'NACK', deliverySeq: 2, requeue: true },
  FLOW: { kind: 'FLOW', subscriptionId: 1, credit: 100 },
  PING: { kind: 'PING', token: 42 },
  PONG: { kind: 'PONG', token: 42 },
  ERROR: { kind: 'ERROR', code: 4429, seq: 7, reason: 'address `orders` is full (max_queued_messages 100000)' },
  CLOSE: { kind: 'CLOSE' },
};

test('PROTOCOL.md has both bindings of every frame kind', () => {
  assert.equal(examples.size, 30);
});

for (const [kind, frame] of Object.entries(clientFrames)) {
  test(`${kind} encodes to the example in both bindings`, () => {
    assert.deepEqual(encode(frame, 'binary'), examples.get(`binary ${kind}`));
    // The text example's SEND body is a string; a bytes body would go binary (PROTOCOL 6.1).
    assert.equal(encode(frame, 'text'), examples.get(`text ${kind}`));
  });
}

for (const kind of ['OPENED', 'RECEIPT', 'SUBSCRIBED', 'MESSAGE', 'PING', 'PONG', 'ERROR', 'CLOSE']) {
  test(`${kind} decodes the same from both bindings`, () => {
    const fromBinary = decode(/** @type {Uint8Array} */ (examples.get(`binary ${kind}`)));
    const fromText = decode(/** @type {string} */ (examples.get(`text ${kind}`)));
    if (kind === 'MESSAGE') {
      assert.equal(new TextDecoder().decode(fromBinary.body), fromText.body);
      assert.equal(fromText.body, body);
      fromBinary.body = fromText.body;
      assert.equal(fromBinary.messageId, '1001');
    }
    for (const frame of [fromBinary, fromText]) {
      delete frame.binding;
      if (kind !== 'MESSAGE') delete frame.headers;
    }
    assert.deepEqual(fromBinary, fromText);
  });
}

test('a truncated or unknown binary frame is refused with a reason', () => {
  assert.throws(() => decode(new Uint8Array([1, 4, 0, 0])), /truncated/);
  assert.throws(() => decode(new Uint8Array([2, 4, 0])), /version 2/);
  assert.throws(() => decode(new Uint8Array([1, 99, 0])), /unknown binary frame kind 99/);
  assert.throws(() => decode('NOPE\n\n'), /unknown text frame kind/);
});

test('string fields: non-ASCII is UTF-8 with its byte length; CR, LF, NUL and over-long values are refused', () => {
  const frame = { kind: 'SEND', seq: 1, address: 'café/ü', headers: [['x-name', 'ñ']], body: new Uint8Array([7]) };
  const bytes = /** @type {Uint8Array} */ (encode(frame, 'binary'));
  const address = new TextEncoder().encode('café/ü');
  assert.equal(bytes[15], address.length);
  assert.deepEqual(bytes.subarray(16, 16 + address.length), address);
  assert.deepEqual([...bytes.subarray(bytes.length - 5)], [0, 2, 0xc3, 0xb1, 7]); // value str16 "ñ", then the body
  assert.throws(() => encode({ ...frame, correlationId: 'a\rb' }, 'binary'), /correlation-id contains CR, LF or NUL/);
  assert.throws(() => encode({ ...frame, replyTo: 'x'.repeat(256) }, 'binary'), /reply-to is 256 bytes, over the 255/);
  assert.throws(() => encode({ ...frame, headers: [['x-a', 'é'.repeat(40000)]] }, 'binary'), /over the 65535/);
});
