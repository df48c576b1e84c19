/**
 * Packaging test (`npm run test:package`): what a user installs from the registry works.
 *
 * 1. `npm pack` (prepack builds dist/), then `npm install <tarball> nodemailer` into a fresh project
 *    in the OS temp directory;
 * 2. the tarball holds dist/, README.md, CHANGELOG.md, LICENSE and package.json only;
 * 3. an ES module `import`s the package and a CommonJS file `require`s it: each builds a
 *    BindingPoolTransport with a route, checks `name` / `version`, hands it to
 *    `nodemailer.createTransport()` and sends one message with `binding: 'mta1'` to a loopback
 *    SMTP server (which sees the binding's EHLO name);
 * 4. a TypeScript consumer is type-checked against the installed package with this repo's tsc,
 *    under `module: node16` (an .mts file and a .cts file, so both the `import` and the `require`
 *    types are used) and under `moduleResolution: bundler`. It passes `binding` to sendMail()
 *    without a cast (the SendMailOptions augmentation reaches the Nodemailer types the consumer
 *    uses) and `@ts-expect-error` marks misspelt options, so tsc fails if they stop being errors.
 *
 * KEEP_PACKAGE_TEST_DIR=1 keeps the temporary project for a look after the run.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const repoRequire = createRequire(join(repo, 'package.json'));
const pkg = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'));
// Under `npm run`, the npm that runs this script; else the one on PATH.
const npm = process.env.npm_execpath ? [process.execPath, process.env.npm_execpath] : ['npm'];
const tsc = repoRequire.resolve('typescript/bin/tsc');
const started = Date.now();

const tmp = mkdtempSync(join(tmpdir(), 'nodemailer-binding-pool-package-'));
const app = join(tmp, 'app');
let server;
let ok = false;

function step(message) {
  console.log(`[package] ${((Date.now() - started) / 1000).toFixed(1)}s ${message}`);
}

async function sh(file, args, cwd, env = {}) {
  // npm run exports this repo as npm_config_local_prefix: an npm started in the temporary project must not see it.
  const { npm_config_local_prefix: _, ...inherited } = process.env;
  try {
    return await run(file, args, { cwd, env: { ...inherited, ...env }, maxBuffer: 16 * 1024 * 1024, timeout: 120_000 });
  } catch (err) {
    throw new Error(`${[file, ...args].join(' ')} (in ${cwd}) failed:\n${err.stdout ?? ''}${err.stderr ?? ''}`, { cause: err });
  }
}

try {
  // 1. Pack and install.
  step('npm pack');
  await sh(npm[0], [...npm.slice(1), 'pack', '--pack-destination', tmp], repo);
  const tarball = readdirSync(tmp).find((f) => f.endsWith('.tgz'));
  assert.ok(tarball, 'npm pack made no tarball');

  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'package-test-consumer', version: '1.0.0', private: true }, null, 2));
  step(`npm install ${tarball}`);
  await sh(
    npm[0],
    [...npm.slice(1), 'install', '--no-audit', '--no-fund', '--prefer-offline', join(tmp, tarball), `nodemailer@${pkg.peerDependencies.nodemailer}`],
    app,
  );

  // 2. Tarball contents.
  const installed = join(app, 'node_modules', pkg.name);
  const top = readdirSync(installed).sort();
  const expected = ['CHANGELOG.md', 'LICENSE', 'README.md', 'dist', 'package.json'].filter((f) => f !== 'README.md' || readdirSync(repo).includes(f));
  assert.deepEqual(top, expected, 'files in the tarball');
  assert.deepEqual(readdirSync(join(installed, 'dist')).sort(), ['cjs', 'esm']);
  assert.deepEqual(readdirSync(join(installed, 'dist', 'esm')).sort(), ['index.d.mts', 'index.mjs', 'queue']);
  assert.deepEqual(readdirSync(join(installed, 'dist', 'esm', 'queue')).sort(), ['index.d.mts', 'index.mjs']);
  step(`tarball holds ${top.join(', ')}`);

  // 3. Runtime: import and require, each sending one message to a loopback SMTP server.
  const received = [];
  const { SMTPServer } = repoRequire('smtp-server');
  server = new SMTPServer({
    authOptional: true,
    // No PTR lookups for the client's address: tests send nothing off the machine.
    disableReverseLookup: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        received.push({ ehlo: session.hostNameAppearsAs, to: session.envelope.rcptTo.map((r) => r.address) });
        callback();
      });
    },
  });
  await new Promise((resolve, reject) => server.listen(0, '127.0.0.1', resolve).once('error', reject));
  const port = String(server.server.address().port);

  for (const [file, source] of Object.entries(runtimeConsumers())) writeFileSync(join(app, file), source);
  for (const file of ['esm.mjs', 'cjs.cjs']) {
    const { stdout } = await sh(process.execPath, [file], app, { SMTP_PORT: port, EXPECTED_VERSION: pkg.version });
    step(`node ${file}: ${stdout.trim()}`);
  }
  assert.deepEqual(received.map((m) => m.ehlo).sort(), ['cjs.mta1.test', 'esm.mta1.test'], 'each consumer delivered one message over binding mta1');

  // The queue's subpath loads without its optional peers, and says what to install when used.
  for (const [file, source] of Object.entries(queueConsumers())) writeFileSync(join(app, file), source);
  for (const file of ['queue-esm.mjs', 'queue-cjs.cjs']) {
    const { stdout } = await sh(process.execPath, [file], app);
    step(`node ${file}: ${stdout.trim()}`);
  }
  // With them installed, the queue's types check too (below).
  step('npm install bullmq ioredis');
  await sh(
    npm[0],
    [
      ...npm.slice(1),
      'install',
      '--no-audit',
      '--no-fund',
      '--prefer-offline',
      `bullmq@${pkg.peerDependencies.bullmq}`,
      `ioredis@${pkg.peerDependencies.ioredis}`,
    ],
    app,
  );

  // 4. Types.
  for (const [file, source] of Object.entries(typeConsumers())) writeFileSync(join(app, file), source);
  for (const config of ['tsconfig.node16.json', 'tsconfig.bundler.json']) {
    await sh(process.execPath, [tsc, '-p', config], app);
    step(`tsc -p ${config}: no errors`);
  }

  ok = true;
  step('package test passed');
} finally {
  server?.close();
  if (ok && !process.env.KEEP_PACKAGE_TEST_DIR) rmSync(tmp, { recursive: true, force: true });
  else console.log(`[package] temporary project kept in ${app}`);
}

function runtimeConsumers() {
  // The same checks from both module systems; `load` differs.
  const body = (kind) => `
const transport = new BindingPoolTransport({
  bindings: { mta1: { name: '${kind}.mta1.test' } },
  route: { host: '127.0.0.1', port: Number(process.env.SMTP_PORT) },
});
assert.equal(transport.name, 'BindingPool');
assert.equal(transport.version, process.env.EXPECTED_VERSION);
assert.equal(VERSION, process.env.EXPECTED_VERSION);
assert.throws(() => new BindingPoolTransport({ maxOutboundConnections: 0 }), ConfigError);
assert.ok(new ConfigError('route', 'bad') instanceof BindingPoolError);

const transporter = nodemailer.createTransport(transport);
assert.equal(transporter.transporter, transport);
const info = await transporter.sendMail({ from: 'sender@example.com', to: 'rcpt@example.org', subject: 'package test', text: 'hello', binding: 'mta1' });
assert.deepEqual(info.accepted, ['rcpt@example.org']);
assert.equal(info.domains[0].binding, 'mta1');
await transport.close();
console.log('${kind}: BindingPoolTransport ' + transport.version + ', accepted ' + info.accepted.join(','));
`;
  return {
    'esm.mjs': `import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import nodemailer from 'nodemailer';
import { BindingPoolError, BindingPoolTransport, ConfigError, VERSION } from '${pkg.name}';
import * as namespace from '${pkg.name}';

// import and require give the same classes: one implementation behind both entry points.
assert.equal(createRequire(import.meta.url)('${pkg.name}').BindingPoolTransport, BindingPoolTransport);
assert.equal(namespace.default, undefined, 'no default export');
${body('esm')}`,
    'cjs.cjs': `const assert = require('node:assert/strict');
const nodemailer = require('nodemailer');
const { BindingPoolError, BindingPoolTransport, ConfigError, VERSION } = require('${pkg.name}');

(async () => {
${body('cjs')}
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
`,
  };
}

function queueConsumers() {
  const body = `
assert.equal(typeof MailQueue, 'function');
assert.equal(typeof MailWorker, 'function');
assert.deepEqual(DEFAULT_RETRY_SCHEDULE, ['1min', '5min', '15min', '1h', '4h']);
assert.throws(() => new MailQueue('outbound', { connection: 'redis://127.0.0.1:1' }), (err) => err.code === 'ECONFIG' && /npm install bullmq ioredis/.test(err.message));
console.log('queue subpath loads; without bullmq: ' + (() => { try { new MailQueue('q', { connection: 'redis://127.0.0.1:1' }); } catch (err) { return err.message.slice(0, 90); } })());
`;
  return {
    'queue-esm.mjs': `import assert from 'node:assert/strict';
import { MailQueue, MailWorker, DEFAULT_RETRY_SCHEDULE } from '${pkg.name}/queue';
${body}`,
    'queue-cjs.cjs': `const assert = require('node:assert/strict');
const { MailQueue, MailWorker, DEFAULT_RETRY_SCHEDULE } = require('${pkg.name}/queue');
${body}`,
  };
}

function typeConsumers() {
  // The type checks shared by every consumer; only the imports differ.
  const body = `
const options: BindingPoolOptions = {
  bindings: { mta1: { localAddress: '192.0.2.1', name: 'mta1.example.com', maxDeliveriesPerConnection: 100 } },
  bindingGroups: { outbound: { bindings: ['mta1'] } },
  domains: { 'example.org': { maxOutboundConnections: 2, tls: 'required' } },
  route: { host: 'smtp.example.com', port: 587, auth: { user: 'u', pass: 'p' } },
  selectBinding: (mail) => (mail.bindingGroup ? undefined : { bindingGroup: 'outbound' }),
};
const transport = new BindingPoolTransport(options);
const name: string = transport.name;
const stats: TransportStats = transport.stats();
const transporter = nodemailer.createTransport(transport);

export async function send(): Promise<void> {
  // binding / bindingGroup are SendMailOptions fields: no cast.
  const info = await transporter.sendMail({ from: 'sender@example.com', to: 'rcpt@example.org', binding: 'mta1' });
  await transporter.sendMail({ from: 'sender@example.com', to: 'rcpt@example.org', bindingGroup: 'outbound' });
  // sendMail resolves to this package's info.
  const typed: BindingPoolSentMessageInfo = info;
  const outcomes: RecipientOutcome[] = typed.domains.flatMap((d: DomainResult) => [...d.accepted, ...d.rejected, ...d.pending]);
  const pending: string[] = typed.pending;
  void outcomes, pending, name, stats;
  // @ts-expect-error binding is a name, not a number
  await transporter.sendMail({ from: 'sender@example.com', to: 'rcpt@example.org', binding: 1 });
}

// @ts-expect-error a misspelt option is a compile error
new BindingPoolTransport({ maxDeliveriesPerConection: 10 });
// @ts-expect-error in every scope
new BindingPoolTransport({ bindings: { mta1: { maxDeliveriesPerConection: 10 } } });
// @ts-expect-error and option values are checked
new BindingPoolTransport({ tls: 'sometimes' });

export function isConfigError(err: unknown): err is ConfigError {
  return err instanceof ConfigError && err instanceof BindingPoolError;
}

export async function queue(): Promise<MailOutcome | undefined> {
  const mailQueue = new MailQueue('outbound', { connection: 'redis://127.0.0.1:6379', maxAge: '5d' });
  const worker = new MailWorker('outbound', { connection: 'redis://127.0.0.1:6379', transport, concurrency: 20, onFinalFailure: (f: FinalFailure) => void f.recipients });
  worker.on('done', (outcome) => void outcome.recipients);
  worker.on('final', (event) => void event.recipients.map((r) => r.status));
  // @ts-expect-error the worker's events are typed: a misspelt one is an error
  worker.on('dnoe', () => undefined);
  const id: string = await mailQueue.add({ from: 'sender@example.com', to: 'rcpt@example.org', binding: 'mta1' });
  // @ts-expect-error queue options are checked too
  new MailQueue('outbound', { connection: 'redis://127.0.0.1:6379', maxAgee: '5d' });
  return mailQueue.outcome(id);
}
`;
  const imports = `import nodemailer from 'nodemailer';
import { BindingPoolError, BindingPoolTransport, ConfigError } from '${pkg.name}';
import type { BindingPoolOptions, BindingPoolSentMessageInfo, DomainResult, RecipientOutcome, TransportStats } from '${pkg.name}';
import { MailQueue, MailWorker } from '${pkg.name}/queue';
import type { FinalFailure, MailOutcome } from '${pkg.name}/queue';
`;
  const compilerOptions = {
    target: 'ES2022',
    lib: ['ES2022'],
    strict: true,
    noEmit: true,
    esModuleInterop: true,
    skipLibCheck: false,
    // Node's types from this repo, so the temporary project installs only the package and Nodemailer.
    typeRoots: [join(repo, 'node_modules', '@types')],
    types: ['node'],
  };
  return {
    // node16: the .mts file resolves the `import` condition, the .cts file the `require` condition.
    'consumer-esm.mts': imports + body,
    'consumer-cjs.cts': imports + body,
    'consumer-bundler.ts': imports + body,
    'tsconfig.node16.json': JSON.stringify(
      { compilerOptions: { ...compilerOptions, module: 'node16', moduleResolution: 'node16' }, files: ['consumer-esm.mts', 'consumer-cjs.cts'] },
      null,
      2,
    ),
    'tsconfig.bundler.json': JSON.stringify(
      { compilerOptions: { ...compilerOptions, module: 'preserve', moduleResolution: 'bundler' }, files: ['consumer-bundler.ts'] },
      null,
      2,
    ),
  };
}
