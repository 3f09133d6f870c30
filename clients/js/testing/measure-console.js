// Measures the console under load (not a test): N messages sent from the page and shown, with
// the broker at $MBWS_BROKER. Usage: node testing/measure-console.js [N] [--external] [--from-disk] [--rate R] [--frames] [--trace FILE]
// --rate R: testing/publish.js sends the N messages at R per second, steadily, while
// testing/console-load.js measures the page (main-thread busy share, long tasks, keypress latency).
// --external: the page only subscribes; the `mbws` CLI beside the broker ($MBWS_CLI, default
// target/release/mbws) sends the N messages as fast as the broker takes them, so the page
// receives at whatever rate it can keep up with (the broker holds back the rest by credit).
// --from-disk: the page gets console.html, console-session.js and mbws.js from this directory, not from the broker
// (Playwright answers its requests; --bare: a local HTTP server): measures an edit without
// rebuilding the broker.
// --bare: drives Chromium over DevTools with Runtime and Performance only (testing/bare-chromium.js);
// Playwright enables DevTools' Network domain, whose per-frame events cost the page and the browser
// more than the page's own work at these rates. --frames and --trace need Playwright.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { openBarePage } from './bare-chromium.js';
import { describeLoad, streamIntoConsole } from './console-load.js';
import { startBroker } from './harness.js';

const count = Number(process.argv[2] ?? 10000);
const external = process.argv.includes('--external');
const bare = process.argv.includes('--bare');
const rateAt = process.argv.indexOf('--rate');
const rate = rateAt > 0 ? Number(process.argv[rateAt + 1]) : 0;
const chromiumPath = process.env.MBWS_CHROMIUM ?? '/usr/bin/chromium';
const timeoutMs = Number(process.env.MBWS_MEASURE_TIMEOUT_MS ?? 120000);
const broker = await startBroker();
/** @type {http.Server | null} */
let files = null;
let pageUrl = `http://${broker.host}:${broker.port}/console`;
const fromDisk = process.argv.includes('--from-disk');
if (fromDisk && bare) {
  const here = process.env.MBWS_CONSOLE_DIR ? path.join(process.env.MBWS_CONSOLE_DIR, 'testing') : path.dirname(fileURLToPath(import.meta.url));
  files = http.createServer((request, response) => {
    const asked = (request.url ?? '').split('?')[0].slice(1);
    const name = ['mbws.js', 'console-session.js'].includes(asked) ? asked : 'console.html';
    response.writeHead(200, { 'content-type': name.endsWith('.js') ? 'text/javascript' : 'text/html', 'cache-control': 'no-store' });
    response.end(readFileSync(path.join(here, '..', name)));
  });
  await new Promise((resolve) => files?.listen(0, '127.0.0.1', () => resolve(undefined)));
  pageUrl = `http://127.0.0.1:${/** @type {any} */ (files.address()).port}/console`;
}
let browser = null;
let page;
let closePage = async () => {};
try {
  if (bare) {
    page = await openBarePage(chromiumPath, pageUrl, { timeoutMs });
    closePage = () => page.close();
  } else {
    // A page that Playwright answers (--from-disk) counts as public for Chromium's Local Network
    // Access checks, which would block its WebSocket to the loopback broker.
    const args = ['--no-sandbox', ...(fromDisk ? ['--disable-features=LocalNetworkAccessChecks'] : [])];
    browser = await chromium.launch({ executablePath: chromiumPath, args });
    page = await browser.newPage({ viewport: { width: 1100, height: 780 } });
    page.setDefaultTimeout(timeoutMs);
    page.on('pageerror', (error) => console.error(`page error: ${error.message}`));
    if (fromDisk) {
      const here = process.env.MBWS_CONSOLE_DIR ? path.join(process.env.MBWS_CONSOLE_DIR, 'testing') : path.dirname(fileURLToPath(import.meta.url));
      await page.route('**/console', (route) => route.fulfill({ path: path.join(here, '../console.html'), contentType: 'text/html' }));
      for (const name of ['mbws.js', 'console-session.js']) {
        await page.route(`**/${name}`, (route) => route.fulfill({ path: path.join(here, '..', name), contentType: 'text/javascript' }));
      }
    }
    await page.goto(pageUrl);
  }
  // Only evaluate and waitForFunction, which both drivers have.
  const fill = (values) => page.evaluate((pairs) => { for (const [id, value] of pairs) document.getElementById(id).value = value; }, values);
  const click = (id) => page.evaluate((target) => document.getElementById(target).click(), id);
  await fill([['url', `ws://${broker.host}:${broker.port}/`]]);
  await click('connect');
  await page.waitForFunction(() => document.getElementById('state').dataset.state === 'open');
  const receivePath = await page.evaluate(() => globalThis.mbwsConsole.receivePath?.() ?? 'page (a console without a Worker)');
  await fill([['sub-address', 'measure']]);
  await click('subscribe');
  await page.waitForFunction(() => document.querySelector('#subscriptions li') !== null);
  if (rate > 0) {
    // --rate R: testing/publish.js sends the N messages at R per second (console-load.js measures).
    const cdp = bare ? page : await page.context().newCDPSession(page);
    const traceAt = bare ? -1 : process.argv.indexOf('--trace');
    if (traceAt > 0) {
      await browser.startTracing(page, { path: process.argv[traceAt + 1], categories: ['devtools.timeline', 'toplevel', 'v8', 'disabled-by-default-devtools.timeline', 'blink', 'renderer.scheduler'] });
    }
    const figures = await streamIntoConsole(page, cdp, { url: `ws://${broker.host}:${broker.port}/`, address: 'measure', count, rate, timeoutMs });
    if (traceAt > 0) await browser.stopTracing();
    console.log(`${bare ? 'bare' : 'playwright'} (receive path: ${receivePath}): ${describeLoad(figures)}`);
  } else {
    await fill([['send-address', 'measure'], ['send-body', 'm{i}'], ['send-count', String(count)]]);
    // Longest gap between animation frames while the messages flow: how responsive the page stays.
    await page.evaluate(() => {
      window.longestFrameGapMs = 0;
      let last = performance.now();
      const frame = (now) => { window.longestFrameGapMs = Math.max(window.longestFrameGapMs, now - last); last = now; requestAnimationFrame(frame); };
      requestAnimationFrame(frame);
    });
    // Main-thread time (DevTools Performance metrics, in seconds) over the run: 1 - busy / wall is
    // how idle the page stayed.
    const cdp = bare ? page : await page.context().newCDPSession(page);
    await cdp.send('Performance.enable');
    const metrics = async () => Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((m) => [m.name, m.value]));
    // --frames: counts the WebSocket frames the page sends (DevTools' Network events; they cost a
    // little themselves, so the figures above are best taken without it).
    let framesSent = 0;
    const frames = !bare && process.argv.includes('--frames');
    if (frames) {
      await cdp.send('Network.enable');
      cdp.on('Network.webSocketFrameSent', () => { framesSent += 1; });
    }
    // --trace FILE: a Chromium trace of the run (every process), for chrome://tracing or Perfetto.
    const traceAt = bare ? -1 : process.argv.indexOf('--trace');
    if (traceAt > 0) {
      await browser.startTracing(page, { path: process.argv[traceAt + 1], categories: ['devtools.timeline', 'toplevel', 'v8', 'disabled-by-default-devtools.timeline', 'blink', 'renderer.scheduler'] });
    }
    const before = await metrics();
    const started = Date.now();
    let publisher;
    if (external) {
      const cli = process.env.MBWS_CLI ?? path.join(path.dirname(process.env.MBWS_BROKER ?? 'target/release/mbws-broker'), 'mbws');
      publisher = spawn(cli, ['--url', `ws://${broker.host}:${broker.port}/`, 'send', 'measure', 'm', '--count', String(count)], { stdio: 'inherit' });
    } else {
      await click('send');
    }
    await page.waitForFunction((n) => Number(document.getElementById('received-total').dataset.count) >= n, count);
    const ms = Date.now() - started;
    const afterRun = await metrics();
    if (traceAt > 0) await browser.stopTracing();
    const spent = (name) => afterRun[name] - before[name];
    const busy = spent('TaskDuration');
    const wall = afterRun.Timestamp - before.Timestamp;
    const gap = await page.evaluate(() => window.longestFrameGapMs);
    const rows = await page.evaluate(() => Number(document.getElementById('log-wrap')?.dataset.rows ?? document.querySelectorAll('#log tr').length));
    console.log(`${bare ? 'bare' : 'playwright'}: ${count} messages ${external ? 'received' : 'sent and received'} in ${ms} ms `
      + `(${Math.round(count / (ms / 1000))} per second in the page); longest frame gap ${gap.toFixed(0)} ms; ${rows} rows kept`);
    console.log(`receive path: ${receivePath}`);
    console.log(`main thread: idle ${(100 * (1 - busy / wall)).toFixed(0)}% of ${wall.toFixed(2)} s; script ${spent('ScriptDuration').toFixed(2)} s, `
      + `layout ${spent('LayoutDuration').toFixed(2)} s, style ${spent('RecalcStyleDuration').toFixed(2)} s, all tasks ${busy.toFixed(2)} s`);
    if (frames) console.log(`${framesSent} WebSocket frames sent by the page`);
    if (!external) console.log(await page.evaluate(() => document.getElementById('send-status').textContent));
    if (publisher) await new Promise((resolve) => publisher.on('exit', resolve));
  }
} finally {
  await closePage();
  await browser?.close();
  files?.close();
  await broker.stop();
}
