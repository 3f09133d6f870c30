// Type-checked against mbws.d.ts (test/types.test.js): what an editor sees when a TypeScript
// project uses the package. Never run.
import { connect, LIGHT, MbwsError, type Message } from '../mbws.js';

export async function example(): Promise<void> {
  const client = await connect('ws://127.0.0.1:7447/', { subprotocol: LIGHT, binding: 'text', token: 't' });
  const receipt: { seq: number } = await client.send('orders', '{"order":42}', { contentType: 'application/json' });
  const subscription = await client.subscribe('orders', { mode: 'multicast', credit: 10 });
  for await (const message of subscription) {
    const text: string = message.text();
    const id: string = message.messageId;
    console.log(receipt.seq, text, id, message.header('x-trace'));
    break;
  }
  await client.subscribe('jobs', { manualAck: true, onMessage: (message: Message) => message.nack(false) });
  client.on('state', (event) => console.log(event.state));
  try {
    await client.send('full', new Uint8Array([1, 2, 3]));
  } catch (error) {
    if (error instanceof MbwsError) console.log(error.code, error.reason);
  }
  await client.close();
}
