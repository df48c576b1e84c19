/**
 * Opportunistic TLS (RFC 7435) and the `tls` levels: the decision table of lib/routing/tls-policy.ts, then
 * delivery to loopback servers with the self-signed test certificate (test/fixtures) offering
 * STARTTLS, asserted on what each server saw: TLS sessions, failed handshakes, stored messages.
 * MX hosts are found through a loopback DNS zone (`dnsServers`, `port`).
 */
import { readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import type { BindingPoolOptions, BindingPoolSendError } from '../lib';
import { inPlainText, isTlsFailure, tlsPlan, withPlainTextRetry, type TlsPlan, type TlsPlanInput } from '../lib/routing/tls-policy';
import { DnsServer } from './support/dns-server';
import { FaultServer } from './support/fault-server';
import { closedAfterEach, rejection } from './support/harness';

const cert = readFileSync(join(__dirname, 'fixtures', 'mx-test.crt'));
const key = readFileSync(join(__dirname, 'fixtures', 'mx-test.key'));

describe('tlsPlan: a level and a destination → SMTPConnection flags, certificate check, plain-text retry', () => {
  const ca = { ca: cert };
  const rows: [string, TlsPlanInput, TlsPlan][] = [
    // MX hosts.
    ['mx no', { level: 'no', destination: 'mx', tlsOptions: undefined }, plan(false, true, false, undefined, false)],
    ['mx ifavailable', { level: 'ifavailable', destination: 'mx', tlsOptions: undefined }, plan(false, false, true, { rejectUnauthorized: false }, true)],
    ['mx ifavailable + ca', { level: 'ifavailable', destination: 'mx', tlsOptions: ca }, plan(false, false, true, { rejectUnauthorized: false, ...ca }, true)],
    [
      'mx ifavailable, checks asked for',
      { level: 'ifavailable', destination: 'mx', tlsOptions: { rejectUnauthorized: true } },
      plan(false, false, true, { rejectUnauthorized: true }, true),
    ],
    ['mx required', { level: 'required', destination: 'mx', tlsOptions: undefined }, plan(true, false, false, { rejectUnauthorized: false }, false)],
    [
      'mx required, checks asked for',
      { level: 'required', destination: 'mx', tlsOptions: { rejectUnauthorized: true } },
      plan(true, false, false, { rejectUnauthorized: true }, false),
    ],
    ['mx verified', { level: 'verified', destination: 'mx', tlsOptions: undefined }, plan(true, false, false, { rejectUnauthorized: true }, false)],
    ['mx verified + ca', { level: 'verified', destination: 'mx', tlsOptions: ca }, plan(true, false, false, { ...ca, rejectUnauthorized: true }, false)],
    [
      'mx verified, checks turned off: still checked',
      { level: 'verified', destination: 'mx', tlsOptions: { rejectUnauthorized: false } },
      plan(true, false, false, { rejectUnauthorized: true }, false),
    ],
    // Routes: Node's checks (rejectUnauthorized unset = on) unless the options turn them off; never retried in plain text.
    ['route no', { level: 'no', destination: 'route', tlsOptions: undefined }, plan(false, true, false, undefined, false)],
    ['route ifavailable', { level: 'ifavailable', destination: 'route', tlsOptions: undefined }, plan(false, false, true, undefined, false)],
    [
      'route ifavailable, checks turned off',
      { level: 'ifavailable', destination: 'route', tlsOptions: { rejectUnauthorized: false } },
      plan(false, false, true, { rejectUnauthorized: false }, false),
    ],
    ['route required', { level: 'required', destination: 'route', tlsOptions: ca }, plan(true, false, false, ca, false)],
    [
      'route verified, checks turned off: still checked',
      { level: 'verified', destination: 'route', tlsOptions: { rejectUnauthorized: false } },
      plan(true, false, false, { rejectUnauthorized: true }, false),
    ],
    // A route's own requireTLS / ignoreTLS win over the level.
    [
      'route ifavailable + requireTLS',
      { level: 'ifavailable', destination: 'route', tlsOptions: undefined, requireTLS: true },
      plan(true, false, true, undefined, false),
    ],
    [
      'route required + ignoreTLS',
      { level: 'required', destination: 'route', tlsOptions: undefined, ignoreTLS: true },
      plan(true, true, false, undefined, false),
    ],
  ];

  test.each(rows)('%s', (_name, input, expected) => {
    expect(tlsPlan(input)).toEqual(expected);
  });

  test('every plan gets its own options object', () => {
    const tlsOptions = { ca: cert };
    const a = tlsPlan({ level: 'required', destination: 'route', tlsOptions });
    const b = tlsPlan({ level: 'required', destination: 'route', tlsOptions });
    expect(a.tls).not.toBe(tlsOptions);
    expect(a.tls).not.toBe(b.tls);
  });

  function plan(requireTLS: boolean, ignoreTLS: boolean, opportunisticTLS: boolean, tls: TlsPlan['tls'], plainTextRetry: boolean): TlsPlan {
    return { requireTLS, ignoreTLS, opportunisticTLS, tls, plainTextRetry };
  }
});

describe('isTlsFailure: which setup failures send the host a plain-text connection', () => {
  // The errors as SMTPConnection reports them (measured against loopback servers, Node 20).
  const socketError = (originalCode: string, message: string, extra: object = {}) =>
    Object.assign(new Error(message), { code: 'ESOCKET', originalCode, command: 'CONN', ...extra });
  const rows: [string, unknown, boolean][] = [
    ['self-signed certificate (checks asked for)', socketError('DEPTH_ZERO_SELF_SIGNED_CERT', 'self-signed certificate'), true],
    ['untrusted chain', socketError('UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'unable to verify the first certificate'), true],
    ['expired certificate', socketError('CERT_HAS_EXPIRED', 'certificate has expired'), true],
    ['name mismatch', socketError('ERR_TLS_CERT_ALTNAME_INVALID', "Hostname/IP does not match certificate's altnames"), true],
    [
      'protocol version refused (TLS 1.0-only server)',
      socketError('ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', '…:SSL routines:ssl3_read_bytes:tlsv1 alert protocol version', {
        library: 'SSL routines',
        reason: 'tlsv1 alert protocol version',
      }),
      true,
    ],
    ['not TLS at all after 220', socketError('ERR_SSL_WRONG_VERSION_NUMBER', '…:wrong version number', { library: 'SSL routines' }), true],
    ['peer closed in the handshake', socketError('ECONNRESET', 'Client network socket disconnected before secure TLS connection was established'), true],
    ['handshake timed out', Object.assign(new Error('TLS handshake timed out'), { code: 'ETIMEDOUT', timeoutType: 'UPGRADE_TIMEOUT', command: 'CONN' }), true],
    ['socket closed while upgrading', Object.assign(new Error('Connection closed unexpectedly'), { code: 'ETLS', command: 'CONN' }), true],
    ['tls.connect threw', Object.assign(new Error('Error initiating TLS - bad option'), { code: 'ETLS', command: 'STARTTLS' }), true],
    // Not TLS: another connection in plain text would fare no better.
    ['connection refused', socketError('ECONNREFUSED', 'connect ECONNREFUSED 127.0.0.5:25'), false],
    ['connect timeout', Object.assign(new Error('Connection timeout'), { code: 'ETIMEDOUT', timeoutType: 'CONNECT_TIMEOUT', command: 'CONN' }), false],
    ['reset (RST): the same in the handshake and before it', socketError('ECONNRESET', 'read ECONNRESET'), false],
    ['421 greeting', Object.assign(new Error('Server terminates connection'), { code: 'ECONNECTION', responseCode: 421, command: 'CONN' }), false],
    ['closed before the greeting', Object.assign(new Error('Connection closed unexpectedly'), { code: 'ECONNECTION', command: 'CONN' }), false],
    ['not an error', 'self-signed certificate', false],
    ['nothing', undefined, false],
  ];

  test.each(rows.map(([name, err, expected]) => ({ name, err, expected })))('$name → $expected', ({ err, expected }) => {
    expect(isTlsFailure(err)).toBe(expected);
  });
});

describe('withPlainTextRetry', () => {
  const target = { host: '192.0.2.1', servername: 'mx1.example', port: 25, requireTLS: false, ignoreTLS: false, opportunisticTLS: true };
  const tlsError = () => Object.assign(new Error('self-signed certificate'), { code: 'ESOCKET', originalCode: 'DEPTH_ZERO_SELF_SIGNED_CERT' });

  test('a TLS failure, when allowed: once more, without STARTTLS', async () => {
    const opened: (typeof target)[] = [];
    const result = await withPlainTextRetry(target, true, async (t) => {
      opened.push(t);
      if (opened.length === 1) throw tlsError();
      return 'plain';
    });
    expect(result).toBe('plain');
    expect(opened).toEqual([target, inPlainText(target)]);
    expect(opened[1]).toMatchObject({ ignoreTLS: true, requireTLS: false, opportunisticTLS: false });
  });

  test('not allowed (required, verified, routes), or not a TLS failure: the error as it came, one connection', async () => {
    for (const [allowed, err] of [
      [false, tlsError()],
      [true, Object.assign(new Error('connect ECONNREFUSED'), { code: 'ESOCKET', originalCode: 'ECONNREFUSED' })],
    ] as const) {
      let opens = 0;
      await expect(
        withPlainTextRetry(target, allowed, () => {
          opens++;
          return Promise.reject(err);
        }),
      ).rejects.toBe(err);
      expect(opens).toBe(1);
    }
  });

  test('the plain-text connection fails too: its error, naming both', async () => {
    const plainErr = Object.assign(new Error('Server terminates connection'), { code: 'ECONNECTION', responseCode: 421 });
    let opens = 0;
    const err = await withPlainTextRetry(target, true, () => Promise.reject(++opens === 1 ? tlsError() : plainErr)).catch((e: unknown) => e);
    expect(err).toBe(plainErr);
    expect(plainErr.message).toBe('TLS failed (self-signed certificate), then in plain text: Server terminates connection');
    expect(opens).toBe(2);
  });
});

// ---------------------------------------------------------------------------------------------
// Delivery against loopback servers

interface SeenMessage {
  secure: boolean;
  rcpts: string[];
  body: string;
}

interface SeenSession {
  id: string;
  /** The TLS handshake completed. */
  secure: boolean;
  messages: SeenMessage[];
}

/** smtp-server offering STARTTLS with the test certificate; records sessions, TLS handshakes and stored messages. */
class TlsServer {
  readonly sessions: SeenSession[] = [];
  /** Handshakes the server saw fail (and other session errors), never thrown. */
  readonly errors: Error[] = [];
  port = 0;
  private server!: SMTPServer;

  private constructor(readonly host: string) {}

  static async start(host: string, tls: Partial<SMTPServerOptions> = {}, port = 0): Promise<TlsServer> {
    const server = new TlsServer(host);
    await server.listen(tls, port);
    return server;
  }

  get messages(): SeenMessage[] {
    return this.sessions.flatMap((s) => s.messages);
  }

  stop(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private listen(tls: Partial<SMTPServerOptions>, port: number): Promise<void> {
    const byId = new Map<string, SeenSession>();
    this.server = new SMTPServer({
      authOptional: true,
      logger: false,
      closeTimeout: 100,
      disableReverseLookup: true,
      key,
      cert,
      ...tls,
      onConnect: (session, callback) => {
        const seen = { id: session.id, secure: false, messages: [] };
        byId.set(session.id, seen);
        this.sessions.push(seen);
        callback();
      },
      onSecure: (_socket, session, callback) => {
        byId.get(session.id)!.secure = true;
        callback();
      },
      onData: (stream, session, callback) => {
        const chunks: Buffer[] = [];
        stream.on('data', (chunk: Buffer) => chunks.push(chunk));
        stream.on('end', () => {
          byId.get(session.id)!.messages.push({
            secure: session.secure,
            rcpts: session.envelope.rcptTo.map((r) => r.address),
            body: Buffer.concat(chunks).toString(),
          });
          callback(null, 'Ok: stored');
        });
      },
    });
    this.server.on('error', (err: Error) => this.errors.push(err));
    return new Promise((resolve, reject) => {
      this.server.server.once('error', reject);
      this.server.listen(port, this.host, () => {
        this.port = (this.server.server.address() as AddressInfo).port;
        resolve();
      });
    });
  }
}

/** Real mail: more than 16 KiB, many lines. */
const BIG_TEXT = Array.from({ length: 1200 }, (_, i) => `line ${i} of a message larger than sixteen KiB`).join('\n');
const mail = (to: string, text = 'hello') => ({ from: 'sender@example.com', to, subject: 'tls', text });

describe('MX delivery: the tls levels against a self-signed STARTTLS host', () => {
  const { onCleanup, transport } = closedAfterEach();
  let dns: DnsServer;

  // mx.test's MX host is mx1.mx.test (named in the certificate), other.test's mail.other.test (not); both at 127.0.0.5.
  beforeEach(async () => {
    dns = await DnsServer.start({
      mx: { 'mx.test': [{ priority: 10, exchange: 'mx1.mx.test' }], 'other.test': [{ priority: 10, exchange: 'mail.other.test' }] },
      a: { 'mx1.mx.test': ['127.0.0.5'], 'mail.other.test': ['127.0.0.5'] },
    });
  });
  afterEach(() => dns.stop());

  /** An MX host at 127.0.0.5 offering STARTTLS with the self-signed certificate. */
  async function mxHost(tls: Partial<SMTPServerOptions> = {}): Promise<TlsServer> {
    const server = await TlsServer.start('127.0.0.5', tls);
    onCleanup(() => server.stop());
    return server;
  }
  const mxOptions = (server: { port: number }, extra: BindingPoolOptions = {}): BindingPoolOptions => ({
    dnsServers: [dns.address],
    port: server.port,
    connectBackoff: 50,
    ...extra,
  });

  test('ifavailable (the default) + self-signed certificate: delivered, encrypted (a message over 16 KiB, whole)', async () => {
    const server = await mxHost();
    const { transporter } = transport(mxOptions(server));
    const info = await transporter.sendMail(mail('a@mx.test', BIG_TEXT));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(server.sessions).toHaveLength(1);
    expect(server.sessions[0].secure).toBe(true);
    expect(server.messages).toHaveLength(1);
    expect(server.messages[0]).toMatchObject({ secure: true, rcpts: ['a@mx.test'] });
    expect(server.messages[0].body.length).toBeGreaterThan(16 * 1024);
    expect(server.messages[0].body).toContain('line 1199 of a message larger than sixteen KiB');
  });

  test('ifavailable + a host whose TLS handshake fails (TLS 1.0 only): delivered once, in plain text, over a second connection', async () => {
    // An old MTA: STARTTLS offered, but only TLS 1.0, which Node's client refuses (minVersion TLSv1.2).
    const server = await mxHost({ minVersion: 'TLSv1', maxVersion: 'TLSv1' });
    const { transporter } = transport(mxOptions(server));
    const info = await transporter.sendMail(mail('a@mx.test', BIG_TEXT));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: false })]);
    // The failed handshake ended the first session; the message went over the next, once.
    expect(server.sessions.map((s) => [s.secure, s.messages.length])).toEqual([
      [false, 0],
      [false, 1],
    ]);
    expect(server.messages).toHaveLength(1);
    expect(server.messages[0]).toMatchObject({ secure: false, rcpts: ['a@mx.test'] });
    expect(server.messages[0].body).toContain('line 1199 of a message larger than sixteen KiB');
    expect(server.errors.length).toBeGreaterThanOrEqual(1);
  });

  test('ifavailable + a handshake answered with bytes that are no TLS (only the first connection): delivered in plain text', async () => {
    const broken = await FaultServer.start({
      host: '127.0.0.5',
      tls: { key, cert },
      plan: { starttls: ({ connection }) => (connection.n === 1 ? 'break' : undefined) },
    });
    onCleanup(() => broken.stop());
    const { transporter } = transport(mxOptions(broken));
    const info = await transporter.sendMail(mail('a@mx.test'));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(broken.connections[0].faults).toEqual(['starttls:break']);
    expect(broken.connections[0].transactions).toHaveLength(0);
    expect(broken.transactions.filter((t) => t.delivered)).toHaveLength(1);
    expect(broken.connections[1]).toMatchObject({ secure: false });
  });

  test('ifavailable + STARTTLS answered 454: delivered in plain text on the same connection', async () => {
    const refusing = await FaultServer.start({ host: '127.0.0.5', tls: { key, cert }, plan: { starttls: () => 'refuse' } });
    onCleanup(() => refusing.stop());
    const { transporter } = transport(mxOptions(refusing));
    const info = await transporter.sendMail(mail('a@mx.test'));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(refusing.connections).toHaveLength(1);
    expect(refusing.connections[0]).toMatchObject({ secure: false, faults: ['starttls:454'] });
    expect(refusing.transactions.filter((t) => t.delivered)).toHaveLength(1);
  });

  test('ifavailable with certificate checks asked for (tlsOptions): the refused certificate is a failed handshake, plain text follows', async () => {
    const server = await mxHost();
    const { transporter } = transport(mxOptions(server, { tlsOptions: { rejectUnauthorized: true } }));
    const info = await transporter.sendMail(mail('a@mx.test'));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(server.sessions.map((s) => [s.secure, s.messages.length])).toEqual([
      [false, 0],
      [false, 1],
    ]);
  });

  test('required + self-signed certificate: delivered, encrypted (an MX certificate is not checked, as Postfix encrypt)', async () => {
    const server = await mxHost();
    const { transporter } = transport(mxOptions(server, { tls: 'required' }));
    const info = await transporter.sendMail(mail('a@mx.test', BIG_TEXT));
    await transporter.close();

    expect(info.accepted).toEqual(['a@mx.test']);
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(server.sessions).toHaveLength(1);
    expect(server.messages).toEqual([expect.objectContaining({ secure: true })]);
  });

  test('required + a host whose TLS handshake fails: pending, nothing sent in clear', async () => {
    const server = await mxHost({ minVersion: 'TLSv1', maxVersion: 'TLSv1' });
    const { transporter } = transport(mxOptions(server, { tls: 'required' }));
    const err = await rejection(transporter.sendMail(mail('a@mx.test')));

    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@mx.test'] });
    expect(JSON.stringify(err.domains)).toMatch(/protocol version/);
    expect(server.sessions.length).toBeGreaterThanOrEqual(1);
    expect(server.messages).toHaveLength(0);
  });

  test('verified + self-signed certificate: pending with the certificate error, nothing sent in clear', async () => {
    const server = await mxHost();
    const { transporter } = transport(mxOptions(server, { tls: 'verified' }));
    const err = await rejection(transporter.sendMail(mail('a@mx.test')));

    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@mx.test'] });
    expect(err.domains[0].pending[0].response).toMatch(/self-signed certificate/);
    expect(server.sessions.length).toBeGreaterThanOrEqual(1);
    // Every session the host saw was a TLS attempt that failed; none was retried in plain text.
    expect(server.sessions.every((s) => !s.secure && s.messages.length === 0)).toBe(true);
    expect(server.messages).toHaveLength(0);
  });

  test('verified + the certificate trusted (tlsOptions.ca): delivered, encrypted; tlsOptions cannot turn the check off', async () => {
    const server = await mxHost();
    const trusted = transport(mxOptions(server, { tls: 'verified', tlsOptions: { ca: cert } }));
    const info = await trusted.transporter.sendMail(mail('a@mx.test', BIG_TEXT));
    await trusted.transporter.close();
    expect(info.accepted).toEqual(['a@mx.test']);
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(server.messages).toEqual([expect.objectContaining({ secure: true, rcpts: ['a@mx.test'] })]);

    const unchecked = transport(mxOptions(server, { tls: 'verified', tlsOptions: { rejectUnauthorized: false } }));
    const err = await rejection(unchecked.transporter.sendMail(mail('b@mx.test')));
    expect(err.domains[0].pending[0].response).toMatch(/self-signed certificate/);
    expect(server.messages).toHaveLength(1);
  });

  test('verified checks the name against the MX host name: a trusted certificate for another name is refused', async () => {
    // other.test's MX is mail.other.test, which the certificate (mx1/mx2.mx.test, relay.test) does not name.
    const server = await mxHost();
    const { transporter } = transport(mxOptions(server, { tls: 'verified', tlsOptions: { ca: cert } }));
    const err = await rejection(transporter.sendMail(mail('a@other.test')));

    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@other.test'] });
    expect(err.domains[0].pending[0].response).toMatch(/mail\.other\.test.*altnames/);
    expect(server.messages).toHaveLength(0);
  });

  test('ifavailable with deliveryThread: the same, from the worker', async () => {
    const server = await mxHost({ minVersion: 'TLSv1', maxVersion: 'TLSv1' });
    const good = await TlsServer.start('127.0.0.5');
    onCleanup(() => good.stop());
    const { transporter } = transport({
      ...mxOptions(server, { deliveryThread: true }),
      domains: { 'other.test': { port: good.port } },
    });
    const [plain, encrypted] = await Promise.all([transporter.sendMail(mail('a@mx.test')), transporter.sendMail(mail('b@other.test'))]);
    await transporter.close();
    expect(plain.domains[0].connections).toEqual([expect.objectContaining({ encrypted: false })]);
    expect(encrypted.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(server.messages).toEqual([expect.objectContaining({ secure: false, rcpts: ['a@mx.test'] })]);
    expect(good.messages).toEqual([expect.objectContaining({ secure: true, rcpts: ['b@other.test'] })]);
  });
});

describe('a route (relay) with a self-signed certificate: certificate checks stay on', () => {
  const { onCleanup, transport } = closedAfterEach();
  async function relay(): Promise<TlsServer> {
    const server = await TlsServer.start('127.0.0.1');
    onCleanup(() => server.stop());
    return server;
  }

  test('not delivered by default: pending with the certificate error, nothing sent in clear', async () => {
    const server = await relay();
    const { transporter } = transport({ route: { host: '127.0.0.1', port: server.port } });
    const err: BindingPoolSendError = await rejection(transporter.sendMail(mail('a@relayed.test')));

    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@relayed.test'] });
    expect(err.domains[0].pending[0].response).toMatch(/self-signed certificate/);
    expect(server.sessions.length).toBeGreaterThanOrEqual(1);
    expect(server.sessions.every((s) => s.messages.length === 0)).toBe(true);
  });

  test('delivered, encrypted, with route.tls.rejectUnauthorized false', async () => {
    const server = await relay();
    const { transporter } = transport({ route: { host: '127.0.0.1', port: server.port, tls: { rejectUnauthorized: false } } });
    const info = await transporter.sendMail(mail('a@relayed.test', BIG_TEXT));
    await transporter.close();

    expect(info.accepted).toEqual(['a@relayed.test']);
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(server.messages).toEqual([expect.objectContaining({ secure: true, rcpts: ['a@relayed.test'] })]);
  });

  test("verified: the route's rejectUnauthorized false does not turn the check off", async () => {
    const server = await relay();
    const { transporter } = transport({ tls: 'verified', route: { host: '127.0.0.1', port: server.port, tls: { rejectUnauthorized: false } } });
    const err = await rejection(transporter.sendMail(mail('a@relayed.test')));
    expect(err.domains[0].pending[0].response).toMatch(/self-signed certificate/);
    expect(server.messages).toHaveLength(0);
  });

  test('a route whose TLS handshake fails is not retried in plain text', async () => {
    const server = await TlsServer.start('127.0.0.1', { minVersion: 'TLSv1', maxVersion: 'TLSv1' });
    onCleanup(() => server.stop());
    const { transporter } = transport({ route: { host: '127.0.0.1', port: server.port, tls: { rejectUnauthorized: false } } });
    const err = await rejection(transporter.sendMail(mail('a@relayed.test')));
    expect(err).toMatchObject({ code: 'EPENDING' });
    expect(err.domains[0].pending[0].response).toMatch(/protocol version/);
    expect(server.messages).toHaveLength(0);
  });
});
