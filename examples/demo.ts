/**
 * `npm run demo`: a few hundred messages through BindingPoolTransport to three SMTP servers on
 * loopback, then a report of every connection the transport opened, checked against what the
 * servers themselves recorded.
 *
 * - relay  (inbox.test, news.test): accepts everything.
 * - exim   (exim.test): answers MAIL FROM with `421 too many messages in this connection` after
 *   5 messages on a connection, like Exim's smtp_accept_max_per_connection; smtp-server closes
 *   the connection after a 421.
 * - strict (strict.test): refuses recipients whose local part starts with `nobody` with 550.
 *
 * The messages are real-sized and composed (HTML and text, most with an attachment): about 70 %
 * of 5–20 KiB, 25 % of 20–200 KiB and 5 % of 1–10 MiB. The servers record the bytes they stored
 * and the demo checks each message's attachment arrived whole.
 *
 * The messages go out through binding group `bulk`: bindings mta1 (127.0.0.2) and mta2
 * (127.0.0.3). The demo exits non-zero when a recipient is lost, a message is delivered twice, or
 * the transport's figures and the servers' disagree. All traffic stays on loopback: every domain
 * has a route, so no DNS query is made (on Linux all of 127.0.0.0/8 is loopback; on macOS first
 * run `sudo ifconfig lo0 alias 127.0.0.2` and `sudo ifconfig lo0 alias 127.0.0.3`).
 */
import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import nodemailer from 'nodemailer';
import { SMTPServer, type SMTPServerSession } from 'smtp-server';
import {
  BindingPoolTransport,
  type BindingPoolOptions,
  type BindingPoolSendError,
  type BindingPoolSentMessageInfo,
  type ConnectionSummary,
  type RetireReason,
  type TransportStats,
} from '../lib';

const MESSAGES = 300;
const EXIM_MESSAGES_PER_CONNECTION = 5;
/** The per-connection limits the options below set. */
const LIMITS = { inbox: 20, news: 50, exim: 4, eximFromMta2: 8, strictRcpts: 12 };
const BINDINGS = {
  mta1: { localAddress: '127.0.0.2', name: 'mta1.demo.test' },
  mta2: { localAddress: '127.0.0.3', name: 'mta2.demo.test' },
} as const;
type BindingName = keyof typeof BINDINGS;

function transportOptions(relay: DemoServer, exim: DemoServer, strict: DemoServer): BindingPoolOptions {
  const route = (server: DemoServer) => ({ host: '127.0.0.1', port: server.port });
  return {
    maxOutboundConnections: 3,
    bindings: {
      mta1: { ...BINDINGS.mta1 },
      // A binding's domain stanza, the most specific scope: mta2 may send more to exim.test per
      // connection than that server takes, so its connections there end on the server's 421.
      mta2: { ...BINDINGS.mta2, domains: { 'exim.test': { maxDeliveriesPerConnection: LIMITS.eximFromMta2 } } },
    },
    bindingGroups: {
      bulk: {
        bindings: ['mta1', 'mta2'],
        maxRecipientsPerTransaction: 10,
        // A binding group's domain stanza.
        domains: { 'news.test': { maxDeliveriesPerConnection: LIMITS.news } },
      },
    },
    // Global domain stanzas: where each domain goes, and its limits.
    domains: {
      'inbox.test': { route: route(relay), maxDeliveriesPerConnection: LIMITS.inbox },
      'news.test': { route: route(relay) },
      'exim.test': { route: route(exim), maxDeliveriesPerConnection: LIMITS.exim },
      'strict.test': { route: route(strict), maxRecipientsPerConnection: LIMITS.strictRcpts },
    },
  };
}

/** What those scopes resolve to for a (binding, domain) pair, for the server-side check. */
function limitFor(binding: string, domain: string): { deliveries: number; rcpts: number } {
  switch (domain) {
    case 'inbox.test':
      return { deliveries: LIMITS.inbox, rcpts: 0 };
    case 'news.test':
      return { deliveries: LIMITS.news, rcpts: 0 };
    case 'exim.test':
      return { deliveries: binding === 'mta2' ? LIMITS.eximFromMta2 : LIMITS.exim, rcpts: 0 };
    case 'strict.test':
      return { deliveries: 0, rcpts: LIMITS.strictRcpts };
    default:
      return { deliveries: 0, rcpts: 0 };
  }
}

// ---------------------------------------------------------------------------------------------
// The servers, and what they record

interface SeenTransaction {
  messageId: string;
  /** Bytes the server stored, and the SHA-256 of the attachment it found (X-Attachment-SHA256 names the one sent). */
  bytes: number;
  attachmentIntact: boolean;
  rcptAttempts: string[];
  rcptAccepted: string[];
  /** The server answered the final dot with 250. */
  delivered: boolean;
}

interface SeenConnection {
  server: string;
  remoteAddress: string;
  ehloName: string;
  transactions: SeenTransaction[];
  /** MAIL FROM commands answered with 421. */
  refusedAtMailFrom: number;
  closed: boolean;
}

interface DemoServer {
  name: string;
  port: number;
  connections: SeenConnection[];
  stop(): Promise<void>;
}

interface ServerBehaviour {
  messagesPerConnection?: number;
  refuseRcpt?: (address: string) => string | undefined;
}

function smtpError(code: number, message: string): Error {
  return Object.assign(new Error(message), { responseCode: code });
}

async function startServer(name: string, behaviour: ServerBehaviour = {}): Promise<DemoServer> {
  const connections: SeenConnection[] = [];
  const bySession = new Map<string, SeenConnection>();
  const seen = (session: SMTPServerSession): SeenConnection => bySession.get(session.id)!;
  const server = new SMTPServer({
    name: `${name}.loopback`,
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    // No PTR lookups of the client addresses: nothing leaves loopback.
    disableReverseLookup: true,
    logger: false,
    closeTimeout: 100,
    onConnect(session, callback) {
      const connection: SeenConnection = {
        server: name,
        remoteAddress: session.remoteAddress,
        ehloName: '',
        transactions: [],
        refusedAtMailFrom: 0,
        closed: false,
      };
      bySession.set(session.id, connection);
      connections.push(connection);
      callback();
    },
    onMailFrom(_address, session, callback) {
      const connection = seen(session);
      connection.ehloName = session.hostNameAppearsAs;
      const delivered = connection.transactions.filter((t) => t.delivered).length;
      if (behaviour.messagesPerConnection !== undefined && delivered >= behaviour.messagesPerConnection) {
        connection.refusedAtMailFrom++;
        return callback(smtpError(421, 'too many messages in this connection'));
      }
      connection.transactions.push({ messageId: '', bytes: 0, attachmentIntact: false, rcptAttempts: [], rcptAccepted: [], delivered: false });
      callback();
    },
    onRcptTo(address, session, callback) {
      const transaction = seen(session).transactions.at(-1)!;
      transaction.rcptAttempts.push(address.address);
      const refusal = behaviour.refuseRcpt?.(address.address);
      if (refusal) return callback(smtpError(550, refusal));
      transaction.rcptAccepted.push(address.address);
      callback();
    },
    onData(stream, session, callback) {
      const transaction = seen(session).transactions.at(-1)!;
      const chunks: Buffer[] = [];
      stream.on('data', (chunk: Buffer) => chunks.push(chunk));
      stream.on('end', () => {
        const text = Buffer.concat(chunks).toString('latin1');
        transaction.messageId = /^Message-ID:\s*(<[^>]*>)/im.exec(text)?.[1] ?? '?';
        transaction.bytes = text.length;
        transaction.attachmentIntact = attachmentIntact(text);
        transaction.delivered = true;
        callback(null, 'Ok: queued');
      });
    },
    onClose(session) {
      const connection = bySession.get(session.id);
      if (!connection) return;
      // Also for connections that never carried a message.
      connection.ehloName ||= session.hostNameAppearsAs || '(none)';
      connection.closed = true;
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return {
    name,
    port: (server.server.address() as AddressInfo).port,
    connections,
    async stop() {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      // smtp-server calls onClose a tick after the socket closed.
      for (let wait = 0; wait < 50 && connections.some((c) => !c.closed); wait++) await new Promise((resolve) => setTimeout(resolve, 10));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The messages: the same every run

function random(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The attachment sizes of the mix: 70 % 5–20 KiB messages (no attachment, a long HTML body), 25 % 20–200 KiB, 5 % 1–10 MiB. */
function messageSize(next: () => number): number {
  const r = next();
  const KiB = 1024;
  if (r < 0.7) return Math.round((5 + next() * 15) * KiB);
  if (r < 0.95) return Math.round((20 + next() * 180) * KiB);
  return Math.round((1 + next() * 9) * KiB * KiB);
}

/** Random bytes for every attachment: slices of one buffer. */
const ATTACHMENT_BYTES = randomBytes(10 * 1024 * 1024);

const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

/** The attachment part of a stored message, decoded, against the digest its header names. */
function attachmentIntact(text: string): boolean {
  const named = /^X-Attachment-SHA256: ([0-9a-f]+)/im.exec(text)?.[1];
  if (!named) return true;
  const part = /Content-Disposition: attachment[^]*?\r\n\r\n([A-Za-z0-9+/=\r\n]+)/.exec(text)?.[1];
  return part !== undefined && sha256(Buffer.from(part.replace(/\r\n/g, ''), 'base64')) === named;
}

function buildMessages() {
  const next = random(2024);
  const pickDomain = (): string => {
    const r = next();
    return r < 0.35 ? 'inbox.test' : r < 0.65 ? 'news.test' : r < 0.8 ? 'exim.test' : 'strict.test';
  };
  return Array.from({ length: MESSAGES }, (_, i) => {
    // Mostly one recipient; about one message in three has two to four, often on several domains.
    const count = next() < 0.7 ? 1 : 2 + Math.floor(next() * 3);
    const to = Array.from({ length: count }, (_, k) => {
      const domain = pickDomain();
      const local = domain === 'strict.test' && next() < 0.2 ? `nobody${i}-${k}` : `user${i}-${k}`;
      return `${local}@${domain}`;
    });
    const size = messageSize(next);
    const paragraph = `<p>Hello, this is demo message ${i}. ${'Lorem ipsum dolor sit amet, consectetur adipiscing elit. '.repeat(8)}</p>\n`;
    // Small messages are all HTML; larger ones carry most of their size as an attachment.
    const small = size < 20 * 1024;
    const attachment = small ? undefined : ATTACHMENT_BYTES.subarray(i, i + Math.round(size * 0.74));
    return {
      bindingGroup: 'bulk',
      messageId: `<demo-${i}@demo.test>`,
      from: 'newsletter@demo.test',
      to,
      subject: `Demo message ${i}`,
      text: `Hello, this is demo message ${i}.`,
      html: paragraph.repeat(small ? Math.ceil(size / paragraph.length) : 2),
      ...(attachment && {
        headers: { 'X-Attachment-SHA256': sha256(attachment) },
        attachments: [{ filename: `report-${i}.bin`, content: attachment }],
      }),
    };
  });
}

type DemoMessage = ReturnType<typeof buildMessages>[number];

interface SendResult {
  message: DemoMessage;
  info?: BindingPoolSentMessageInfo;
  error?: BindingPoolSendError;
}

// ---------------------------------------------------------------------------------------------
// Report

const sum = (values: number[]): number => values.reduce((a, b) => a + b, 0);

function countBy<T>(items: T[], key: (item: T) => string): Map<string, number> {
  const counts = new Map<string, number>();
  for (const item of items) counts.set(key(item), (counts.get(key(item)) ?? 0) + 1);
  return counts;
}

/** A plain-text table; `right` marks the right-aligned columns. */
function table(header: string[], rows: (string | number)[][], right: number[] = []): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, c) => Math.max(...cells.map((r) => r[c].length)));
  const line = (r: string[]): string =>
    r
      .map((cell, c) => (right.includes(c) ? cell.padStart(widths[c]) : cell.padEnd(widths[c])))
      .join('  ')
      .trimEnd();
  const lines = header.some((h) => h) ? [line(header), widths.map((w) => '-'.repeat(w)).join('  ')] : [];
  return [...lines, ...cells.slice(1).map(line)].map((l) => `  ${l}`).join('\n');
}

const WHY: Record<RetireReason, string> = {
  maxDeliveries: 'maxDeliveriesPerConnection reached',
  maxRecipients: 'maxRecipientsPerConnection reached',
  serverClosed: 'server closed it (421)',
  error: 'connection error',
  idle: 'idle',
  evicted: 'closed idle to free a host slot',
  shaped: 'a reply rule lowered maxOutboundConnections',
  shutdown: 'transporter closed',
};

function printConnections(closed: ConnectionSummary[]): void {
  const number = (id: string): number => Number(id.split('#')[1]);
  const rows = [...closed]
    .sort((a, b) => a.binding.localeCompare(b.binding) || a.domain.localeCompare(b.domain) || number(a.id) - number(b.id))
    .map((c) => [c.id, c.binding, c.domain, c.localAddress ?? '(any)', c.deliveries, c.recipients, c.transactions, WHY[c.reason]]);
  console.log(`\nConnections (${closed.length}), as the transport's connectionClosed events reported them:\n`);
  console.log(table(['connection', 'binding', 'domain', 'source', 'deliveries', 'RCPTs', 'transactions', 'retired because'], rows, [4, 5, 6]));
}

/**
 * Compares the events with the servers' records, grouped by (server, domain, source address the
 * server saw): the same number of connections, the same deliveries on each, no limit exceeded.
 * (Connections cannot be paired one to one: the events do not carry the client's port.)
 */
function crossCheck(servers: DemoServer[], closed: ConnectionSummary[], problems: string[]): void {
  const UNUSED = '(no mail)';
  interface Group {
    server: string;
    domain: string;
    source: string;
    seen: SeenConnection[];
    reported: ConnectionSummary[];
  }
  const groups = new Map<string, Group>();
  const group = (server: string, domain: string, source: string): Group => {
    const key = `${server} ${domain} ${source}`;
    if (!groups.has(key)) groups.set(key, { server, domain, source, seen: [], reported: [] });
    return groups.get(key)!;
  };
  const bindingAt = new Map<string, BindingName>(Object.entries(BINDINGS).map(([name, b]) => [b.localAddress, name as BindingName]));

  for (const c of servers.flatMap((s) => s.connections)) {
    const domains = new Set(c.transactions.flatMap((t) => t.rcptAttempts.map((r) => r.split('@')[1])));
    if (domains.size > 1) problems.push(`a ${c.server} connection from ${c.remoteAddress} carried recipients of ${[...domains].join(', ')}`);
    // A pool may open a connection for a send that another connection, freed meanwhile, took.
    const unused = c.transactions.length + c.refusedAtMailFrom === 0;
    group(c.server, unused ? UNUSED : [...domains][0], c.remoteAddress).seen.push(c);
    const binding = bindingAt.get(c.remoteAddress);
    if (!binding) problems.push(`${c.server} saw a connection from ${c.remoteAddress}, no binding's address`);
    else if (c.ehloName !== BINDINGS[binding].name) problems.push(`${c.server} saw EHLO ${c.ehloName} from ${c.remoteAddress} (${binding})`);
  }
  const serverAt = new Map(servers.map((s) => [`127.0.0.1:${s.port}`, s.name]));
  for (const c of closed) group(serverAt.get(c.host) ?? c.host, c.transactions === 0 ? UNUSED : c.domain, c.localAddress ?? '(any)').reported.push(c);

  const delivered = (c: SeenConnection): number => sum(c.transactions.filter((t) => t.delivered).map((t) => t.rcptAccepted.length));
  const rcpts = (c: SeenConnection): number => sum(c.transactions.map((t) => t.rcptAttempts.length));
  const descending = (values: number[]): number[] => [...values].sort((a, b) => b - a);
  let rcptsNotSeen = 0;
  const rows = [...groups.values()]
    .sort((a, b) => a.server.localeCompare(b.server) || a.domain.localeCompare(b.domain) || a.source.localeCompare(b.source))
    .map((g) => {
      const binding = bindingAt.get(g.source) ?? '?';
      const limit = limitFor(binding, g.domain);
      const seenDeliveries = descending(g.seen.map(delivered));
      const reportedDeliveries = descending(g.reported.map((c) => c.deliveries));
      const refused = sum(g.seen.map((c) => c.refusedAtMailFrom));
      const seenRcpts = sum(g.seen.map(rcpts));
      const reportedRcpts = sum(g.reported.map((c) => c.recipients));
      const issues: string[] = [];
      if (g.seen.length !== g.reported.length) issues.push(`${g.reported.length} connections reported`);
      if (seenDeliveries.join() !== reportedDeliveries.join()) issues.push(`deliveries reported: ${reportedDeliveries.join(' ')}`);
      // After a 421 to MAIL FROM the server drops the RCPTs pipelined behind it: it sees fewer.
      if (refused === 0 ? reportedRcpts !== seenRcpts : reportedRcpts < seenRcpts) issues.push(`${reportedRcpts} RCPTs reported`);
      if (limit.deliveries > 0 && Math.max(0, ...seenDeliveries) > limit.deliveries) issues.push(`more than ${limit.deliveries} deliveries on a connection`);
      if (limit.rcpts > 0 && Math.max(0, ...g.seen.map(rcpts)) > limit.rcpts) issues.push(`more than ${limit.rcpts} RCPTs on a connection`);
      for (const issue of issues) problems.push(`${g.server}, ${g.domain}, from ${g.source}: ${issue}`);
      rcptsNotSeen += reportedRcpts - seenRcpts;
      return [
        g.server,
        g.domain,
        `${g.source} (${binding})`,
        g.seen.length,
        seenDeliveries.join(' '),
        reportedRcpts === seenRcpts ? seenRcpts : `${seenRcpts} (${reportedRcpts})*`,
        refused || '',
        limit.deliveries ? `≤ ${limit.deliveries} deliveries` : limit.rcpts ? `≤ ${limit.rcpts} RCPTs` : '',
        issues.length ? issues.join('; ') : 'yes',
      ];
    });
  console.log('\nWhat the servers recorded, per server, domain and the source address they saw:\n');
  console.log(table(['server', 'domain', 'source', 'conns', 'deliveries per connection', 'RCPTs', '421s', 'limit', 'matches the events'], rows, [3, 5, 6]));
  if (rcptsNotSeen > 0) {
    console.log(`  * (n): RCPTs the events counted. ${rcptsNotSeen} of them were pipelined behind a MAIL FROM the server answered with 421;
    it closed the connection without reading them, and their recipients went out again over a new connection.`);
  }
}

function printSample(results: SendResult[]): void {
  const sample = results.find((r) => r.info && r.info.rejected.length > 0 && r.info.domains.length > 2)?.info;
  if (!sample) return;
  console.log(
    `\nOne message's info: messageId ${sample.messageId}, accepted ${sample.accepted.length}, rejected ${sample.rejected.length}, pending ${sample.pending.length}; info.domains[]:\n`,
  );
  const rows = sample.domains.flatMap((d) =>
    [...d.accepted, ...d.rejected, ...d.pending].map((o) => [d.domain, d.binding, o.host ?? '', o.status, o.recipient, o.response]),
  );
  console.log(table(['domain', 'binding', 'host', 'status', 'recipient', 'response'], rows));
}

/** Every recipient has exactly one outcome, and what was accepted is exactly what the servers delivered, once. */
function printTotals(
  results: SendResult[],
  servers: DemoServer[],
  closed: ConnectionSummary[],
  stats: TransportStats,
  elapsed: number,
  problems: string[],
): void {
  const outcome = { accepted: 0, rejected: 0, pending: 0 };
  let recipients = 0;
  let lost = 0;
  let reportedTwice = 0;
  const acceptedPairs = new Set<string>();
  for (const { message, info, error } of results) {
    const result = info ?? error;
    recipients += message.to.length;
    if (!result || !Array.isArray(result.accepted)) {
      // An error without the outcome lists (not EREJECTED / EPENDING): nothing is known.
      lost += message.to.length;
      continue;
    }
    for (const rcpt of message.to) {
      const lists = (['accepted', 'rejected', 'pending'] as const).filter((status) => result[status].includes(rcpt));
      if (lists.length === 0) lost++;
      if (lists.length > 1) reportedTwice++;
      for (const status of lists) outcome[status]++;
      if (lists.includes('accepted')) acceptedPairs.add(`${message.messageId} ${rcpt}`);
    }
  }
  const seen = servers.flatMap((s) => s.connections);
  const deliveredPairs = seen.flatMap((c) => c.transactions.filter((t) => t.delivered).flatMap((t) => t.rcptAccepted.map((r) => `${t.messageId} ${r}`)));
  const deliveredCounts = countBy(deliveredPairs, (p) => p);
  const duplicates = deliveredPairs.length - deliveredCounts.size;
  const acceptedNotDelivered = [...acceptedPairs].filter((p) => !deliveredCounts.has(p)).length;
  const deliveredNotAccepted = [...deliveredCounts.keys()].filter((p) => !acceptedPairs.has(p)).length;
  const expectedRejected = results.flatMap((r) => r.message.to).filter((r) => r.startsWith('nobody')).length;
  const reportedDeliveries = sum(closed.map((c) => c.deliveries));
  const errors = countBy(
    results.filter((r) => r.error),
    (r) => r.error!.code ?? r.error!.message,
  );

  const stored = seen.flatMap((c) => c.transactions.filter((t) => t.delivered));
  const broken = stored.filter((t) => !t.attachmentIntact).length;
  if (broken) problems.push(`${broken} stored message(s) whose attachment differs from the one sent`);
  if (lost) problems.push(`${lost} recipient(s) lost: in none of accepted / rejected / pending`);
  if (reportedTwice) problems.push(`${reportedTwice} recipient(s) in more than one of accepted / rejected / pending`);
  if (duplicates) problems.push(`${duplicates} duplicate deliveries on the servers`);
  if (acceptedNotDelivered) problems.push(`${acceptedNotDelivered} recipient(s) reported accepted that no server delivered`);
  if (deliveredNotAccepted) problems.push(`${deliveredNotAccepted} recipient(s) delivered by a server but not reported accepted`);
  if (outcome.rejected !== expectedRejected) problems.push(`${outcome.rejected} recipients rejected, ${expectedRejected} expected`);
  if (reportedDeliveries !== deliveredPairs.length) problems.push(`the events count ${reportedDeliveries} deliveries, the servers ${deliveredPairs.length}`);

  // After close() every pool has been dropped: stats() keeps their figures in droppedPools.
  const dropped = stats.droppedPools;
  const poolsAgree = stats.pools.length === 0 && dropped.opened === closed.length && dropped.deliveries === deliveredPairs.length;
  if (!poolsAgree)
    problems.push(`stats() after close(): ${stats.pools.length} live pools, ${dropped.opened} connections opened, ${dropped.deliveries} deliveries`);
  const check = (ok: boolean): string => (ok ? 'ok' : 'MISMATCH');
  const withInfo = results.filter((r) => r.info).length;
  const errorList = [...errors].map(([code, n]) => `${n} with ${code}`).join(', ');
  console.log('\nTotals:\n');
  const rows: (string | number)[][] = [
    ['messages', results.length, `${withInfo} resolved with info${errorList ? `, ${errorList} (no recipient accepted)` : ''}`],
    ['recipients', recipients, `over ${closed.length} connections from 2 bindings, in ${elapsed} ms`],
    [
      '  accepted',
      outcome.accepted,
      `the servers delivered ${deliveredPairs.length} (message, recipient) pairs: ${check(acceptedNotDelivered === 0 && deliveredNotAccepted === 0)}`,
    ],
    ['  rejected', outcome.rejected, `${expectedRejected} nobody*@strict.test addresses were sent: ${check(outcome.rejected === expectedRejected)}`],
    ['  pending', outcome.pending, ''],
    [
      'bytes',
      `${(sum(stored.map((t) => t.bytes)) / 1024 / 1024).toFixed(1)} MiB`,
      `stored by the servers; largest ${(Math.max(...stored.map((t) => t.bytes)) / 1024 / 1024).toFixed(1)} MiB; attachments intact: ${check(broken === 0)}`,
    ],
    ['  lost', lost, 'in none of accepted / rejected / pending (must be 0)'],
    ['duplicates', duplicates, '(message, recipient) pairs a server delivered more than once (must be 0)'],
    [
      'deliveries',
      reportedDeliveries,
      `summed over the connectionClosed events; the servers counted ${deliveredPairs.length}: ${check(reportedDeliveries === deliveredPairs.length)}`,
    ],
    ['421s', sum(seen.map((c) => c.refusedAtMailFrom)), 'exim.test answered MAIL FROM with 421; the transport went on over a new connection'],
    [
      'pools',
      dropped.pools,
      `(binding, domain) pools; stats() after close(): ${dropped.opened} connections opened, ${dropped.deliveries} deliveries: ${check(poolsAgree)}`,
    ],
  ];
  console.log(table(['', '', ''], rows, [1]));
}

/** `210 of 5–20 KiB, …`: how many messages of each size class the demo sends. */
function sizeMix(messages: DemoMessage[]): string {
  const bytes = (m: DemoMessage): number => m.attachments?.[0].content.length ?? m.html.length;
  const KiB = 1024;
  const classes = countBy(messages, (m) => (bytes(m) < 20 * KiB ? '5–20 KiB' : bytes(m) < 1024 * KiB ? '20–200 KiB' : '1–10 MiB'));
  return [...classes].map(([name, n]) => `${n} of ${name}`).join(', ');
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const started = Date.now();
  const relay = await startServer('relay');
  const exim = await startServer('exim', { messagesPerConnection: EXIM_MESSAGES_PER_CONNECTION });
  const strict = await startServer('strict', { refuseRcpt: (address) => (address.startsWith('nobody') ? '5.1.1 no such user here' : undefined) });
  const servers = [relay, exim, strict];

  const messages = buildMessages();
  console.log(`Servers on 127.0.0.1:
  relay  :${relay.port}  inbox.test (≤ ${LIMITS.inbox} deliveries per connection), news.test (≤ ${LIMITS.news}, set for group bulk)
  exim   :${exim.port}  exim.test (≤ ${LIMITS.exim}; ≤ ${LIMITS.eximFromMta2} from mta2), answers 421 after ${EXIM_MESSAGES_PER_CONNECTION} messages on a connection
  strict :${strict.port}  strict.test (≤ ${LIMITS.strictRcpts} RCPTs per connection), 550 for nobody*@strict.test
Sending ${messages.length} messages (${sizeMix(messages)}) to ${sum(messages.map((m) => m.to.length))} recipients through binding group bulk: mta1 ${BINDINGS.mta1.localAddress}, mta2 ${BINDINGS.mta2.localAddress}`);

  const pool = new BindingPoolTransport(transportOptions(relay, exim, strict));
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (summary: ConnectionSummary) => closed.push(summary));
  const transporter = nodemailer.createTransport(pool);

  const results: SendResult[] = await Promise.all(
    messages.map((message) =>
      transporter.sendMail(message).then(
        (info) => ({ message, info }),
        (error: BindingPoolSendError) => ({ message, error }),
      ),
    ),
  );
  // Resolves once every connection is closed, so every connectionClosed event is in.
  await transporter.close();
  const elapsed = Date.now() - started;
  await Promise.all(servers.map((s) => s.stop()));

  const problems: string[] = [];
  printConnections(closed);
  crossCheck(servers, closed, problems);
  printSample(results);
  printTotals(results, servers, closed, pool.stats(), elapsed, problems);

  if (problems.length > 0) {
    console.log(`\nFAILED:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    return 1;
  }
  console.log('\nOK: every recipient has exactly one outcome, nothing was delivered twice, and the servers agree with the transport.');
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
