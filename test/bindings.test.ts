/**
 * Bindings: which source address and EHLO name a message goes out with, how a binding is chosen
 * (per message, binding group round-robin, selectBinding, defaultBinding, the built-in
 * `default`), refusals for names that do not exist, and one pool per (binding, domain) pair.
 * Everything is checked on the server's side: where each connection came from and what it said.
 */
import type { SendMailOptions } from 'nodemailer';
import type { BindingPoolOptions, BindingPoolSendError, PoolStats } from '../lib';
import { RecordingServer, type SeenConnection } from './support/recording-server';
import { makeTransport, messages, routeTo } from './support/send';

const MTA1 = { localAddress: '127.0.0.2', name: 'mta1.test' };
const MTA2 = { localAddress: '127.0.0.3', name: 'mta2.test' };
const MTA3 = { localAddress: '127.0.0.4', name: 'mta3.test' };

function source(connection: SeenConnection): string {
  return connection.remoteAddress.replace(/^::ffff:/, '');
}

/** Subject of every delivered message → source address of the connection that carried it. */
function sourceBySubject(server: RecordingServer): Record<string, string> {
  const map: Record<string, string> = {};
  for (const c of server.connections) for (const t of c.transactions) if (t.delivered && t.subject) map[t.subject] = source(c);
  return map;
}

/** Delivered messages per source address. */
function countBySource(server: RecordingServer): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const c of server.connections) counts[source(c)] = (counts[source(c)] ?? 0) + c.transactions.filter((t) => t.delivered).length;
  return counts;
}

function mail(subject: string, extra: Partial<SendMailOptions> = {}): SendMailOptions {
  return { from: 'sender@example.com', to: `${subject}@example.org`, subject, text: subject, ...extra };
}

describe('bindings', () => {
  let server: RecordingServer;
  beforeEach(async () => {
    server = await RecordingServer.start();
  });
  afterEach(() => server.stop());

  const options = (extra: BindingPoolOptions = {}): BindingPoolOptions => ({
    route: routeTo(server),
    bindings: { mta1: { ...MTA1 }, mta2: { ...MTA2 } },
    ...extra,
  });

  describe('source address and EHLO name', () => {
    test("a message naming a binding goes out from the binding's address with its EHLO name", async () => {
      const { transporter } = makeTransport(options());
      const infos = await Promise.all([
        transporter.sendMail(mail('a1', { binding: 'mta1' })),
        transporter.sendMail(mail('b1', { binding: 'mta2' })),
        transporter.sendMail(mail('a2', { binding: 'mta1' })),
        transporter.sendMail(mail('b2', { binding: 'mta2' })),
      ]);
      await transporter.close();
      expect(infos.map((i) => i.domains.map((d) => d.binding))).toEqual([['mta1'], ['mta2'], ['mta1'], ['mta2']]);
      expect(sourceBySubject(server)).toEqual({ a1: '127.0.0.2', a2: '127.0.0.2', b1: '127.0.0.3', b2: '127.0.0.3' });
      for (const c of server.connections) expect(['127.0.0.2', '127.0.0.3']).toContain(source(c));
      // A second dial of a pair whose sends the first connection served meanwhile may be closed by
      // close() before it said EHLO (a busy machine): every connection that said it used its binding's name.
      const greeted = server.connections.filter((c) => c.ehloName !== '');
      expect(new Set(greeted.map(source))).toEqual(new Set(['127.0.0.2', '127.0.0.3']));
      for (const c of greeted) expect(c.ehloName).toBe(source(c) === '127.0.0.2' ? 'mta1.test' : 'mta2.test');
      expect(server.totalDelivered()).toBe(4);
    });

    test('a binding without its own name says EHLO with the global name', async () => {
      const { transporter } = makeTransport({
        route: routeTo(server),
        name: 'global.test',
        bindings: { mta1: { ...MTA1 }, bare: { localAddress: '127.0.0.5' } },
      });
      await transporter.sendMail(mail('bare', { binding: 'bare' }));
      await transporter.sendMail(mail('own', { binding: 'mta1' }));
      await transporter.close();
      expect(server.connections.map((c) => [source(c), c.ehloName])).toEqual([
        ['127.0.0.5', 'global.test'],
        ['127.0.0.2', 'mta1.test'],
      ]);
    });
  });

  describe('binding groups', () => {
    test('a group spreads messages round-robin over its bindings, in order', async () => {
      const { transporter } = makeTransport(options({ bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } } }));
      const used: string[] = [];
      for (const m of messages(6, 'example.org', { bindingGroup: 'bulk' })) {
        const info = await transporter.sendMail(m);
        used.push(info.domains[0].binding);
      }
      await transporter.close();
      expect(used).toEqual(['mta1', 'mta2', 'mta1', 'mta2', 'mta1', 'mta2']);
      expect(sourceBySubject(server)).toEqual({ m0: '127.0.0.2', m1: '127.0.0.3', m2: '127.0.0.2', m3: '127.0.0.3', m4: '127.0.0.2', m5: '127.0.0.3' });
      // One pooled connection per binding, each carrying its three messages.
      expect(server.connections.map((c) => [source(c), c.ehloName, c.transactions.filter((t) => t.delivered).length]).sort()).toEqual([
        ['127.0.0.2', 'mta1.test', 3],
        ['127.0.0.3', 'mta2.test', 3],
      ]);
    });

    test('concurrent sends to a three-binding group split evenly', async () => {
      const { transporter } = makeTransport({
        route: routeTo(server),
        bindings: { mta1: MTA1, mta2: MTA2, mta3: MTA3 },
        bindingGroups: { bulk: { bindings: ['mta1', 'mta2', 'mta3'] } },
      });
      const infos = await Promise.all(messages(9, 'example.org', { bindingGroup: 'bulk' }).map((m) => transporter.sendMail(m)));
      await transporter.close();
      expect(infos.every((i) => i.accepted.length === 1)).toBe(true);
      expect(countBySource(server)).toEqual({ '127.0.0.2': 3, '127.0.0.3': 3, '127.0.0.4': 3 });
    });
  });

  describe('choosing a binding', () => {
    test('selectBinding picks for messages that name none: a name, { binding }, { bindingGroup }, or undefined for defaultBinding', async () => {
      const seen: string[] = [];
      const selectBinding = (m: SendMailOptions) => {
        const subject = String(m.subject);
        seen.push(subject);
        if (subject.startsWith('vip')) return 'mta2';
        if (subject.startsWith('tx')) return { binding: 'mta1' };
        if (subject.startsWith('bulk')) return { bindingGroup: 'bulk' };
        return undefined;
      };
      const { transporter } = makeTransport({
        route: routeTo(server),
        bindings: { mta1: MTA1, mta2: MTA2, mta3: MTA3 },
        bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } },
        defaultBinding: 'mta3',
        selectBinding,
      });
      for (const m of [mail('vip'), mail('tx'), mail('bulk0'), mail('bulk1'), mail('other'), mail('named', { binding: 'mta2' })]) await transporter.sendMail(m);
      await transporter.close();
      // A message that names its binding is not offered to selectBinding.
      expect(seen).toEqual(['vip', 'tx', 'bulk0', 'bulk1', 'other']);
      expect(sourceBySubject(server)).toEqual({
        vip: '127.0.0.3',
        tx: '127.0.0.2',
        bulk0: '127.0.0.2',
        bulk1: '127.0.0.3',
        other: '127.0.0.4',
        named: '127.0.0.3',
      });
    });

    test('defaultBinding is used for messages that name none', async () => {
      const { transporter } = makeTransport(options({ defaultBinding: 'mta2' }));
      await transporter.sendMail(mail('d1'));
      await transporter.sendMail(mail('d2'));
      await transporter.close();
      expect(server.connections.map((c) => [source(c), c.ehloName])).toEqual([['127.0.0.3', 'mta2.test']]);
      expect(sourceBySubject(server)).toEqual({ d1: '127.0.0.3', d2: '127.0.0.3' });
    });

    test('defaultBinding may name a binding group: round-robin', async () => {
      const { transporter } = makeTransport(options({ bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } }, defaultBinding: 'bulk' }));
      for (const m of messages(4, 'example.org')) await transporter.sendMail(m);
      await transporter.close();
      expect(sourceBySubject(server)).toEqual({ m0: '127.0.0.2', m1: '127.0.0.3', m2: '127.0.0.2', m3: '127.0.0.3' });
    });

    test('with no bindings configured, the built-in `default` binding lets the OS pick the address and says EHLO with the global name', async () => {
      const { pool, transporter } = makeTransport({ route: routeTo(server), name: 'global.test' });
      const info = await transporter.sendMail(mail('plain'));
      const pools = pool.stats().pools;
      await transporter.close();
      expect(info.domains.map((d) => d.binding)).toEqual(['default']);
      expect(pools.map((p) => [p.binding, p.domain])).toEqual([['default', 'example.org']]);
      // Towards 127.0.0.1 the OS picks 127.0.0.1: none of the binding addresses.
      expect(server.connections.map((c) => [source(c), c.ehloName])).toEqual([['127.0.0.1', 'global.test']]);
    });

    test('a binding named `default` replaces the built-in one', async () => {
      const { transporter } = makeTransport({ route: routeTo(server), bindings: { default: { localAddress: '127.0.0.6', name: 'mine.test' } } });
      await transporter.sendMail(mail('mine'));
      await transporter.close();
      expect(server.connections.map((c) => [source(c), c.ehloName])).toEqual([['127.0.0.6', 'mine.test']]);
    });
  });

  describe('unknown names are refused before anything is sent', () => {
    test.each<[string, Partial<SendMailOptions>, BindingPoolOptions, string]>([
      ['an unknown binding', { binding: 'mta9' }, {}, 'unknown binding "mta9" (did you mean "mta1"?)'],
      [
        'an unknown binding group',
        { bindingGroup: 'blk' },
        { bindingGroups: { bulk: { bindings: ['mta1'] } } },
        'unknown binding group "blk" (did you mean "bulk"?)',
      ],
      [
        'a binding and a binding group at once',
        { binding: 'mta1', bindingGroup: 'bulk' },
        { bindingGroups: { bulk: { bindings: ['mta2'] } } },
        'names both a binding and a binding group',
      ],
      ['selectBinding naming nothing', {}, { selectBinding: () => 'nowhere' }, 'unknown binding "nowhere"'],
      ['selectBinding naming an unknown group', {}, { selectBinding: () => ({ bindingGroup: 'nowhere' }) }, 'unknown binding group "nowhere"'],
    ])('%s: EBINDING, and the server saw no connection', async (_what, choice, extra, message) => {
      const { transporter } = makeTransport(options(extra));
      const refused = await transporter.sendMail(mail('refused', { ...choice, to: ['x@example.org', 'y@other.example'] })).then(
        () => undefined,
        (err: BindingPoolSendError) => err,
      );
      await transporter.close();
      expect(refused).toBeDefined();
      expect(refused!.code).toBe('EBINDING');
      expect(refused!.message).toContain(message);
      expect(server.connections).toHaveLength(0);
    });

    test('after a refused message the next one still goes out, and only it reaches the server', async () => {
      const { transporter } = makeTransport(options());
      await expect(transporter.sendMail(mail('refused', { binding: 'nope' }))).rejects.toMatchObject({ code: 'EBINDING' });
      await transporter.sendMail(mail('fine', { binding: 'mta1' }));
      await transporter.close();
      expect(server.connections).toHaveLength(1);
      expect(server.connections[0].transactions.map((t) => t.subject)).toEqual(['fine']);
    });

    // `bindingGroups` is a plain object: a name it inherits (toString, constructor…) is no group.
    test('a binding group named like an Object.prototype property is unknown: EBINDING', async () => {
      const { transporter } = makeTransport(options());
      const refused = await transporter.sendMail(mail('refused', { bindingGroup: 'toString' })).then(
        () => undefined,
        (err: BindingPoolSendError) => err,
      );
      await transporter.close();
      expect(server.connections).toHaveLength(0);
      expect(refused?.code).toBe('EBINDING');
    });
  });

  describe('one pool per (binding, domain)', () => {
    test('pool.stats() has one entry per pair, with the deliveries, recipients and transactions the server saw', async () => {
      const refuse = new Set(['nobody@example.org']);
      await server.stop();
      server = await RecordingServer.start('127.0.0.1', { rcpt: (address) => (refuse.has(address) ? { code: 550, message: 'no such user' } : undefined) });
      const { pool, transporter } = makeTransport(options({ maxOutboundConnections: 1 }));
      const sends = [
        // mta1 → example.org: 3 messages, one with a refused recipient (4 RCPT, 3 delivered).
        transporter.sendMail({ from: 's@example.com', to: 'a1@example.org', subject: 'p1', text: 'x', binding: 'mta1' }),
        transporter.sendMail({ from: 's@example.com', to: ['a2@example.org', 'nobody@example.org'], subject: 'p2', text: 'x', binding: 'mta1' }),
        transporter.sendMail({ from: 's@example.com', to: 'a3@example.org', subject: 'p3', text: 'x', binding: 'mta1' }),
        // One message to two domains from mta1: example.org and other.example go through different pools.
        transporter.sendMail({
          from: 's@example.com',
          to: ['a4@example.org', 'o1@other.example', 'o2@other.example'],
          subject: 'p4',
          text: 'x',
          binding: 'mta1',
        }),
        // mta2 → example.org: its own pool, its own connection.
        transporter.sendMail({ from: 's@example.com', to: ['b1@example.org', 'b2@example.org', 'b3@example.org'], subject: 'p5', text: 'x', binding: 'mta2' }),
      ];
      const infos = await Promise.all(sends);
      const stats = pool.stats().pools;
      await transporter.close();

      expect(infos.map((i) => i.rejected)).toEqual([[], ['nobody@example.org'], [], [], []]);
      expect(infos[3].domains.map((d) => [d.binding, d.domain]).sort()).toEqual([
        ['mta1', 'example.org'],
        ['mta1', 'other.example'],
      ]);

      // What the server saw, per (source address, domain).
      const seen = new Map<string, { connections: number; transactions: number; recipients: number; deliveries: number }>();
      for (const c of server.connections) {
        const domains = new Set(c.transactions.flatMap((t) => t.rcptAttempts.map((r) => r.split('@')[1])));
        // A connection carries one pair's traffic only.
        expect(domains.size).toBe(1);
        const key = `${source(c)} ${[...domains][0]}`;
        const figures = seen.get(key) ?? { connections: 0, transactions: 0, recipients: 0, deliveries: 0 };
        figures.connections++;
        figures.transactions += c.transactions.length;
        figures.recipients += c.transactions.reduce((n, t) => n + t.rcptAttempts.length, 0);
        figures.deliveries += c.transactions.filter((t) => t.delivered).reduce((n, t) => n + t.rcptAccepted.length, 0);
        seen.set(key, figures);
      }
      expect(Object.fromEntries(seen)).toEqual({
        '127.0.0.2 example.org': { connections: 1, transactions: 4, recipients: 5, deliveries: 4 },
        '127.0.0.2 other.example': { connections: 1, transactions: 1, recipients: 2, deliveries: 2 },
        '127.0.0.3 example.org': { connections: 1, transactions: 1, recipients: 3, deliveries: 3 },
      });

      const address: Record<string, string> = { mta1: '127.0.0.2', mta2: '127.0.0.3' };
      const fromStats = (p: PoolStats) => [
        `${address[p.binding]} ${p.domain}`,
        { connections: p.opened, transactions: p.transactions, recipients: p.recipients, deliveries: p.deliveries },
      ];
      expect(stats).toHaveLength(3);
      expect(Object.fromEntries(stats.map(fromStats))).toEqual(Object.fromEntries(seen));
    });
  });
});
