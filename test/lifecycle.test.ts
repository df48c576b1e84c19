import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { format } from 'node:util';
import createDebug from 'debug';
import type { ConnectionSummary } from '../lib';
import { RecordingServer } from './support/recording-server';
import { eventually, makeTransport, routeTo } from './support/send';

const cert = readFileSync(join(__dirname, 'fixtures', 'mx-test.crt'));
const key = readFileSync(join(__dirname, 'fixtures', 'mx-test.key'));
const mail = (to: string | string[]) => ({ from: 'sender@example.com', to, subject: 'hi', text: 'hi' });
const SECRET = 'pa55-word-never-logged';

describe('verify()', () => {
  test('resolves true when every configured route takes a connection', async () => {
    const server = await RecordingServer.start();
    const { transporter } = makeTransport({ route: routeTo(server), domains: { 'x.test': { route: routeTo(server) } } });
    await expect(transporter.verify()).resolves.toBe(true);
    await transporter.close();
    await server.stop();
    // Two routes checked, each with its own connection, both QUIT again.
    expect(server.connections).toHaveLength(2);
    await eventually(() => expect(server.connections.every((c) => c.closed)).toBe(true));
  });

  test('rejects naming the route that did not answer', async () => {
    const server = await RecordingServer.start();
    const port = server.port;
    await server.stop();
    const { transporter } = makeTransport({ domains: { 'x.test': { route: { host: '127.0.0.1', port } } } });
    await expect(transporter.verify()).rejects.toMatchObject({ code: 'ECONNECT', message: expect.stringContaining('domains["x.test"].route') });
    await transporter.close();
  });
});

describe('idle pools', () => {
  test('an idle pool QUITs its connections and is dropped; its figures stay in the totals', async () => {
    const server = await RecordingServer.start();
    const { pool, transporter } = makeTransport({ route: routeTo(server), idleTimeout: 200 });
    const closed: ConnectionSummary[] = [];
    pool.on('connectionClosed', (summary: ConnectionSummary) => closed.push(summary));
    await transporter.sendMail(mail(['a@idle.test', 'b@idle.test']));
    expect(pool.stats().pools).toHaveLength(1);
    await new Promise((r) => setTimeout(r, 1_500));
    expect(pool.stats().pools).toHaveLength(0);
    expect(pool.stats().droppedPools).toMatchObject({ pools: 1, opened: 1, deliveries: 2, recipients: 2, transactions: 1 });
    expect(closed).toEqual([expect.objectContaining({ reason: 'idle', deliveries: 2, domain: 'idle.test' })]);
    await eventually(() => expect(server.connections[0].closed).toBe(true));
    await transporter.close();
    await server.stop();
  });
  test('idleTimeout counts from the last send: a pool used again meanwhile stays, then goes', async () => {
    const server = await RecordingServer.start();
    const { pool, transporter } = makeTransport({ route: routeTo(server), idleTimeout: 600 });
    await transporter.sendMail(mail(['a@again.test']));
    await new Promise((r) => setTimeout(r, 400));
    await transporter.sendMail(mail(['b@again.test']));
    // 800 ms after the first send, 400 after the second: not idle for idleTimeout yet.
    await new Promise((r) => setTimeout(r, 400));
    expect(pool.stats().pools).toHaveLength(1);
    await eventually(() => expect(pool.stats().pools).toHaveLength(0));
    expect(pool.stats().droppedPools).toMatchObject({ pools: 1, deliveries: 2 });
    expect(server.deliveredRecipients()).toEqual(['a@again.test', 'b@again.test']);
    await transporter.close();
    await server.stop();
  });
});

describe('process exit', () => {
  test('once its pools are dropped for idleness, a transport never closed keeps the process alive no longer', async () => {
    const server = await RecordingServer.start();
    // A program that sends once and forgets the transport. Nothing but the idle pool may hold
    // it: not a timer armed for acquireTimeout (30 s here).
    const program = `
      const nodemailer = require('nodemailer');
      const { BindingPoolTransport } = require(${JSON.stringify(join(__dirname, '..', 'dist', 'cjs', 'index.js'))});
      const started = Date.now();
      const transporter = nodemailer.createTransport(new BindingPoolTransport({ route: { host: '127.0.0.1', port: ${server.port} }, idleTimeout: 300, acquireTimeout: 30000 }));
      transporter.sendMail({ envelope: { from: 'a@example.com', to: ['b@x.test'] }, raw: 'Subject: exit\\r\\n\\r\\nbye\\r\\n' }).then(
        () => process.on('exit', () => console.log('exited after', Date.now() - started, 'ms')),
        (err) => { console.error(err); process.exitCode = 1; },
      );`;
    const started = Date.now();
    const output = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ['-e', program], { cwd: join(__dirname, '..'), timeout: 15_000 }, (err, stdout, stderr) =>
        err ? reject(new Error(`${err.message}: ${stderr}`)) : resolve(stdout),
      ),
    ).finally(() => server.stop());
    const elapsed = Date.now() - started;

    expect(output).toMatch(/exited after \d+ ms/);
    expect(server.deliveredRecipients()).toEqual(['b@x.test']);
    // The pool is dropped after idleTimeout and its connection QUITs; the process then ends.
    expect(elapsed).toBeLessThan(10_000);
  });
});

describe('credentials', () => {
  let authAttempts: number;
  const authServer = (options: { tls?: boolean } = {}) =>
    RecordingServer.start('127.0.0.1', {
      server: {
        authMethods: ['PLAIN', 'LOGIN'],
        allowInsecureAuth: true,
        ...(options.tls ? { disabledCommands: [], key, cert } : {}),
        onAuth: (auth, _session, callback) => {
          authAttempts++;
          if (auth.password === SECRET) callback(null, { user: auth.username });
          else callback(new Error('bad credentials'));
        },
      },
    });
  beforeEach(() => {
    authAttempts = 0;
  });

  test('are not sent over a plain connection unless allowed', async () => {
    const server = await authServer();
    const { transporter } = makeTransport({ route: { ...routeTo(server), auth: { user: 'u', pass: SECRET } } });
    const err = await transporter.sendMail(mail('a@x.test')).catch((e: unknown) => e);
    await transporter.close();
    await server.stop();
    expect(err).toMatchObject({ code: 'EPENDING' });
    expect(JSON.stringify((err as { domains: unknown }).domains)).toContain('unencrypted');
    expect(authAttempts).toBe(0);
  });

  test('go over STARTTLS, and never reach debug output, errors or stats()', async () => {
    const lines: string[] = [];
    const previousLog = createDebug.log;
    createDebug.enable('nodemailer-binding-pool:*');
    createDebug.log = (...args: unknown[]) => lines.push(format(...args));
    try {
      const server = await authServer({ tls: true });
      const route = { ...routeTo(server), host: '127.0.0.1', tls: { ca: cert, servername: 'relay.test' } };
      const good = makeTransport({ route: { ...route, auth: { user: 'u', pass: SECRET } } });
      const info = await good.transporter.sendMail(mail('a@x.test'));
      const stats = JSON.stringify(good.pool.stats());
      await good.transporter.close();
      const bad = makeTransport({ route: { ...route, auth: { user: 'u', pass: `${SECRET}-wrong` } } });
      const err = await bad.transporter.sendMail(mail('b@x.test')).catch((e: unknown) => e);
      await bad.transporter.close();
      await server.stop();

      expect(info.accepted).toEqual(['a@x.test']);
      expect(server.connections[0].secure).toBe(true);
      expect(authAttempts).toBe(2);
      expect(err).toMatchObject({ code: 'EPENDING' });
      expect(lines.length).toBeGreaterThan(5);
      const everything = [...lines, stats, JSON.stringify(info), JSON.stringify(err), (err as Error).message, (err as Error).stack].join('\n');
      expect(everything).not.toContain(SECRET);
    } finally {
      createDebug.disable();
      createDebug.log = previousLog;
    }
  });
});

describe('LMTP', () => {
  test('each recipient gets its own DATA reply; only the 2xx ones count as deliveries', async () => {
    const server = await RecordingServer.start('127.0.0.1', {
      server: {
        lmtp: true,
        onData: (stream, session, callback) => {
          stream.resume();
          stream.on('end', () => {
            const replies = session.envelope.rcptTo.map((r) =>
              r.address.startsWith('full') ? Object.assign(new Error('mailbox full'), { responseCode: 552 }) : 'delivered',
            );
            (callback as unknown as (err: null, replies: (string | Error)[]) => void)(null, replies);
          });
        },
      },
    });
    const { pool, transporter } = makeTransport({ route: { ...routeTo(server), lmtp: true } });
    const info = await transporter.sendMail(mail(['ok@l.test', 'full@l.test', 'ok2@l.test']));
    const stats = pool.stats().pools[0];
    await transporter.close();
    await server.stop();
    expect(info.accepted).toEqual(['ok@l.test', 'ok2@l.test']);
    expect(info.rejected).toEqual(['full@l.test']);
    expect(stats).toMatchObject({ deliveries: 2, recipients: 3 });
  });
});
