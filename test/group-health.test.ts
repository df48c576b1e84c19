import { RecordingServer } from './support/recording-server';
import { makeTransport, routeTo } from './support/send';

test('a binding group skips a member whose pool for the domain is backing off', async () => {
  // The receiver refuses connections from 127.0.0.2 only (a blocklisted sending IP).
  const server = await RecordingServer.start('127.0.0.1', {
    greeting: (from) => (from === '127.0.0.2' ? { code: 421, message: 'blocked' } : undefined),
  });
  const { transporter } = makeTransport({
    route: routeTo(server),
    connectBackoff: 60_000,
    bindings: { mta1: { localAddress: '127.0.0.2' }, mta2: { localAddress: '127.0.0.3' } },
    bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } },
  });
  const results: string[] = [];
  for (let i = 0; i < 6; i++) {
    const outcome = await transporter.sendMail({ from: 's@example.com', to: `u${i}@health.test`, subject: `m${i}`, text: 'x', bindingGroup: 'bulk' }).then(
      (info) => `accepted via ${info.domains[0].binding}`,
      (err: { code: string; domains: { binding: string }[] }) => `${err.code} via ${err.domains[0].binding}`,
    );
    results.push(outcome);
  }
  await transporter.close();
  await server.stop();
  // m0 tries mta1 and fails; from then on mta1's pool backs off and every message takes mta2,
  // where plain round-robin would have sent m2 and m4 into the backoff as well.
  expect(results).toEqual(['EPENDING via mta1', ...Array(5).fill('accepted via mta2')]);
  expect(server.refusedConnections).toEqual(['127.0.0.2']);
  expect(server.connections.map((c) => c.remoteAddress.replace(/^::ffff:/, ''))).toEqual(['127.0.0.3']);
  expect(server.totalDelivered()).toBe(5);
});
