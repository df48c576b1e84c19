/**
 * Monitoring: sample `pool.stats()` while a batch is sending, and log every `connectionClosed`
 * event. The server takes 5 ms per message so the samples catch busy connections and waiting sends.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type ConnectionSummary, type TransportStats } from '../lib';
import { runMain, startSlowSink } from './run-main';

async function main(): Promise<number> {
  const { server, route } = await startSlowSink(5);

  const pool = new BindingPoolTransport({
    maxOutboundConnections: 3,
    maxDeliveriesPerConnection: 25,
    domains: { 'one.test': { route }, 'two.test': { route, maxOutboundConnections: 1 } },
  });
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (c: ConnectionSummary) => {
    closed.push(c);
    console.log(`  closed ${c.id.padEnd(17)} ${String(c.deliveries).padStart(3)} deliveries  ${c.reason}`);
  });
  const transporter = nodemailer.createTransport(pool);

  const samples: { t: number; stats: TransportStats }[] = [];
  const started = Date.now();
  const timer = setInterval(() => samples.push({ t: Date.now() - started, stats: pool.stats() }), 40);
  let accepted: number;
  try {
    const sends = Array.from({ length: 120 }, (_, i) =>
      transporter.sendMail({ from: 'a@example.test', to: `r${i}@${i % 3 ? 'one' : 'two'}.test`, subject: `#${i}`, text: 'hi' }),
    );
    accepted = (await Promise.all(sends)).reduce((n, info) => n + info.accepted.length, 0);
  } finally {
    clearInterval(timer);
    await transporter.close();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  console.log('\n    ms  sending  pool              open busy wait  opened  deliveries');
  // Five samples spread over the run.
  const picked = [...new Set([0, 1, 2, 3, 4].map((k) => Math.round((k * (samples.length - 1)) / 4)))].map((k) => samples[k]);
  for (const { t, stats } of picked) {
    for (const p of stats.pools) {
      const name = `${p.binding}/${p.domain}`;
      console.log(
        `${String(t).padStart(6)}  ${String(stats.sending).padStart(7)}  ${name.padEnd(16)} ${[p.open, p.busy, p.waiting].map((n) => String(n).padStart(4)).join(' ')}  ${String(p.opened).padStart(6)}  ${String(p.deliveries).padStart(10)}`,
      );
    }
  }
  const after = pool.stats();
  const d = after.droppedPools;
  console.log(
    `\nafter close(): ${after.pools.length} live pools; dropped: ${d.pools} pools, ${d.opened} connections, ${d.deliveries} deliveries, ${d.transactions} transactions`,
  );
  console.log(`${accepted}/120 accepted, ${closed.length} connectionClosed events`);
  const ok = accepted === 120 && d.deliveries === 120 && d.opened === closed.length && samples.length > 0;
  return ok ? 0 : 1;
}

runMain(main);
