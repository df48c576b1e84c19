/**
 * The read-ahead budget (lib/message/read-ahead.ts): unit cases on its gates, then real sends of large
 * composed messages to a loopback server whose reader is slow, checking that the bytes held never
 * pass the budget while every message is delivered intact.
 */
import { randomBytes } from 'node:crypto';
import { ReadAheadBudget, type ReadAheadTicket } from '../lib/message/read-ahead';
import { closedAfterEach } from './support/harness';
import { routeTo } from './support/send';

const MiB = 1024 * 1024;

describe('ReadAheadBudget', () => {
  const key = (name: string, limit: number) => ({ key: name, limit });
  const admitted = async (pending: Promise<ReadAheadTicket> | ReadAheadTicket, ms = 20): Promise<boolean> =>
    Promise.race([Promise.resolve(pending).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);

  test('a destination holds at most its limit; the next waits and goes when one is released, in order', async () => {
    const budget = new ReadAheadBudget(100 * MiB);
    const first = await budget.admit([key('a', 2)], 10);
    await budget.admit([key('a', 2)], 10);
    const third = budget.admit([key('a', 2)], 10);
    const fourth = budget.admit([key('a', 2)], 10);
    expect(await admitted(third)).toBe(false);
    expect(budget.held).toEqual({ messages: 2, bytes: 20, waiting: 2 });
    budget.release(first);
    expect(await admitted(third)).toBe(true);
    expect(await admitted(fourth)).toBe(false);
  });

  test('a full destination does not hold back a message for another', async () => {
    const budget = new ReadAheadBudget(100 * MiB);
    await budget.admit([key('slow', 1)], 10);
    const blocked = budget.admit([key('slow', 1)], 10);
    expect(await admitted(blocked)).toBe(false);
    expect(await admitted(budget.admit([key('fast', 1)], 10))).toBe(true);
  });

  test('messages for several destinations, listed in any order, never wait on each other forever', async () => {
    // Found by the demo: [a, b] holding a and waiting for b, [b, a] holding b and waiting for a.
    const budget = new ReadAheadBudget(100 * MiB);
    const first = await budget.admit([key('a', 1), key('b', 1)], 10);
    const ab = budget.admit([key('a', 1), key('b', 1)], 10);
    const ba = budget.admit([key('b', 1), key('a', 1)], 10);
    budget.release(first);
    const next = await Promise.race([ab, ba]);
    budget.release(next);
    expect(await admitted(next === (await ab) ? ba : ab)).toBe(true);
  });

  test('a message waiting for a full destination holds no slot of another (found by review)', async () => {
    const budget = new ReadAheadBudget(100 * MiB);
    await budget.admit([key('slow', 1)], 10);
    // Two messages for both destinations wait for the slow one…
    const both = [budget.admit([key('a', 2), key('slow', 1)], 10), budget.admit([key('a', 2), key('slow', 1)], 10)];
    expect(await admitted(both[0])).toBe(false);
    // …and a message only for a still goes.
    expect(await admitted(budget.admit([key('a', 2)], 10))).toBe(true);
  });

  test('a large message waiting for bytes is not overtaken by smaller ones (found by review)', async () => {
    const budget = new ReadAheadBudget(100);
    const first = await budget.admit([key('a', 100)], 40);
    const large = budget.admit([key('a', 100)], 90);
    // A small one that would fit now waits its turn behind the large one…
    const small = budget.admit([key('a', 100)], 40);
    expect(await admitted(small)).toBe(false);
    // …which goes as soon as there is room for it, then the small one.
    budget.release(first);
    expect(await admitted(large)).toBe(true);
    expect(await admitted(small)).toBe(false);
    budget.release(await large);
    expect(await admitted(small)).toBe(true);
  });

  test('bytes stay under the budget; a message larger than the whole budget still goes, alone', async () => {
    const budget = new ReadAheadBudget(10 * MiB);
    const big = await budget.admit([key('a', 10)], 50 * MiB);
    expect(budget.held.bytes).toBe(50 * MiB);
    const next = budget.admit([key('a', 10)], 1 * MiB);
    expect(await admitted(next)).toBe(false);
    budget.release(big);
    expect(await admitted(next)).toBe(true);
  });

  test('the first read reserves the whole budget (it is built alone); later ones the size measured, and are charged their real size', async () => {
    const budget = new ReadAheadBudget(100 * MiB);
    const t = await budget.admit([key('a', 10)]);
    expect(t.bytes).toBe(100 * MiB);
    const waiting = budget.admit([key('a', 10)]);
    expect(await admitted(waiting)).toBe(false);
    budget.settle(t, 40 * MiB);
    expect(budget.held.bytes).toBe(80 * MiB);
    const u = await waiting;
    expect(u.bytes).toBe(40 * MiB);
    budget.settle(u, 1 * MiB);
    budget.release(t);
    budget.release(u);
    expect(budget.held).toEqual({ messages: 0, bytes: 0, waiting: 0 });
  });
});

describe('large composed messages queued at once', () => {
  const { startServer, transport } = closedAfterEach();

  test.each([false, true])(
    'hold no more than maxReadAheadBytes (plus reads begun on an estimate), and all arrive intact (deliveryThread: %s)',
    async (deliveryThread) => {
      const attachment = randomBytes(3 * MiB);
      const base64 = attachment.toString('base64');
      // A server that reads slowly (30 ms per message), so sends pile up behind its two connections.
      const server = await startServer({ dataReplyDelay: 30, server: { size: 0 } });
      const { pool, transporter } = transport({ route: routeTo(server), deliveryThread, maxOutboundConnections: 2, maxReadAheadBytes: 12 * MiB });
      let peak = 0;
      const sampler = setInterval(() => (peak = Math.max(peak, pool.stats().readAhead.bytes)), 2);
      const sends = Array.from({ length: 24 }, (_, i) =>
        transporter.sendMail({
          from: 's@example.com',
          to: `r${i}@big.test`,
          subject: `big ${i}`,
          html: '<p>see the attachment</p>',
          attachments: [{ filename: 'data.bin', content: attachment }],
        }),
      );
      const results = await Promise.allSettled(sends);
      clearInterval(sampler);
      const delivered = server.connections.flatMap((c) => c.transactions).filter((t) => t.delivered);
      const intact = delivered.filter((t) => (t.text ?? '').replace(/\r\n/g, '').includes(base64));
      expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
      expect(server.deliveredRecipients()).toHaveLength(24);
      expect(intact).toHaveLength(24);
      // One composed message is about 4.1 MiB (base64): budget 12 MiB, plus the reads started on a
      // low estimate before the first message was built (at most two here).
      expect(peak).toBeGreaterThan(0);
      expect(peak).toBeLessThanOrEqual(12 * MiB + 2 * 4.2 * MiB);
      expect(pool.stats().readAhead).toEqual({ messages: 0, bytes: 0, waiting: 0 });
    },
  );
});
