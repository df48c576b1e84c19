/**
 * The DNS side of shared MX hosts (issue 11, item 4): a host's addresses are looked up once for
 * every domain that names it, lost queries are asked again before recipients go pending. Counted
 * on the loopback DNS server, delivered end to end to an SMTP server on 127.0.0.5.
 */
import { DnsServer } from './support/dns-server';
import { RecordingServer } from './support/recording-server';
import { makeTransport } from './support/send';

const HOST = 'mx.shared.test';
const mail = (to: string | string[]) => ({ from: 'sender@example.com', to, subject: 'hello', text: 'hi' });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** d0.test … d<n-1>.test. */
const domainNames = (n: number) => Array.from({ length: n }, (_, i) => `d${i}.test`);

describe('DNS: MX hosts cached per host, queries retried', () => {
  let dns: DnsServer;
  let mx: RecordingServer;

  beforeEach(async () => {
    mx = await RecordingServer.start('127.0.0.5');
    // 150 domains of one hosted mail provider, plus mx.test with a host of its own.
    const shared = Object.fromEntries(domainNames(150).map((d) => [d, [{ priority: 10, exchange: HOST }]]));
    dns = await DnsServer.start({
      mx: { ...shared, 'mx.test': [{ priority: 10, exchange: 'mx1.mx.test' }] },
      a: { [HOST]: ['127.0.0.5'], 'mx1.mx.test': ['127.0.0.5'] },
      silent: ['silent.test'],
    });
  });
  afterEach(async () => {
    await Promise.all([mx.stop(), dns.stop()]);
  });

  const transport = (extra = {}) => makeTransport({ dnsServers: [dns.address], port: mx.port, tls: 'no', ...extra });

  test('150 domains sharing one MX host: 150 MX queries, one A and one AAAA query for the host', async () => {
    // acquireTimeout under Jest's 20 s: a delivery that cannot get a connection fails as pending.
    const { pool, transporter } = transport({ acquireTimeout: 10_000 });
    const [first, ...rest] = domainNames(150);
    // One domain first (the host is then cached), the other 149 at once (they share the cache).
    await transporter.sendMail(mail(`u@${first}`));
    const info = await transporter.sendMail(mail(rest.map((d) => `u@${d}`))).catch((err: { accepted: string[] }) => err);
    const { dns: stats } = pool.stats();
    await transporter.close();
    expect(domainNames(150).map((d) => dns.count(d, 'MX'))).toEqual(Array(150).fill(1));
    expect(dns.count(HOST, 'A')).toBe(1);
    expect(dns.count(HOST, 'AAAA')).toBe(1);
    expect(stats).toEqual({ queries: 152, cachedDomains: 150, cachedHosts: 1 });
    expect(info.accepted).toHaveLength(149);
    expect(mx.totalDelivered()).toBe(150);
  });

  test('concurrent lookups of one host share one query', async () => {
    // The host's answer comes late, so every domain's lookup finds the host's query in flight. Not
    // later than 250 ms: c-ares times a try out from the server's measured latency, not dnsTimeout.
    dns.zone.delays = { [HOST]: 100 };
    const { pool, transporter } = transport();
    const domains = domainNames(10);
    const info = await transporter.sendMail(mail(domains.map((d) => `u@${d}`)));
    await transporter.close();
    expect(info.accepted).toHaveLength(10);
    expect(domains.map((d) => dns.count(d, 'MX'))).toEqual(Array(10).fill(1));
    expect(dns.count(HOST, 'A')).toBe(1);
    expect(dns.count(HOST, 'AAAA')).toBe(1);
    expect(pool.stats().dns.cachedHosts).toBe(1);
  });

  test('a dropped first query is asked again: delivered, not pending, and the server saw 2 queries', async () => {
    dns.zone.dropFirst = { 'mx.test': 1, 'mx1.mx.test': 1 };
    const { pool, transporter } = transport({ dnsTimeout: 300 });
    const info = await transporter.sendMail(mail('a@mx.test'));
    await transporter.close();
    expect(info.accepted).toEqual(['a@mx.test']);
    expect(info.pending ?? []).toEqual([]);
    expect(mx.deliveredRecipients()).toEqual(['a@mx.test']);
    expect(dns.count('mx.test', 'MX')).toBe(2);
    expect(dns.count('mx1.mx.test', 'A')).toBe(2);
    expect(dns.count('mx1.mx.test', 'AAAA')).toBe(2);
    expect(pool.stats().dns.queries).toBe(6);
  });

  test('dnsRetries: 0 is one try (a lost packet leaves the recipient pending); a silent server gets 1 + dnsRetries tries', async () => {
    dns.zone.dropFirst = { 'mx.test': 1 };
    const once = transport({ dnsTimeout: 300, dnsRetries: 0 });
    const err = await once.transporter.sendMail(mail('a@mx.test')).catch((e: unknown) => e);
    await once.transporter.close();
    expect(err).toMatchObject({ code: 'EPENDING', pending: ['a@mx.test'] });
    expect(JSON.stringify((err as { domains: unknown }).domains)).toContain('ETIMEOUT');
    expect(dns.count('mx.test', 'MX')).toBe(1);

    const silent = transport({ dnsTimeout: 200 });
    const silentErr = await silent.transporter.sendMail(mail('b@silent.test')).catch((e: unknown) => e);
    await silent.transporter.close();
    expect(silentErr).toMatchObject({ code: 'EPENDING', pending: ['b@silent.test'] });
    expect(dns.count('silent.test', 'MX')).toBe(3);
    expect(mx.connections).toHaveLength(0);
  });

  test('TTL clamp for host entries: minDnsTtl keeps a 1 s answer, maxDnsTtl expires a day-long one', async () => {
    dns.zone.ttls = { [HOST]: 1 };
    const short = transport({ minDnsTtl: 60 });
    await short.transporter.sendMail(mail('a@d0.test'));
    await sleep(1_200);
    await short.transporter.sendMail(mail('b@d1.test'));
    await short.transporter.close();
    expect(dns.count(HOST, 'A')).toBe(1);

    dns.zone.ttls = { [HOST]: 86_400 };
    const long = transport({ minDnsTtl: 0, maxDnsTtl: 1 });
    await long.transporter.sendMail(mail('c@d2.test'));
    await long.transporter.sendMail(mail('d@d3.test'));
    expect(dns.count(HOST, 'A')).toBe(2);
    await sleep(1_200);
    await long.transporter.sendMail(mail('e@d4.test'));
    await long.transporter.close();
    expect(dns.count(HOST, 'A')).toBe(3);
  });

  test("a domain's answer expires with its host's addresses, not a full TTL after the domain was looked up", async () => {
    dns.zone.ttls = { [HOST]: 86_400 };
    const { transporter } = transport({ minDnsTtl: 0, maxDnsTtl: 2 });
    // t = 0: the host is cached until t = 2 s.
    await transporter.sendMail(mail('a@d0.test'));
    await sleep(1_300);
    // t = 1.3 s: d1 reuses the cached host, so d1's answer also expires at t = 2 s.
    await transporter.sendMail(mail('b@d1.test'));
    expect(dns.count(HOST, 'A')).toBe(1);
    await sleep(1_000);
    // t = 2.3 s: d1 was cached 1 s ago, under maxDnsTtl, but its host's addresses have expired.
    await transporter.sendMail(mail('c@d1.test'));
    await transporter.close();
    expect(dns.count('d1.test', 'MX')).toBe(2);
    expect(dns.count(HOST, 'A')).toBe(2);
    expect(mx.totalDelivered()).toBe(3);
  });

  test('dnsRetries is checked like the other DNS options', () => {
    expect(() => transport({ dnsRetries: -1 })).toThrow(/dnsRetries.*whole number ≥ 0/);
    expect(() => transport({ dnsRetries: 1.5 })).toThrow(/dnsRetries/);
  });
});
