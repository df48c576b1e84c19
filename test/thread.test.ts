/**
 * The same deliveries with `deliveryThread: true`: the engine runs in a worker thread (from the
 * build in dist/, which `npm test` makes first), and the server must see exactly what it sees
 * without the thread.
 */
import type { ConnectionSummary } from '../lib';
import { RecordingServer } from './support/recording-server';
import { makeTransport, messages, routeTo } from './support/send';

describe('deliveryThread', () => {
  let server: RecordingServer;
  beforeEach(async () => {
    server = await RecordingServer.start();
  });
  afterEach(() => server.stop());

  test('limits, bindings and results hold as in the application thread', async () => {
    const { pool, transporter } = makeTransport({
      deliveryThread: true,
      route: routeTo(server),
      maxDeliveriesPerConnection: 4,
      // One connection at a time per pool, so the connection count is exactly ceil(10 / 4) per binding.
      maxOutboundConnections: 1,
      bindings: { mta1: { localAddress: '127.0.0.2', name: 'mta1.test' }, mta2: { localAddress: '127.0.0.3', name: 'mta2.test' } },
      bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } },
    });
    const closed: ConnectionSummary[] = [];
    pool.on('connectionClosed', (summary: ConnectionSummary) => closed.push(summary));
    const infos = await Promise.all(messages(20, 'thread.test', { bindingGroup: 'bulk' }).map((m) => transporter.sendMail(m)));
    await transporter.close();

    expect(infos.flatMap((i) => i.accepted).sort()).toEqual(
      messages(20, 'thread.test')
        .map((m) => m.to)
        .sort(),
    );
    expect(server.totalDelivered()).toBe(20);
    for (const c of server.connections) expect(c.transactions.filter((t) => t.delivered).length).toBeLessThanOrEqual(4);
    const bySource = new Map<string, number>();
    for (const c of server.connections) bySource.set(c.remoteAddress.replace(/^::ffff:/, ''), (bySource.get(c.remoteAddress.replace(/^::ffff:/, '')) ?? 0) + 1);
    // 10 messages per binding, 4 per connection: 3 connections from each source address.
    expect(Object.fromEntries(bySource)).toEqual({ '127.0.0.2': 3, '127.0.0.3': 3 });
    expect(server.connections.map((c) => c.ehloName).sort()).toEqual(['mta1.test', 'mta1.test', 'mta1.test', 'mta2.test', 'mta2.test', 'mta2.test']);
    // Events and the final stats come back from the worker.
    expect(closed.reduce((sum, c) => sum + c.deliveries, 0)).toBe(20);
    expect(pool.stats().droppedPools).toMatchObject({ pools: 2, opened: 6, deliveries: 20 });
  });

  test("a 421 after k messages (Exim's limit) still ends with every message delivered once", async () => {
    await server.stop();
    server = await RecordingServer.start('127.0.0.1', { messagesPerConnection: 3 });
    const { transporter } = makeTransport({ deliveryThread: true, route: routeTo(server), maxOutboundConnections: 1, maxAttempts: 5 });
    const infos = await Promise.all(messages(10, 'exim.test').map((m) => transporter.sendMail(m)));
    await transporter.close();
    expect(infos.every((i) => i.accepted.length === 1)).toBe(true);
    const subjects = server.connections.flatMap((c) => c.transactions.filter((t) => t.delivered).map((t) => t.subject));
    expect(subjects.sort()).toEqual(
      messages(10, 'exim.test')
        .map((m) => m.subject)
        .sort(),
    );
  });

  test('rejections, a selectBinding function and verify() work across the thread', async () => {
    await server.stop();
    server = await RecordingServer.start('127.0.0.1', { rcpt: (address) => (address.startsWith('bad') ? { code: 550, message: 'no such user' } : undefined) });
    const { transporter } = makeTransport({
      deliveryThread: true,
      route: routeTo(server),
      bindings: { mta2: { localAddress: '127.0.0.3' } },
      selectBinding: () => 'mta2',
    });
    await expect(transporter.verify()).resolves.toBe(true);
    const info = await transporter.sendMail({ from: 's@example.com', to: ['good@t.test', 'bad@t.test'], subject: 's', text: 't' });
    const err = await transporter.sendMail({ from: 's@example.com', to: ['bad2@t.test'], subject: 's', text: 't' }).catch((e: unknown) => e);
    await transporter.close();
    expect(info).toMatchObject({ accepted: ['good@t.test'], rejected: ['bad@t.test'] });
    expect(info.domains[0]).toMatchObject({ binding: 'mta2', rejected: [expect.objectContaining({ responseCode: 550 })] });
    expect(err).toMatchObject({ code: 'EREJECTED', rejected: ['bad2@t.test'] });
    // verify() connected from the default binding; the messages went from mta2.
    const sending = server.connections.filter((c) => c.transactions.length > 0);
    expect(sending.length).toBeGreaterThan(0);
    expect(sending.every((c) => c.remoteAddress.endsWith('127.0.0.3'))).toBe(true);
  });

  test('options that cannot reach the thread are refused at construction', () => {
    expect(() => makeTransport({ deliveryThread: true, tlsOptions: { checkServerIdentity: () => undefined } })).toThrow(
      expect.objectContaining({ code: 'ECONFIG', path: 'deliveryThread' }),
    );
  });
});
