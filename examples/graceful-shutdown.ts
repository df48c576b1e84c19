/**
 * Graceful shutdown: on SIGTERM stop taking new work, `await transporter.close()` (it lets the
 * sends in flight finish, then QUITs every connection), and exit. To demonstrate, the program
 * sends itself SIGTERM while a batch is half sent; the server takes 100 ms per message, so several
 * sends are in flight at that moment. Every one of them settles, and a send after close() fails
 * with ECLOSED.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type BindingPoolError, type ConnectionSummary } from '../lib';
import { runMain, startSlowSink } from './run-main';

async function main(): Promise<number> {
  const { server, route } = await startSlowSink(100);
  const pool = new BindingPoolTransport({
    route,
    maxOutboundConnections: 3,
  });
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (c: ConnectionSummary) => closed.push(c));
  const transporter = nodemailer.createTransport(pool);

  const inFlight = new Set<Promise<unknown>>();
  const settled = { accepted: 0, failed: 0 };
  let started = 0;
  let accepting = true;

  const shutdown = new Promise<void>((resolve) => {
    process.once('SIGTERM', () => {
      accepting = false; // 1. take no new work
      console.log(`SIGTERM: ${inFlight.size} sends in flight, ${pool.stats().sending} per stats(); closing`);
      // 2. close() waits for the sends in flight, then QUITs every connection.
      // (Nodemailer's typings say close() returns void; it returns this transport's promise.)
      void (async () => {
        await transporter.close();
        resolve();
      })();
    });
  });

  // The producer: one new message every 20 ms, 30 in all, while accepting.
  for (let i = 0; i < 30 && accepting; i++) {
    const p = transporter.sendMail({ from: 'a@example.test', to: `r${i}@example.test`, subject: `#${i}`, text: 'hi' }).then(
      () => settled.accepted++,
      () => settled.failed++,
    );
    started++;
    inFlight.add(p);
    void p.finally(() => inFlight.delete(p));
    if (i === 9) process.kill(process.pid, 'SIGTERM');
    await new Promise((r) => setTimeout(r, 20));
  }
  await shutdown;
  const stillPending = inFlight.size;
  let lateError = '';
  await transporter.sendMail({ from: 'a@example.test', to: 'late@example.test', text: 'too late' }).catch((err: BindingPoolError) => {
    lateError = err.code;
  });
  await new Promise<void>((resolve) => server.close(() => resolve()));

  console.log(`started ${started} sends before SIGTERM stopped the producer`);
  console.log(`after close(): ${settled.accepted} accepted, ${settled.failed} failed, ${stillPending} still unsettled`);
  console.log(`connections closed: ${closed.map((c) => `${c.id} (${c.deliveries}, ${c.reason})`).join(', ')}`);
  console.log(`a send after close(): ${lateError || 'did not fail'}`);
  const ok = started < 30 && settled.accepted === started && stillPending === 0 && lateError === 'ECLOSED' && closed.every((c) => c.reason === 'shutdown');
  return ok ? 0 : 1;
}

runMain(main);
