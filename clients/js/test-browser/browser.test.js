// The web console (/console) and the chat example in headless Chromium, against the real broker
// binary: pages load the client from the broker, send and receive, and survive a dropped
// connection. Chromium is $MBWS_CHROMIUM, else /usr/bin/chromium (Debian's `chromium`);
// `.ci/run` installs it. The console's screenshot goes to $MBWS_SCREENSHOT if set (docs/console.png
// was made so), else to the temp directory.

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { chromium } from 'playwright-core';

import { openBarePage } from '../testing/bare-chromium.js';
import { describeLoad, streamIntoConsole } from '../testing/console-load.js';
import { startBroker, startProxy, TIMEOUT_MS } from '../testing/harness.js';

const repository = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const MESSAGES = 1000;
const chromiumPath = process.env.MBWS_CHROMIUM ?? '/usr/bin/chromium';
/** The stream of the load test: LOAD_RATE messages a second for LOAD_SECONDS (env overrides them). */
const LOAD_RATE = Number(process.env.MBWS_CONSOLE_LOAD_RATE ?? 10000);
const LOAD_SECONDS = Number(process.env.MBWS_CONSOLE_LOAD_SECONDS ?? 3);
/** The console's history (console.html HISTORY_ROWS). */
const HISTORY_ROWS = 10000;

/** @type {Awaited<ReturnType<typeof startBroker>>} */
let broker;
/** @type {import('playwright-core').Browser} */
let browser;

before(async () => {
  broker = await startBroker();
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox'],
    timeout: TIMEOUT_MS,
  });
});
after(async () => {
  await browser?.close();
  await broker?.stop();
});

/**
 * A console page, connected (through `url` if given) and subscribed to `address`. The page counts
 * the WebSockets opened on its own thread (`pageSockets`; a Worker's are not counted); with
 * `noWorker` it has no Worker constructor, as in a browser without Workers.
 * @param {string} address
 * @param {{mode?: string, url?: string, noWorker?: boolean}} [options]
 */
async function consolePage(address, options = {}) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 780 } });
  page.setDefaultTimeout(TIMEOUT_MS);
  const errors = /** @type {string[]} */ ([]);
  page.on('pageerror', (error) => errors.push(error.message));
  await page.addInitScript((noWorker) => {
    const scope = /** @type {any} */ (globalThis);
    const Native = scope.WebSocket;
    scope.pageSockets = 0;
    scope.WebSocket = class extends Native {
      /** @param {any[]} args */
      constructor(...args) { super(...args); scope.pageSockets += 1; }
    };
    if (noWorker) delete scope.Worker;
  }, options.noWorker ?? false);
  await page.goto(`http://${broker.host}:${broker.port}/console`);
  if (options.url) await page.fill('#url', options.url);
  await page.click('#connect');
  await page.waitForSelector('#state[data-state="open"]');
  await page.fill('#sub-address', address);
  if (options.mode) await page.selectOption('#sub-mode', options.mode);
  await page.click('#subscribe');
  await page.waitForSelector('#subscriptions li');
  return { page, errors };
}

/**
 * Sends `count` messages `m0`... from the console's send form.
 * @param {import('playwright-core').Page} page
 * @param {string} address
 * @param {number} count
 */
async function sendFromPage(page, address, count) {
  await page.fill('#send-address', address);
  await page.fill('#send-body', 'm{i}');
  await page.fill('#send-count', String(count));
  await page.click('#send');
}

/** @param {import('playwright-core').Page} page @param {number} count */
async function waitForReceived(page, count) {
  await page.waitForFunction((n) => Number(document.getElementById('received-total')?.dataset.count) >= n, count);
}

/**
 * The bodies in the console's message history, oldest first (the page keeps them in memory and
 * renders the rows in view). @param {import('playwright-core').Page} page
 * @returns {Promise<string[]>}
 */
function historyBodies(page) {
  return page.evaluate(() => /** @type {any} */ (globalThis).mbwsConsole.history());
}

/**
 * The rows the message list shows now: [history index, body], top to bottom.
 * @param {import('playwright-core').Page} page
 * @returns {Promise<Array<[number, string]>>}
 */
function renderedRows(page) {
  return page.$$eval('#log tr:not([hidden])', (rows) => rows.map((row) => /** @type {[number, string]} */ (
    [Number(/** @type {HTMLElement} */ (row).dataset.index), row.children[4].textContent ?? ''])));
}

/** Waits until the list has drawn `count` rows of history. @param {import('playwright-core').Page} page @param {number} count */
async function waitForRows(page, count) {
  await page.waitForFunction((n) => Number(document.getElementById('log-wrap')?.dataset.rows) >= n, count);
}

/**
 * Where the console's session runs ('worker' or 'page'), and how many WebSockets the page's own
 * thread opened. @param {import('playwright-core').Page} page
 * @returns {Promise<{path: string, pageSockets: number}>}
 */
function receivePath(page) {
  return page.evaluate(() => {
    const scope = /** @type {any} */ (globalThis);
    return { path: scope.mbwsConsole.receivePath(), pageSockets: scope.pageSockets };
  });
}

/**
 * Every message shown once: the history holds each body once, and the page counted each once.
 * @param {import('playwright-core').Page} page @param {number} count
 */
async function assertShownExactlyOnce(page, count) {
  assertExactlyOnce(await historyBodies(page), count);
  assert.equal(await page.getAttribute('#received-total', 'data-count'), String(count), 'nothing received twice');
}

/** @param {string[]} bodies @param {number} count */
function assertExactlyOnce(bodies, count) {
  assert.equal(bodies.length, count, 'one history entry per message');
  assert.deepEqual([...new Set(bodies)].sort(), Array.from({ length: count }, (_, i) => `m${i}`).sort());
}

/**
 * The list shows the newest entries while it follows, and can be scrolled to any entry: with
 * the keyboard (Home) to the oldest, and to one in the middle.
 * @param {import('playwright-core').Page} page @param {string[]} bodies the history, oldest first
 */
async function assertListShowsAndScrolls(page, bodies) {
  const atBottom = await renderedRows(page);
  assert.ok(atBottom.length >= 5, `the list shows rows (${atBottom.length})`);
  assert.deepEqual(atBottom.at(-1), [bodies.length - 1, bodies.at(-1)], 'the newest message is the last row shown');
  for (const [index, body] of atBottom) assert.equal(body, bodies[index]);
  await page.focus('#log-wrap');
  await page.keyboard.press('Home');
  await page.waitForFunction(() => document.getElementById('log-wrap')?.dataset.first === '0');
  assert.deepEqual((await renderedRows(page))[0], [0, bodies[0]], 'Home scrolls to the oldest');
  const middle = Math.floor(bodies.length / 2);
  await page.evaluate((px) => { /** @type {HTMLElement} */ (document.getElementById('log-wrap')).scrollTop = px; }, middle * 20);
  await page.waitForFunction((n) => document.getElementById('log-wrap')?.dataset.first === String(n), middle);
  const rows = await renderedRows(page);
  assert.deepEqual(rows[0], [middle, bodies[middle]], 'scrolled to the middle');
  for (const [index, body] of rows) assert.equal(body, bodies[index]);
  await page.keyboard.press('End');
  await page.waitForFunction((n) => Number(document.getElementById('log-wrap')?.dataset.first) > n, middle);
}

test(`console: ${MESSAGES} messages sent from the page are all shown, in this page and a second one`, async () => {
  const address = 'browser/console';
  const second = await consolePage(address, { mode: 'multicast' });
  const first = await consolePage(address);
  const started = Date.now();
  await sendFromPage(first.page, address, MESSAGES);
  await waitForReceived(first.page, MESSAGES);
  const elapsedMs = Date.now() - started;
  await waitForReceived(second.page, MESSAGES);
  await first.page.waitForFunction((n) => document.getElementById('send-status')?.dataset.done === String(n), MESSAGES);
  // The list is drawn once per animation frame: wait for the frame that drew the last one.
  await waitForRows(first.page, MESSAGES);
  await waitForRows(second.page, MESSAGES);
  const bodies = await historyBodies(first.page);
  await assertShownExactlyOnce(first.page, MESSAGES);
  await assertShownExactlyOnce(second.page, MESSAGES);
  assert.equal(await first.page.textContent('#receipted-total'), String(MESSAGES));
  // The receive path is off the page's thread: the session runs in the page's one Worker, and
  // the page itself opened no WebSocket.
  for (const { page } of [first, second]) {
    assert.deepEqual(await receivePath(page), { path: 'worker', pageSockets: 0 });
    assert.deepEqual(page.workers().map((worker) => new URL(worker.url()).pathname), ['/console-session.js']);
  }
  const status = await first.page.textContent('#send-status');
  console.log(`console: ${MESSAGES} messages sent and shown in ${elapsedMs} ms `
    + `(${Math.round(MESSAGES / (elapsedMs / 1000))} per second in the page); ${status}`);
  const screenshot = process.env.MBWS_SCREENSHOT ?? path.join(tmpdir(), `mbws-console-${process.pid}.png`);
  await first.page.screenshot({ path: screenshot });
  assert.ok(statSync(screenshot).size > 10000, 'a screenshot with something on it');
  await assertListShowsAndScrolls(first.page, bodies); // After the screenshot: it focuses the list.
  assert.deepEqual([...first.errors, ...second.errors], []);
  await first.page.close();
  await second.page.close();
});

// Issue 12: "the console must stay responsive at 10,000 messages per second". The page is driven
// over DevTools with Runtime, Performance and Input only (testing/bare-chromium.js): Playwright
// enables DevTools' Network domain, whose event per WebSocket frame costs the browser more CPU
// than the page itself at this rate, and on a 2-core machine starves the publisher. The bounds
// are generous for a loaded machine; the figures are printed (README "From a web page" has them).
test(`console at ${LOAD_RATE} messages a second for ${LOAD_SECONDS} s: every one counted, a bounded history, the page's thread mostly idle`, async () => {
  const count = LOAD_RATE * LOAD_SECONDS;
  const page = await openBarePage(chromiumPath, `http://${broker.host}:${broker.port}/console`, { timeoutMs: TIMEOUT_MS });
  try {
    await page.evaluate((url) => {
      const field = /** @type {HTMLInputElement} */ (document.getElementById('url'));
      field.value = url;
      document.getElementById('connect')?.click();
    }, broker.url);
    await page.waitForFunction(() => document.getElementById('state')?.dataset.state === 'open');
    await page.evaluate(() => {
      /** @type {HTMLInputElement} */ (document.getElementById('sub-address')).value = 'browser/load';
      document.getElementById('subscribe')?.click();
    });
    await page.waitForFunction(() => document.querySelector('#subscriptions li') !== null);
    const figures = await streamIntoConsole(page, page, { url: broker.url, address: 'browser/load', count, rate: LOAD_RATE, timeoutMs: 60000 });
    console.log(`console under load: ${describeLoad(figures)}`);
    if (figures.published.perSecond < LOAD_RATE * 0.9) {
      console.log(`console under load: the publisher reached ${figures.published.perSecond} of ${LOAD_RATE} messages a second (a loaded machine)`);
    }
    // Every message counted once: the counter is exact, and the history is the newest
    // HISTORY_ROWS, in order (one anycast consumer), the newest drawn as the last row.
    assert.equal(figures.counted, count, 'the console counted every message once');
    await page.waitForFunction((n) => document.getElementById('log-wrap')?.dataset.rows === String(n), HISTORY_ROWS);
    const shown = await page.evaluate(() => {
      const rows = [...document.querySelectorAll('#log tr')];
      const last = rows.filter((row) => !(/** @type {HTMLElement} */ (row).hidden)).at(-1);
      return { history: /** @type {any} */ (globalThis).mbwsConsole.history(), rows: rows.length, last: last?.children[4].textContent };
    });
    assert.deepEqual(shown.history, Array.from({ length: HISTORY_ROWS }, (_, i) => `p${count - HISTORY_ROWS + i}`), 'the newest messages, in order');
    assert.ok(shown.rows <= 60, `a fixed pool of rows in the DOM (${shown.rows}), not one per message`);
    assert.equal(shown.last, `p${count - 1}`, 'the newest message is the last row shown');
    assert.equal(Number(await page.evaluate(() => document.getElementById('received-total')?.dataset.count)), count, 'nothing counted twice');
    // Responsive: the thread is busy well under half the time (about 15% measured on a loaded
    // 2-core machine; 60% before the drawing was throttled), long tasks are rare, a keypress is
    // handled promptly.
    assert.ok(figures.busyPercent < 40, `the page's main thread was busy ${figures.busyPercent.toFixed(1)}% of the stream (bound 40%)`);
    assert.ok(figures.longTasks <= 5, `${figures.longTasks} tasks over 50 ms (bound 5)`);
    assert.ok(figures.inputs >= 3, `keys were pressed during the stream (${figures.inputs})`);
    assert.ok(figures.inputMaxMs < 250, `a keypress waited at most ${figures.inputMaxMs.toFixed(0)} ms for the page (bound 250 ms)`);
  } finally {
    await page.close();
  }
});

test(`console without Workers: the page runs the session itself, and shows ${MESSAGES} messages once each`, async () => {
  const address = 'browser/no-worker';
  const { page, errors } = await consolePage(address, { noWorker: true });
  await sendFromPage(page, address, MESSAGES);
  await waitForReceived(page, MESSAGES);
  await page.waitForFunction((n) => document.getElementById('send-status')?.dataset.done === String(n), MESSAGES);
  await waitForRows(page, MESSAGES);
  await assertShownExactlyOnce(page, MESSAGES);
  assert.equal(await page.textContent('#receipted-total'), String(MESSAGES));
  assert.deepEqual(await receivePath(page), { path: 'page', pageSockets: 1 });
  assert.deepEqual(page.workers(), []);
  assert.deepEqual(errors, []);
  await page.close();
});

test('console: the address panel lists, from the admin API, an address the page sent to', async () => {
  const token = 'console-admin-token-0123456789';
  const withAdmin = await startBroker(['--admin-listen', '127.0.0.1:0', '--admin-token', token]);
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 780 } });
    page.setDefaultTimeout(TIMEOUT_MS);
    const errors = /** @type {string[]} */ ([]);
    page.on('pageerror', (error) => errors.push(error.message));
    await page.goto(`http://${withAdmin.host}:${withAdmin.port}/console`);
    await page.click('#connect');
    await page.waitForSelector('#state[data-state="open"]');
    // Nobody consumes: the five messages wait in the queue, depth 5.
    const address = 'browser/panel';
    await sendFromPage(page, address, 5);
    await page.waitForFunction(() => document.getElementById('send-status')?.dataset.done === '5');
    // Another origin than the page's, with a token: the browser's CORS preflight must pass.
    await page.fill('#admin-url', `http://${withAdmin.admin}`);
    await page.fill('#admin-token', token);
    await page.click('#admin-watch');
    const cells = await page.waitForFunction((name) => {
      const row = [...document.querySelectorAll('#address-rows tr')].find((tr) => tr instanceof HTMLElement && tr.dataset.address === name);
      return row ? [...row.querySelectorAll('td')].map((cell) => cell.textContent) : null;
    }, address);
    const [name, routing, depth, consumers] = /** @type {string[]} */ (await cells.jsonValue());
    assert.deepEqual([name, routing, depth, consumers], [address, 'anycast', '5', '0']);
    assert.match(await page.textContent('#admin-status') ?? '', /addresses at/);
    assert.deepEqual(errors, []);
    await page.close();
  } finally {
    await withAdmin.stop();
  }
});

test('console: a page survives the broker dropping its connection, without losing a message', async () => {
  const proxy = await startProxy(broker.port);
  try {
    const address = 'browser/resume';
    const { page, errors } = await consolePage(address, { url: proxy.url });
    // What the page logs, for the assertions' messages (a resume that went wrong says why here).
    const logged = /** @type {string[]} */ ([]);
    page.on('console', (message) => logged.push(`${message.type()}: ${message.text()}`));
    page.on('pageerror', (error) => logged.push(`pageerror: ${error.stack ?? error.message}`));
    // Every state the page shows from now on, in order (a MutationObserver misses none).
    await page.evaluate(() => {
      const state = /** @type {HTMLElement} */ (document.getElementById('state'));
      const states = /** @type {string[]} */ ([]);
      /** @type {any} */ (globalThis).shownStates = states;
      new MutationObserver(() => { if (states.at(-1) !== state.dataset.state) states.push(state.dataset.state ?? ''); })
        .observe(state, { attributes: true, attributeFilter: ['data-state'] });
    });
    // The connection stalls after 16 KiB from the broker (receipts and deliveries of a few
    // hundred messages; all 1,000 take more) and is then cut: the cut surely comes while
    // receipts and deliveries are in flight, however fast the page is.
    const stalled = proxy.stallAfter(16 * 1024);
    await sendFromPage(page, address, MESSAGES);
    await stalled;
    await waitForReceived(page, 1);
    const before = Number(await page.getAttribute('#received-total', 'data-count'));
    assert.ok(before < MESSAGES, `the page has not received every message before the cut (${before})`);
    proxy.cut();
    /** @type {string[]} */
    let shownStates = [];
    const context = () => `states shown: ${JSON.stringify(shownStates)}; the page logged:\n${logged.join('\n')}`;
    // The page resumes: it shows `reconnecting`, then `open` again.
    await page.waitForFunction(() => {
      const states = /** @type {string[]} */ (/** @type {any} */ (globalThis).shownStates);
      const lost = states.indexOf('reconnecting');
      return lost >= 0 && states.indexOf('open', lost) > lost;
    }).catch(async (error) => {
      shownStates = await page.evaluate(() => /** @type {any} */ (globalThis).shownStates);
      throw new Error(`the page did not show reconnecting, then open (${error.message}); ${context()}`);
    });
    await waitForReceived(page, MESSAGES);
    await page.waitForFunction((n) => document.getElementById('send-status')?.dataset.done === String(n), MESSAGES);
    await waitForRows(page, MESSAGES);
    shownStates = await page.evaluate(() => /** @type {any} */ (globalThis).shownStates);
    await assertShownExactlyOnce(page, MESSAGES);
    assert.equal(await page.textContent('#receipted-total'), String(MESSAGES), `every SEND receipted; ${context()}`);
    assert.deepEqual(shownStates, ['reconnecting', 'open'], `one resume, and open after it; ${context()}`);
    assert.equal(await page.getAttribute('#state', 'data-state'), 'open');
    assert.deepEqual(errors, [], context());
    console.log(`console resume: cut after ${before} of ${MESSAGES} messages had reached the page`);
    await page.close();
  } finally {
    await proxy.stop();
  }
});

test('chat example: two pages talk in the multicast room, and the anycast bot answers', async () => {
  const chat = pathToFileURL(path.join(repository, 'examples/chat.html'));
  /** @param {string} query */
  const open = async (query) => {
    const page = await browser.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    await page.goto(`${chat.href}?broker=${encodeURIComponent(broker.url)}&${query}`);
    await page.waitForSelector('body[data-ready="true"]');
    return page;
  };
  const alice = await open('name=alice&bot=1');
  const bob = await open('name=bob');
  /** @param {import('playwright-core').Page} page @param {string} line */
  const say = async (page, line) => {
    await page.fill('#line', line);
    await page.press('#line', 'Enter');
  };
  /** @param {import('playwright-core').Page} page @param {string} text */
  const sees = (page, text) => page.waitForFunction(
    (wanted) => [...document.querySelectorAll('#messages li')].some((item) => item.textContent === wanted), text);
  await say(bob, 'hello');
  await Promise.all([sees(alice, 'bob: hello'), sees(bob, 'bob: hello')]);
  await say(alice, 'hi bob');
  await sees(bob, 'alice: hi bob');
  await say(bob, '/bot echo ping');
  await Promise.all([sees(alice, 'bot: ping'), sees(bob, 'bot: ping')]);
  await alice.close();
  await bob.close();
});

test("the README's snippet (From a web page) works in a page opened from disk", async () => {
  const readme = readFileSync(path.join(repository, 'README.md'), 'utf8');
  const snippet = readme.split('## From a web page')[1]?.match(/```html\n([\s\S]*?)```/)?.[1];
  assert.ok(snippet, 'README.md has an html block under "From a web page"');
  const dir = mkdtempSync(path.join(tmpdir(), 'mbws-snippet-'));
  try {
    const file = path.join(dir, 'snippet.html');
    writeFileSync(file, snippet.replaceAll('127.0.0.1:7447', `${broker.host}:${broker.port}`));
    const page = await browser.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    const errors = /** @type {string[]} */ ([]);
    page.on('pageerror', (error) => errors.push(error.message));
    await page.goto(pathToFileURL(file).href);
    await page.waitForFunction(() => document.querySelector('#log li')?.textContent?.startsWith('hello from '));
    assert.deepEqual(errors, []);
    await page.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
