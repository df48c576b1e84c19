import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DnsServer, type Zone } from './support/dns-server';
import { RecordingServer } from './support/recording-server';
import { makeTransport } from './support/send';

const fixtures = join(__dirname, 'fixtures');
const cert = readFileSync(join(fixtures, 'mx-test.crt'));
const key = readFileSync(join(fixtures, 'mx-test.key'));

/** Two SMTP servers on one port at 127.0.0.5 and 127.0.0.6, since `port` is one value per scope. */
async function twoMxServers(options: ConstructorParameters<typeof RecordingServer>[1] = {}): Promise<[RecordingServer, RecordingServer]> {
  for (let tries = 0; tries < 5; tries++) {
    const first = await RecordingServer.start('127.0.0.5', options);
    try {
      const second = await RecordingServer.start('127.0.0.6', options, first.port);
      return [first, second];
    } catch {
      await first.stop();
    }
  }
  throw new Error('no common free port');
}

const mail = (to: string | string[], subject = 'hello') => ({ from: 'sender@example.com', to, subject, text: 'hi' });

describe('direct MX delivery', () => {
  let dns: DnsServer;
  let mx1: RecordingServer;
  let mx2: RecordingServer;

  const baseZone = (): Zone => ({
    mx: {
      'mx.test': [
        { priority: 20, exchange: 'mx2.mx.test' },
        { priority: 10, exchange: 'mx1.mx.test' },
      ],
      'down.test': [
        { priority: 10, exchange: 'dead.mx.test' },
        { priority: 20, exchange: 'mx2.mx.test' },
      ],
      'null.test': [{ priority: 0, exchange: '' }],
    },
    a: { 'mx1.mx.test': ['127.0.0.5'], 'mx2.mx.test': ['127.0.0.6'], 'dead.mx.test': ['127.0.0.7'], 'implicit.test': ['127.0.0.6'] },
    nxdomain: ['nowhere.test'],
    servfail: ['broken.test'],
    silent: ['slow.test'],
  });

  beforeEach(async () => {
    [mx1, mx2] = await twoMxServers();
    dns = await DnsServer.start(baseZone());
  });
  afterEach(async () => {
    await Promise.all([mx1.stop(), mx2.stop(), dns.stop()]);
  });

  const transport = (extra = {}) => makeTransport({ dnsServers: [dns.address], port: mx1.port, tls: 'no', ...extra });

  test('the preferred MX host takes the mail', async () => {
    const { transporter } = transport();
    const info = await transporter.sendMail(mail(['a@mx.test', 'b@MX.test']));
    await transporter.close();
    // Nodemailer's envelope already carries the domain in lower case.
    expect(info.accepted).toEqual(['a@mx.test', 'b@mx.test']);
    expect(info.domains[0].hosts).toEqual([`mx1.mx.test[127.0.0.5]:${mx1.port}`]);
    expect(mx1.deliveredRecipients()).toEqual(['a@mx.test', 'b@mx.test']);
    expect(mx2.connections).toHaveLength(0);
  });

  test('with the preferred host down, the next one takes over', async () => {
    const { transporter } = transport();
    const info = await transporter.sendMail(mail('a@down.test'));
    await transporter.close();
    expect(info.accepted).toEqual(['a@down.test']);
    expect(mx2.deliveredRecipients()).toEqual(['a@down.test']);
  });

  test('a host that greets with 421 is skipped for the next one', async () => {
    await mx1.stop();
    mx1 = await RecordingServer.start(
      '127.0.0.5',
      { server: { onConnect: (_s, cb) => cb(Object.assign(new Error('busy'), { responseCode: 421 })) } },
      mx2.port,
    );
    const { transporter } = transport();
    const info = await transporter.sendMail(mail('a@mx.test'));
    await transporter.close();
    expect(info.accepted).toEqual(['a@mx.test']);
    expect(mx2.deliveredRecipients()).toEqual(['a@mx.test']);
  });

  test('every MX host down: pending after each host was tried', async () => {
    await mx2.stop();
    let refused = 0;
    const refuse = (_s: unknown, cb: (err?: Error) => void) => {
      refused++;
      cb(Object.assign(new Error('go away'), { responseCode: 421 }));
    };
    mx2 = await RecordingServer.start('127.0.0.6', { server: { onConnect: refuse } }, mx1.port);
    // A 421 greeting with nothing open is the receiver throttling the binding: the pair pauses
    // (connectBackoff), and a send that cannot wait that long (acquireTimeout) is pending at once.
    const { transporter } = transport({ acquireTimeout: 500 });
    const err = await transporter.sendMail(mail('a@down.test')).catch((e: unknown) => e);
    await transporter.close();
    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@down.test'] });
    const outcome = (err as { domains: { pending: { response: string; retryAfter?: Date }[] }[] }).domains[0].pending[0];
    expect(outcome.response).toContain('dead.mx.test[127.0.0.7]');
    expect(outcome.response).toContain('mx2.mx.test[127.0.0.6]');
    expect(outcome.response).toMatch(/throttling this binding .*sends paused for \d+ ms, past acquireTimeout/);
    expect(outcome.retryAfter?.getTime()).toBeGreaterThan(Date.now());
    // One connect per host, then the pool pauses instead of dialing again.
    expect(refused).toBe(1);
  });

  test('no MX records: the domain itself is the mail host (implicit MX)', async () => {
    const { transporter } = transport();
    const info = await transporter.sendMail(mail('x@implicit.test'));
    await transporter.close();
    expect(info.accepted).toEqual(['x@implicit.test']);
    expect(mx2.deliveredRecipients()).toEqual(['x@implicit.test']);
  });

  test('null MX and NXDOMAIN are rejected permanently without a connection', async () => {
    const { transporter } = transport();
    const info = await transporter.sendMail(mail(['a@null.test', 'b@nowhere.test', 'c@mx.test']));
    await transporter.close();
    expect(info.accepted).toEqual(['c@mx.test']);
    expect(info.rejected.sort()).toEqual(['a@null.test', 'b@nowhere.test']);
    const byDomain = Object.fromEntries(info.domains.map((d) => [d.domain, d]));
    expect(byDomain['null.test'].rejected[0]).toMatchObject({ responseCode: 556 });
    expect(byDomain['null.test'].rejected[0].response).toContain('5.1.10');
    expect(byDomain['nowhere.test'].rejected[0]).toMatchObject({ responseCode: 550 });
    expect(byDomain['null.test'].connections).toHaveLength(0);
    // Only c@mx.test reached a server.
    expect(mx1.connections).toHaveLength(1);
    expect(mx2.connections).toHaveLength(0);
  });

  test('SERVFAIL and a DNS timeout leave the recipients pending with the DNS error', async () => {
    const { transporter } = transport({ dnsTimeout: 300 });
    const err = await transporter.sendMail(mail(['a@broken.test', 'b@slow.test'])).catch((e: unknown) => e);
    await transporter.close();
    expect(err).toMatchObject({ code: 'EPENDING' });
    const pending = (err as { domains: { domain: string; pending: { response: string; responseCode: number }[] }[] }).domains;
    const byDomain = Object.fromEntries(pending.map((d) => [d.domain, d.pending[0]]));
    expect(byDomain['broken.test'].response).toContain('ESERVFAIL');
    expect(byDomain['slow.test'].response).toContain('ETIMEOUT');
    expect(byDomain['broken.test'].responseCode).toBe(451);
    expect(mx1.connections.length + mx2.connections.length).toBe(0);
  });

  test('concurrent lookups of one domain share one query, and the answer is cached', async () => {
    const { pool, transporter } = transport();
    await Promise.all(Array.from({ length: 10 }, (_, i) => transporter.sendMail(mail(`u${i}@mx.test`))));
    await transporter.sendMail(mail('late@mx.test'));
    await transporter.close();
    expect(dns.count('mx.test', 'MX')).toBe(1);
    expect(dns.count('mx1.mx.test', 'A')).toBe(1);
    expect(pool.stats().dns.cachedDomains).toBe(1);
    expect(mx1.totalDelivered()).toBe(11);
  });

  test('TTLs are clamped: minDnsTtl keeps a 1 s answer, maxDnsTtl expires a day-long one', async () => {
    dns.zone.ttl = 1;
    const short = transport({ minDnsTtl: 60 });
    await short.transporter.sendMail(mail('a@mx.test'));
    await new Promise((r) => setTimeout(r, 1_200));
    await short.transporter.sendMail(mail('b@mx.test'));
    await short.transporter.close();
    expect(dns.count('mx.test', 'MX')).toBe(1);

    dns.zone.ttl = 86_400;
    const long = transport({ minDnsTtl: 0, maxDnsTtl: 1 });
    await long.transporter.sendMail(mail('c@mx.test'));
    await long.transporter.sendMail(mail('d@mx.test'));
    expect(dns.count('mx.test', 'MX')).toBe(2);
    await new Promise((r) => setTimeout(r, 1_200));
    await long.transporter.sendMail(mail('e@mx.test'));
    await long.transporter.close();
    expect(dns.count('mx.test', 'MX')).toBe(3);
  });

  test('a static route still wins for its domain while the rest goes by MX', async () => {
    const relay = await RecordingServer.start('127.0.0.1');
    const { transporter } = transport({ domains: { 'relayed.test': { route: { host: relay.host, port: relay.port } } } });
    const info = await transporter.sendMail(mail(['r@relayed.test', 'm@mx.test']));
    await transporter.close();
    await relay.stop();
    expect(info.accepted.sort()).toEqual(['m@mx.test', 'r@relayed.test']);
    expect(relay.deliveredRecipients()).toEqual(['r@relayed.test']);
    expect(mx1.deliveredRecipients()).toEqual(['m@mx.test']);
    expect(dns.count('relayed.test', 'MX')).toBe(0);
  });
});

describe('TLS policy for MX delivery', () => {
  let dns: DnsServer;
  let mx: RecordingServer;
  afterEach(async () => {
    await Promise.all([mx.stop(), dns.stop()]);
  });

  const start = async (starttls: boolean) => {
    mx = await RecordingServer.start('127.0.0.5', { server: starttls ? { disabledCommands: [], key, cert } : {} });
    dns = await DnsServer.start({ mx: { 'mx.test': [{ priority: 10, exchange: 'mx1.mx.test' }] }, a: { 'mx1.mx.test': ['127.0.0.5'] } });
  };

  test("tls: 'required' against a server without STARTTLS sends nothing and leaves the recipient pending", async () => {
    await start(false);
    const { transporter } = makeTransport({ dnsServers: [dns.address], port: mx.port, tls: 'required' });
    const err = await transporter.sendMail(mail('a@mx.test')).catch((e: unknown) => e);
    await transporter.close();
    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@mx.test'] });
    expect(JSON.stringify((err as { domains: unknown }).domains)).toMatch(/STARTTLS|TLS/);
    expect(mx.connections.length).toBeGreaterThanOrEqual(1);
    expect(mx.connections.flatMap((c) => c.transactions)).toHaveLength(0);
  });

  test("tls: 'required' with STARTTLS: the server sees a TLS session and the result says encrypted", async () => {
    await start(true);
    const { pool, transporter } = makeTransport({ dnsServers: [dns.address], port: mx.port, tls: 'required', tlsOptions: { ca: cert } });
    const info = await transporter.sendMail(mail('a@mx.test'));
    expect(pool.stats().pools[0].encrypted).toBe(1);
    await transporter.close();
    expect(info.domains[0].connections).toEqual([expect.objectContaining({ encrypted: true })]);
    expect(mx.connections[0].secure).toBe(true);
    expect(mx.deliveredRecipients()).toEqual(['a@mx.test']);
  });

  test("tls: 'verified' checks the certificate: an untrusted one fails the delivery ('required' does not check an MX host's, see test/tls.test.ts)", async () => {
    await start(true);
    const { transporter } = makeTransport({ dnsServers: [dns.address], port: mx.port, tls: 'verified' });
    const err = await transporter.sendMail(mail('a@mx.test')).catch((e: unknown) => e);
    await transporter.close();
    expect(err).toMatchObject({ code: 'EPENDING' });
    expect(JSON.stringify((err as { domains: unknown }).domains)).toMatch(/certificate/i);
    expect(mx.totalDelivered()).toBe(0);
  });

  test("tls: 'ifavailable' (the default) upgrades when offered and sends in plain text when not", async () => {
    await start(true);
    const secure = makeTransport({ dnsServers: [dns.address], port: mx.port, tlsOptions: { ca: cert } });
    const info = await secure.transporter.sendMail(mail('a@mx.test'));
    await secure.transporter.close();
    expect(info.domains[0].connections[0].encrypted).toBe(true);
    expect(mx.connections[0].secure).toBe(true);
    await mx.stop();
    mx = await RecordingServer.start('127.0.0.5', {}, mx.port);
    const plain = makeTransport({ dnsServers: [dns.address], port: mx.port });
    const plainInfo = await plain.transporter.sendMail(mail('b@mx.test'));
    await plain.transporter.close();
    expect(plainInfo.domains[0].connections[0].encrypted).toBe(false);
    expect(mx.deliveredRecipients()).toEqual(['b@mx.test']);
  });
});
