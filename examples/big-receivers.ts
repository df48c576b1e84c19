/**
 * Momentum-style limits for big receivers: each domain stanza caps what one connection may carry
 * (`maxDeliveriesPerConnection`, `maxRecipientsPerConnection`) and how many connections are open
 * at once (`maxOutboundConnections`), the way Momentum configures gmail.com or yahoo.com.
 *
 * - gmail.test: accepts everything; we allow 40 deliveries and 60 RCPTs per connection, 2 connections.
 * - yahoo.test: answers MAIL FROM with `421 4.7.0 too many messages in this connection` after 20
 *   messages on a connection (Exim's smtp_accept_max_per_connection). The first binding keeps under
 *   it (maxDeliveriesPerConnection 20, the connection is retired cleanly); binding `eager` sets 50
 *   in its own domain stanza, runs into the 421, carries on over a new connection (reason
 *   `serverClosed`), and after two such 421s keeps under 20 itself (a learned limit).
 * Both domains have a static route to their server on 127.0.0.1.
 */
import nodemailer from 'nodemailer';
import type { SMTPServerSession } from 'smtp-server';
import { BindingPoolTransport, type ConnectionSummary } from '../lib';
import { runMain, startLoopbackSmtp } from './run-main';

async function startServer(messagesPerConnection = Infinity): Promise<{ port: number; delivered: () => number; close(): Promise<void> }> {
  const perSession = new Map<string, number>();
  let delivered = 0;
  const count = (session: SMTPServerSession) => perSession.get(session.id) ?? 0;
  const { port, close } = await startLoopbackSmtp({
    onMailFrom(_address, session, callback) {
      if (count(session) >= messagesPerConnection)
        return callback(Object.assign(new Error('4.7.0 too many messages in this connection'), { responseCode: 421 }));
      callback();
    },
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        perSession.set(session.id, count(session) + 1);
        delivered += session.envelope.rcptTo.length;
        callback(null, 'Ok');
      });
    },
  });
  return { port, delivered: () => delivered, close };
}

async function main(): Promise<number> {
  const gmail = await startServer();
  const yahoo = await startServer(20);
  const pool = new BindingPoolTransport({
    bindings: {
      careful: { localAddress: '127.0.0.2' },
      eager: { localAddress: '127.0.0.3', domains: { 'yahoo.test': { maxDeliveriesPerConnection: 50 } } },
    },
    defaultBinding: 'careful',
    domains: {
      'gmail.test': {
        route: { host: '127.0.0.1', port: gmail.port },
        maxDeliveriesPerConnection: 40,
        maxRecipientsPerConnection: 60,
        maxOutboundConnections: 2,
      },
      'yahoo.test': { route: { host: '127.0.0.1', port: yahoo.port }, maxDeliveriesPerConnection: 20, maxOutboundConnections: 1 },
    },
  });
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (c: ConnectionSummary) => closed.push(c));
  const transporter = nodemailer.createTransport(pool);

  let accepted: number;
  let sent: number;
  try {
    const sends = [];
    for (let i = 0; i < 100; i++) sends.push({ to: `u${i}@gmail.test`, binding: 'careful' });
    for (let i = 0; i < 60; i++) sends.push({ to: `u${i}@yahoo.test`, binding: 'careful' });
    for (let i = 0; i < 60; i++) sends.push({ to: `v${i}@yahoo.test`, binding: 'eager' });
    sent = sends.length;
    const infos = await Promise.all(sends.map((m, i) => transporter.sendMail({ ...m, from: 'news@example.test', subject: `#${i}`, text: 'hi' })));
    accepted = infos.reduce((n, info) => n + info.accepted.length, 0);
  } finally {
    await transporter.close();
    await Promise.all([gmail.close(), yahoo.close()]);
  }

  console.log('binding   domain       conns  deliveries per connection                  retired');
  const keys = [...new Set(closed.map((c) => `${c.binding} ${c.domain}`))].sort();
  for (const key of keys) {
    const conns = closed.filter((c) => `${c.binding} ${c.domain}` === key);
    const reasons = new Map<string, number>();
    for (const c of conns) reasons.set(c.reason, (reasons.get(c.reason) ?? 0) + 1);
    const [binding, domain] = key.split(' ');
    const perConn = conns.map((c) => c.deliveries).join(' ');
    console.log(
      `${binding.padEnd(9)} ${domain.padEnd(12)} ${String(conns.length).padStart(5)}  ${perConn.padEnd(42)} ${[...reasons].map(([r, n]) => `${n} ${r}`).join(', ')}`,
    );
  }
  console.log(`${accepted}/${sent} accepted; servers delivered gmail ${gmail.delivered()}, yahoo ${yahoo.delivered()}`);
  const ok =
    accepted === sent &&
    gmail.delivered() + yahoo.delivered() === sent &&
    closed.every((c) => c.domain !== 'gmail.test' || (c.deliveries <= 40 && c.recipients <= 60)) &&
    closed.some((c) => c.binding === 'eager' && c.reason === 'serverClosed');
  return ok ? 0 : 1;
}

runMain(main);
