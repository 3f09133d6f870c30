// The console under a steady stream, measured (the browser test and measure-console.js --rate use
// it): a publisher process (testing/publish.js) sends COUNT messages at RATE per second to an
// address the console page watches, while this measures the page's main thread over DevTools:
//   - busy: `Performance.getMetrics` TaskDuration (every task the page's main thread ran: script,
//     style, layout, paint, messages from the Worker) over the wall time of the stream;
//   - long tasks: a PerformanceObserver('longtask') in the page (tasks over 50 ms);
//   - input latency: a key pressed every INPUT_EVERY_MS through DevTools (Input.dispatchKeyEvent),
//     from the event's timestamp to the page's handler (how long a keypress waits for the thread).
// Works with a Playwright page and CDP session or with testing/bare-chromium.js (both have
// evaluate, waitForFunction and send).

import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const INPUT_EVERY_MS = 200;

/**
 * Streams `count` messages at `rate` per second to `address` (which the page's console is
 * subscribed to) and measures the page meanwhile. Resolves once the console counted `count`.
 * @param {{evaluate: Function, waitForFunction: Function}} page
 * @param {{send: (method: string, params?: object) => Promise<any>}} cdp
 * @param {{url: string, address: string, count: number, rate: number, timeoutMs: number}} options
 */
export async function streamIntoConsole(page, cdp, { url, address, count, rate, timeoutMs }) {
  const counted = () => page.evaluate(() => Number(document.getElementById('received-total')?.dataset.count));
  const startCount = await counted();
  await page.evaluate(() => {
    const scope = /** @type {any} */ (globalThis);
    scope.loadProbe = { longTasks: /** @type {number[]} */ ([]), inputMs: /** @type {number[]} */ ([]) };
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) scope.loadProbe.longTasks.push(entry.duration);
    }).observe({ type: 'longtask' });
    // Capture phase on the window: nothing of the page's can delay it further.
    addEventListener('keydown', (event) => {
      if (event.key === 'F9') scope.loadProbe.inputMs.push(performance.now() - event.timeStamp);
    }, true);
  });
  await cdp.send('Performance.enable', { timeDomain: 'timeTicks' });
  const metrics = async () => Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map(
    (/** @type {{name: string, value: number}} */ m) => [m.name, m.value]));
  const before = await metrics();
  const started = Date.now();
  const publisher = spawn(process.execPath, [path.join(here, 'publish.js'), url, address, String(count), String(rate)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  publisher.stdout.setEncoding('utf8').on('data', (chunk) => { output += chunk; });
  publisher.stderr.setEncoding('utf8').on('data', (chunk) => { output += chunk; });
  const exited = new Promise((resolve) => publisher.once('exit', resolve));
  // Keypresses while the stream flows (and the round trip of each, as DevTools answers it once
  // the page has handled the event).
  let pressing = true;
  const roundTrips = /** @type {number[]} */ ([]);
  const presser = (async () => {
    while (pressing) {
      const sentAt = performance.now();
      const key = { key: 'F9', code: 'F9', windowsVirtualKeyCode: 120 };
      await cdp.send('Input.dispatchKeyEvent', { type: 'rawKeyDown', ...key });
      await cdp.send('Input.dispatchKeyEvent', { type: 'keyUp', ...key });
      roundTrips.push(performance.now() - sentAt);
      await new Promise((resolve) => setTimeout(resolve, INPUT_EVERY_MS));
    }
  })();
  try {
    // Polled every 100 ms: Playwright's default polls in every animation frame, which would
    // make the page draw frames it otherwise would not.
    await page.waitForFunction((n) => Number(document.getElementById('received-total')?.dataset.count) >= n, startCount + count,
      { polling: 100, timeout: timeoutMs });
  } catch (error) {
    throw new Error(`the console counted ${(await counted()) - startCount} of ${count} within ${timeoutMs} ms `
      + `(publisher: ${output.trim() || 'still running'}): ${/** @type {Error} */ (error).message}`);
  } finally {
    pressing = false;
    await presser;
  }
  const ms = Date.now() - started;
  const after = await metrics();
  const code = await Promise.race([exited, new Promise((resolve) => setTimeout(() => resolve('still running'), timeoutMs))]);
  if (code !== 0) {
    if (publisher.exitCode === null) publisher.kill('SIGKILL');
    throw new Error(`the publisher failed (${code}): ${output}`);
  }
  const published = JSON.parse(output.trim().split('\n').at(-1) ?? '{}');
  const probe = await page.evaluate(() => /** @type {any} */ (globalThis).loadProbe);
  const spent = (/** @type {string} */ name) => after[name] - before[name];
  const wall = after.Timestamp - before.Timestamp;
  const sorted = (/** @type {number[]} */ values) => [...values].sort((a, b) => a - b);
  const inputs = sorted(probe.inputMs);
  const trips = sorted(roundTrips);
  return {
    count,
    ms,
    perSecondInPage: Math.round(count / (ms / 1000)),
    published,
    counted: (await counted()) - startCount,
    busyPercent: (100 * spent('TaskDuration')) / wall,
    seconds: {
      wall, tasks: spent('TaskDuration'), script: spent('ScriptDuration'), layout: spent('LayoutDuration'),
      style: spent('RecalcStyleDuration'),
    },
    longTasks: probe.longTasks.length,
    longestTaskMs: Math.max(0, ...probe.longTasks),
    inputs: inputs.length,
    inputMedianMs: inputs[Math.floor(inputs.length / 2)] ?? NaN,
    inputMaxMs: inputs.at(-1) ?? NaN,
    roundTripMaxMs: trips.at(-1) ?? NaN,
  };
}

/** One line of the figures, as the test and measure-console.js print them. @param {Awaited<ReturnType<typeof streamIntoConsole>>} f */
export function describeLoad(f) {
  const s = f.seconds;
  return `${f.count} messages at ${f.published.perSecond}/s from the publisher (behind its schedule at most ${f.published.behindMs} ms): `
    + `counted ${f.counted} in ${f.ms} ms (${f.perSecondInPage}/s in the page); main thread busy ${f.busyPercent.toFixed(1)}% `
    + `of ${s.wall.toFixed(2)} s (script ${s.script.toFixed(2)} s, layout ${s.layout.toFixed(2)} s, style ${s.style.toFixed(2)} s); `
    + `${f.longTasks} long tasks (longest ${f.longestTaskMs.toFixed(0)} ms); keypress to handler median `
    + `${f.inputMedianMs.toFixed(1)} ms, max ${f.inputMaxMs.toFixed(1)} ms over ${f.inputs} presses (DevTools round trip max ${f.roundTripMaxMs.toFixed(0)} ms)`;
}
