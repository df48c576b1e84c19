/**
 * Direct-to-MX delivery from two bindings in a group, with per-domain limits.
 *
 * A dns2 server on 127.0.0.1 answers the MX lookups (passed as `dnsServers`); its MX hosts have A
 * records on 127.0.0.1, where one smtp-server listens; the global `port` is that server's port.
 * Bindings mta1 (127.0.0.2) and mta2 (127.0.0.3) form group `bulk`; each destination domain gets
 * a member round-robin. `gone.test` does not exist (NXDOMAIN): its recipients are rejected.
 */
import dns2 from 'dns2';
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type ConnectionSummary } from '../lib';
import { runMain, startLoopbackSmtp } from './run-main';

const { Packet } = dns2;
const MX: Record<string, { priority: number; exchange: string }[]> = {
  'alpha.test': [{ priority: 10, exchange: 'mx.alpha.test' }],
  'beta.test': [
    { priority: 10, exchange: 'mx1.beta.test' },
    { priority: 20, exchange: 'mx2.beta.test' },
  ],
};
const A: Record<string, string[]> = { 'mx.alpha.test': ['127.0.0.1'], 'mx1.beta.test': ['127.0.0.1'], 'mx2.beta.test': ['127.0.0.1'] };
/** dns2 encodes plain record objects; its typings ask for its Resource class. */
const resource = (record: Record<string, unknown>) => record as unknown as InstanceType<typeof Packet.Resource>;

async function startDns(): Promise<{ address: string; close(): Promise<void> }> {
  const server = dns2.createServer({
    udp: true,
    handle: (request, send) => {
      const [question] = request.questions;
      const name = question.name.toLowerCase();
      const response = Packet.createResponseFromRequest(request);
      if (!MX[name] && !A[name])
        response.header.rcode = 3; // NXDOMAIN
      else if (question.type === Packet.TYPE.MX)
        for (const mx of MX[name] ?? []) response.answers.push(resource({ name, type: Packet.TYPE.MX, class: Packet.CLASS.IN, ttl: 300, ...mx }));
      else if (question.type === Packet.TYPE.A)
        for (const address of A[name] ?? []) response.answers.push(resource({ name, type: Packet.TYPE.A, class: Packet.CLASS.IN, ttl: 300, address }));
      send(response);
    },
  });
  const port = await new Promise<number>((resolve) => {
    server.on('listening', () => resolve((server.addresses() as { udp: { port: number } }).udp.port));
    void server.listen({ udp: { port: 0, address: '127.0.0.1' } });
  });
  return { address: `127.0.0.1:${port}`, close: () => server.close() };
}

async function main(): Promise<number> {
  const dns = await startDns();
  const received: { from: string; rcpts: string[] }[] = [];
  const smtp = await startLoopbackSmtp({
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        received.push({ from: session.remoteAddress, rcpts: session.envelope.rcptTo.map((r) => r.address) });
        callback(null, 'Ok');
      });
    },
  });
  const { port } = smtp;
  console.log(`dns on ${dns.address}, MX hosts on 127.0.0.1:${port}`);

  const pool = new BindingPoolTransport({
    dnsServers: [dns.address],
    port,
    tls: 'no',
    bindings: { mta1: { localAddress: '127.0.0.2', name: 'mta1.example.test' }, mta2: { localAddress: '127.0.0.3', name: 'mta2.example.test' } },
    bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] } },
    defaultBinding: 'bulk',
    domains: {
      'alpha.test': { maxDeliveriesPerConnection: 3, maxOutboundConnections: 2 },
      'beta.test': { maxRecipientsPerTransaction: 2, maxOutboundConnections: 1 },
    },
  });
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (c: ConnectionSummary) => closed.push(c));
  const transporter = nodemailer.createTransport(pool);

  const outcome = { accepted: 0, rejected: 0, pending: 0 };
  try {
    const sends = Array.from({ length: 6 }, (_, i) =>
      transporter.sendMail({
        from: 'news@example.test',
        to: [`a${i}@alpha.test`, `b${i}@beta.test`, `c${i}@beta.test`, `x${i}@gone.test`],
        text: `message ${i}`,
      }),
    );
    const infos = await Promise.all(sends);
    for (const d of infos[0].domains)
      console.log(`  message 0, ${d.domain}: binding ${d.binding}, hosts ${d.hosts.join(' ') || '-'}, ${d.rejected[0]?.response ?? 'accepted'}`);
    for (const info of infos) for (const key of ['accepted', 'rejected', 'pending'] as const) outcome[key] += info[key].length;
  } finally {
    await transporter.close();
    await smtp.close();
    await dns.close();
  }

  for (const c of closed) console.log(`  ${c.id.padEnd(18)} from ${c.localAddress} ${c.deliveries} deliveries in ${c.transactions} transactions (${c.reason})`);
  const sources = new Set(received.map((r) => r.from));
  console.log(`accepted ${outcome.accepted}, rejected ${outcome.rejected}, pending ${outcome.pending}; server saw sources ${[...sources].sort().join(', ')}`);
  const ok =
    outcome.accepted === 18 &&
    outcome.rejected === 6 &&
    outcome.pending === 0 &&
    closed.filter((c) => c.domain === 'alpha.test').every((c) => c.deliveries <= 3);
  return ok ? 0 : 1;
}

runMain(main);
