// The editor types: mbws.js's JSDoc (and console-session.js's) type-checks under `strict`, the
// committed mbws.d.ts is what `npm run types` writes from it, and a TypeScript user
// (testing/consumer.ts) compiles against it.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const tsc = path.join(root, 'node_modules/typescript/bin/tsc');

/** @param {string[]} args */
function runTsc(args) {
  const result = spawnSync(process.execPath, [tsc, ...args], { cwd: root, encoding: 'utf8', timeout: 120000 });
  assert.equal(result.status, 0, `tsc ${args.join(' ')} failed (run \`npm ci\` in clients/js first):\n${result.stdout}${result.stderr}`);
}

test('mbws.js and console-session.js type-check (tsc --noEmit, strict, checkJs)', () => {
  runTsc(['-p', 'tsconfig.json']);
});

test('mbws.d.ts is up to date with the JSDoc (npm run types)', () => {
  const out = mkdtempSync(path.join(tmpdir(), 'mbws-types-'));
  try {
    runTsc(['-p', 'tsconfig.types.json', '--outDir', out]);
    const fresh = readFileSync(path.join(out, 'mbws.d.ts'), 'utf8');
    assert.equal(readFileSync(path.join(root, 'mbws.d.ts'), 'utf8'), fresh, 'run `npm run types` in clients/js and commit mbws.d.ts');
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test('a TypeScript user compiles against mbws.d.ts', () => {
  runTsc(['-p', 'tsconfig.consumer.json']);
});
