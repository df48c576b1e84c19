import { RecordingServer } from './support/recording-server';
import { makeTransport, messages, routeTo } from './support/send';

describe('per-connection limits, counted on the server', () => {
  let server: RecordingServer;
  beforeEach(async () => {
    server = await RecordingServer.start();
  });
  afterEach(() => server.stop());

  test.each([
    [20, 7],
    [25, 5],
    [9, 1],
  ])('%d single-recipient messages with maxDeliveriesPerConnection %d open ceil(N/L) connections', async (n, limit) => {
    const { pool, transporter } = makeTransport({ route: routeTo(server), maxDeliveriesPerConnection: limit, maxOutboundConnections: 1 });
    const infos = await Promise.all(messages(n, 'example.org').map((m) => transporter.sendMail(m)));
    await transporter.close();
    expect(infos.every((i) => i.accepted.length === 1)).toBe(true);
    expect(server.connections).toHaveLength(Math.ceil(n / limit));
    for (const c of server.connections) expect(c.transactions.filter((t) => t.delivered).length).toBeLessThanOrEqual(limit);
    expect(server.totalDelivered()).toBe(n);
    const retired = pool.stats().droppedPools;
    expect(retired).toBeDefined();
  });

  test('maxRecipientsPerConnection splits one message over connections and is never exceeded', async () => {
    const { transporter } = makeTransport({ route: routeTo(server), maxRecipientsPerConnection: 3, maxOutboundConnections: 1 });
    const to = Array.from({ length: 10 }, (_, i) => `r${i}@example.org`);
    const info = await transporter.sendMail({ from: 's@example.com', to, subject: 'x', text: 'x' });
    await transporter.close();
    expect(info.accepted.sort()).toEqual([...to].sort());
    expect(server.connections.map((c) => c.transactions.flatMap((t) => t.rcptAttempts).length)).toEqual([3, 3, 3, 1]);
    expect(server.deliveredRecipients().sort()).toEqual([...to].sort());
  });
});
