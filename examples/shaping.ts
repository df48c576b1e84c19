/**
 * Traffic shaping and reply rules: a new IP on a warm-up plan, and a receiver that starts
 * deferring it the way Yahoo does.
 *
 * - Binding `fresh` (127.0.0.2) is on day 0 of its warm-up plan: 20 messages a second, across
 *   every domain it sends to (one bucket for the binding: the IP's budget).
 * - yahoo.test accepts 30 messages, then answers MAIL FROM with Yahoo's `421 4.7.0 [TSS04] …
 *   temporarily deferred`. The built-in reply rule `yahoo-tss04` suspends the (binding, domain)
 *   pair for two hours: the rest go pending at once with `retryAfter` at the suspension's end,
 *   and no further connection is opened. other.test, from the same binding, goes on.
 *
 * It prints the events, stats().rates and stats().shaping, and the most messages the servers saw
 * in any second.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type BindingPoolSendError, type BindingPoolSentMessageInfo, type SuspensionEvent } from '../lib';
import { runMain, startLoopbackSmtp } from './run-main';

const TSS04 = '4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred due to unexpected volume or user complaints';

async function startServer(acceptFirst = Infinity): Promise<{ port: number; times: number[]; close(): Promise<void> }> {
  const times: number[] = [];
  const { port, close } = await startLoopbackSmtp({
    onMailFrom(_address, _session, callback) {
      if (times.length >= acceptFirst) return callback(Object.assign(new Error(TSS04), { responseCode: 421 }));
      callback();
    },
    onRcptTo(_address, _session, callback) {
      times.push(Date.now());
      callback();
    },
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => callback(null, 'Ok'));
    },
  });
  return { port, times, close };
}

/** The most of `times` in any window of `ms`. */
function peak(times: number[], ms: number): number {
  const sorted = [...times].sort((a, b) => a - b);
  let best = 0;
  for (let i = 0, j = 0; j < sorted.length; j++) {
    while (sorted[j] - sorted[i] >= ms) i++;
    best = Math.max(best, j - i + 1);
  }
  return best;
}

async function main(): Promise<number> {
  const yahoo = await startServer(30);
  const other = await startServer();
  const today = new Date().toISOString().slice(0, 10);
  const pool = new BindingPoolTransport({
    bindings: {
      fresh: {
        localAddress: '127.0.0.2',
        warmup: {
          start: today,
          steps: [
            [0, '20/s'],
            [7, '200/s'],
          ],
        },
      },
    },
    defaultBinding: 'fresh',
    domains: {
      'yahoo.test': { route: { host: '127.0.0.1', port: yahoo.port }, maxOutboundConnections: 1 },
      'other.test': { route: { host: '127.0.0.1', port: other.port } },
    },
  });
  for (const name of ['suspended', 'resumed'] as const) {
    pool.on(name, (e: SuspensionEvent) => console.log(`event ${name}: ${e.binding}/${e.domain} until ${e.until.toISOString()} (${e.rule}: ${e.reply})`));
  }
  const transporter = nodemailer.createTransport(pool);
  const outcomes = { accepted: 0, pending: 0, retryAfter: new Set<string>() };
  const count = (result: BindingPoolSentMessageInfo | BindingPoolSendError): void => {
    outcomes.accepted += result.accepted.length;
    for (const domain of result.domains) {
      outcomes.pending += domain.pending.length;
      for (const p of domain.pending) if (p.retryAfter) outcomes.retryAfter.add(p.retryAfter.toISOString().slice(0, 16));
    }
  };
  let stats;
  try {
    const sends = [];
    for (let i = 0; i < 40; i++) sends.push({ to: `y${i}@yahoo.test` }, { to: `o${i}@other.test` });
    await Promise.all(
      sends.map((m, i) =>
        transporter.sendMail({ ...m, from: 'news@example.test', subject: `#${i}`, text: 'Hello' }).then(count, (err: BindingPoolSendError) => count(err)),
      ),
    );
    stats = pool.stats();
  } finally {
    await transporter.close();
    await Promise.all([yahoo.close(), other.close()]);
  }
  console.log('rates:', JSON.stringify(stats.rates));
  console.log('shaping:', JSON.stringify(stats.shaping.map(({ domain, suspended }) => ({ domain, suspended }))));
  const busiest = peak([...yahoo.times, ...other.times], 1_000);
  console.log(
    `accepted ${outcomes.accepted}, pending ${outcomes.pending} (retryAfter ${[...outcomes.retryAfter].join(', ')}); at most ${busiest} RCPTs in any second`,
  );
  const ok =
    outcomes.accepted === 70 &&
    outcomes.pending === 10 &&
    busiest <= 20 &&
    stats.shaping.length === 1 &&
    stats.shaping[0].suspended?.rule === 'yahoo-tss04' &&
    stats.rates[0]?.warmup?.day === 0;
  return ok ? 0 : 1;
}

runMain(main);
