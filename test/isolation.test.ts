/**
 * A destination that stalls must not hold the others up: its own sends fail within its timeouts,
 * and the other domains' sends finish meanwhile.
 */
import { createServer, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { RecordingServer } from './support/recording-server';
import { makeTransport, messages, routeTo } from './support/send';

test('a stalling domain fails its own sends on its timeout while another domain is delivered', async () => {
  // Accepts connections and never greets.
  const held = new Set<Socket>();
  const staller = createServer((socket) => {
    held.add(socket);
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => staller.listen(0, '127.0.0.1', resolve));
  const fast = await RecordingServer.start();
  const { transporter } = makeTransport({
    domains: {
      'stall.test': { route: { host: '127.0.0.1', port: (staller.address() as AddressInfo).port }, greetingTimeout: 3_000 },
      'fast.test': { route: routeTo(fast) },
    },
  });

  let stalledSettled = 0;
  const stalled = messages(5, 'stall.test').map((m) =>
    transporter
      .sendMail(m)
      .then(
        () => 'accepted',
        (err: { code: string; pending: string[] }) => `${err.code} ${err.pending.length}`,
      )
      .finally(() => stalledSettled++),
  );
  const delivered = await Promise.all(messages(20, 'fast.test').map((m) => transporter.sendMail(m)));
  // Every fast.test send finished while the stalled ones were still waiting for a greeting.
  expect(stalledSettled).toBe(0);
  expect(delivered.every((info) => info.accepted.length === 1)).toBe(true);
  expect(fast.totalDelivered()).toBe(20);

  // The stalled domain's recipients go pending on the greeting timeout, not before and not never.
  expect(await Promise.all(stalled)).toEqual(Array(5).fill('EPENDING 1'));
  await transporter.close();
  for (const socket of held) socket.destroy();
  await new Promise<void>((resolve) => staller.close(() => resolve()));
  await fast.stop();
});
