/**
 * The cost of `coordination` (issue 13): one process on the one-domain scenario (raw 650-byte
 * messages, 5 connections, smtp-sink), with coordination against the same without, in the same
 * run, rounds alternating. A cluster cap (maxOutboundConnections, maxHostConnections) costs a
 * lease per connection, not per message; a rate costs a take per batch of recipients. It
 * measures both: no rate, and `maxMessageRate` set high enough never to bind ('1000000/s'), so
 * its cost is the Redis round trips alone.
 *
 *   npx tsc -p bench/tsconfig.json && node build/bench/coordination.js [--sends N] [--rounds N]
 *
 * Starts its own redis-server (test/support/redis-server.ts). Prints msg/s per candidate and
 * round, and the medians' ratios to the candidate without coordination.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type BindingPoolOptions } from '../lib';
import { RedisServer } from '../test/support/redis-server';
import { buildRawMessage, median, numberFlag as flag, pump, SENDER } from './common';
import { startSink } from './sink';

const SENDS = flag('--sends', 20_000);
const ROUNDS = flag('--rounds', 3);
const WINDOW = 100;

async function run(options: BindingPoolOptions, raw: Buffer): Promise<number> {
  const pool = new BindingPoolTransport(options);
  const transporter = nodemailer.createTransport(pool);
  const started = process.hrtime.bigint();
  const result = await pump(SENDS, WINDOW, async (i) => {
    const info = await transporter.sendMail({ envelope: { from: SENDER, to: [`r${i}@one.test`] }, raw });
    return info.accepted.length;
  });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await pool.close();
  if (result.accepted !== SENDS) throw new Error(`only ${result.accepted} of ${SENDS} accepted (${result.firstError ?? ''})`);
  return SENDS / seconds;
}

async function main(): Promise<void> {
  const sink = await startSink();
  const redis = await RedisServer.start();
  const raw = buildRawMessage();
  const base: BindingPoolOptions = { dnsServers: ['127.0.0.1:1'], route: { host: sink.host, port: sink.port }, maxOutboundConnections: 5 };
  const coordination = { redis: redis.url, keyPrefix: 'nbp-bench:' };
  const rate = { maxMessageRate: '1000000/s' };
  const candidates: [string, BindingPoolOptions][] = [
    ['without', base],
    ['coordination', { ...base, coordination }],
    ['rate, this process only', { ...base, ...rate }],
    ['coordination + rate', { ...base, coordination, ...rate }],
  ];
  const rates = new Map<string, number[]>(candidates.map(([name]) => [name, []]));
  try {
    for (const [, options] of candidates) await run({ ...options }, raw); // warm-up
    for (let round = 1; round <= ROUNDS; round++) {
      const line: string[] = [];
      for (const [name, options] of candidates) {
        const rate = await run(options, raw);
        rates.get(name)!.push(rate);
        line.push(`${name} ${rate.toFixed(0)}`);
      }
      console.log(`round ${round}: ${line.join('  ')} (msg/s)`);
    }
  } finally {
    await redis.stop();
    await sink.stop();
  }
  const without = median(rates.get('without')!);
  console.log(`\n${SENDS} sends per round, window ${WINDOW}, ${sink.kind}, ${ROUNDS} rounds; medians:`);
  const localRate = median(rates.get('rate, this process only')!);
  console.log('| candidate | msg/s | × without | × the same rate without coordination |');
  console.log('|---|---:|---:|---:|');
  for (const [name] of candidates) {
    const value = median(rates.get(name)!);
    const sameRate = name === 'coordination + rate' ? (value / localRate).toFixed(2) : '';
    console.log(`| ${name} | ${value.toFixed(0)} | ${(value / without).toFixed(2)} | ${sameRate} |`);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
