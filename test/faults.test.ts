/**
 * Nothing lost, nothing duplicated: a few dozen messages (some for several recipients, some for
 * several domains) go out under per-connection limits while FaultServers misbehave in one way
 * per scenario, and in all ways at once (seeded) in the last. Every scenario runs the invariant
 * checker (test/support/invariants.ts) and asserts on what the servers saw.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BindingPoolOptions } from '../lib';
import { FaultServer, chance, type FaultPlan, type FaultServerOptions, type FaultTransaction } from './support/fault-server';
import { InvariantChecker, type Figures, type Limits, type SendRecord } from './support/invariants';
import { makeTransport } from './support/send';

const fixtures = join(__dirname, 'fixtures');
const tls = { key: readFileSync(join(fixtures, 'mx-test.key')), cert: readFileSync(join(fixtures, 'mx-test.crt')) };

const DOMAINS = ['a.test', 'b.test', 'c.test'];
const LIMITS: Limits = { maxDeliveriesPerConnection: 3, maxRecipientsPerConnection: 7, maxRecipientsPerTransaction: 4, maxOutboundConnections: 2 };
/** Short timeouts so that stalls end quickly; a tiny connect backoff so that a refused connect does not hold the rest of the batch pending. */
const TIMEOUTS: BindingPoolOptions = {
  greetingTimeout: 400,
  socketTimeout: 400,
  connectionTimeout: 2_000,
  connectBackoff: 10,
  maxConnectBackoff: 50,
  acquireTimeout: 15_000,
};

interface Message {
  subject: string;
  recipients: string[];
  text: string;
}

interface Shape {
  messages?: number;
  /** Recipients of message i. */
  count?: (i: number) => number;
  /** Domain of recipient j of message i. */
  domain?: (i: number, j: number) => string;
  /** Local-part prefix of recipient j of message i (marks it for a targeted fault). */
  prefix?: (i: number, j: number) => string;
  bodySize?: number;
}

function batch(tag: string, shape: Shape = {}): Message[] {
  const n = shape.messages ?? 36;
  return Array.from({ length: n }, (_, i) => {
    const count = shape.count?.(i) ?? 1 + (i % 4);
    const recipients = Array.from(
      { length: count },
      (_, j) => `${shape.prefix?.(i, j) ?? ''}${tag}-m${i}r${j}@${shape.domain?.(i, j) ?? DOMAINS[(i + j) % DOMAINS.length]}`,
    );
    return { subject: `${tag}-m${i}`, recipients, text: shape.bodySize ? `${'0123456789abcdef'.repeat(shape.bodySize / 16)}\n` : `message ${i}\n` };
  });
}

interface Scenario {
  name: string;
  plan: FaultPlan | ((domain: string) => FaultPlan);
  server?: Omit<FaultServerOptions, 'plan' | 'host' | 'port'>;
  options?: BindingPoolOptions;
  shape?: Shape;
  /** Sends in flight at once. Default 6. */
  window?: number;
}

interface Run {
  servers: Record<string, FaultServer>;
  sends: SendRecord[];
  figures: Figures;
  violations: string[];
  /** Outcome of every (subject, recipient), with the response. */
  outcome: (recipient: string) => { status: string; response: string; responseCode?: number };
  transactions: FaultTransaction[];
}

const summaries: string[] = [];
const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});
afterAll(() => {
  console.log(`${summaries.length} fault scenarios through the invariant checker (plus 2 RSET liveness tests and 1 pool-size test)\n${summaries.join('\n')}`);
});

async function run(scenario: Scenario): Promise<Run> {
  const servers: Record<string, FaultServer> = {};
  for (const domain of DOMAINS) {
    const plan = typeof scenario.plan === 'function' ? scenario.plan(domain) : scenario.plan;
    const server = await FaultServer.start({ label: domain, name: domain, ...scenario.server, plan });
    cleanups.push(() => server.stop());
    servers[domain] = server;
  }
  const routeTls = scenario.server?.tls ? { tls: { ca: tls.cert, servername: 'relay.test' } } : {};
  const { pool, transporter } = makeTransport({
    ...LIMITS,
    ...TIMEOUTS,
    ...scenario.options,
    domains: Object.fromEntries(DOMAINS.map((d) => [d, { route: { ...servers[d].route, ...routeTls } }])),
  });
  cleanups.push(() => pool.close());
  const checker = new InvariantChecker(pool, Object.values(servers), LIMITS);
  const messages = batch(scenario.name.replace(/\W+/g, '').slice(0, 12), scenario.shape);
  // A window of sends in flight, as a queue runner would keep: a refused connect fails the sends
  // waiting at that moment (and those during the backoff), not the whole batch.
  const queue = [...messages];
  const window = scenario.window ?? 6;
  await Promise.all(
    Array.from({ length: window }, async () => {
      for (let m = queue.shift(); m; m = queue.shift())
        await checker.send(transporter, { from: 'sender@example.com', to: m.recipients, subject: m.subject, text: m.text }, m.recipients);
    }),
  );
  const { violations, figures } = await checker.finish(transporter);

  const outcomes = new Map<string, { status: string; response: string; responseCode?: number }>();
  for (const send of checker.sends) {
    for (const domain of (send.info ?? send.error)?.domains ?? []) {
      for (const o of [...domain.accepted, ...domain.rejected, ...domain.pending]) outcomes.set(o.recipient, o);
    }
  }
  summaries.push(
    `${scenario.name}: ${figures.sends} sends, ${figures.recipients} rcpts → ${figures.accepted} accepted, ${figures.rejected} rejected, ${figures.pending} pending (${figures.unknown} unknown); ` +
      `lost ${figures.lost}, duplicates ${figures.duplicates}; ${figures.serverConnections} connections, ${figures.serverTransactions} transactions; faults ${JSON.stringify(figures.faults)}; ` +
      `peak open client ${figures.peakClientOpen} / server ${figures.peakServerConcurrency}`,
  );
  // Every invariant holds, pool sizes included.
  expect(violations).toEqual([]);
  // "Outcome unknown" is the truth, as the servers saw it. A server that took the final dot and
  // sent no reply may have the message: unknown, never sent again. Unknown is allowed beyond that
  // only where the server may have read the dot off the socket before the connection ended (it
  // had answered DATA, and then dropped or restarted without a reply: the client cannot tell
  // that from a server that read the dot); a drop or stall before DATA left the server with
  // nothing, so the recipient went on elsewhere.
  const transactions = Object.values(servers).flatMap((s) => s.transactions);
  for (const [recipient, outcome] of outcomes) {
    const own = transactions.filter((t) => t.rcptAccepted.includes(recipient));
    const mayHaveIt = own.some((t) => t.received && t.dataReply === undefined);
    const dotMayBeIn = own.some((t) => t.dataStarted && t.dataReply === undefined);
    const unknown = outcome.status === 'pending' && /outcome unknown/.test(outcome.response);
    if (mayHaveIt) expect({ recipient, unknown }).toEqual({ recipient, unknown: true });
    if (!dotMayBeIn) expect({ recipient, unknown }).toEqual({ recipient, unknown: false });
  }
  return {
    servers,
    sends: checker.sends,
    figures,
    violations,
    outcome: (recipient) => outcomes.get(recipient)!,
    transactions: Object.values(servers).flatMap((s) => s.transactions),
  };
}

/** The recipients of transactions that got a fault of this kind. */
const faulted = (r: Run, kind: string): string[] => r.transactions.filter((t) => t.faults.some((f) => f.startsWith(kind))).flatMap((t) => t.rcptAccepted);
const allRecipients = (r: Run): string[] => r.sends.flatMap((s) => s.recipients);
const nth =
  (every: number, from = 1) =>
  (n: number) =>
    n >= from && (n - from) % every === 0;

describe('greeting faults (the connect fails: recipients pending, the pool backs off, nothing lost)', () => {
  test.each([421, 554])('greeting %i on every third connection', async (code) => {
    const r = await run({
      name: `greet${code}`,
      plan: { greeting: ({ connection }) => (nth(3)(connection.n) ? { code, message: code === 421 ? '4.3.2 try again later' : '5.7.1 go away' } : undefined) },
    });
    expect(r.figures.faults[`greeting:${code}`]).toBeGreaterThan(0);
    expect(r.figures.accepted).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      expect(o.status === 'accepted' || (o.status === 'pending' && (o.response.includes(String(code)) || /failed \d+ time/.test(o.response)))).toBe(true);
    }
  });

  test('no greeting at all on every third connection (greetingTimeout)', async () => {
    const r = await run({ name: 'greetstall', plan: { greeting: ({ connection }) => (nth(3)(connection.n) ? 'stall' : undefined) } });
    expect(r.figures.faults['greeting:stall']).toBeGreaterThan(0);
    expect(r.figures.accepted).toBeGreaterThan(0);
    expect(r.figures.rejected).toBe(0);
    const pending = allRecipients(r).filter((x) => r.outcome(x).status === 'pending');
    for (const recipient of pending) expect(r.outcome(recipient).response).toMatch(/Greeting never received|Timeout|failed \d+ time/);
  });
});

describe("Exim's 421 after k messages on a connection", () => {
  test('421 at MAIL FROM after 2 messages per connection (client limit 3)', async () => {
    const r = await run({ name: 'exim421', plan: { messagesPerConnection: 2 } });
    expect(r.figures.faults['mail:421-too-many-messages']).toBeGreaterThan(0);
    for (const c of Object.values(r.servers).flatMap((s) => s.connections)) expect(c.transactions.filter((t) => t.received).length).toBeLessThanOrEqual(2);
    // A 421 only sends the transaction to another connection: with the client's limit (3) above
    // the server's (2), a recipient may meet several (a connection handed to it may have used up
    // its two), but a 421 after k ≥ 1 deliveries costs it no attempt.
    for (const recipient of allRecipients(r)) expect(r.outcome(recipient).status).toBe('accepted');
  });
});

describe('recipient refusals', () => {
  const marked = (i: number, j: number) => ((i * 3 + j) % 5 === 0 ? 'x' : '');

  test.each([
    [450, 'pending', '4.2.1 mailbox busy'],
    [550, 'rejected', '5.1.1 no such user'],
  ])('RCPT %i for chosen recipients: %s, the others accepted', async (code, status, message) => {
    const r = await run({
      name: `rcpt${code}`,
      plan: { rcpt: ({ rcpt }) => (rcpt!.startsWith('x') ? { code, message } : undefined) },
      shape: { prefix: marked },
    });
    expect(r.figures.faults[`rcpt:${code}`]).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      if (recipient.startsWith('x')) expect(o).toMatchObject({ status, responseCode: code });
      else expect(o.status).toBe('accepted');
    }
    // Refused once, never offered again.
    for (const recipient of allRecipients(r).filter((x) => x.startsWith('x')))
      expect(r.transactions.filter((t) => t.rcptAttempts.includes(recipient))).toHaveLength(1);
  });

  test('452 too many recipients after the first RCPT of each transaction: the rest go in new transactions', async () => {
    // Two or three recipients per domain per message, so that each domain's share needs several transactions.
    const r = await run({
      name: 'rcpt452',
      plan: { rcpt: ({ transaction }) => (transaction!.rcptAccepted.length >= 1 ? { code: 452, message: '4.5.3 too many recipients' } : undefined) },
      shape: { messages: 24, count: (i) => 2 + (i % 2), domain: (i) => DOMAINS[i % 3] },
    });
    expect(r.figures.faults['rcpt:452']).toBeGreaterThan(0);
    // Up to 3 recipients per domain, maxAttempts 3: each is delivered, once, in its own transaction.
    for (const recipient of allRecipients(r)) expect(r.outcome(recipient).status).toBe('accepted');
    for (const t of r.transactions) expect(t.rcptAccepted.length).toBeLessThanOrEqual(1);
  });
});

describe('refusals of the message at the final dot', () => {
  test.each([
    [451, 'pending', '4.3.0 temporary failure'],
    [554, 'rejected', '5.6.0 content rejected'],
  ])('DATA %i on every fifth transaction: its recipients %s, not sent again', async (code, status, message) => {
    const r = await run({ name: `data${code}`, plan: { data: ({ transaction }) => (nth(5)(transaction!.n) ? { code, message } : undefined) } });
    const refused = faulted(r, `data:${code}`);
    expect(refused.length).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      if (refused.includes(recipient)) expect(o).toMatchObject({ status, responseCode: code });
      else expect(o.status).toBe('accepted');
    }
    expect(r.transactions.length).toBe(new Set(r.transactions.map((t) => `${t.messageId}|${t.rcptAttempts.join()}`)).size);
  });
});

describe('dropped connections', () => {
  test('socket dropped right after MAIL FROM on every fourth transaction: sent again, delivered once', async () => {
    const r = await run({ name: 'dropmail', plan: { mail: ({ transaction }) => (nth(4)(transaction!.n) ? 'dropAfter' : undefined) } });
    expect(r.figures.faults['mail:dropAfter']).toBeGreaterThan(0);
    expect(r.figures.unknown).toBe(0);
    // Nothing was sent when the drop came: every recipient goes on over another connection.
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      expect(o.status === 'accepted' || (o.status === 'pending' && !/outcome unknown/.test(o.response))).toBe(true);
    }
    expect(r.figures.accepted).toBeGreaterThan(r.figures.recipients * 0.9);
  });

  test('socket dropped right after the first RCPT of chosen recipients: sent again, delivered once', async () => {
    const r = await run({
      name: 'droprcpt',
      plan: { rcpt: ({ rcpt, rcptSeen }) => (rcpt!.startsWith('x') && rcptSeen === 0 ? 'dropAfter' : undefined) },
      shape: { prefix: (i, j) => (i % 3 === 0 && j === 0 ? 'x' : '') },
    });
    expect(r.figures.faults['rcpt:dropAfter']).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) expect(r.outcome(recipient).status).toBe('accepted');
    for (const recipient of allRecipients(r).filter((x) => x.startsWith('x'))) {
      expect(r.transactions.filter((t) => t.rcptAttempts.includes(recipient)).length).toBeGreaterThanOrEqual(2);
    }
  });

  test('socket dropped at the DATA command (before 354) on every fourth transaction: sent again', async () => {
    const r = await run({ name: 'dropdatacmd', plan: { dataCommand: ({ transaction }) => (nth(4)(transaction!.n) ? 'drop' : undefined) } });
    expect(r.figures.faults['data:dropAtCommand']).toBeGreaterThan(0);
    expect(r.figures.unknown).toBe(0);
    expect(r.figures.accepted).toBeGreaterThan(r.figures.recipients * 0.9);
  });

  test('socket dropped in the middle of a 96 KB message on every fourth transaction: the server has nothing, so sent again and accepted', async () => {
    const r = await run({
      name: 'dropmid',
      plan: { data: ({ transaction }) => (nth(4)(transaction!.n) ? 'dropMidData' : undefined) },
      shape: { messages: 24, bodySize: 96 * 1024 },
    });
    const dropped = r.transactions.filter((t) => t.faults.includes('data:dropMidData'));
    expect(dropped.length).toBeGreaterThan(0);
    expect(r.figures.unknown).toBe(0);
    // The drop left the end of the message unread: every recipient goes on over another
    // connection and is accepted there, unless every one of its maxAttempts (3) was dropped.
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      const drops = dropped.filter((t) => t.rcptAccepted.includes(recipient)).length;
      if (drops < 3) expect(o.status).toBe('accepted');
      else expect(o).toMatchObject({ status: 'pending', response: expect.stringMatching(/reset the connection/) });
    }
    expect(r.figures.accepted).toBeGreaterThanOrEqual(r.figures.recipients * 0.9);
  });

  test('socket dropped after the final dot, before the reply, on every fourth transaction: pending "outcome unknown", never sent again', async () => {
    const r = await run({ name: 'dropdot', plan: { data: ({ transaction }) => (nth(4)(transaction!.n) ? 'dropAfterDot' : undefined) } });
    const unknown = faulted(r, 'data:dropAfterDot');
    expect(unknown.length).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      if (unknown.includes(recipient)) expect(o).toMatchObject({ status: 'pending', response: expect.stringMatching(/outcome unknown/) });
      else expect(o.status).toBe('accepted');
    }
    expect(r.figures.unknown).toBe(unknown.length);
  });
});

describe('stalls past the client timeouts', () => {
  test('no reply to the first RCPT of chosen recipients (socketTimeout): sent again, delivered once', async () => {
    const r = await run({
      name: 'stallrcpt',
      plan: { rcpt: ({ rcpt, rcptSeen }) => (rcpt!.startsWith('x') && rcptSeen === 0 ? 'stall' : undefined) },
      shape: { prefix: (i, j) => (i % 9 === 4 && j === 0 ? 'x' : '') },
    });
    expect(r.figures.faults['rcpt:stall']).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) expect(r.outcome(recipient).status).toBe('accepted');
  });

  test('no reply to the final dot on every seventh transaction (socketTimeout): pending "outcome unknown", never sent again', async () => {
    const r = await run({ name: 'stalldot', plan: { data: ({ transaction }) => (nth(7, 3)(transaction!.n) ? 'stallAfterDot' : undefined) } });
    const unknown = faulted(r, 'data:stallAfterDot');
    expect(unknown.length).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) {
      const o = r.outcome(recipient);
      if (unknown.includes(recipient)) expect(o).toMatchObject({ status: 'pending', response: expect.stringMatching(/outcome unknown/) });
      else expect(o.status).toBe('accepted');
    }
  });
});

describe('STARTTLS faults (tls: ifavailable, the default)', () => {
  test('STARTTLS offered but answered 454 on every other connection: goes on in plain text, all delivered', async () => {
    const r = await run({ name: 'tls454', server: { tls }, plan: { starttls: ({ connection }) => (connection.n % 2 === 0 ? 'refuse' : undefined) } });
    expect(r.figures.faults['starttls:454']).toBeGreaterThan(0);
    for (const recipient of allRecipients(r)) expect(r.outcome(recipient).status).toBe('accepted');
    const connections = Object.values(r.servers)
      .flatMap((s) => s.connections)
      .filter((c) => c.transactions.length > 0);
    for (const c of connections) expect(c.secure).toBe(!c.faults.includes('starttls:454'));
  });

  test('STARTTLS handshake broken on every third connection: that connect fails, nothing lost', async () => {
    const r = await run({ name: 'tlsbreak', server: { tls }, plan: { starttls: ({ connection }) => (nth(3)(connection.n) ? 'break' : undefined) } });
    expect(r.figures.faults['starttls:break']).toBeGreaterThan(0);
    expect(r.figures.accepted).toBeGreaterThan(0);
    const connections = Object.values(r.servers).flatMap((s) => s.connections);
    for (const c of connections.filter((c) => c.faults.includes('starttls:break'))) expect(c.transactions).toHaveLength(0);
    // Every message went over TLS.
    for (const c of connections.filter((c) => c.transactions.length > 0)) expect(c.secure).toBe(true);
  });
});

describe('server restart', () => {
  test('a server restarts (every socket closed, listens again on the same port) while the batch is in flight', async () => {
    const r = await run({
      name: 'restart',
      plan: (domain) => ({
        onTransaction: ({ server, transaction }) => {
          if (domain === 'a.test' && transaction!.n === 8) void server.restart();
        },
      }),
    });
    const a = r.servers['a.test'];
    expect(a.restarts).toBe(1);
    expect(a.connections.some((c) => c.generation === 0 && c.transactions.length > 0)).toBe(true);
    expect(a.connections.some((c) => c.generation === 1 && c.transactions.length > 0)).toBe(true);
    // What the restart cut off before the final dot went again; only a message whose dot was in
    // (at most one per connection open then) can be unknown. Everything else is accepted.
    expect(r.figures.unknown).toBeLessThanOrEqual(LIMITS.maxOutboundConnections! * LIMITS.maxRecipientsPerTransaction!);
    expect(r.figures.accepted).toBe(r.figures.recipients - r.figures.unknown);
  });
});

describe('every fault at once, at random (seeded)', () => {
  const SEED = 20_240_611;

  /** Each decision draws from the seed and a key naming it, so the run replays with the same seed. */
  const randomPlan = (seed: number): FaultPlan => ({
    messagesPerConnection: 4,
    greeting: ({ server, connection }) => {
      const x = chance(seed, `${server.label}|greeting|${connection.n}`);
      if (x < 0.03) return { code: 421, message: '4.3.2 busy' };
      if (x < 0.05) return { code: 554, message: '5.7.1 not now' };
      return x < 0.06 ? 'stall' : undefined;
    },
    starttls: ({ server, connection }) => {
      const x = chance(seed, `${server.label}|starttls|${connection.n}`);
      return x < 0.06 ? 'refuse' : x < 0.09 ? 'break' : undefined;
    },
    mail: ({ server, transaction }) => {
      const x = chance(seed, `${server.label}|mail|${transaction!.n}`);
      return x < 0.03 ? 'dropAfter' : x < 0.05 ? { code: 421, message: '4.3.2 shutting down' } : undefined;
    },
    rcpt: ({ server, rcpt, rcptSeen }) => {
      const x = chance(seed, `${server.label}|rcpt|${rcpt}|${rcptSeen}`);
      if (x < 0.04) return { code: 550, message: '5.1.1 no such user' };
      if (x < 0.08) return { code: 450, message: '4.2.1 busy' };
      if (x < 0.1) return { code: 452, message: '4.5.3 too many recipients' };
      if (x < 0.11) return { code: 421, message: '4.3.2 shutting down' };
      if (x < 0.125) return 'dropAfter';
      return x < 0.13 ? 'stall' : undefined;
    },
    dataCommand: ({ server, transaction }) => (chance(seed, `${server.label}|datacmd|${transaction!.n}`) < 0.02 ? 'drop' : undefined),
    data: ({ server, transaction }) => {
      const x = chance(seed, `${server.label}|data|${transaction!.n}`);
      if (x < 0.03) return { code: 451, message: '4.3.0 try later' };
      if (x < 0.06) return { code: 554, message: '5.6.0 rejected' };
      if (x < 0.08) return 'dropMidData';
      if (x < 0.1) return 'dropAfterDot';
      return x < 0.11 ? 'stallAfterDot' : undefined;
    },
    rset: ({ server, connection }) => {
      const x = chance(seed, `${server.label}|rset|${connection.n}|${connection.transactions.length}`);
      return x < 0.05 ? 'drop' : x < 0.07 ? 'stall' : undefined;
    },
    onTransaction: ({ server, transaction }) => {
      if (server.label === 'b.test' && transaction!.n === 20) void server.restart();
    },
  });

  test.each([false, true])(`mixed faults from seed ${SEED} (deliveryThread %s): every invariant holds`, async (deliveryThread) => {
    const r = await run({
      name: `mixed${SEED}${deliveryThread ? 't' : ''}`,
      server: { tls },
      plan: randomPlan(SEED),
      shape: { messages: 48 },
      options: { deliveryThread },
    });
    // Most kinds of fault did happen.
    expect(Object.keys(r.figures.faults).length).toBeGreaterThanOrEqual(8);
    expect(r.servers['b.test'].restarts).toBe(1);
    expect(r.figures.accepted).toBeGreaterThan(0);
  });
});

describe('a connection lost at the RSET after a refused transaction', () => {
  // Found by the soak (a restart at that moment) and fixed in lib/smtp/connection.ts (resetSession):
  // Nodemailer drops reset()'s callback when the connection closes or times out before the
  // reply, and the transaction's promise never settled, nor sendMail(), nor close(). Liveness
  // needs a bound: 3 s here, against a 300 ms socketTimeout.
  test.each(['drop', 'stall'] as const)('RSET %s after a 554 to the message: the send settles', async (kind) => {
    const server = await FaultServer.start({ label: 'a.test', plan: { data: () => ({ code: 554, message: '5.6.0 rejected' }), rset: () => kind } });
    cleanups.push(() => server.stop());
    const { pool, transporter } = makeTransport({ ...TIMEOUTS, socketTimeout: 300, route: server.route });
    const sending = transporter.sendMail({ from: 's@example.com', to: ['a@a.test'], subject: 'x', text: 'x' }).then(
      (info) => info,
      (err: Error) => err,
    );
    let timer: NodeJS.Timeout | undefined;
    const settled = await Promise.race([sending.then(() => true), new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), 3_000)))]);
    clearTimeout(timer);
    // A hung transport's close() would hang too: close it only when the send came back.
    if (settled) await pool.close();
    expect(server.connections[0].faults).toEqual([`rset:${kind}`]);
    expect(settled).toBe(true);
    expect(await sending).toMatchObject({ code: 'EREJECTED', rejected: ['a@a.test'] });
  });
});

describe('known bug', () => {
  // BUG (lib/pool/registry.ts): generic-pool takes a connection out of its count as soon as its
  // destroy starts, while CountingConnection.close() is still QUITting it; the pool dials the
  // replacement at once, so the destination sees up to 2 × maxOutboundConnections connections
  // from one binding. Server-side count, no timing involved: 30 messages, limits 3 / 2.
  test('a pool never has more than maxOutboundConnections connections open on the server, counting those still closing', async () => {
    const server = await FaultServer.start({ label: 'a.test' });
    cleanups.push(() => server.stop());
    const limits: Limits = { maxDeliveriesPerConnection: 3, maxOutboundConnections: 2 };
    const { pool, transporter } = makeTransport({ ...limits, route: server.route });
    cleanups.push(() => pool.close());
    const checker = new InvariantChecker(pool, [server], limits);
    const mails = Array.from({ length: 30 }, (_, i) => ({ from: 's@example.com', to: `u${i}@a.test`, subject: `m${i}`, text: 'x' }));
    await Promise.all(mails.map((m) => checker.send(transporter, m, [m.to])));
    const { violations } = await checker.finish(transporter);
    expect(server.connections.length).toBe(10);
    expect(violations).toEqual([]);
    expect(server.peakConcurrency()).toBeLessThanOrEqual(2);
  });
});
