/**
 * Defects found by review, one test each (each failed before its fix): an idle pool dropped under
 * a send waiting for its MX lookup; verify() resolving a route with its host as a domain; a
 * throwing sendMail callback; RCPTs counted for commands never sent; address fields injecting
 * commands before Nodemailer's address parser rewrote them.
 */
import { createServer, type AddressInfo } from 'node:net';
import { DnsServer } from './support/dns-server';
import type { RecordingServer } from './support/recording-server';
import { closedAfterEach } from './support/harness';
import { makeTransport, routeTo } from './support/send';
import type { BindingPoolSendError } from '../lib';

const { startServer, transport, onCleanup } = closedAfterEach();
const transactionsOf = (server: RecordingServer) => server.connections.flatMap((c) => c.transactions);

test('a pool is not dropped as idle while a send waits for its MX lookup', async () => {
  const mx = await startServer();
  // The MX answer comes after the pool's idle timeout has passed.
  const dns = await DnsServer.start({
    mx: { 'slow-mx.test': [{ priority: 10, exchange: 'mx.slow-mx.test' }] },
    a: { 'mx.slow-mx.test': ['127.0.0.1'] },
    delays: { 'slow-mx.test': 300 },
  });
  onCleanup(() => dns.stop());
  const { transporter } = transport({ dnsServers: [dns.address], port: mx.port, tls: 'no', idleTimeout: 50 });
  const info = await transporter.sendMail({ from: 's@example.com', to: 'a@slow-mx.test', subject: 'x', text: 'x' });
  expect(info.accepted).toEqual(['a@slow-mx.test']);
  expect(mx.deliveredRecipients()).toEqual(['a@slow-mx.test']);
});

test("verify() checks a domain stanza's route with that stanza's options (tls: 'required' against a server without STARTTLS)", async () => {
  const plain = await startServer({ server: { disabledCommands: ['STARTTLS', 'AUTH'] } });
  const { pool } = transport({ domains: { 'tls.test': { route: routeTo(plain), tls: 'required' } } });
  await expect(pool.verify()).rejects.toMatchObject({ code: 'ECONNECT', message: expect.stringMatching(/domains\["tls\.test"\]\.route/) });
  const relaxed = transport({ domains: { 'tls.test': { route: routeTo(plain), tls: 'ifavailable' } } });
  await expect(relaxed.pool.verify()).resolves.toBe(true);
});

test('a sendMail callback that throws is isolated: no unhandled rejection, the transport goes on', async () => {
  const server = await startServer();
  const { transporter } = transport({ route: routeTo(server) });
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  onCleanup(async () => void process.off('unhandledRejection', onUnhandled));
  await new Promise<void>((resolve) => {
    transporter.sendMail({ from: 's@example.com', to: 'a@x.test', subject: 'x', text: 'x' }, () => {
      setTimeout(resolve, 50);
      throw new Error('the application callback failed');
    });
  });
  const next = await transporter.sendMail({ from: 's@example.com', to: 'b@x.test', subject: 'y', text: 'y' });
  expect(next.accepted).toEqual(['b@x.test']);
  expect(unhandled).toEqual([]);
});

describe('RCPTs counted only when sent (maxRecipientsPerConnection counts attempted RCPTs)', () => {
  test('a refused MAIL FROM without PIPELINING: no RCPT went out, none counted', async () => {
    const server = await startServer({
      server: {
        hidePIPELINING: true,
        onMailFrom: (_address, _session, callback) => callback(Object.assign(new Error('sender refused'), { responseCode: 550 })),
      },
    });
    const { pool, transporter } = transport({ route: routeTo(server) });
    const err = (await transporter
      .sendMail({ from: 's@example.com', to: ['a@x.test', 'b@x.test'], text: 'x' })
      .catch((e: unknown) => e)) as BindingPoolSendError;
    expect(err.code).toBe('EREJECTED');
    expect(transactionsOf(server).flatMap((t) => t.rcptAttempts)).toEqual([]);
    expect(pool.stats().pools[0]).toMatchObject({ transactions: 1, recipients: 0, deliveries: 0 });
  });

  test("a message over the server's SIZE: nothing sent, nothing counted", async () => {
    const server = await startServer({ server: { size: 1000 } });
    const { pool, transporter } = transport({ route: routeTo(server) });
    const err = (await transporter
      .sendMail({ from: 's@example.com', to: 'a@x.test', text: 'x'.repeat(5000) })
      .catch((e: unknown) => e)) as BindingPoolSendError;
    expect(err).toMatchObject({ code: 'EREJECTED', rejected: ['a@x.test'] });
    expect(err.domains[0].rejected[0]).toMatchObject({ responseCode: 552 });
    expect(transactionsOf(server)).toEqual([]);
    expect(pool.stats().pools[0]).toMatchObject({ transactions: 0, recipients: 0 });
  });
});

describe('CR, LF or NUL in an address field as the application passed it: EADDRESS, nothing sent', () => {
  test.each<[string, Record<string, unknown>]>([
    ['a command smuggled into `to`', { to: 'ok@d.test, evil@d.test\r\nRCPT TO:<inject@d.test>' }],
    ['LF in a `cc` entry', { to: 'ok@d.test', cc: ['c@d.test', 'x@d.test\nRCPT TO:<inject@d.test>'] }],
    ['CR in a display name', { to: { name: 'Bob\rRCPT TO:<inject@d.test>', address: 'bob@d.test' } }],
    ['NUL in `from`', { from: 'sender\0@example.com', to: 'ok@d.test' }],
    ['CRLF in `envelope.to`', { to: 'ok@d.test', envelope: { from: 's@example.com', to: ['ok@d.test\r\nRCPT TO:<inject@d.test>'] } }],
    ['LF in `bcc`', { to: 'ok@d.test', bcc: 'b@d.test\n' }],
  ])('%s', async (_what, fields) => {
    const server = await startServer();
    const { transporter } = makeTransport({ route: routeTo(server) });
    onCleanup(() => transporter.close() as unknown as Promise<void>);
    const err = (await transporter.sendMail({ from: 's@example.com', subject: 'x', text: 'x', ...fields }).catch((e: unknown) => e)) as BindingPoolSendError;
    expect(err).toMatchObject({ code: 'EADDRESS', message: expect.stringMatching(/contains CR, LF or NUL; nothing of this message was sent/) });
    expect(transactionsOf(server)).toEqual([]);
    // The next message is not affected.
    const next = await transporter.sendMail({ from: 's@example.com', to: 'next@d.test', subject: 'y', text: 'y' });
    expect(next.accepted).toEqual(['next@d.test']);
    expect(transactionsOf(server).flatMap((t) => t.rcptAttempts)).toEqual(['next@d.test']);
  });
});

test('a reply in the middle of DATA retires the connection: the rest of the message never becomes the next command (found by review)', async () => {
  // A server that answers 552 as soon as message bytes arrive, before the dot, and reads on.
  const seen: { connection: number; lines: string[]; leftInData: string; dataBytes: number }[] = [];
  const server = createServer((socket) => {
    const record = { connection: seen.length + 1, lines: [] as string[], leftInData: '', dataBytes: 0 };
    seen.push(record);
    let inData = false;
    let messages = 0;
    let answeredEarly = false;
    let buffer = '';
    socket.on('error', () => undefined);
    socket.write('220 early.test ESMTP\r\n');
    socket.on('data', (chunk: Buffer) => {
      buffer += chunk.toString('latin1');
      if (inData) {
        record.dataBytes += chunk.length;
        // The first message of the server's life gets its answer early.
        const early = seen.length === 1 && messages === 0;
        if (early && !answeredEarly) {
          answeredEarly = true;
          socket.write('552 5.3.4 message too big for this mailbox\r\n');
          // Stop reading for a moment, so the client is still writing when the reply comes.
          socket.pause();
          setTimeout(() => socket.resume(), 300);
        }
        record.leftInData = buffer.slice(-200);
        const end = buffer.indexOf('\r\n.\r\n');
        if (end === -1) return;
        buffer = buffer.slice(end + 5);
        inData = false;
        messages++;
        if (!early) socket.write('250 2.0.0 queued\r\n');
      }
      for (let eol = buffer.indexOf('\r\n'); eol !== -1 && !inData; eol = buffer.indexOf('\r\n')) {
        const line = buffer.slice(0, eol);
        buffer = buffer.slice(eol + 2);
        record.lines.push(line);
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === 'EHLO') socket.write('250-early.test\r\n250 8BITMIME\r\n');
        else if (verb === 'DATA') {
          inData = true;
          socket.write('354 go ahead\r\n');
        } else if (verb === 'QUIT') socket.end('221 bye\r\n');
        else socket.write(line.length > 100 ? '500 5.5.2 line too long\r\n' : '250 ok\r\n');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  onCleanup(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as AddressInfo).port;
  const { transporter } = transport({ route: { host: '127.0.0.1', port }, maxOutboundConnections: 1, socketTimeout: 2_000 });
  const big = {
    from: 's@example.com',
    to: 'a@x.test',
    subject: 'big',
    text: 'x'.repeat(70) + '\n',
    attachments: [{ filename: 'a.bin', content: Buffer.alloc(30 * 1024 * 1024, 7) }],
  };
  const err = (await transporter.sendMail(big).catch((e: unknown) => e)) as BindingPoolSendError;
  expect(err).toMatchObject({ code: 'EREJECTED', rejected: ['a@x.test'] });
  expect(err.domains[0].rejected[0]).toMatchObject({ responseCode: 552 });
  const next = await transporter.sendMail({ from: 's@example.com', to: 'b@x.test', subject: 'next', text: 'next\n' });
  expect(next.accepted).toEqual(['b@x.test']);
  // The client stopped writing the message at the 552 and dropped the connection: no RSET, MAIL
  // or QUIT went into the message, and the next one went over a new connection.
  expect(seen).toHaveLength(2);
  expect(seen[0].lines.slice(seen[0].lines.indexOf('DATA') + 1)).toEqual([]);
  expect(seen[0].leftInData).not.toMatch(/RSET|MAIL FROM|QUIT/);
  // It stopped: far less than the 40 MiB message reached the server.
  expect(seen[0].dataBytes).toBeLessThan(30 * 1024 * 1024);
  expect(seen[1].lines.filter((l) => /^RCPT TO:<b@x\.test>/.test(l))).toHaveLength(1);
});
