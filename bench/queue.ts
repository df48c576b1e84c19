/**
 * The durable queue's cost (`nodemailer-binding-pool/queue`): the one-domain scenario (raw
 * 650-byte messages, 5 connections, smtp-sink) sent directly with sendMail (100 in flight)
 * against the same messages through a MailQueue and one MailWorker (concurrency 100) in the same
 * process, rounds alternating, and Redis's memory per queued message at three sizes.
 *
 *   npx tsc -p bench/tsconfig.json && node build/bench/queue.js [--sends N] [--rounds N]
 *
 * Starts its own redis-server (test/support/redis-server.ts) and smtp-sink. Queue figures:
 * - add: addBulk in chunks of 500, no worker running (msg/s stored);
 * - drain: a worker started on that queue, until every message is done (msg/s delivered);
 * - end to end: adds and the worker at once, from the first add to the last message done.
 */
import nodemailer from 'nodemailer';
import Redis from 'ioredis';
import { BindingPoolTransport, type BindingPoolOptions } from '../lib';
import { MailQueue, MailWorker, type MailOutcome, type QueuedMail } from '../lib/queue';
import { RedisServer } from '../test/support/redis-server';
import { buildRawMessage, median, numberFlag as flag, pump, SENDER } from './common';
import { startSink } from './sink';

const SENDS = flag('--sends', 10_000);
const ROUNDS = flag('--rounds', 3);
const WINDOW = 100;
const CHUNK = 500;
let queues = 0;

const elapsed = (started: bigint): number => Number(process.hrtime.bigint() - started) / 1e9;

async function direct(options: BindingPoolOptions, raw: Buffer): Promise<number> {
  const pool = new BindingPoolTransport(options);
  const transporter = nodemailer.createTransport(pool);
  const started = process.hrtime.bigint();
  const result = await pump(
    SENDS,
    WINDOW,
    async (i) => (await transporter.sendMail({ envelope: { from: SENDER, to: [`r${i}@one.test`] }, raw })).accepted.length,
  );
  const seconds = elapsed(started);
  await pool.close();
  if (result.accepted !== SENDS) throw new Error(`direct: only ${result.accepted} of ${SENDS} accepted (${result.firstError ?? ''})`);
  return SENDS / seconds;
}

function mails(count: number, raw: Buffer, offset = 0): QueuedMail[] {
  return Array.from({ length: count }, (_, i) => ({ envelope: { from: SENDER, to: [`r${offset + i}@one.test`] }, raw }));
}

async function addAll(queue: MailQueue, raw: Buffer): Promise<void> {
  for (let at = 0; at < SENDS; at += CHUNK) await queue.addBulk(mails(Math.min(CHUNK, SENDS - at), raw, at));
}

/** Resolves when `count` messages are done; fails unless every recipient was accepted. */
function allDone(worker: MailWorker, count: number): Promise<void> {
  let done = 0;
  return new Promise((resolve, reject) =>
    worker.on('done', (outcome: MailOutcome) => {
      if (outcome.recipients.some((r) => r.status !== 'accepted')) reject(new Error(`${outcome.id}: ${JSON.stringify(outcome.recipients)}`));
      if (++done === count) resolve();
    }),
  );
}

async function throughQueue(url: string, options: BindingPoolOptions, raw: Buffer): Promise<{ add: number; drain: number; endToEnd: number }> {
  const name = `bench${++queues}`;
  const queue = new MailQueue(name, { connection: url });
  let started = process.hrtime.bigint();
  await addAll(queue, raw);
  const add = SENDS / elapsed(started);
  const worker = new MailWorker(name, { connection: url, transport: options, concurrency: WINDOW });
  started = process.hrtime.bigint();
  await allDone(worker, SENDS);
  const drain = SENDS / elapsed(started);
  // End to end: the worker is running; adds and deliveries overlap.
  started = process.hrtime.bigint();
  const finished = allDone(worker, SENDS);
  await addAll(queue, raw);
  await finished;
  const endToEnd = SENDS / elapsed(started);
  await worker.close();
  await queue.queue.obliterate({ force: true });
  await queue.close();
  return { add, drain, endToEnd };
}

/** Redis's used_memory per message queued (no worker), at one size; the queue is emptied after. */
async function memoryPerMessage(url: string, count: number, make: (i: number) => QueuedMail): Promise<{ perMessage: number; size: number }> {
  const client = new Redis(url);
  const name = `memory${++queues}`;
  const queue = new MailQueue(name, { connection: url });
  const used = async (): Promise<number> => Number(/used_memory:(\d+)/.exec(await client.info('memory'))![1]);
  const before = await used();
  for (let at = 0; at < count; at += 100) await queue.addBulk(Array.from({ length: Math.min(100, count - at) }, (_, i) => make(at + i)));
  const after = await used();
  const job = (await queue.queue.getJobs(['wait'], 0, 0))[0];
  await queue.queue.obliterate({ force: true });
  await queue.close();
  await client.quit();
  return { perMessage: (after - before) / count, size: job.data.size };
}

async function main(): Promise<void> {
  const sink = await startSink();
  const redis = await RedisServer.start();
  const raw = buildRawMessage();
  const options: BindingPoolOptions = { dnsServers: ['127.0.0.1:1'], route: { host: sink.host, port: sink.port }, maxOutboundConnections: 5 };
  const rates = { direct: [] as number[], add: [] as number[], drain: [] as number[], endToEnd: [] as number[] };
  const memory: string[] = [];
  try {
    await direct(options, raw); // warm-up
    for (let round = 1; round <= ROUNDS; round++) {
      const sent = await direct(options, raw);
      const queued = await throughQueue(redis.url, options, raw);
      rates.direct.push(sent);
      rates.add.push(queued.add);
      rates.drain.push(queued.drain);
      rates.endToEnd.push(queued.endToEnd);
      console.log(
        `round ${round}: direct ${sent.toFixed(0)}  queue add ${queued.add.toFixed(0)}  drain ${queued.drain.toFixed(0)}  end to end ${queued.endToEnd.toFixed(0)} (msg/s)`,
      );
    }
    const attachment = (bytes: number) => [{ filename: 'report.pdf', content: Buffer.alloc(bytes, 7), contentType: 'application/pdf' }];
    const sizes: [string, number, (i: number) => QueuedMail][] = [
      ['raw 650 B', 2_000, (i) => mails(1, raw, i)[0]],
      [
        'composed, 100 KiB attachment',
        200,
        (i) => ({ from: SENDER, to: `r${i}@one.test`, subject: `#${i}`, text: 'hello', html: '<p>hello</p>', attachments: attachment(100 * 1024) }),
      ],
      [
        'composed, 10 MiB attachment',
        5,
        (i) => ({ from: SENDER, to: `r${i}@one.test`, subject: `#${i}`, text: 'hello', attachments: attachment(10 * 1024 * 1024) }),
      ],
    ];
    for (const [label, count, make] of sizes) {
      const { perMessage, size } = await memoryPerMessage(redis.url, count, make);
      memory.push(`| ${label} | ${count} | ${size} | ${perMessage.toFixed(0)} | ${(perMessage - size).toFixed(0)} |`);
    }
  } finally {
    await redis.stop();
    await sink.stop();
  }
  const base = median(rates.direct);
  console.log(`\n${SENDS} messages per round, one domain, 5 connections, ${sink.kind}, ${ROUNDS} rounds; medians:`);
  console.log('| candidate | msg/s | × direct sendMail |');
  console.log('|---|---:|---:|');
  console.log(`| direct sendMail, ${WINDOW} in flight | ${base.toFixed(0)} | 1.00 |`);
  for (const [label, values] of [
    ['queue: add (store only)', rates.add],
    ['queue: drain (worker, concurrency 100)', rates.drain],
    ['queue: end to end', rates.endToEnd],
  ] as const)
    console.log(`| ${label} | ${median(values).toFixed(0)} | ${(median(values) / base).toFixed(2)} |`);
  console.log('\nRedis used_memory per queued message:');
  console.log('| message | queued | stored bytes | used_memory per message | over the bytes |');
  console.log('|---|---:|---:|---:|---:|');
  for (const line of memory) console.log(line);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
