// A page in headless Chromium driven over the DevTools protocol with nothing but Runtime and
// Performance (not a test; measure-console.js --bare uses it). Playwright enables the Network
// domain on every page, which makes Chromium serialize every WebSocket frame into a DevTools event
// and send it to the driver: at thousands of frames per second that costs the page and the browser
// more than the page's own work, so a measurement of a WebSocket page through Playwright measures
// Playwright too. This driver offers the two calls measure-console.js needs, with Playwright's
// signatures: `evaluate(fn, arg)` and `waitForFunction(fn, arg)`.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { WebSocket } from 'ws';

/**
 * Starts Chromium and opens `url` in a page. `close()` stops Chromium and its helper processes (its
 * process group, by the group's ID) and removes its profile.
 * @param {string} executable
 * @param {string} url
 * @param {{timeoutMs?: number, args?: string[]}} [options]
 */
export async function openBarePage(executable, url, options = {}) {
  const timeoutMs = options.timeoutMs ?? 120000;
  const profile = mkdtempSync(path.join(tmpdir(), 'mbws-chromium-'));
  const child = spawn(executable, ['--headless', '--no-sandbox', '--remote-debugging-port=0', `--user-data-dir=${profile}`,
    '--window-size=1100,780', '--disable-background-timer-throttling', '--disable-backgrounding-occluded-windows',
    '--disable-renderer-backgrounding', ...(options.args ?? []), 'about:blank'],
    // Its own process group, so that close() stops its helpers too: killed alone, the browser
    // process left renderers writing into the profile while it was being removed (ENOTEMPTY).
    { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  const endpoint = await new Promise((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => reject(new Error(`chromium did not report its DevTools endpoint: ${text}`)), 20000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      text += chunk;
      const found = /DevTools listening on (ws:\/\/\S+)/.exec(text);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`chromium exited (${code}): ${text}`)); });
  });
  const socket = new WebSocket(endpoint, { perMessageDeflate: false, maxPayload: 256 * 1024 * 1024 });
  await new Promise((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject); });
  let nextId = 1;
  /** @type {Map<number, {resolve: (value: any) => void, reject: (error: Error) => void}>} */
  const calls = new Map();
  socket.on('message', (data) => {
    const message = JSON.parse(String(data));
    const call = message.id ? calls.get(message.id) : undefined;
    if (!call) return;
    calls.delete(message.id);
    if (message.error) call.reject(new Error(`${message.error.message} (${message.error.code})`));
    else call.resolve(message.result);
  });
  /** @param {string} method @param {object} [params] @param {string} [sessionId] @returns {Promise<any>} */
  const send = (method, params = {}, sessionId = undefined) => new Promise((resolve, reject) => {
    const id = nextId++;
    calls.set(id, { resolve, reject });
    socket.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
  });
  const { targetId } = await send('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await send('Target.attachToTarget', { targetId, flatten: true });
  /** @param {string} method @param {object} [params] */
  const page = (method, params) => send(method, params, sessionId);
  /**
   * Playwright's page.evaluate: runs `fn(arg)` in the page, awaits it, returns its value.
   * @param {Function} fn @param {any} [arg]
   */
  const evaluate = async (fn, arg) => {
    const { result, exceptionDetails } = await page('Runtime.evaluate', {
      expression: `(${fn})(${JSON.stringify(arg)})`, awaitPromise: true, returnByValue: true,
    });
    if (exceptionDetails) throw new Error(`in the page: ${exceptionDetails.exception?.description ?? exceptionDetails.text}`);
    return result.value;
  };
  /**
   * Playwright's page.waitForFunction: polls `fn(arg)` until it is truthy, at most timeoutMs.
   * @param {Function} fn @param {any} [arg]
   */
  const waitForFunction = async (fn, arg) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = await evaluate(fn, arg);
      if (value) return value;
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${fn}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  await page('Page.navigate', { url });
  await waitForFunction(() => document.readyState === 'complete');
  return {
    evaluate,
    waitForFunction,
    /** @param {string} method @param {object} [params] */
    send: page,
    async close() {
      socket.close();
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        process.kill(-child.pid, 'SIGKILL');
        await exited;
      }
      rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 }); // Its helpers may still be writing.
    },
  };
}
