/**
 * A durable delivery queue (`nodemailer-binding-pool/queue`, on BullMQ): retries that survive a
 * restart, final outcomes per recipient, and a hook to write bounces.
 *
 * - greylist.test greylists: the first RCPT of each (sender, recipient) gets `451 4.7.1
 *   greylisted, try again later`; the next attempt, a second later, is accepted.
 * - nobody@greylist.test does not exist: `550 5.1.1`, final at once, and the hook writes a bounce.
 *
 * Redis: $REDIS_URL, or a throwaway redis-server on a loopback port when it is installed.
 * In an application: `import { MailQueue, MailWorker } from 'nodemailer-binding-pool/queue'`,
 * with the queue in the web process and workers wherever they run.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, type AddressInfo } from 'node:net';
import { MailQueue, MailWorker, type FinalEvent, type MailOutcome } from '../lib/queue';
import { runMain, startLoopbackSmtp, type LoopbackSmtp } from './run-main';

async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as AddressInfo;
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

/** $REDIS_URL, or a redis-server started here (no persistence: an example). */
async function redisUrl(): Promise<{ url: string; child?: ChildProcess }> {
  if (process.env.REDIS_URL) return { url: process.env.REDIS_URL };
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((resolve, reject) => {
    child.once('error', (err) => reject(new Error(`set REDIS_URL, or install redis-server: ${err.message}`)));
    child.once('exit', (code) => reject(new Error(`redis-server exited (${code}) before it was ready`)));
    child.stdout!.on('data', (chunk: Buffer) => /Ready to accept connections/.test(chunk.toString()) && resolve());
  });
  child.stdout!.resume();
  return { url: `redis://127.0.0.1:${port}`, child };
}

async function greylistingServer(): Promise<LoopbackSmtp> {
  const firstSeen = new Map<string, number>();
  return startLoopbackSmtp({
    onRcptTo(address, session, callback) {
      if (address.address.startsWith('nobody@')) return callback(Object.assign(new Error('5.1.1 no such user'), { responseCode: 550 }));
      const key = `${session.envelope.mailFrom && session.envelope.mailFrom.address}|${address.address}`;
      const first = firstSeen.get(key) ?? (firstSeen.set(key, Date.now()), Date.now());
      if (Date.now() - first < 500) return callback(Object.assign(new Error('4.7.1 greylisted, try again later'), { responseCode: 451 }));
      callback();
    },
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => callback(null, 'Ok: queued'));
    },
  });
}

async function main(): Promise<number> {
  const redis = await redisUrl();
  const smtp = await greylistingServer();
  const queue = new MailQueue('outbound', { connection: redis.url });
  const worker = new MailWorker('outbound', {
    connection: redis.url,
    transport: { route: { host: '127.0.0.1', port: smtp.port }, dnsServers: ['127.0.0.1:1'] },
    // A short schedule for the example; the default is like an MTA's: 1 min, 5 min, 15 min, 1 h, then every 4 h.
    retrySchedule: ['1s'],
    onFinalFailure: ({ messageId, recipients }) => {
      for (const r of recipients) console.log(`bounce for ${messageId}: ${r.address} ${r.status} after ${r.attempts} attempt(s): ${r.response}`);
    },
  });
  worker.on('final', (event: FinalEvent) => {
    for (const r of event.recipients) console.log(`final: ${r.address} ${r.status} (attempt ${r.attempts}) ${r.response ?? ''}`);
  });
  const done = new Map<string, MailOutcome>();
  const allDone = new Promise<void>((resolve) => worker.on('done', (outcome: MailOutcome) => done.set(outcome.id, outcome).size === 2 && resolve()));

  const ids = [
    await queue.add({
      from: 'shop@sender.example',
      to: ['alice@greylist.test', 'bob@greylist.test'],
      subject: 'Your order',
      text: 'Shipped.',
      html: '<p>Shipped.</p>',
    }),
    await queue.add({ from: 'shop@sender.example', to: ['carol@greylist.test', 'nobody@greylist.test'], subject: 'Your order', text: 'Shipped.' }),
  ];
  console.log(`queued ${ids.join(', ')}`);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const waiting = await queue.outcome(ids[0]);
  console.log(`while greylisted: ${waiting!.recipients.map((r) => `${r.address} ${r.status}, next ${r.nextAttemptAt?.toISOString() ?? '-'}`).join('; ')}`);
  await allDone;

  const statuses = ids.flatMap((id) => done.get(id)!.recipients.map((r) => `${r.address}=${r.status}`));
  console.log(`outcomes: ${statuses.join(' ')}`);
  await worker.close();
  await queue.close();
  await smtp.close();
  redis.child?.kill();
  const expected = 'alice@greylist.test=accepted bob@greylist.test=accepted carol@greylist.test=accepted nobody@greylist.test=rejected';
  return statuses.join(' ') === expected ? 0 : 1;
}

runMain(main);
