// Test harness: starts the real mbws-broker binary on an ephemeral loopback port (it logs
// "listening on ADDRESS", as tests/common/mod.rs reads it), and a TCP proxy the tests can cut.
//
// The broker binary is $MBWS_BROKER, else target/debug/mbws-broker of this repository (built by
// `cargo build` or `cargo test`). Every broker and proxy is stopped by its own handle.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repository = path.resolve(here, '../../..');
/** Bound on every wait in these tests. */
export const TIMEOUT_MS = 20000;

export function brokerBinary() {
  const binary = process.env.MBWS_BROKER ?? path.join(repository, 'target/debug/mbws-broker');
  if (!existsSync(binary)) {
    throw new Error(`${binary} is missing: run \`cargo build\` at the repository root first (or set MBWS_BROKER)`);
  }
  return binary;
}

/**
 * A broker process with its own data directory; `stop()` kills it by its PID. Its admin API is
 * off unless `flags` give `--admin-listen` (then `admin` is its HOST:PORT, from the log).
 * @param {string[]} [flags]
 */
export async function startBroker(flags = []) {
  const dataDir = mkdtempSync(path.join(tmpdir(), 'mbws-js-'));
  const withAdmin = flags.includes('--admin-listen');
  const admin = withAdmin ? [] : ['--admin-listen', 'off'];
  const child = spawn(brokerBinary(), ['--listen', '127.0.0.1:0', ...admin, '--no-pin', '--data-dir', dataDir, ...flags], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  /** @type {string[]} */
  const log = [];
  /** @type {string | undefined} */
  let adminAddress;
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`mbws-broker did not report its address: ${log.join('\n')}`)), 10000);
    /** @type {string | undefined} */
    let listening;
    let pending = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        log.push(line);
        const found = line.split(' listening on ')[1];
        if (found) listening = found.split(/\s/)[0];
        const admin = line.split('admin API at http://')[1];
        if (admin) adminAddress = admin.split('/')[0];
        if (listening && (!withAdmin || adminAddress)) {
          clearTimeout(timer);
          resolve(listening);
        }
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`mbws-broker exited at start (${code}): ${log.join('\n')}`));
    });
  });
  const [host, port] = [address.slice(0, address.lastIndexOf(':')), Number(address.slice(address.lastIndexOf(':') + 1))];
  return {
    host,
    port,
    url: `ws://${address}/`,
    admin: adminAddress,
    log,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await exited;
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP proxy in front of `port`: `cut()` destroys every connection through it (both sides at
 * once, without a WebSocket close), as a network failure would; new connections still pass.
 * `stallAfter(bytes)` lets `bytes` more bytes from the broker through to the connections open
 * now, then stops forwarding to them (what the broker writes next waits in the proxy and is lost
 * by a cut): it resolves once the budget is spent, so a test can cut a connection with frames
 * surely in flight, whatever the timing. New connections are never stalled.
 * @param {number} port
 */
export async function startProxy(port) {
  /** @type {Set<net.Socket>} */
  const sockets = new Set();
  /** @type {Set<(bytes: number) => Promise<void>>} stallAfter of each connection open now */
  const stallers = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1');
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
    }
    client.pipe(upstream);
    // Broker to client by hand (not pipe) so that a budget can stop it at any byte.
    let budget = Infinity;
    /** @type {(() => void) | null} */
    let spent = null;
    upstream.on('data', (/** @type {Buffer} */ chunk) => {
      if (budget <= 0) return;
      const pass = chunk.length > budget ? chunk.subarray(0, budget) : chunk;
      budget -= pass.length;
      if (!client.write(pass)) upstream.pause();
      if (budget <= 0) {
        upstream.pause();
        spent?.();
      }
    });
    client.on('drain', () => { if (budget > 0) upstream.resume(); });
    /** @param {number} bytes */
    const stallAfter = (bytes) => new Promise((resolve) => {
      budget = bytes;
      spent = () => resolve(undefined);
      if (budget <= 0) resolve(undefined);
    });
    stallers.add(stallAfter);
    client.on('close', () => { stallers.delete(stallAfter); upstream.destroy(); });
    upstream.on('close', () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  const address = /** @type {net.AddressInfo} */ (server.address());
  return {
    url: `ws://127.0.0.1:${address.port}/`,
    connections: () => sockets.size / 2,
    cut() {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    /** @param {number} bytes */
    async stallAfter(bytes) {
      await Promise.all([...stallers].map((stall) => stall(bytes)));
    },
    async stop() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}

/**
 * Resolves with `promise`'s value, or rejects once `ms` pass (every wait here is bounded).
 * @template T
 * @param {Promise<T>} promise
 * @param {string} what
 * @param {number} [ms]
 * @returns {Promise<T>}
 */
export function within(promise, what, ms = TIMEOUT_MS) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return /** @type {Promise<T>} */ (Promise.race([promise, timeout]).finally(() => clearTimeout(timer)));
}

/**
 * Takes `count` messages from a subscription's iterator (bounded by TIMEOUT_MS).
 * @param {AsyncIterable<import('../mbws.js').Message>} subscription
 * @param {number} count
 */
export async function take(subscription, count) {
  /** @type {import('../mbws.js').Message[]} */
  const messages = [];
  if (count === 0) return messages;
  await within(
    (async () => {
      for await (const message of subscription) {
        messages.push(message);
        if (messages.length === count) break;
      }
    })(),
    `${count} messages (got ${messages.length})`,
  );
  return messages;
}
