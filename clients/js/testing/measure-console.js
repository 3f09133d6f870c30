// Measures the console under load (not a test): N messages sent from the page and shown, with
// the broker at $MBWS_BROKER. Usage: node testing/measure-console.js [N] [--external]
// --external: the page only subscribes; the `mbws` CLI beside the broker ($MBWS_CLI, default
// target/release/mbws) sends the N messages as fast as the broker takes them, so the page
// receives at whatever rate it can keep up with (the broker holds back the rest by credit).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startBroker } from './harness.js';

const count = Number(process.argv[2] ?? 10000);
const external = process.argv.includes('--external');
const broker = await startBroker();
const browser = await chromium.launch({ executablePath: process.env.MBWS_CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox'] });
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 780 } });
  page.setDefaultTimeout(120000);
  await page.goto(`http://${broker.host}:${broker.port}/console`);
  await page.click('#connect');
  await page.waitForSelector('#state[data-state="open"]');
  await page.fill('#sub-address', 'measure');
  await page.click('#subscribe');
  await page.waitForSelector('#subscriptions li');
  await page.fill('#send-address', 'measure');
  await page.fill('#send-body', 'm{i}');
  await page.fill('#send-count', String(count));
  // Longest gap between animation frames while the messages flow: how responsive the page stays.
  await page.evaluate(() => {
    window.longestFrameGapMs = 0;
    let last = performance.now();
    const frame = (now) => { window.longestFrameGapMs = Math.max(window.longestFrameGapMs, now - last); last = now; requestAnimationFrame(frame); };
    requestAnimationFrame(frame);
  });
  const started = Date.now();
  let publisher;
  if (external) {
    const cli = process.env.MBWS_CLI ?? path.join(path.dirname(process.env.MBWS_BROKER ?? 'target/release/mbws-broker'), 'mbws');
    publisher = spawn(cli, ['--url', `ws://${broker.host}:${broker.port}/`, 'send', 'measure', 'm', '--count', String(count)], { stdio: 'inherit' });
  } else {
    await page.click('#send');
  }
  await page.waitForFunction((n) => Number(document.getElementById('received-total').dataset.count) >= n, count);
  const ms = Date.now() - started;
  const gap = await page.evaluate(() => window.longestFrameGapMs);
  const rows = await page.$$eval('#log tr', (r) => r.length);
  console.log(`${count} messages sent and shown in ${ms} ms (${Math.round(count / (ms / 1000))} per second in the page); longest frame gap ${gap.toFixed(0)} ms; ${rows} rows kept`);
  if (!external) console.log(await page.textContent('#send-status'));
  if (publisher) await new Promise((resolve) => publisher.on('exit', resolve));
} finally {
  await browser.close();
  await broker.stop();
}
