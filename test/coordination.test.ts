/**
 * Limits shared across processes through a real Redis (issue 13): redis-server started on a
 * loopback port (test/support/redis-server.ts), child processes each with their own transport
 * (test/fixtures/coordination-child.cjs, built from dist/), one PolicyServer on loopback that
 * records concurrent sessions per source address and the time of every RCPT. Each case checks
 * the outcome on the server: every message accepted once, the cluster-wide cap and rate held.
 */
import { fork, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import type { Transporter } from 'nodemailer';
import Redis from 'ioredis';
import * as lib from '../lib';
import type { BindingPoolOptions, BindingPoolSendError, BindingPoolSentMessageInfo, SuspensionEvent } from '../lib';
import { peakInWindow, type PolicyServer } from './support/policy-server';
import { haveRedisServer, RedisServer } from './support/redis-server';
import { NO_DNS } from './support/send';
import { closedAfterEach, printedFigures } from './support/harness';

const note = printedFigures('coordination (server-side figures)');

const CHILD = join(__dirname, 'fixtures', 'coordination-child.cjs');
const SOURCE = '127.0.0.2';
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

if (!haveRedisServer()) throw new Error('redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)');

let redis: RedisServer;
beforeAll(async () => {
  redis = await RedisServer.start();
});
afterAll(async () => {
  await redis?.stop();
});

const { onCleanup, policyServer: server, transport } = closedAfterEach();

function inspector(): Redis {
  const client = new Redis(redis.url, { maxRetriesPerRequest: 1 });
  onCleanup(() => client.quit());
  return client;
}

/** Options of one process: one binding (the shared source address), coordination under `prefix`. */
function processOptions(receiver: PolicyServer, prefix: string, extra: BindingPoolOptions = {}): BindingPoolOptions {
  return {
    dnsServers: NO_DNS,
    bindings: { ip1: { localAddress: SOURCE } },
    defaultBinding: 'ip1',
    route: receiver.route,
    // An idle connection holds its lease: let it go soon, so the other processes get it.
    idleTimeout: 200,
    coordination: { redis: redis.url, keyPrefix: prefix, leaseTtl: 2_000 },
    ...extra,
  };
}

interface ChildOutcome {
  pid: number;
  accepted: number;
  pending: number;
  responses: Record<string, number>;
  unhandled?: string;
  error?: string;
}

function runChild(options: BindingPoolOptions, count: number): { pid: number; started: Promise<void>; done: Promise<ChildOutcome | undefined>; kill(): void } {
  const child = fork(CHILD, [JSON.stringify(options), String(count)], { stdio: ['ignore', 'pipe', 'inherit', 'ipc'] });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const started = new Promise<void>((resolve) => child.once('message', () => resolve()));
  const done = new Promise<ChildOutcome | undefined>((resolve) =>
    child.once('exit', () => resolve(output.trim() ? (JSON.parse(output.trim().split('\n').pop()!) as ChildOutcome) : undefined)),
  );
  onCleanup(async () => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  return { pid: child.pid!, started, done, kill: () => child.kill('SIGKILL') };
}

describe('8 processes, one Redis', () => {
  test('maxOutboundConnections 2 and maxMessageRate 50/s held cluster-wide; one process SIGKILLed in the middle: the others finish, its leases come back within leaseTtl', async () => {
    const receiver = await server();
    const prefix = 'nbp-test-8:';
    const options = processOptions(receiver, prefix, { maxOutboundConnections: 2, maxMessageRate: '50/s', acquireTimeout: 30_000 });
    const children = Array.from({ length: 8 }, () => runChild(options, 25));
    await Promise.all(children.map((c) => c.started));
    // Killed once the batch is under way, while it holds a lease (a live connection).
    const client = inspector();
    const leaseKey = `${prefix}lease:pair:ip1:cluster.test`;
    let victim: (typeof children)[number] | undefined;
    for (let waited = 0; !victim && waited < 10_000; waited += 10) {
      const holders = (await client.zrange(leaseKey, 0, -1)).map((m) => Number(m.split('-')[0]));
      if (receiver.rcpts.length >= 30) victim = children.find((c) => holders.includes(c.pid));
      if (!victim) await sleep(10);
    }
    if (!victim) throw new Error('no process held a lease');
    victim.kill();
    const killedAt = Date.now();
    let leaseBackMs: number | undefined;
    const watch = (async () => {
      while (leaseBackMs === undefined && Date.now() - killedAt < 10_000) {
        const members = await client.zrange(leaseKey, 0, -1);
        if (!members.some((m) => m.startsWith(`${victim!.pid}-`))) leaseBackMs = Date.now() - killedAt;
        else await sleep(50);
      }
    })();
    const outcomes = await Promise.all(children.filter((c) => c !== victim).map((c) => c.done));
    await watch;
    const source = receiver.counts(SOURCE);
    const ratePeak = peakInWindow(
      receiver.rcpts.map((r) => r.at),
      1_000,
    );
    const victimAccepted = receiver.accepted.filter((m) => m.recipients[0].startsWith(`p${victim!.pid}-`)).length;
    note('8 processes, cap 2, 50/s, one SIGKILL', {
      survivorsAccepted: outcomes.map((o) => o?.accepted),
      survivorsPending: outcomes.reduce((n, o) => n + (o?.pending ?? 0), 0),
      pendingResponses: outcomes.map((o) => o?.responses),
      victimAcceptedBeforeKill: victimAccepted,
      peakSessionsFromSource: source.peakSessions,
      peakRcptsPer1s: ratePeak,
      leasesBackAfterKillMs: leaseBackMs,
      serverMessages: receiver.accepted.length,
    });
    // Every survivor delivered all of its 25, each once.
    expect(outcomes.map((o) => o && { accepted: o.accepted, pending: o.pending, unhandled: o.unhandled, error: o.error })).toEqual(
      Array(7).fill({ accepted: 25, pending: 0, unhandled: undefined, error: undefined }),
    );
    const seen = receiver.acceptedRecipients();
    expect([...seen.values()].every((n) => n === 1)).toBe(true);
    expect(receiver.accepted.length).toBe(7 * 25 + victimAccepted);
    // The cluster-wide cap and rate, as the server saw them.
    expect(source.peakSessions).toBeLessThanOrEqual(2);
    expect(source.peakSessions).toBe(2);
    expect(ratePeak).toBeLessThanOrEqual(50);
    // The dead process's lease ran out within leaseTtl (2 s) and a renewal period.
    expect(leaseBackMs).toBeDefined();
    expect(leaseBackMs!).toBeLessThanOrEqual(2_000 + 800);
    // Every survivor let its leases go as it closed.
    await sleep(100);
    expect(await client.zcard(leaseKey)).toBe(0);
  }, 60_000);
});

async function sendAll(transporter: Transporter<BindingPoolSentMessageInfo>, count: number, tag: string) {
  const outcome = { accepted: 0, pending: [] as { response: string; retryAfter?: Date }[] };
  await Promise.all(
    Array.from({ length: count }, (_, i) =>
      transporter.sendMail({ from: 'news@sender.example', to: `${tag}${i}@cluster.test`, subject: `#${i}`, text: `line ${i}\n`.repeat(2_000) }).then(
        (info) => (outcome.accepted += info.accepted.length),
        (err: BindingPoolSendError) => {
          for (const d of err.domains ?? []) outcome.pending.push(...d.pending);
        },
      ),
    ),
  );
  return outcome;
}

describe('shared suspensions and learned limits', () => {
  test("one process's reply rule suspends the pair in every process; a limit one learns, the others keep", async () => {
    let told = false;
    const receiver = await server({
      maxMessagesPerConnection: 3,
      mailReply: ({ accepted }) =>
        accepted >= 20 && !told ? ((told = true), { code: 421, message: '4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred' }) : undefined,
    });
    const prefix = 'nbp-test-shared:';
    const a = transport(processOptions(receiver, prefix, { maxOutboundConnections: 1 }));
    const b = transport(processOptions(receiver, prefix, { maxOutboundConnections: 1 }));
    const heard: SuspensionEvent[] = [];
    b.pool.on('suspended', (e: SuspensionEvent) => heard.push(e));
    // a learns the 3-per-connection limit and then meets the TSS04.
    const first = await sendAll(a.transporter, 24, 'a');
    await sleep(200);
    const learnedInB = b.pool.stats().shaping.find((s) => s.learned)?.learned?.maxDeliveriesPerConnection;
    const connectsBefore = receiver.sessions.length;
    const second = await sendAll(b.transporter, 3, 'b');
    note('shared suspension and learned limit', {
      aAccepted: first.accepted,
      aPending: first.pending.length,
      learnedInB,
      bHeard: heard.map((e) => `${e.rule} fromCluster=${e.fromCluster}`),
      bPending: second.pending.map((p) => p.response.slice(0, 60)),
    });
    expect(first.accepted).toBe(20);
    expect(learnedInB).toBe(3);
    expect(heard).toEqual([expect.objectContaining({ domain: 'cluster.test', rule: 'yahoo-tss04', fromCluster: true })]);
    expect(second.pending).toHaveLength(3);
    expect(second.pending.every((p) => /suspended until .* by reply rule yahoo-tss04/.test(p.response) && p.retryAfter instanceof Date)).toBe(true);
    expect(receiver.sessions.length).toBe(connectsBefore);
  }, 20_000);
});

describe('with deliveryThread', () => {
  test('two transports delivering from worker threads share maxOutboundConnections 1: the server never sees 2 sessions', async () => {
    const receiver = await server();
    const options = processOptions(receiver, 'nbp-test-thread:', { deliveryThread: true, maxOutboundConnections: 1 });
    const [a, b] = [transport(options), transport(options)];
    const [first, second] = await Promise.all([sendAll(a.transporter, 15, 'ta'), sendAll(b.transporter, 15, 'tb')]);
    note('deliveryThread, cap 1 across 2 transports', { accepted: first.accepted + second.accepted, peakSessions: receiver.counts(SOURCE).peakSessions });
    expect(first.accepted + second.accepted).toBe(30);
    expect(receiver.counts(SOURCE).peakSessions).toBe(1);
  }, 20_000);
});

describe('when Redis fails', () => {
  test("Redis killed in the middle of a batch and restarted 1 s later ('wait'): the sends wait, then all are delivered, each once, no unhandled error", async () => {
    const receiver = await server();
    const { transporter } = transport(
      processOptions(receiver, 'nbp-test-restart:', {
        maxOutboundConnections: 2,
        maxDeliveriesPerConnection: 5,
        maxMessageRate: '100/s',
        acquireTimeout: 10_000,
      }),
    );
    const unhandled: unknown[] = [];
    const onUnhandled = (err: unknown) => unhandled.push(err);
    process.on('unhandledRejection', onUnhandled);
    try {
      const sending = sendAll(transporter, 60, 'r');
      for (let waited = 0; receiver.accepted.length < 10 && waited < 5_000; waited += 10) await sleep(10);
      await redis.kill();
      const killedAt = Date.now();
      const atKill = receiver.accepted.length;
      await sleep(1_000);
      const duringOutage = receiver.accepted.length - atKill;
      await redis.restart();
      const outcome = await sending;
      note('Redis killed and restarted after 1 s', {
        acceptedBeforeKill: atKill,
        acceptedDuringOutage: duringOutage,
        accepted: outcome.accepted,
        pending: outcome.pending.length,
        totalMs: Date.now() - killedAt,
      });
      expect(outcome).toEqual({ accepted: 60, pending: [] });
      expect([...receiver.acceptedRecipients().values()].every((n) => n === 1)).toBe(true);
      expect(receiver.acceptedRecipients().size).toBe(60);
      expect(unhandled).toEqual([]);
    } finally {
      process.off('unhandledRejection', onUnhandled);
      if (!redis.pid) await redis.restart();
    }
  }, 30_000);

  test("Redis down longer than acquireTimeout: every send pending with a clear response (ECOORDINATION); { processes: 2 } goes on with this process's share", async () => {
    const receiver = await server();
    await redis.kill();
    try {
      const waiting = transport(processOptions(receiver, 'nbp-test-down:', { acquireTimeout: 1_500 }));
      const stuck = await sendAll(waiting.transporter, 4, 'w');
      const local = transport(
        processOptions(receiver, 'nbp-test-down:', {
          acquireTimeout: 5_000,
          maxOutboundConnections: 4,
          coordination: { redis: redis.url, keyPrefix: 'nbp-test-down:', onFailure: { processes: 2 } },
        }),
      );
      const shared = await sendAll(local.transporter, 10, 'l');
      note('Redis down', {
        waitPending: stuck.pending.length,
        response: stuck.pending[0]?.response,
        localShareAccepted: shared.accepted,
        peakSessions: receiver.counts(SOURCE).peakSessions,
      });
      expect(stuck.accepted).toBe(0);
      expect(stuck.pending).toHaveLength(4);
      expect(stuck.pending[0].response).toMatch(/coordination store \(Redis\), which fails/);
      expect(shared.accepted).toBe(10);
      // This process's share of maxOutboundConnections 4 among 2 processes.
      expect(receiver.counts(SOURCE).peakSessions).toBeLessThanOrEqual(2);
    } finally {
      await redis.restart();
    }
  }, 30_000);
});

describe('without coordination', () => {
  test('no Redis module is loaded', () => {
    const script = `const { BindingPoolTransport } = require(${JSON.stringify(join(__dirname, '..', 'dist', 'cjs', 'index.js'))});
      const t = new BindingPoolTransport({ maxMessageRate: '10/s' });
      const loaded = Object.keys(require.cache).filter((k) => k.includes('/node_modules/ioredis/'));
      console.log(JSON.stringify(loaded)); t.close();`;
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(run.stdout.trim()).toBe('[]');
  });

  test.each([
    [{ coordination: { redis: 'localhost:6379' } }, /^coordination\.redis: must be a redis:\/\/ or rediss:\/\/ URL/],
    [{ coordination: { redis: 'redis://127.0.0.1', leaseTtl: 10 } }, /coordination\.leaseTtl: must be a whole number of milliseconds from 1000/],
    [{ coordination: { redis: 'redis://127.0.0.1', onFailure: 'panic' } }, /coordination\.onFailure: must be 'wait' or \{ processes: N \}/],
    [{ coordination: { redis: 'redis://127.0.0.1', keyPrefx: 'x' } }, /coordination\.keyPrefx: unknown option/],
    [{ deliveryThread: true, coordination: { redis: { defineCommand: () => undefined } } }, /coordination\.redis: must be a URL with deliveryThread/],
  ])('%j is refused naming the option', (options, message) => {
    expect(() => new lib.BindingPoolTransport(options as never)).toThrow(message);
  });
});
