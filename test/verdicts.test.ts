import { RecordingServer } from './support/recording-server';
import { makeTransport, routeTo } from './support/send';
import type { BindingPoolSendError } from '../lib';

const refuseMailFrom = (code: number, message: string) => ({
  server: {
    onMailFrom(_address: unknown, _session: unknown, callback: (err?: Error | null) => void) {
      callback(Object.assign(new Error(message), { responseCode: code }));
    },
  },
});

describe('a refused MAIL FROM decides the recipients (PIPELINING: the RCPT replies behind it are 503s)', () => {
  test.each([
    [451, 'greylisted, try again later', 'EPENDING', 'pending'],
    [550, 'sender refused', 'EREJECTED', 'rejected'],
  ] as const)('%d at MAIL FROM: %s recipients carry the MAIL FROM reply', async (code, text, errorCode, status) => {
    const server = await RecordingServer.start('127.0.0.1', refuseMailFrom(code, text));
    const { transporter } = makeTransport({ route: routeTo(server) });
    const err = (await transporter
      .sendMail({ from: 's@example.com', to: ['a@example.org', 'b@example.org'], text: 'x' })
      .catch((e: unknown) => e)) as BindingPoolSendError;
    await transporter.close();
    await server.stop();
    expect(err.code).toBe(errorCode);
    expect([...err[status]].sort()).toEqual(['a@example.org', 'b@example.org']);
    for (const outcome of err.domains[0][status]) expect(outcome.response).toMatch(new RegExp(`^${code} .*${text}`));
  });
});

test('421 in reply to the final dot is a reply, not a lost connection: sent again, delivered once', async () => {
  let dots = 0;
  const server = await RecordingServer.start('127.0.0.1', { data: () => (++dots === 1 ? { code: 421, message: 'shutting down, try later' } : undefined) });
  const { transporter } = makeTransport({ route: routeTo(server) });
  const info = await transporter.sendMail({ from: 's@example.com', to: 'a@example.org', subject: 'once', text: 'x' });
  await transporter.close();
  await server.stop();
  expect(info.accepted).toEqual(['a@example.org']);
  expect(server.deliveredRecipients()).toEqual(['a@example.org']);
  expect(server.connections).toHaveLength(2);
});
