// Coalesced settlements against the real broker (`node --test`): the client queues ACKs and
// NACKs and writes them once per task, as one cumulative ACK where every client-ack delivery at
// or below it is settled (PROTOCOL 7.5), and as single frames otherwise. These tests watch the
// frames on the wire (a WebSocket that records what it sends) and prove with the broker's own
// behaviour (redelivery after the ack timeout, requeue on CLOSE) what each frame settled.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { WebSocket as NodeWebSocket } from 'ws';

import { connect } from '../mbws.js';
import { startBroker, startProxy, take, within } from '../testing/harness.js';

/** @type {Awaited<ReturnType<typeof startBroker>>} */
let broker;
let addressCounter = 0;
/** @param {string} label */
const fresh = (label) => `js/settle/${label}/${process.pid}/${++addressCounter}`;

before(async () => {
  broker = await startBroker();
});
after(async () => {
  await broker?.stop();
});

/**
 * A WebSocket class that records the ACK and NACK frames a client sends (binary binding):
 * `{kind, seq, flag}` with flag 1 for a cumulative ACK or a requeuing NACK.
 */
function recording() {
  /** @type {Array<{kind: string, seq: number, flag: number}>} */
  const settlements = [];
  class RecordingWebSocket extends NodeWebSocket {
    /** @param {any} data @param {any[]} rest */
    send(data, ...rest) {
      if (data instanceof Uint8Array && (data[1] === 9 || data[1] === 10)) {
        const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
        settlements.push({ kind: data[1] === 9 ? 'ACK' : 'NACK', flag: data[2], seq: Number(view.getBigUint64(3)) });
      }
      // @ts-ignore: ws's overloads
      return super.send(data, ...rest);
    }
  }
  return { settlements, WebSocket: RecordingWebSocket };
}

/** @param {number} seq */
const cumulative = (seq) => ({ kind: 'ACK', flag: 1, seq });
/** @param {number} seq */
const single = (seq) => ({ kind: 'ACK', flag: 0, seq });

describe('coalesced settlements', () => {
  test('manual acks out of order with a gap: one cumulative ACK below it, single ACKs above; the ack timeout redelivers only the gap', async () => {
    const timed = await startBroker(['--ack-timeout-ms', '1500']);
    try {
      const wire = recording();
      const address = fresh('gap');
      const client = await connect(timed.url, { WebSocket: wire.WebSocket });
      const subscription = await client.subscribe(address, { manualAck: true, credit: 10 });
      await Promise.all(Array.from({ length: 6 }, (_, i) => client.send(address, `m${i}`)));
      const six = await take(subscription, 6);
      assert.deepEqual(six.map((m) => m.text()), ['m0', 'm1', 'm2', 'm3', 'm4', 'm5']);
      // In one task, out of order; m3 stays unsettled.
      for (const i of [5, 1, 0, 2, 4]) six[i].ack();
      assert.deepEqual(wire.settlements, [], 'queued, not written, within the task');
      const [again] = await take(subscription, 1);
      assert.deepEqual(wire.settlements, [cumulative(six[2].deliverySeq), single(six[5].deliverySeq), single(six[4].deliverySeq)]);
      assert.equal(again.text(), 'm3', 'the ack timeout redelivered the gap');
      assert.equal(again.redelivered, true);
      again.ack();
      // Had anything else gone unacknowledged, its ack timeout would have requeued it ahead of this.
      await client.send(address, 'end');
      const [end] = await take(subscription, 1);
      assert.equal(end.text(), 'end');
      end.ack();
      await client.close();
    } finally {
      await timed.stop();
    }
  });

  test('a NACK among ACKs is written before the cumulative ACK that spans it; anycast, multicast and auto-ack deliveries mixed', async () => {
    const wire = recording();
    const [anycastAddress, multicastAddress, autoAddress] = [fresh('any'), fresh('multi'), fresh('auto')];
    const client = await connect(broker.url, { WebSocket: wire.WebSocket });
    const anycast = await client.subscribe(anycastAddress, { manualAck: true, credit: 2 });
    const multicast = await client.subscribe(multicastAddress, { mode: 'multicast', manualAck: true, credit: 2 });
    const auto = await client.subscribe(autoAddress, { ack: 'auto', credit: 2 });
    // One at a time, so the delivery seqs of the three subscriptions interleave.
    for (const i of [0, 1]) {
      for (const address of [anycastAddress, multicastAddress, autoAddress]) {
        await client.send(address, `${address.split('/')[2]}${i}`);
      }
    }
    const [a, b, c] = [await take(anycast, 2), await take(multicast, 2), await take(auto, 2)];
    const seqs = [...a, ...b, ...c].map((m) => m.deliverySeq).sort((x, y) => x - y);
    assert.equal(new Set(seqs).size, 6);
    a[0].ack();
    b[0].nack();
    a[1].ack();
    b[1].ack();
    const through = Math.max(a[1].deliverySeq, b[1].deliverySeq);
    const [back] = await take(multicast, 1);
    assert.deepEqual(wire.settlements, [{ kind: 'NACK', flag: 1, seq: b[0].deliverySeq }, cumulative(through)]);
    assert.equal(back.text(), 'multi0', 'the NACKed delivery came back: the cumulative ACK did not settle it');
    assert.equal(back.redelivered, true);
    back.ack();
    // The cumulative ACK freed the credit of both subscriptions, each for its own deliveries.
    await Promise.all([client.send(anycastAddress, 'any2'), client.send(anycastAddress, 'any3'), client.send(multicastAddress, 'multi2')]);
    assert.deepEqual((await take(anycast, 2)).map((m) => m.text()), ['any2', 'any3']);
    assert.deepEqual((await take(multicast, 1)).map((m) => m.text()), ['multi2']);
    assert.ok(wire.settlements.every((frame) => frame.seq > 0));
    await client.close();
  });

  test('automatic acks: a burst is settled by a few cumulative ACKs, and nothing is left unacknowledged', async () => {
    const wire = recording();
    const address = fresh('auto-acks');
    const consumer = await connect(broker.url, { WebSocket: wire.WebSocket });
    const producer = await connect(broker.url);
    const count = 400;
    let received = 0;
    /** @type {() => void} */
    let allReceived = () => {};
    const done = new Promise((resolve) => { allReceived = () => resolve(undefined); });
    await consumer.subscribe(address, { credit: 50, onMessage: () => { if (++received === count) allReceived(); } });
    await within(Promise.all(Array.from({ length: count }, (_, i) => producer.send(address, `m${i}`))), 'receipts');
    await within(done, `${count} messages (got ${received})`);
    await consumer.close();
    const acks = wire.settlements.filter((frame) => frame.kind === 'ACK');
    assert.ok(acks.some((frame) => frame.flag === 1), 'cumulative ACKs were used');
    assert.ok(acks.length < count / 2, `${acks.length} ACK frames for ${count} deliveries`);
    // CLOSE requeues whatever the session had not acknowledged: a new consumer would get it first.
    const next = await connect(broker.url);
    const subscription = await next.subscribe(address);
    await producer.send(address, 'last');
    assert.deepEqual((await take(subscription, 1)).map((m) => m.text()), ['last']);
    await Promise.all([next.close(), producer.close()]);
  });

  test('resume: cumulative ACKs across cut connections, a delivery held over a cut; nothing lost, nothing twice, nothing left', async () => {
    const proxy = await startProxy(broker.port);
    try {
      const wire = recording();
      const address = fresh('resume');
      const consumer = await connect(proxy.url, { WebSocket: wire.WebSocket, reconnectDelayMs: 20, maxReconnectDelayMs: 200 });
      const producer = await connect(broker.url);
      let resumes = 0;
      consumer.on('state', (event) => { if (event.state === 'open' && event.resumed) resumes += 1; });
      const count = 600;
      const cutsAt = new Set([100, 250, 400, 550]);
      /** @type {Map<string, number>} */
      const received = new Map();
      /** @type {import('../mbws.js').Message | null} */
      let held = null;
      /** @type {() => void} */
      let allReceived = () => {};
      const done = new Promise((resolve) => { allReceived = () => resolve(undefined); });
      await consumer.subscribe(address, {
        credit: 30,
        manualAck: true,
        onMessage: (message) => {
          received.set(message.text(), (received.get(message.text()) ?? 0) + 1);
          const total = received.size;
          if (total === 90) held = message; // Unsettled over the cut at 100, settled at 300.
          else message.ack();
          if (total === 300) held?.ack();
          if (cutsAt.has(total)) proxy.cut();
          if (total === count) allReceived();
        },
      });
      await within(Promise.all(Array.from({ length: count }, (_, i) => producer.send(address, `m${i}`))), 'receipts');
      await within(done, `${count} messages (got ${received.size})`);
      assert.equal(received.size, count, 'nothing lost');
      assert.deepEqual([...received.values()].filter((n) => n !== 1), [], 'nothing twice');
      assert.ok(resumes >= 3, `the consumer resumed (${resumes} times)`);
      assert.ok(wire.settlements.some((frame) => frame.flag === 1), 'cumulative ACKs were used');
      await within(consumer.close(), 'close');
      const next = await connect(broker.url);
      const subscription = await next.subscribe(address);
      await producer.send(address, 'last');
      assert.deepEqual((await take(subscription, 1)).map((m) => m.text()), ['last'], 'every delivery was settled');
      await Promise.all([next.close(), producer.close()]);
    } finally {
      await proxy.stop();
    }
  });
});
