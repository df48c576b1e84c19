/**
 * The durable delivery queue (`nodemailer-binding-pool/queue`) against a real redis-server and
 * loopback receivers: greylisting, a receiver down for the first attempts, a permanent 5xx, an
 * age limit, "outcome unknown", a 27 MiB message, bad input, a worker killed with SIGKILL in the
 * middle of a batch (test/fixtures/queue-worker.cjs, built from dist/), and Redis killed and
 * restarted with its append-only file. Every case checks on the server which (Message-ID,
 * recipient) pairs arrived, and how often.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import Redis from 'ioredis';
import type { SendMailOptions } from 'nodemailer';
import type { BindingPoolOptions } from '../lib';
import { MailQueue, MailQueueEvents, MailWorker, type FinalFailure, type MailOutcome, type MailWorkerOptions, type MailQueueOptions } from '../lib/queue';
import type { PolicyReply, PolicyServer } from './support/policy-server';
import { FaultServer } from './support/fault-server';
import { sha256 } from './support/byte-server';
import { haveRedisServer, RedisServer } from './support/redis-server';
import { freePort } from './support/free-port';
import { NO_DNS } from './support/send';
import { closedAfterEach, printedFigures } from './support/harness';

jest.setTimeout(60_000);

const note = printedFigures('queue (server-side figures)');

const SOURCE = '127.0.0.2';
const GREYLISTED: PolicyReply = { code: 451, message: '4.7.1 greylisted, try again later' };
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

if (!haveRedisServer()) throw new Error('redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)');

// The worker processes run dist/: a build older than lib/queue would test old code.
const built = statSync(join(__dirname, '..', 'dist', 'cjs', 'queue', 'mail-worker.js'), { throwIfNoEntry: false })?.mtimeMs ?? 0;
const sources = readdirSync(join(__dirname, '..', 'lib', 'queue')).map((f) => statSync(join(__dirname, '..', 'lib', 'queue', f)).mtimeMs);
if (built < Math.max(...sources)) throw new Error('dist/ is older than lib/queue: run `npm run build` first (npm test does)');

let redis: RedisServer;
beforeAll(async () => {
  redis = await RedisServer.start();
});
afterAll(async () => {
  await redis?.stop();
});

const { onCleanup, policyServer } = closedAfterEach();
let queues = 0;

function transportOptions(route: { host: string; port: number }, extra: BindingPoolOptions = {}): BindingPoolOptions {
  return { dnsServers: NO_DNS, bindings: { ip1: { localAddress: SOURCE } }, defaultBinding: 'ip1', route, idleTimeout: 200, ...extra };
}

/** A queue, a worker on it and an events listener, all closed after the test. */
function setup(route: { host: string; port: number }, worker: Partial<MailWorkerOptions> = {}, queue: Partial<MailQueueOptions> = {}, url = redis.url) {
  const name = `q${++queues}`;
  const mailQueue = new MailQueue(name, { connection: url, ...queue });
  onCleanup(() => mailQueue.close());
  const start = (): MailWorker => {
    const mailWorker = new MailWorker(name, { connection: url, transport: transportOptions(route), retrySchedule: ['300ms'], ...worker });
    mailWorker.on('error', () => undefined);
    onCleanup(() => mailWorker.close());
    return mailWorker;
  };
  return { name, mailQueue, start };
}

/** Resolves with each id's outcome once every one of them is done (from the worker's 'done' events). */
function doneOutcomes(worker: MailWorker, ids: readonly string[]): Promise<Map<string, MailOutcome>> {
  const outcomes = new Map<string, MailOutcome>();
  return new Promise((resolve) => {
    worker.on('done', (outcome: MailOutcome) => {
      if (ids.includes(outcome.id)) outcomes.set(outcome.id, outcome);
      if (outcomes.size === ids.length) resolve(outcomes);
    });
  });
}

/** Realistic mail: text and HTML of a few KiB, every third with a 20–60 KiB attachment. */
function letter(i: number, to: string[]): SendMailOptions {
  const text = `Dear customer,\n\nyour statement #${i} is ready.\n`.repeat(40 + (i % 7) * 10);
  const mail: SendMailOptions = {
    from: 'Billing <billing@sender.example>',
    to,
    subject: `statement #${i}`,
    text,
    html: `<p>${text.replace(/\n/g, '</p><p>')}</p>`,
  };
  if (i % 3 === 0)
    mail.attachments = [{ filename: `statement-${i}.pdf`, content: randomBytes(20 * 1024 + ((i * 7919) % 40) * 1024), contentType: 'application/pdf' }];
  return mail;
}

/** (Message-ID, recipient) → times the server answered 250 for it. */
function deliveries(server: PolicyServer): Map<string, number> {
  const counts = new Map<string, number>();
  for (const message of server.accepted)
    for (const r of message.recipients) counts.set(`${message.messageId}|${r}`, (counts.get(`${message.messageId}|${r}`) ?? 0) + 1);
  return counts;
}

/** CRLF line ends and no trailing line break: the form two copies of a message are compared in. */
const crlf = (bytes: Buffer): Buffer =>
  Buffer.from(
    bytes
      .toString('latin1')
      .replace(/\r?\n/g, '\r\n')
      .replace(/(\r\n)+$/, ''),
    'latin1',
  );

function inspector(url = redis.url): Redis {
  const client = new Redis(url, { maxRetriesPerRequest: 1 });
  onCleanup(() => client.quit());
  return client;
}

describe('retries', () => {
  test('greylisting: every recipient is refused with 451 at first and accepted on the next attempt, each once, with the same Message-ID', async () => {
    const firstSeen = new Map<string, number>();
    const server = await policyServer({
      rcptReply: ({ address, from }) => {
        const key = `${from}|${address}`;
        const first = firstSeen.get(key);
        if (first === undefined) firstSeen.set(key, Date.now());
        return first === undefined || Date.now() - first < 250 ? GREYLISTED : undefined;
      },
    });
    const { name, mailQueue, start } = setup(server.route);
    const events = new MailQueueEvents(name, { connection: redis.url });
    onCleanup(() => events.close());
    await events.waitUntilReady();
    const fromEvents: MailOutcome[] = [];
    events.on('done', (outcome: MailOutcome) => fromEvents.push(outcome));

    const ids = await mailQueue.addBulk(Array.from({ length: 12 }, (_, i) => letter(i, [`a${i}@grey.test`, `b${i}@grey.test`])));
    const worker = start();
    const finals: string[] = [];
    worker.on('final', (event: { recipients: { address: string }[] }) => finals.push(...event.recipients.map((r) => r.address)));
    const done = doneOutcomes(worker, ids);
    // While the recipients wait for their second attempt, the query shows them queued with a time.
    let queued: MailOutcome | undefined;
    for (let i = 0; i < 50 && queued?.recipients[0].attempts !== 1; i++) {
      await sleep(20);
      queued = await mailQueue.outcome(ids[0]);
    }
    expect(queued).toMatchObject({ state: 'queued', recipients: [{ status: 'queued', attempts: 1, responseCode: 451 }, { status: 'queued' }] });
    expect(queued!.recipients[0].nextAttemptAt!.getTime()).toBeGreaterThan(Date.now() - 1000);

    const outcomes = await done;
    const counts = deliveries(server);
    for (const id of ids) {
      const outcome = outcomes.get(id)!;
      expect(outcome.state).toBe('done');
      for (const r of outcome.recipients) {
        expect(r).toMatchObject({ status: 'accepted', attempts: 2, responseCode: 250 });
        expect(counts.get(`${outcome.messageId}|${r.address}`)).toBe(1);
      }
    }
    expect(counts.size).toBe(24);
    expect(finals.sort()).toEqual(ids.flatMap((_, i) => [`a${i}@grey.test`, `b${i}@grey.test`]).sort());
    expect(server.refusedMail.length).toBe(0);
    expect(server.rcpts.length).toBe(48); // 24 refused, 24 accepted
    // The outcome is queryable after the message is done, and the stored bytes are gone.
    expect(await mailQueue.outcome(ids[3])).toMatchObject({ state: 'done', recipients: [{ status: 'accepted' }, { status: 'accepted' }] });
    expect(await mailQueue.outcome('no-such-id')).toBeUndefined();
    const keys = await inspector().keys(`bull:${name}:message:*`);
    expect(keys).toEqual([]);
    await sleep(200);
    expect(fromEvents.map((o) => o.id).sort()).toEqual([...ids].sort());
    note('greylisting', {
      messages: 12,
      recipients: 24,
      accepted: counts.size,
      'server 250s': [...counts.values()].reduce((a, b) => a + b, 0),
      'RCPTs refused 451': 24,
      'attempts each': 2,
    });
  });

  test('a receiver down for the first attempts: everything is delivered once it listens', async () => {
    const port = await freePort();
    const { mailQueue, start } = setup({ host: '127.0.0.1', port }, { retrySchedule: ['200ms'] });
    const ids = await mailQueue.addBulk(Array.from({ length: 6 }, (_, i) => letter(i, [`r${i}@down.test`])));
    const worker = start();
    const done = doneOutcomes(worker, ids);
    const attemptsSeen: number[] = [];
    worker.on('final', (event: { recipients: { attempts: number }[] }) => attemptsSeen.push(...event.recipients.map((r) => r.attempts)));
    await sleep(1_200);
    const server = await policyServer({ port });
    const outcomes = await done;
    const counts = deliveries(server);
    for (const outcome of outcomes.values()) {
      expect(outcome.recipients[0].status).toBe('accepted');
      expect(outcome.recipients[0].attempts).toBeGreaterThanOrEqual(2);
      expect(counts.get(`${outcome.messageId}|${outcome.recipients[0].address}`)).toBe(1);
    }
    note('receiver down for 1.2 s', { messages: 6, accepted: counts.size, attempts: attemptsSeen });
  });

  test('a permanent 5xx is final at once; the others are accepted; onFinalFailure hears of it once', async () => {
    const server = await policyServer({
      rcptReply: ({ address }) => (address.startsWith('nobody') ? { code: 550, message: '5.1.1 no such user' } : undefined),
    });
    const failures: FinalFailure[] = [];
    const { mailQueue, start } = setup(server.route, { onFinalFailure: (failure) => void failures.push(failure) });
    const id = await mailQueue.add(letter(0, ['one@bounce.test', 'nobody@bounce.test', 'two@bounce.test']));
    const worker = start();
    const outcome = (await doneOutcomes(worker, [id])).get(id)!;
    expect(outcome.recipients).toEqual([
      expect.objectContaining({ address: 'one@bounce.test', status: 'accepted', attempts: 1 }),
      expect.objectContaining({ address: 'nobody@bounce.test', status: 'rejected', attempts: 1, responseCode: 550 }),
      expect.objectContaining({ address: 'two@bounce.test', status: 'accepted', attempts: 1 }),
    ]);
    expect(failures).toHaveLength(1);
    expect(failures[0].recipients).toEqual([
      expect.objectContaining({ address: 'nobody@bounce.test', status: 'rejected', response: expect.stringContaining('no such user') }),
    ]);
    expect(server.rcpts.filter((r) => r.address === 'nobody@bounce.test')).toHaveLength(1);
    expect([...deliveries(server).values()]).toEqual([1, 1]);
  });

  test('maxAge: a recipient deferred until the age limit ends expired after a last attempt at the limit', async () => {
    const server = await policyServer({ rcptReply: () => GREYLISTED });
    const failures: FinalFailure[] = [];
    const { mailQueue, start } = setup(server.route, { onFinalFailure: (failure) => void failures.push(failure) }, { maxAge: 1_000 });
    const id = await mailQueue.add(letter(1, ['late@slow.test']));
    const worker = start();
    const outcome = (await doneOutcomes(worker, [id])).get(id)!;
    const r = outcome.recipients[0];
    expect(r).toMatchObject({ status: 'expired', responseCode: 451 });
    expect(r.attempts).toBeGreaterThanOrEqual(3);
    // The last attempt came at the limit, not a whole step before it.
    expect(r.lastAttemptAt!.getTime()).toBeGreaterThanOrEqual(outcome.expiresAt.getTime() - 50);
    expect(failures.map((f) => f.recipients[0].status)).toEqual(['expired']);
    expect(server.rcpts).toHaveLength(r.attempts);
    note('maxAge 1 s, schedule 300 ms', { attempts: r.attempts, 'last attempt after expiry (ms)': r.lastAttemptAt!.getTime() - outcome.expiresAt.getTime() });
  });
});

describe('outcome unknown', () => {
  async function dropFirstAfterDot(): Promise<FaultServer> {
    let transactions = 0;
    const server = await FaultServer.start({ plan: { data: () => (++transactions === 1 ? 'dropAfterDot' : undefined) } });
    onCleanup(() => server.stop());
    return server;
  }

  test('the final dot left and no reply came: final as unknown, never sent again', async () => {
    const server = await dropFirstAfterDot();
    const { mailQueue, start } = setup(server.route);
    const id = await mailQueue.add(letter(2, ['maybe@unknown.test']));
    const outcome = (await doneOutcomes(start(), [id])).get(id)!;
    expect(outcome.recipients[0]).toMatchObject({ status: 'unknown', attempts: 1, response: expect.stringMatching(/^outcome unknown/) });
    await sleep(400);
    expect(server.transactions.filter((t) => t.received)).toHaveLength(1);
  });

  test('with retryUnknown it goes again (and the server has it twice)', async () => {
    const server = await dropFirstAfterDot();
    const { mailQueue, start } = setup(server.route, { retryUnknown: true });
    const id = await mailQueue.add(letter(2, ['maybe@unknown.test']));
    const outcome = (await doneOutcomes(start(), [id])).get(id)!;
    expect(outcome.recipients[0]).toMatchObject({ status: 'accepted', attempts: 2 });
    expect(server.transactions.filter((t) => t.received)).toHaveLength(2);
  });
});

describe('messages', () => {
  test('a 27 MiB message is stored once, read as a stream, delivered byte for byte, and its bytes leave Redis when done', async () => {
    const server = await policyServer({ keepBodies: true });
    const { name, mailQueue, start } = setup(server.route);
    const attachment = randomBytes(20 * 1024 * 1024);
    const id = await mailQueue.add({
      from: 'big@sender.example',
      to: ['big1@big.test', 'big2@big.test'],
      subject: 'big',
      text: 'see attachment',
      attachments: [{ filename: 'big.bin', content: attachment }],
    });
    const client = inspector();
    const stored = await client.getBuffer(`bull:${name}:message:${id}`);
    const record = (await mailQueue.queue.getJob(id))!.data;
    expect(stored!.length).toBe(record.size);
    expect(stored!.length).toBeGreaterThan(27 * 1024 * 1024);
    expect(await client.keys(`bull:${name}:message:*`)).toHaveLength(1);
    const outcome = (await doneOutcomes(start(), [id])).get(id)!;
    expect(outcome.recipients.map((r) => r.status)).toEqual(['accepted', 'accepted']);
    expect(server.accepted).toHaveLength(1);
    // What the server stored is what the queue stored (line ends as SMTP carries them).
    expect(sha256(crlf(server.accepted[0].body!))).toBe(sha256(crlf(stored!)));
    expect(server.accepted[0].messageId).toBe(outcome.messageId);
    await sleep(100);
    expect(await client.exists(`bull:${name}:message:${id}`)).toBe(0);
    note('27 MiB message', { stored: stored!.length, 'server bytes': server.accepted[0].bytes, 'same sha256': true });
  });

  test('Bcc recipients get the message without a Bcc header; a raw message keeps its Message-ID, or gets one that stays', async () => {
    const server = await policyServer({ keepBodies: true });
    const { mailQueue, start } = setup(server.route);
    const raw = 'From: a@sender.example\r\nTo: x@raw.test\r\nSubject: raw\r\nMessage-ID: <own-id@sender.example>\r\n\r\nhello\r\n';
    const ids = [
      await mailQueue.add({ from: 'a@sender.example', to: 'to@bcc.test', bcc: 'hidden@bcc.test', subject: 'bcc', text: 'hello' }),
      await mailQueue.add({ envelope: { from: 'a@sender.example', to: ['x@raw.test'] }, raw }),
      await mailQueue.add({ envelope: { from: 'a@sender.example', to: ['y@raw.test'] }, raw: raw.replace('Message-ID: <own-id@sender.example>\r\n', '') }),
    ];
    const outcomes = await doneOutcomes(start(), ids);
    const bcc = server.accepted.find((m) => m.recipients.includes('hidden@bcc.test'))!;
    expect(bcc.recipients.sort()).toEqual(['hidden@bcc.test', 'to@bcc.test']);
    expect(bcc.body!.toString()).not.toMatch(/^bcc:/im);
    expect(outcomes.get(ids[1])!.messageId).toBe('<own-id@sender.example>');
    const generated = outcomes.get(ids[2])!.messageId;
    expect(generated).toMatch(/^<.+@.+>$/);
    expect(server.accepted.find((m) => m.recipients[0] === 'y@raw.test')!.messageId).toBe(generated);
  });

  test('a message to two domains: one send each, the fast domain recorded while the slow one is still going, every recipient accepted once', async () => {
    const one = await policyServer();
    const two = await policyServer({ dataDelayMs: 600 });
    const { mailQueue, start } = setup(one.route, { transport: transportOptions(one.route, { domains: { 'two.test': { route: two.route } } }) });
    const id = await mailQueue.add(letter(4, ['a@one.test', 'b@two.test', 'c@one.test']));
    const done = doneOutcomes(start(), [id]);
    // While two.test's server sits on its final dot, one.test's recipients are already recorded.
    while (two.accepted.length === 0) await sleep(5);
    await sleep(100);
    const meanwhile = await mailQueue.outcome(id);
    expect(meanwhile!.recipients.map((r) => `${r.address}=${r.status}`)).toEqual(['a@one.test=accepted', 'c@one.test=accepted', 'b@two.test=queued']);
    const outcome = (await done).get(id)!;
    expect(outcome.recipients.map((r) => `${r.address}=${r.status}/${r.attempts}`)).toEqual([
      'a@one.test=accepted/1',
      'c@one.test=accepted/1',
      'b@two.test=accepted/1',
    ]);
    expect([...deliveries(one).values(), ...deliveries(two).values()]).toEqual([1, 1, 1]);
  });

  test('add() with a jobId twice queues and delivers the message once; an integer or a colon is refused before anything is stored', async () => {
    const server = await policyServer();
    const { name, mailQueue, start } = setup(server.route);
    expect(await mailQueue.add(letter(5, ['once@dedupe.test']), { jobId: 'order-1' })).toBe('order-1');
    expect(await mailQueue.add(letter(5, ['once@dedupe.test']), { jobId: 'order-1' })).toBe('order-1');
    await expect(mailQueue.add(letter(5, ['x@dedupe.test']), { jobId: '42' })).rejects.toThrow(/^jobId: /);
    await expect(mailQueue.add(letter(5, ['x@dedupe.test']), { jobId: 'a:b' })).rejects.toThrow(/^jobId: /);
    expect(await inspector().keys(`bull:${name}:message:*`)).toHaveLength(1);
    await doneOutcomes(start(), ['order-1']);
    expect(server.accepted).toHaveLength(1);
  });

  test('listeners that throw are reported; the messages are not sent again and the events go on', async () => {
    // Greylisted at first: 'final' comes both between attempts and at the end.
    const seen = new Set<string>();
    const server = await policyServer({
      rcptReply: ({ address }) => (address.startsWith('grey') && !seen.has(address) && seen.add(address) ? GREYLISTED : undefined),
    });
    const { name, mailQueue, start } = setup(server.route);
    const events = new MailQueueEvents(name, { connection: redis.url });
    onCleanup(() => events.close());
    await events.waitUntilReady();
    const heard: string[] = [];
    const eventErrors: Error[] = [];
    events.on('error', (err) => eventErrors.push(err));
    events.on('done', (outcome) => {
      heard.push(outcome.id);
      throw new Error('events listener bug');
    });
    const worker = start();
    const errors: Error[] = [];
    worker.on('error', (err: Error) => errors.push(err));
    worker.on('final', () => {
      throw new Error('listener bug');
    });
    const first = await mailQueue.add(letter(6, ['one@listener.test', 'grey@listener.test']));
    await doneOutcomes(worker, [first]);
    const second = await mailQueue.add(letter(7, ['two@listener.test']));
    await doneOutcomes(worker, [second]);
    await sleep(300);
    expect(server.accepted.map((m) => m.recipients.join(','))).toEqual(['one@listener.test', 'grey@listener.test', 'two@listener.test']);
    expect(errors.filter((e) => /a 'final' listener threw: listener bug/.test(e.message))).toHaveLength(3);
    expect(heard).toEqual([first, second]);
    expect(eventErrors.map((e) => e.message)).toEqual([expect.stringContaining('events listener bug'), expect.stringContaining('events listener bug')]);
  });

  test('a message over maxMessageSize, or with CR/LF in an address, is refused by add() and nothing is stored', async () => {
    const { name, mailQueue } = setup({ host: '127.0.0.1', port: 1 }, {}, { maxMessageSize: 64 * 1024 });
    await expect(mailQueue.add({ from: 'a@sender.example', to: 'x@d.test', text: 'x'.repeat(100_000) })).rejects.toMatchObject({ code: 'ESIZE' });
    await expect(mailQueue.add({ from: 'a@sender.example', to: 'ok@d.test, evil@d.test\r\nRCPT TO:<inject@d.test>', text: 'x' })).rejects.toMatchObject({
      code: 'EADDRESS',
    });
    await expect(mailQueue.add({ from: 'a@sender.example', text: 'x' })).rejects.toMatchObject({ code: 'ENORECIPIENTS' });
    expect(await mailQueue.queue.count()).toBe(0);
    expect(await inspector().keys(`bull:${name}:message:*`)).toEqual([]);
  });

  test('bad options name the option', () => {
    expect(() => new MailWorker('x', { connection: redis.url, transport: {}, retrySchedule: ['1min', 'soon'] })).toThrow(
      /^retrySchedule\[1\]: must be a duration/,
    );
    expect(() => new MailQueue('x', { connection: redis.url, maxAge: -1 })).toThrow(/^maxAge: /);
    expect(() => new MailQueue('x', { connection: redis.url, maxAgee: '1d' } as never)).toThrow(/^maxAgee: unknown option \(did you mean "maxAge"\?\)/);
  });
});

describe('crash safety', () => {
  function startChild(
    name: string,
    route: { host: string; port: number },
    worker: Partial<MailWorkerOptions> = {},
    hook?: 'report' | 'hang',
    transport = transportOptions(route),
    /** Where the onFinalFailure calls the child reports (with `hook`) go. */
    hookCalls?: string[][],
  ): Promise<ChildProcess> {
    const options = {
      name,
      connection: redis.url,
      transport,
      worker: { concurrency: 8, retrySchedule: ['300ms'], lockDuration: 1_500, stalledInterval: 500, ...worker },
      hook,
    };
    const child = fork(join(__dirname, 'fixtures', 'queue-worker.cjs'), [JSON.stringify(options)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    onCleanup(async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    child.on('message', (message: { hook?: string[] }) => message.hook && hookCalls?.push(message.hook));
    return new Promise((resolve, reject) => {
      child.once('message', (message) => message === 'ready' && resolve(child));
      child.once('exit', (code) => reject(new Error(`the worker exited (${code}) before it was ready`)));
    });
  }

  async function killed(child: ChildProcess): Promise<void> {
    child.kill('SIGKILL');
    if (child.exitCode === null && child.signalCode === null) await new Promise((resolve) => child.once('exit', resolve));
  }

  async function allDone(mailQueue: MailQueue, ids: readonly string[], ms: number): Promise<(MailOutcome | undefined)[]> {
    const deadline = Date.now() + ms;
    let outcomes: (MailOutcome | undefined)[] = [];
    while (Date.now() < deadline) {
      outcomes = await Promise.all(ids.map((id) => mailQueue.outcome(id)));
      if (outcomes.every((o) => o?.state === 'done')) break;
      await sleep(200);
    }
    return outcomes;
  }

  test('two workers, one killed with SIGKILL mid-batch (messages mid-retry among them), a third started: every recipient ends accepted, a duplicate only where the kill fell between the dot and the record', async () => {
    // The b recipients are greylisted at first: at the kill, messages wait for their second attempt with a recorded first one.
    const firstSeen = new Map<string, number>();
    const server = await policyServer({
      dataDelayMs: 40,
      rcptReply: ({ address }) => {
        if (!address.startsWith('b')) return undefined;
        const first = firstSeen.get(address) ?? (firstSeen.set(address, Date.now()), Date.now());
        return Date.now() - first < 250 ? GREYLISTED : undefined;
      },
    });
    const { mailQueue, name } = setup(server.route);
    const ids = await mailQueue.addBulk(Array.from({ length: 60 }, (_, i) => letter(i, [`a${i}@crash.test`, `b${i}@crash.test`])));
    const [first] = await Promise.all([startChild(name, server.route), startChild(name, server.route)]);
    while (server.accepted.length < 30) await sleep(5);
    await killed(first);
    const killedAt = server.accepted.length;
    // What the server took before the kill but no record shows: the window a duplicate can come from.
    const before = deliveries(server);
    const snapshot = await Promise.all(ids.map((id) => mailQueue.outcome(id)));
    const recorded = new Set(snapshot.flatMap((o) => o!.recipients.filter((r) => r.status === 'accepted').map((r) => `${o!.messageId}|${r.address}`)));
    const window = [...before.keys()].filter((pair) => !recorded.has(pair));
    const midRetry = snapshot.filter((o) => o!.recipients.some((r) => r.status === 'queued' && r.attempts > 0)).length;

    const third = await startChild(name, server.route);
    const outcomes = await allDone(mailQueue, ids, 40_000);
    third.send('close');
    const counts = deliveries(server);
    const statuses = outcomes.flatMap((o) => o?.recipients.map((r) => r.status) ?? ['missing']);
    expect(statuses).toEqual(Array(120).fill('accepted'));
    expect(counts.size).toBe(120);
    const duplicates = [...counts].filter(([, n]) => n > 1).map(([pair]) => pair);
    for (const pair of duplicates) expect(window).toContain(pair);
    // The kill hit work in flight, and messages between attempts.
    expect(window.length).toBeGreaterThan(0);
    expect(midRetry).toBeGreaterThan(0);
    // At most what the killed worker had in flight: concurrency 8, 2 recipients each.
    expect(duplicates.length).toBeLessThanOrEqual(16);
    note('2 workers (concurrency 8 each), one killed with SIGKILL after 30 messages, a third started', {
      'messages accepted before the kill': killedAt,
      'messages between attempts at the kill': midRetry,
      'pairs the server had but no record showed': window.length,
      duplicates: duplicates.length,
      'final outcomes': `${statuses.length} (all accepted)`,
      'server pairs': counts.size,
    });
  });

  test('a worker killed inside onFinalFailure: the next worker calls it again for the same recipients, and sends nothing again', async () => {
    const server = await policyServer({
      rcptReply: ({ address }) => (address.startsWith('nobody') ? { code: 550, message: '5.1.1 no such user' } : undefined),
    });
    const { mailQueue, name } = setup(server.route);
    const id = await mailQueue.add(letter(9, ['yes@hook.test', 'nobody@hook.test']));
    const calls: string[][] = [];
    const first = await startChild(name, server.route, {}, 'hang', undefined, calls);
    while (calls.length === 0) await sleep(5);
    await killed(first);
    const second = await startChild(name, server.route, {}, 'report', undefined, calls);
    const [outcome] = await allDone(mailQueue, [id], 20_000);
    second.send('close');
    expect(calls).toEqual([['nobody@hook.test=rejected'], ['nobody@hook.test=rejected']]);
    expect(outcome!.recipients.map((r) => `${r.address}=${r.status}/${r.attempts}`)).toEqual(['yes@hook.test=accepted/1', 'nobody@hook.test=rejected/1']);
    // Recorded before the hook ran: neither recipient went to the server again.
    expect(server.rcpts.map((r) => r.address).sort()).toEqual(['nobody@hook.test', 'yes@hook.test']);
    expect(server.accepted).toHaveLength(1);
  });

  test('a worker killed while a second domain is still going, after the first answered 550: the next worker calls onFinalFailure for it, and sends nothing recorded again', async () => {
    const bounce = await policyServer({ rcptReply: () => ({ code: 550, message: '5.1.1 no such user' }) });
    const slow = await policyServer({ dataDelayMs: 5_000 });
    const transport = transportOptions(bounce.route, { domains: { 'slow.test': { route: slow.route } } });
    const { mailQueue, name } = setup(bounce.route);
    const id = await mailQueue.add(letter(10, ['nobody@bounce.test', 'late@slow.test']));
    const calls: string[][] = [];
    const first = await startChild(name, bounce.route, {}, 'report', transport, calls);
    // The 550 is recorded (unannounced) while slow.test holds its final dot.
    while (slow.accepted.length === 0 || bounce.rcpts.length === 0) await sleep(5);
    await sleep(200);
    await killed(first);
    expect(calls).toEqual([]);
    const second = await startChild(name, bounce.route, {}, 'report', transport, calls);
    const [outcome] = await allDone(mailQueue, [id], 20_000);
    second.send('close');
    expect(calls).toEqual([['nobody@bounce.test=rejected']]);
    expect(outcome!.recipients.map((r) => `${r.address}=${r.status}`)).toEqual(['nobody@bounce.test=rejected', 'late@slow.test=accepted']);
    // The 550 was recorded at the kill: not asked again. The slow domain's dot was out but unrecorded: it went again (the duplicate window).
    expect(bounce.rcpts).toHaveLength(1);
    expect(slow.accepted).toHaveLength(2);
  });

  test('a message whose worker dies more often than maxStalledCount fails: its recipients end unknown, in outcome() and in MailQueueEvents, and it is not sent again', async () => {
    const server = await policyServer({ dataDelayMs: 4_000 });
    const { mailQueue, name } = setup(server.route);
    const events = new MailQueueEvents(name, { connection: redis.url });
    onCleanup(() => events.close());
    await events.waitUntilReady();
    const done: MailOutcome[] = [];
    events.on('done', (outcome: MailOutcome) => done.push(outcome));
    const ids = await mailQueue.addBulk([letter(7, ['s1@stall.test']), letter(8, ['s2@stall.test'])]);
    const stalls = { maxStalledCount: 0, lockDuration: 1_000, stalledInterval: 300 };
    const first = await startChild(name, server.route, stalls);
    while (server.accepted.length < 2) await sleep(5);
    await killed(first);
    await startChild(name, server.route, stalls);
    const outcomes = await allDone(mailQueue, ids, 20_000);
    expect(outcomes.map((o) => o!.recipients[0])).toEqual([
      expect.objectContaining({ status: 'unknown', response: expect.stringMatching(/^outcome unknown: the message failed in the queue/) }),
      expect.objectContaining({ status: 'unknown' }),
    ]);
    await sleep(500);
    expect(done.map((o) => o.recipients[0].status)).toEqual(['unknown', 'unknown']);
    expect(server.accepted).toHaveLength(2);
  });

  test('Redis killed with SIGKILL mid-batch and restarted from its append-only file: nothing is lost, nothing is sent twice', async () => {
    const persistent = await RedisServer.start({ persistent: true });
    onCleanup(() => persistent.stop());
    const server = await policyServer({ dataDelayMs: 20 });
    const { mailQueue, start } = setup(server.route, {}, {}, persistent.url);
    const ids = await mailQueue.addBulk(Array.from({ length: 40 }, (_, i) => letter(i, [`r${i}@restart.test`])));
    const worker = start();
    const done = doneOutcomes(worker, ids);
    while (server.accepted.length < 10) await sleep(5);
    await persistent.kill();
    const atKill = server.accepted.length;
    await sleep(1_000);
    const duringOutage = server.accepted.length - atKill;
    await persistent.restart();
    const outcomes = await done;
    const counts = deliveries(server);
    expect([...outcomes.values()].flatMap((o) => o.recipients.map((r) => r.status))).toEqual(Array(40).fill('accepted'));
    expect(counts.size).toBe(40);
    expect([...counts.values()].every((n) => n === 1)).toBe(true);
    note('Redis SIGKILL + restart (appendfsync always)', {
      'accepted before the kill': atKill,
      'during the 1 s outage': duringOutage,
      accepted: counts.size,
      duplicates: 0,
    });
  });
});
