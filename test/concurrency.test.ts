import { ConcurrencyLimit } from '../lib/message/concurrency';
import { closedAfterEach } from './support/harness';
import { messages, routeTo } from './support/send';

/** A task that runs until its release() is called. */
function gated() {
  let release!: () => void;
  const done = new Promise<void>((resolve) => (release = resolve));
  return { release, task: () => done };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

describe('ConcurrencyLimit', () => {
  test('runs at most `limit` tasks at once and starts the rest in the order they came', async () => {
    const limit = new ConcurrencyLimit(2);
    const started: number[] = [];
    const gates = Array.from({ length: 5 }, gated);
    const runs = gates.map((gate, i) =>
      limit.run(() => {
        started.push(i);
        return gate.task();
      }),
    );
    await turn();
    expect(started).toEqual([0, 1]);
    expect(limit.queued).toBe(3);
    gates[1].release();
    await turn();
    expect(started).toEqual([0, 1, 2]);
    gates[0].release();
    gates[2].release();
    await turn();
    expect(started).toEqual([0, 1, 2, 3, 4]);
    expect(limit.queued).toBe(0);
    gates[3].release();
    gates[4].release();
    await Promise.all(runs);
  });

  test('a task that fails frees its turn and passes its error on', async () => {
    const limit = new ConcurrencyLimit(1);
    const failing = limit.run(() => Promise.reject(new Error('broken stream')));
    const next = limit.run(async () => 'built');
    await expect(failing).rejects.toThrow('broken stream');
    await expect(next).resolves.toBe('built');
    expect(limit.queued).toBe(0);
  });

  test('a long queue drains in order', async () => {
    const limit = new ConcurrencyLimit(3);
    const order: number[] = [];
    await Promise.all(Array.from({ length: 3_000 }, (_, i) => limit.run(async () => void order.push(i))));
    expect(order).toEqual(Array.from({ length: 3_000 }, (_, i) => i));
  });
});

describe('a batch of composed messages handed over at once', () => {
  const { startServer, transport } = closedAfterEach();

  // At most 16 read at once, and at most 4 per connection the destination may open (8 with
  // deliveryThread: the messages crossing between the threads count too).
  test.each([
    [false, 10, 16],
    [true, 10, 16],
    [false, 2, 8],
    [true, 1, 8],
  ])(
    'deliveryThread %s, maxOutboundConnections %i: read %i at a time at most, and delivered in full',
    async (deliveryThread, maxOutboundConnections, expected) => {
      const server = await startServer();
      const { transporter } = transport({ route: routeTo(server), deliveryThread, maxOutboundConnections });
      // Count the message streams being read at once, as the transport reads them.
      let reading = 0;
      let mostAtOnce = 0;
      transporter.use('stream', (mail, done) => {
        const open = mail.message.createReadStream.bind(mail.message);
        mail.message.createReadStream = () => {
          const stream = open();
          mostAtOnce = Math.max(mostAtOnce, ++reading);
          stream.once('end', () => reading--);
          return stream;
        };
        done();
      });
      const results = await Promise.allSettled(messages(120, 'x.test').map((m) => transporter.sendMail(m)));
      await transporter.close();
      await server.stop();

      expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      // The first message is built alone (its size is not known yet) and may still be held while
      // the next ones are read, so the most seen at once depends on timing: reads run side by side.
      expect(mostAtOnce).toBeLessThanOrEqual(expected);
      expect(mostAtOnce).toBeGreaterThanOrEqual(Math.min(expected - 1, 3));
      expect(server.deliveredRecipients()).toHaveLength(120);
    },
  );
});
