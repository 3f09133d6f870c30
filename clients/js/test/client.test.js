// The JavaScript client against the real broker binary, over real sockets (`node --test`).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { connect, LIGHT, MbwsError, RELIABLE } from '../mbws.js';
import { startBroker, startProxy, take, within } from '../testing/harness.js';

/** @type {Awaited<ReturnType<typeof startBroker>>} */
let broker;
let addressCounter = 0;
/** A fresh address per test, so tests never see each other's messages. @param {string} label */
const fresh = (label) => `js/${label}/${process.pid}/${++addressCounter}`;

before(async () => {
  broker = await startBroker();
});
after(async () => {
  await broker?.stop();
});

describe('both subprotocols and both bindings', () => {
  for (const subprotocol of [RELIABLE, LIGHT]) {
    for (const binding of /** @type {const} */ (['binary', 'text'])) {
      test(`${subprotocol} ${binding}: send with receipts, consume in order with properties`, async () => {
        const address = fresh(`${subprotocol}-${binding}`);
        const consumer = await connect(broker.url, { subprotocol, binding });
        const producer = await connect(broker.url, { subprotocol, binding });
        assert.equal(consumer.subprotocol, subprotocol);
        assert.equal(consumer.limits?.sessionExpiryMs === 0, subprotocol === LIGHT);
        const subscription = await consumer.subscribe(address, { credit: 20 });
        const count = 50;
        const receipts = [];
        for (let i = 1; i <= count; i++) {
          receipts.push(producer.send(address, `body ${i}`, {
            contentType: 'text/plain', correlationId: `c${i}`, replyTo: 'replies', headers: { 'x-index': String(i) },
          }));
        }
        const seqs = (await within(Promise.all(receipts), 'receipts')).map((receipt) => receipt.seq);
        assert.deepEqual(seqs, Array.from({ length: count }, (_, i) => i + 1));
        const messages = await take(subscription, count);
        assert.deepEqual(messages.map((m) => m.text()), Array.from({ length: count }, (_, i) => `body ${i + 1}`));
        const last = messages[count - 1];
        assert.equal(last.address, address);
        assert.equal(last.contentType, 'text/plain');
        assert.equal(last.correlationId, `c${count}`);
        assert.equal(last.replyTo, 'replies');
        assert.equal(last.header('x-index'), String(count));
        assert.equal(last.redelivered, false);
        assert.match(last.messageId, /^\d+$/);
        await producer.close();
        await consumer.close();
        assert.equal(consumer.state, 'closed');
      });
    }
  }

  test('binary bodies survive the text binding (sent and delivered as binary frames)', async () => {
    const address = fresh('bytes');
    const client = await connect(broker.url, { binding: 'text' });
    const subscription = await client.subscribe(address);
    const body = new Uint8Array([0, 255, 254, 10, 13, 0x80]);
    await client.send(address, body);
    await client.send(address, 'line one\n\nline three\n');
    const [bytes, text] = await take(subscription, 2);
    assert.deepEqual([...bytes.body], [...body]);
    assert.equal(text.text(), 'line one\n\nline three\n');
    await client.close();
  });

  test('JSON bodies and durable messages', async () => {
    const address = fresh('json');
    const client = await connect(broker.url);
    const subscription = await client.subscribe(address);
    await client.send(address, JSON.stringify({ order: 42 }), { contentType: 'application/json', durable: true });
    const [message] = await take(subscription, 1);
    assert.deepEqual(message.json(), { order: 42 });
    assert.equal(message.durable, true);
    await client.close();
  });

  test('MBLWS sends without a receipt when asked (seq 0)', async () => {
    const address = fresh('no-receipt');
    const client = await connect(broker.url, { subprotocol: LIGHT });
    const subscription = await client.subscribe(address);
    assert.deepEqual(await client.send(address, 'fire and forget', { receipt: false }), { seq: 0 });
    assert.deepEqual(await client.send(address, 'receipted'), { seq: 1 });
    const messages = await take(subscription, 2);
    assert.deepEqual(messages.map((m) => m.text()), ['fire and forget', 'receipted']);
    await client.close();
  });
});

describe('receipts, refusals and errors as rejected promises', () => {
  test('a SEND to a full address is refused with 4429; the others are receipted', async () => {
    const small = await startBroker(['--max-queued-messages', '5']);
    try {
      const client = await connect(small.url);
      const address = fresh('full');
      const results = await within(
        Promise.allSettled(Array.from({ length: 8 }, (_, i) => client.send(address, `m${i}`))),
        'answers to 8 SENDs',
      );
      assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'fulfilled', 'fulfilled', 'fulfilled',
        'rejected', 'rejected', 'rejected']);
      const refusal = /** @type {PromiseRejectedResult} */ (results[5]).reason;
      assert.ok(refusal instanceof MbwsError);
      assert.equal(refusal.code, 4429);
      assert.equal(refusal.seq, 6);
      assert.equal(refusal.fatal, false);
      assert.match(refusal.reason, /max_queued_messages|full/);
      // The session goes on after a non-fatal refusal.
      assert.equal(client.state, 'open');
      const other = fresh('after-refusal');
      assert.deepEqual(await client.send(other, 'still fine'), { seq: 9 });
      await client.close();
    } finally {
      await small.stop();
    }
  });

  test('a SUBSCRIBE over max-credit is refused with 4413', async () => {
    const client = await connect(broker.url);
    const limit = client.limits?.maxCredit ?? 0;
    await assert.rejects(client.subscribe(fresh('credit'), { credit: limit + 1 }), (error) => {
      assert.ok(error instanceof MbwsError);
      assert.equal(error.code, 4413);
      assert.ok(error.subscriptionId > 0);
      return true;
    });
    assert.equal(client.state, 'open');
    await client.close();
  });

  test('a connection that cannot be made rejects connect with the close code', async () => {
    const gone = await startBroker();
    const url = gone.url;
    await gone.stop();
    await assert.rejects(connect(url, { connectTimeoutMs: 5000 }), (error) => {
      assert.ok(error instanceof MbwsError);
      assert.equal(error.code, 1006);
      return true;
    });
  });

  test('bad input is refused before it reaches the broker', async () => {
    const client = await connect(broker.url);
    await assert.rejects(client.send('', 'x'), /address is empty/);
    await assert.rejects(client.send('a'.repeat(300), 'x'), /over max-address-bytes/);
    await assert.rejects(client.send('ok', 'x', { headers: { Bad: 'y' } }), /application headers are x-/);
    await assert.rejects(client.send('ok', 'x', { correlationId: 'a\nb' }), /CR, LF or NUL/);
    const huge = new Uint8Array((client.limits?.maxFrameBytes ?? 0) + 1);
    await assert.rejects(client.send('ok', huge), (error) => error instanceof MbwsError && error.code === 4413);
    // None of these spent a seq: the next SEND is seq 1.
    assert.deepEqual(await client.send(fresh('ok'), 'fine'), { seq: 1 });
    await client.close();
    await assert.rejects(client.send(fresh('closed'), 'late'), (error) => error instanceof MbwsError && error.code === 1000);
  });

  test('a fatal ERROR ends the session and rejects what is pending with its code', async () => {
    const client = await connect(broker.url, { subprotocol: LIGHT });
    /** @type {any[]} */
    const states = [];
    client.on('state', (event) => states.push(event));
    // MBLWS resends are a conflict (PROTOCOL 5): resending seq 1 by hand is fatal 4409.
    await client.send(fresh('fatal'), 'one');
    client.nextSeq = 1;
    await assert.rejects(client.send(fresh('fatal'), 'again'), (error) => {
      assert.ok(error instanceof MbwsError);
      assert.equal(error.code, 4409);
      assert.equal(error.fatal, true);
      return true;
    });
    assert.equal(client.state, 'closed');
    assert.equal(states.at(-1).state, 'closed');
    assert.equal(states.at(-1).error.code, 4409);
  });
});

describe('anycast and multicast', () => {
  test('anycast: each message goes to exactly one of two consumers', async () => {
    const address = fresh('anycast');
    const a = await connect(broker.url);
    const b = await connect(broker.url, { binding: 'text' });
    /** @type {Map<string, string[]>} */
    const seen = new Map([['a', []], ['b', []]]);
    const count = 200;
    let total = 0;
    /** @type {() => void} */
    let allArrived = () => {};
    const arrived = new Promise((resolve) => { allArrived = () => resolve(undefined); });
    for (const [name, client] of /** @type {const} */ ([['a', a], ['b', b]])) {
      await client.subscribe(address, {
        credit: 5,
        onMessage: async (message) => {
          seen.get(name)?.push(message.text());
          if (++total === count) allArrived();
          await new Promise((resolve) => setImmediate(resolve)); // Hold the credit a moment.
        },
      });
    }
    const producer = await connect(broker.url);
    await Promise.all(Array.from({ length: count }, (_, i) => producer.send(address, `m${i}`)));
    await within(arrived, 'every anycast message');
    const all = [...(seen.get('a') ?? []), ...(seen.get('b') ?? [])].sort();
    assert.deepEqual(all, Array.from({ length: count }, (_, i) => `m${i}`).sort());
    assert.ok((seen.get('a')?.length ?? 0) > 0 && (seen.get('b')?.length ?? 0) > 0, 'both consumers took part');
    await Promise.all([a.close(), b.close(), producer.close()]);
  });

  test('multicast: every subscriber gets every message', async () => {
    const address = fresh('multicast');
    const clients = await Promise.all([connect(broker.url), connect(broker.url, { binding: 'text' })]);
    const subscriptions = await Promise.all(clients.map((client) => client.subscribe(address, { mode: 'multicast' })));
    const producer = await connect(broker.url);
    const count = 100;
    await Promise.all(Array.from({ length: count }, (_, i) => producer.send(address, `m${i}`)));
    for (const subscription of subscriptions) {
      const messages = await take(subscription, count);
      assert.deepEqual(messages.map((m) => m.text()), Array.from({ length: count }, (_, i) => `m${i}`));
    }
    await Promise.all([...clients, producer].map((client) => client.close()));
  });
});

describe('acks and credit', () => {
  test('automatic acks free credit: 30 messages through a credit of 1', async () => {
    const address = fresh('auto-acks');
    const client = await connect(broker.url);
    const subscription = await client.subscribe(address, { credit: 1 });
    await Promise.all(Array.from({ length: 30 }, (_, i) => client.send(address, `m${i}`)));
    const messages = await take(subscription, 30);
    assert.equal(messages.length, 30);
    await client.close();
  });

  test('manual acks: credit holds deliveries until ack; a NACK requeues', async () => {
    const address = fresh('manual');
    const holder = await connect(broker.url);
    const held = await holder.subscribe(address, { credit: 3, manualAck: true });
    const producer = await connect(broker.url);
    await Promise.all(Array.from({ length: 10 }, (_, i) => producer.send(address, `m${i}`)));
    const first = await take(held, 3);
    // The holder has no credit left: a second consumer gets the other 7.
    const other = await connect(broker.url);
    const rest = await other.subscribe(address, { credit: 10, manualAck: true });
    const seven = await take(rest, 7);
    assert.deepEqual([...first, ...seven].map((m) => m.text()).sort(), Array.from({ length: 10 }, (_, i) => `m${i}`).sort());
    // A NACK (requeue) gives one back; the holder has no credit, so the second consumer gets
    // it again, marked redelivered.
    seven[0].nack();
    const [again] = await take(rest, 1);
    assert.equal(again.text(), seven[0].text());
    assert.equal(again.redelivered, true);
    for (const message of [...seven.slice(1), again]) message.ack();
    await other.close();
    // An ACK frees a credit: with the other consumer gone, the next message reaches the holder.
    first[1].ack();
    await producer.send(address, 'm10');
    const [next] = await take(held, 1);
    assert.equal(next.text(), 'm10');
    first[0].ack();
    first[2].ack();
    next.ack();
    await Promise.all([holder.close(), producer.close()]);
  });

  test('setCredit (FLOW) raises the credit of a subscription', async () => {
    const address = fresh('flow');
    const client = await connect(broker.url);
    const subscription = await client.subscribe(address, { credit: 2, manualAck: true });
    await Promise.all(Array.from({ length: 6 }, (_, i) => client.send(address, `m${i}`)));
    const two = await take(subscription, 2);
    subscription.setCredit(6);
    const four = await take(subscription, 4);
    assert.deepEqual([...two, ...four].map((m) => m.text()), Array.from({ length: 6 }, (_, i) => `m${i}`));
    await client.close();
  });

  test('broker auto-ack (at most once) with a slow iterator: paused at the credit, resumed, nothing lost', async () => {
    const address = fresh('auto');
    const client = await connect(broker.url);
    const subscription = await client.subscribe(address, { ack: 'auto', credit: 10 });
    const count = 200;
    await Promise.all(Array.from({ length: count }, (_, i) => client.send(address, `m${i}`)));
    let paused = false;
    const received = [];
    await within((async () => {
      for await (const message of subscription) {
        paused ||= subscription.paused;
        received.push(message.text());
        if (received.length === count) break;
        await new Promise((resolve) => setImmediate(resolve));
      }
    })(), 'auto-ack messages');
    assert.deepEqual(received, Array.from({ length: count }, (_, i) => `m${i}`));
    assert.ok(paused, 'the subscription was paused (FLOW 0) while its buffer was full');
    assert.equal(subscription.paused, false, 'and resumed once the iterator caught up');
    await client.close();
  });

  test('unsubscribe ends the iterator and returns unacknowledged deliveries', async () => {
    const address = fresh('unsubscribe');
    const client = await connect(broker.url);
    const subscription = await client.subscribe(address, { manualAck: true, credit: 5 });
    await client.send(address, 'kept');
    await take(subscription, 1);
    subscription.unsubscribe();
    const iterator = subscription[Symbol.asyncIterator]();
    assert.deepEqual(await iterator.next(), { value: undefined, done: true });
    const again = await client.subscribe(address);
    const [redelivered] = await take(again, 1);
    assert.equal(redelivered.text(), 'kept');
    assert.equal(redelivered.redelivered, true);
    await client.close();
  });
});

describe('heartbeats and credentials', () => {
  test('an idle client keeps its session with heartbeats', async () => {
    const client = await connect(broker.url, { heartbeatMs: 1000 });
    assert.equal(client.limits?.heartbeatMs, 1000);
    /** @type {string[]} */
    const states = [];
    client.on('state', (event) => states.push(event.state));
    // Silence over 2 x 1000 ms would make the broker close with 4408; the PINGs prevent it.
    await new Promise((resolve) => setTimeout(resolve, 3000));
    assert.deepEqual(states, []);
    assert.deepEqual(await client.send(fresh('heartbeat'), 'still here'), { seq: 1 });
    await client.close();
  });

  test('credentials: a token in the query string, login and passcode in OPEN', async () => {
    for (const binding of /** @type {const} */ (['binary', 'text'])) {
      const client = await connect(broker.url, { binding, token: 'secret token/1', login: 'alice', passcode: 's3cret' });
      assert.match(client.url, /\?token=secret%20token%2F1$/);
      assert.equal(client.state, 'open');
      await client.close();
    }
  });
});

describe('resume after a dropped connection (MBWS)', () => {
  for (const binding of /** @type {const} */ (['binary', 'text'])) {
    test(`${binding}: 1,000 messages across cut connections, nothing lost, nothing twice`, async () => {
      const proxy = await startProxy(broker.port);
      try {
        const address = fresh(`resume-${binding}`);
        const options = { binding, reconnectDelayMs: 20, maxReconnectDelayMs: 200 };
        const consumer = await connect(proxy.url, options);
        const producer = await connect(proxy.url, options);
        /** @type {any[]} */
        const events = [];
        for (const client of [consumer, producer]) client.on('state', (event) => events.push(event));
        const subscription = await consumer.subscribe(address, { credit: 50 });
        const count = 1000;
        const cutsAt = new Set([150, 400, 700, 900]);
        /** @type {Map<string, number>} */
        const received = new Map();
        const consumed = (async () => {
          let total = 0;
          for await (const message of subscription) {
            received.set(message.text(), (received.get(message.text()) ?? 0) + 1);
            total += 1;
            if (cutsAt.has(total)) proxy.cut();
            if (total === count) break;
          }
        })();
        const receipts = [];
        for (let i = 0; i < count; i++) {
          receipts.push(producer.send(address, `m${i}`));
          if (i === 500) proxy.cut(); // Also while SENDs are in flight.
        }
        const seqs = (await within(Promise.all(receipts), 'every receipt')).map((receipt) => receipt.seq);
        assert.deepEqual(seqs, Array.from({ length: count }, (_, i) => i + 1));
        await within(consumed, 'every message');
        assert.equal(received.size, count, 'nothing lost');
        assert.deepEqual([...received.values()].filter((n) => n !== 1), [], 'nothing twice');
        const resumed = events.filter((event) => event.state === 'open' && event.resumed);
        assert.ok(resumed.length >= 2, `both clients resumed (events: ${JSON.stringify(events.map((e) => e.state))})`);
        assert.ok(events.some((event) => event.state === 'reconnecting'));
        // Nothing left over: a fresh consumer of the address finds it empty.
        await producer.send(address, 'last');
        const [last] = await take(subscription, 1);
        assert.equal(last.text(), 'last');
        await Promise.all([consumer.close(), producer.close()]);
      } finally {
        await proxy.stop();
      }
    });
  }

  test('MBLWS does not resume: a cut closes the session and rejects pending SENDs', async () => {
    const proxy = await startProxy(broker.port);
    try {
      const client = await connect(proxy.url, { subprotocol: LIGHT });
      const closed = new Promise((resolve) => client.on('state', (event) => event.state === 'closed' && resolve(event)));
      proxy.cut();
      const event = /** @type {any} */ (await within(closed, 'the closed state'));
      assert.ok(event.error instanceof MbwsError);
      await assert.rejects(client.send(fresh('light'), 'x'), MbwsError);
    } finally {
      await proxy.stop();
    }
  });

  test('an expired session is reported, not resumed into a new one', async () => {
    const short = await startBroker(['--session-expiry-ms', '300']);
    const proxy = await startProxy(short.port);
    try {
      const client = await connect(proxy.url, { reconnectDelayMs: 1000, maxReconnectDelayMs: 1000 });
      const pending = client.send(fresh('expire'), 'x'); // May or may not be receipted before the cut.
      pending.catch(() => {});
      const closed = new Promise((resolve) => client.on('state', (event) => event.state === 'closed' && resolve(event)));
      await pending.catch(() => {});
      proxy.cut();
      const event = /** @type {any} */ (await within(closed, 'the closed state'));
      assert.ok(event.error instanceof MbwsError);
      assert.match(event.error.reason, /could not be resumed/);
    } finally {
      await proxy.stop();
      await short.stop();
    }
  });
});
