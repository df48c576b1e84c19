/**
 * What a send reports: every recipient exactly once in accepted, rejected or pending, with the
 * server's reply, per domain; and what the server saw agrees with it.
 */
import type { BindingPoolSendError, BindingPoolSentMessageInfo } from '../lib';
import { RecordingServer, type Behaviour } from './support/recording-server';
import { closedAfterEach, rejection } from './support/harness';
import { routeTo } from './support/send';

const { startServer, transport } = closedAfterEach();

/** `bad…` refused 550 at RCPT, `soft…` deferred 450, the rest accepted. */
const picky: Behaviour = {
  rcpt: (address) => {
    if (address.startsWith('bad')) return { code: 550, message: '5.1.1 no such user' };
    if (address.startsWith('soft')) return { code: 450, message: '4.2.1 mailbox busy, try later' };
    return undefined;
  },
};

const rcptAttempts = (server: RecordingServer) => server.connections.flatMap((c) => c.transactions.flatMap((t) => t.rcptAttempts));
const mail = (to: string | string[], subject = 'hello', extra: Record<string, unknown> = {}) => ({
  from: 'sender@example.com',
  to,
  subject,
  text: 'hi',
  ...extra,
});

describe('a message for three domains', () => {
  const servers: Record<string, RecordingServer> = {};
  beforeEach(async () => {
    for (const domain of ['a.test', 'b.test', 'c.test']) servers[domain] = await startServer(picky);
  });

  test('every recipient is reported exactly once, per domain with binding, host and the server replies', async () => {
    const byDomain = {
      'a.test': { ok: ['ok1@a.test', 'ok2@a.test'], bad: ['bad1@a.test'], soft: ['soft1@a.test'] },
      'b.test': { ok: ['ok3@b.test'], bad: ['bad2@b.test', 'bad3@b.test'], soft: [] },
      'c.test': { ok: ['ok4@c.test'], bad: [], soft: ['soft2@c.test'] },
    };
    // Interleaved across domains and outcomes.
    const to = ['ok1@a.test', 'bad2@b.test', 'soft2@c.test', 'bad1@a.test', 'ok3@b.test', 'soft1@a.test', 'ok4@c.test', 'bad3@b.test', 'ok2@a.test'];
    const { transporter } = transport({
      domains: Object.fromEntries(Object.entries(servers).map(([domain, server]) => [domain, { route: routeTo(server) }])),
    });
    const info = await transporter.sendMail(mail(to));
    await transporter.close();

    const all = Object.values(byDomain);
    expect(info.accepted.sort()).toEqual(all.flatMap((d) => d.ok).sort());
    expect(info.rejected.sort()).toEqual(all.flatMap((d) => d.bad).sort());
    expect(info.pending.sort()).toEqual(all.flatMap((d) => d.soft).sort());
    // Exactly once across the three lists.
    expect([...info.accepted, ...info.rejected, ...info.pending].sort()).toEqual([...to].sort());
    expect(info.response).toMatch(/^250/);

    expect(info.domains.map((d) => d.domain).sort()).toEqual(['a.test', 'b.test', 'c.test']);
    for (const result of info.domains) {
      const expected = byDomain[result.domain as keyof typeof byDomain];
      const server = servers[result.domain];
      const host = `127.0.0.1:${server.port}`;
      expect(result.binding).toBe('default');
      expect(result.hosts).toEqual([host]);
      expect(result.connections).toHaveLength(1);
      expect(result.accepted.map((o) => o.recipient).sort()).toEqual([...expected.ok].sort());
      expect(result.rejected.map((o) => o.recipient).sort()).toEqual([...expected.bad].sort());
      expect(result.pending.map((o) => o.recipient).sort()).toEqual([...expected.soft].sort());
      for (const o of result.accepted) expect(o).toMatchObject({ status: 'accepted', responseCode: 250, host, response: expect.stringMatching(/^250 /) });
      for (const o of result.rejected)
        expect(o).toMatchObject({ status: 'rejected', responseCode: 550, host, response: expect.stringMatching(/^550 .*no such user/) });
      for (const o of result.pending)
        expect(o).toMatchObject({ status: 'pending', responseCode: 450, host, response: expect.stringMatching(/^450 .*mailbox busy/) });

      // The server saw every recipient of its domain once (a 450 is not retried at once) and
      // took the message for the accepted ones only.
      expect(rcptAttempts(server).sort()).toEqual([...expected.ok, ...expected.bad, ...expected.soft].sort());
      expect(server.deliveredRecipients().sort()).toEqual([...expected.ok].sort());
      expect(server.connections).toHaveLength(1);
    }
  });

  test('one domain refusing the message after DATA (554) has its recipients rejected, the others are accepted', async () => {
    await servers['b.test'].stop();
    servers['b.test'] = await startServer({ data: () => ({ code: 554, message: '5.7.1 message refused as spam' }) });
    const { transporter } = transport({
      domains: Object.fromEntries(Object.entries(servers).map(([domain, server]) => [domain, { route: routeTo(server) }])),
    });
    const info = await transporter.sendMail(mail(['ok@a.test', 'x@b.test', 'y@b.test', 'ok@c.test'], 'spam'));
    await transporter.close();

    expect(info.accepted.sort()).toEqual(['ok@a.test', 'ok@c.test']);
    expect(info.rejected.sort()).toEqual(['x@b.test', 'y@b.test']);
    expect(info.pending).toEqual([]);
    const b = info.domains.find((d) => d.domain === 'b.test')!;
    for (const o of b.rejected) expect(o).toMatchObject({ responseCode: 554, response: expect.stringMatching(/^554 .*refused as spam/) });
    // Accepted at RCPT, refused after the dot, and not tried again.
    const [transaction, ...others] = servers['b.test'].connections.flatMap((c) => c.transactions);
    expect(others).toEqual([]);
    expect(transaction.rcptAccepted.sort()).toEqual(['x@b.test', 'y@b.test']);
    expect(transaction.delivered).toBe(false);
  });
});

describe('results from one server', () => {
  let server: RecordingServer;
  beforeEach(async () => {
    server = await startServer(picky);
  });

  test('rejected recipients are not deliveries: maxDeliveriesPerConnection counts accepted ones only', async () => {
    const limit = 2;
    const { pool, transporter } = transport({ route: routeTo(server), maxDeliveriesPerConnection: limit, maxOutboundConnections: 1 });
    const to = ['ok0@x.test', 'bad0@x.test', 'ok1@x.test', 'bad1@x.test', 'bad2@x.test', 'ok2@x.test', 'ok3@x.test', 'bad3@x.test', 'ok4@x.test'];
    const info = await transporter.sendMail(mail(to));
    const stats = pool.stats().pools;
    await transporter.close();

    expect(info.accepted.sort()).toEqual(to.filter((r) => r.startsWith('ok')).sort());
    expect(info.rejected.sort()).toEqual(to.filter((r) => r.startsWith('bad')).sort());
    const delivered = server.connections.map((c) => c.transactions.filter((t) => t.delivered).reduce((sum, t) => sum + t.rcptAccepted.length, 0));
    for (const count of delivered) expect(count).toBeLessThanOrEqual(limit);
    // Had rejections counted, more connections would have been needed.
    expect(server.connections).toHaveLength(Math.ceil(5 / limit));
    expect(delivered).toEqual([2, 2, 1]);
    expect(server.totalDelivered()).toBe(5);
    expect(stats).toHaveLength(1);
    expect(stats[0].deliveries).toBe(server.totalDelivered());
    expect(stats[0].recipients).toBe(rcptAttempts(server).length);
    expect(stats[0].transactions).toBe(server.connections.reduce((sum, c) => sum + c.transactions.length, 0));
  });

  test('the same with single-recipient messages, rejected ones interleaved', async () => {
    const limit = 2;
    const { pool, transporter } = transport({ route: routeTo(server), maxDeliveriesPerConnection: limit, maxOutboundConnections: 1 });
    const to = Array.from({ length: 10 }, (_, i) => (i % 2 === 0 ? `ok${i}@x.test` : `bad${i}@x.test`));
    const results = await Promise.all(to.map((rcpt, i) => transporter.sendMail(mail(rcpt, `m${i}`)).catch((err: BindingPoolSendError) => err)));
    const stats = pool.stats().pools;
    await transporter.close();

    results.forEach((result, i) => {
      if (i % 2 === 0) expect((result as BindingPoolSentMessageInfo).accepted).toEqual([to[i]]);
      else expect(result).toMatchObject({ code: 'EREJECTED', rejected: [to[i]] });
    });
    for (const c of server.connections) {
      expect(c.transactions.filter((t) => t.delivered).reduce((sum, t) => sum + t.rcptAccepted.length, 0)).toBeLessThanOrEqual(limit);
    }
    expect(server.connections).toHaveLength(Math.ceil(5 / limit));
    expect(server.totalDelivered()).toBe(5);
    expect(stats[0].deliveries).toBe(5);
    expect(stats[0].recipients).toBe(10);
  });

  test('all rejected: the send fails with EREJECTED, carrying the breakdown', async () => {
    const { transporter } = transport({ route: routeTo(server) });
    const err = await rejection(transporter.sendMail(mail(['bad1@x.test', 'bad2@x.test'])));
    await transporter.close();

    expect(err.code).toBe('EREJECTED');
    expect(err.accepted).toEqual([]);
    expect(err.pending).toEqual([]);
    expect(err.rejected.sort()).toEqual(['bad1@x.test', 'bad2@x.test']);
    expect(err.response).toMatch(/^550 /);
    expect(err.domains).toHaveLength(1);
    expect(err.domains[0]).toMatchObject({ domain: 'x.test', binding: 'default', hosts: [`127.0.0.1:${server.port}`] });
    expect(err.domains[0].rejected.map((o) => o.responseCode)).toEqual([550, 550]);
    expect(rcptAttempts(server).sort()).toEqual(['bad1@x.test', 'bad2@x.test']);
    expect(server.totalDelivered()).toBe(0);
  });

  test('none accepted, some pending: the send fails with EPENDING', async () => {
    const { transporter } = transport({ route: routeTo(server) });
    const err = await rejection(transporter.sendMail(mail(['bad1@x.test', 'soft1@x.test', 'soft2@x.test'])));
    await transporter.close();

    expect(err.code).toBe('EPENDING');
    expect(err.rejected).toEqual(['bad1@x.test']);
    expect(err.pending.sort()).toEqual(['soft1@x.test', 'soft2@x.test']);
    expect(err.domains[0].pending.map((o) => o.responseCode)).toEqual([450, 450]);
    // A 450 is the server's verdict, not a broken connection: not retried within the send.
    expect(rcptAttempts(server).sort()).toEqual(['bad1@x.test', 'soft1@x.test', 'soft2@x.test']);
    expect(server.totalDelivered()).toBe(0);
  });

  test('a DATA-phase 554 rejects the recipients and fails the send with EREJECTED', async () => {
    await server.stop();
    server = await startServer({ data: () => ({ code: 554, message: '5.6.0 content rejected' }) });
    const { transporter } = transport({ route: routeTo(server) });
    const err = await rejection(transporter.sendMail(mail(['a@x.test', 'b@x.test'])));
    await transporter.close();

    expect(err.code).toBe('EREJECTED');
    expect(err.rejected.sort()).toEqual(['a@x.test', 'b@x.test']);
    expect(err.domains[0].rejected.every((o) => o.responseCode === 554 && /content rejected/.test(o.response))).toBe(true);
    const transactions = server.connections.flatMap((c) => c.transactions);
    expect(transactions).toHaveLength(1);
    expect(transactions[0]).toMatchObject({ delivered: false, rcptAccepted: ['a@x.test', 'b@x.test'] });
  });

  test('invalid addresses are rejected locally while the others go out', async () => {
    const { transporter } = transport({ route: routeTo(server) });
    // An explicit envelope: Nodemailer passes these through as given.
    const info = await transporter.sendMail(mail('ok@x.test', 'hello', { envelope: { from: 'sender@example.com', to: ['nodomain', 'user@', 'ok@x.test'] } }));
    await transporter.close();

    expect(info.accepted).toEqual(['ok@x.test']);
    expect(info.rejected.sort()).toEqual(['nodomain', 'user@']);
    expect(info.pending).toEqual([]);
    const invalid = info.domains.find((d) => d.domain === '')!;
    expect(invalid.rejected.map((o) => o.response)).toEqual([expect.stringMatching(/invalid address/), expect.stringMatching(/invalid address/)]);
    expect(invalid.hosts).toEqual([]);
    expect(rcptAttempts(server)).toEqual(['ok@x.test']);
    expect(server.deliveredRecipients()).toEqual(['ok@x.test']);
  });

  test.each([
    ['recipient', (envelope: { from: string; to: string[] }) => envelope.to.push('evil@x.test\r\nRCPT TO:<injected@x.test>')],
    ['recipient', (envelope: { from: string; to: string[] }) => envelope.to.push('evil\n@x.test')],
    ['sender', (envelope: { from: string; to: string[] }) => (envelope.from = 'sender@example.com\r\nRSET')],
  ])('a %s with CR/LF fails the whole message with EADDRESS; the server sees nothing', async (_role, tamper) => {
    const { transporter } = transport({ route: routeTo(server) });
    // Nodemailer itself strips CR/LF from addresses it parses, so the bad address is put into the
    // envelope after parsing, as a plugin or a caller-built message could.
    transporter.use('stream', (m, done) => {
      tamper(m.message.getEnvelope() as { from: string; to: string[] });
      done();
    });
    const err = await rejection(transporter.sendMail(mail('ok@x.test', 'hello', { envelope: { from: 'sender@example.com', to: ['ok@x.test'] } })));
    await transporter.close();

    expect(err.code).toBe('EADDRESS');
    expect(err.message).toMatch(/CR, LF/);
    expect(server.connections).toHaveLength(0);
  });

  test('a recipient listed twice (to and bcc, domain in another form) is sent and reported once', async () => {
    const { transporter } = transport({ route: routeTo(server) });
    const info = await transporter.sendMail(mail('dup@x.test', 'hello', { cc: 'other@x.test', bcc: ['dup@x.test', 'dup@X.TEST.'] }));
    await transporter.close();

    expect(info.accepted.sort()).toEqual(['dup@x.test', 'other@x.test']);
    expect(info.rejected).toEqual([]);
    expect(info.pending).toEqual([]);
    expect(rcptAttempts(server).sort()).toEqual(['dup@x.test', 'other@x.test']);
    expect(server.deliveredRecipients().sort()).toEqual(['dup@x.test', 'other@x.test']);
  });
});
