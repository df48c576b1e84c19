/**
 * What the benchmark parent and its child processes share: scenario definitions, the workload
 * (which message goes to which recipients), the prebuilt raw message, and small helpers.
 */
import type { SendMailOptions } from 'nodemailer';

/** Every candidate the harness knows. */
export type CandidateName =
  /** This package's transport. */
  | 'binding-pool'
  /** The same with `deliveryThread: true`: SMTP in a worker thread. */
  | 'binding-pool-thread'
  /** One Nodemailer pool (`pool: true`) to the sink: the baseline of every ratio. */
  | 'nodemailer-pool'
  /** A Map of Nodemailer pools, one per (binding, domain): what users write today. */
  | 'nodemailer-map'
  /** Ceiling: `SMTPConnection.send` in a loop on 5 connections with prebuilt bytes, no sendMail. */
  | 'smtp-connection'
  /** Ceiling: a do-nothing transport under `sendMail` that only reads the message stream. */
  | 'noop-transport'
  /** Ceiling of a two-thread transport: noop-transport here while a worker runs the smtp-connection loop, nothing crossing. */
  | 'two-thread-ceiling';

export const BASELINE: CandidateName = 'nodemailer-pool';

/** How the recipients of one send are laid out. */
export type Shape =
  /** One recipient per message, all at one domain. */
  | 'one-domain'
  /** One recipient per message over 100 domains × 2 bindings (200 pools). */
  | 'many-domains'
  /** One message to 1 000 recipients over 50 domains (20 each). */
  | 'fanout';

/** raw: the prebuilt 650-byte message; composed: Nodemailer builds ~670 bytes from text; mix: bench/mix.ts's realistic sizes and attachments. */
export type MessageKind = 'raw' | 'composed' | 'mix';

export interface Scenario {
  name: string;
  title: string;
  /** What it measures (README and report). */
  measures: string;
  shape: Shape;
  message: MessageKind;
  /** maxDeliveriesPerConnection / maxMessages; 0 = no limit. */
  limit: number;
  candidates: CandidateName[];
  /** sendMail calls per round (full, quick). */
  sends: { full: number; quick: number };
  /** True for the target scenarios. */
  target: boolean;
  /**
   * Sends in flight: 'all' hands every sendMail to the candidate at once (an application
   * queueing a batch); unset, the run's --window (an application that waits on its sends).
   */
  window?: 'all';
}

export const FANOUT_RECIPIENTS = 1_000;
export const FANOUT_DOMAINS = 50;
export const MANY_DOMAINS = 100;
export const BINDING_ADDRESSES = ['127.0.0.2', '127.0.0.3'];
/** Connections per pool (ours: maxOutboundConnections; Nodemailer: maxConnections; the SMTPConnection loop). */
export const CONNECTIONS = 5;

const SINGLE: CandidateName[] = ['binding-pool', 'binding-pool-thread', 'nodemailer-pool', 'smtp-connection', 'noop-transport', 'two-thread-ceiling'];
const MULTI: CandidateName[] = ['binding-pool', 'binding-pool-thread', 'nodemailer-pool', 'nodemailer-map', 'smtp-connection', 'noop-transport'];

const ONE_DOMAIN: Scenario = {
  name: 'one-domain',
  title: 'one domain, 5 connections, no limit (raw)',
  measures: 'steady-state throughput of the hot path: one pool, connections reused forever, prebuilt 650-byte raw messages',
  shape: 'one-domain',
  message: 'raw',
  limit: 0,
  candidates: SINGLE,
  sends: { full: 20_000, quick: 2_000 },
  target: true,
};

const LIMIT_100: Scenario = {
  name: 'limit-100',
  title: 'one domain, 5 connections, 100 deliveries per connection (raw)',
  measures: 'cost of retiring and reopening connections every 100 deliveries (Nodemailer: maxMessages 100)',
  shape: 'one-domain',
  message: 'raw',
  limit: 100,
  candidates: SINGLE,
  sends: { full: 20_000, quick: 2_000 },
  target: true,
};

/** The same work with every sendMail call made at once (see Scenario.window). */
function queued(scenario: Scenario, measures: string): Scenario {
  return { ...scenario, name: `${scenario.name}-queued`, title: scenario.title.replace(' (', ', the whole batch queued at once ('), measures, window: 'all' };
}

export const SCENARIOS: Scenario[] = [
  ONE_DOMAIN,
  LIMIT_100,
  queued(ONE_DOMAIN, 'all sendMail calls made at once, as an application handing over a batch does'),
  queued(LIMIT_100, "retiring connections under a queued batch: where Nodemailer's pool at maxMessages 100 loses about half its throughput"),
  {
    name: 'limit-10',
    title: 'one domain, 5 connections, 10 deliveries per connection (raw)',
    measures: 'connection churn dominating: a new SMTP session every 10 messages',
    shape: 'one-domain',
    message: 'raw',
    limit: 10,
    candidates: SINGLE,
    sends: { full: 5_000, quick: 1_000 },
    target: false,
  },
  {
    name: 'one-domain-composed',
    title: 'one domain, 5 connections, no limit (composed by Nodemailer)',
    measures: 'the same as one-domain with messages built by Nodemailer from from/to/subject/text: MIME composition dominates',
    shape: 'one-domain',
    message: 'composed',
    limit: 0,
    candidates: SINGLE,
    sends: { full: 5_000, quick: 1_000 },
    target: false,
  },
  {
    name: 'real-mix',
    title: 'one domain, 5 connections, no limit, a realistic mix of composed messages (5 KiB–10 MiB, attachments)',
    measures:
      'real mail: text + HTML composed by Nodemailer, 70 % 5–20 KiB, 25 % 20–200 KiB with an attachment, 5 % 1–10 MiB with 1–3 attachments (bench/mix.ts); msg/s and MB/s',
    shape: 'one-domain',
    message: 'mix',
    limit: 0,
    candidates: ['binding-pool', 'binding-pool-thread', 'nodemailer-pool', 'noop-transport'],
    sends: { full: 3_500, quick: 350 },
    target: false,
  },
  {
    name: 'many-domains',
    title: '100 domains × 2 bindings, one recipient per message (raw)',
    measures: '200 (binding, domain) pools at once; Nodemailer: one pool (no bindings, baseline) and a Map of 200 pools with localAddress',
    shape: 'many-domains',
    message: 'raw',
    limit: 0,
    candidates: MULTI,
    sends: { full: 5_000, quick: 1_000 },
    target: false,
  },
  {
    name: 'fanout',
    title: 'one message to 1 000 recipients over 50 domains (raw)',
    measures: 'recipient grouping and per-domain transactions; rate is recipients/s. Nodemailer pool: one 1 000-RCPT transaction; Map: one sendMail per domain',
    shape: 'fanout',
    message: 'raw',
    limit: 0,
    candidates: MULTI,
    sends: { full: 20, quick: 3 },
    target: false,
  },
];

export const MEMORY_SCENARIO = {
  name: 'memory',
  title: 'N distinct domains (10 000; 1 000 quick), one message each, then idle',
  measures: 'memory held per live pool and what is left per pool after they are dropped for idleness',
};

export const BIG_QUEUE_SCENARIO = {
  name: 'big-queue',
  title: '200 sendMail calls at once, each with one 20 MiB attachment, one domain',
  measures: 'memory of a queue of large messages: peak RSS, heapUsed, external and arrayBuffers while every send waits its turn',
};

const BIG_QUEUE_TEXT = 'Hello,\n\nthe report you asked for is attached.\n\nRegards,\nExample Sender\n';
const BIG_QUEUE_HTML =
  '<!DOCTYPE html><html><body><p>Hello,</p><p>the report you asked for is <b>attached</b>.</p><p>Regards,<br>Example Sender</p></body></html>';

/** A big-queue message: short text and HTML, one attachment given by path or as a (shared) Buffer. */
export function bigQueueMail(i: number, attachment: { path: string } | { content: Buffer }): SendMailOptions {
  return {
    from: SENDER,
    to: [`u${i}@example.com`],
    subject: `Report ${i}`,
    text: BIG_QUEUE_TEXT,
    html: BIG_QUEUE_HTML,
    attachments: [{ filename: 'report.bin', contentType: 'application/octet-stream', ...attachment }],
  };
}

/** What the parent asks a child to run. */
export interface RunSpec {
  scenario: string;
  candidate: CandidateName;
  shape: Shape;
  message: MessageKind;
  limit: number;
  sends: number;
  warmupSends: number;
  window: number;
  host: string;
  port: number;
  round: number;
}

/** What a child reports for one round. */
export interface RunResult {
  scenario: string;
  candidate: CandidateName;
  round: number;
  sends: number;
  /** Recipients the candidate reported delivered. */
  accepted: number;
  expected: number;
  failed: number;
  firstError?: string;
  ms: number;
  /** Recipients per second (= messages per second with one recipient per message). */
  rate: number;
  cpuUserMs: number;
  cpuSystemMs: number;
  /** process.resourceUsage().maxRSS of the child, MiB. */
  peakRssMiB: number;
  /** SMTP connections opened in the measured phase (counted on SMTPConnection.prototype.connect). */
  connections: number;
  /** Our transport only: connections opened per its own pool.stats() / connectionClosed events. */
  ownConnections?: number;
  messageBytes: number;
}

export const SENDER = 'bench@sender.example';

/** A numeric command-line flag (`--sends 5000`), or the fallback when it is not given. */
export function numberFlag(name: string, fallback: number): number {
  const args = process.argv.slice(2);
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
}

/** A fixed 650-byte RFC 5322 message, CRLF line ends. */
export function buildRawMessage(size = 650): Buffer {
  const head = [
    'From: Bench <bench@sender.example>',
    'To: Recipient <rcpt@example.com>',
    'Subject: nodemailer-binding-pool benchmark',
    'Date: Thu, 01 Jan 2026 00:00:00 +0000',
    'Message-ID: <bench-0@sender.example>',
    'MIME-Version: 1.0',
    'Content-Type: text/plain; charset=us-ascii',
    'Content-Transfer-Encoding: 7bit',
    '',
    '',
  ].join('\r\n');
  let body = '';
  while (head.length + body.length < size) {
    const room = size - head.length - body.length;
    // Each line is up to 76 characters plus CRLF; the last one fills the size exactly.
    const line = room >= 78 ? 'x'.repeat(76) : 'y'.repeat(Math.max(0, room - 2));
    body += line + '\r\n';
  }
  const bytes = Buffer.from(head + body, 'ascii');
  if (bytes.length !== size) throw new Error(`raw message is ${bytes.length} bytes, wanted ${size}`);
  return bytes;
}

export const COMPOSED_TEXT = 'Hello,\n\n' + 'This is a benchmark message from nodemailer-binding-pool. '.repeat(6) + '\n\nBye\n';

/** One send of a workload: its envelope recipients and the binding it should go out from. */
export interface Send {
  to: string[];
  /** Index into BINDING_ADDRESSES (many-domains only). */
  binding?: number;
}

export function sendFor(shape: Shape, i: number, round: number): Send {
  // The round is in the local part so two rounds never send the same address (no effect on the sink).
  switch (shape) {
    case 'one-domain':
      return { to: [`u${i}r${round}@example.com`] };
    case 'many-domains':
      // Every (binding, domain) pair is used: domains cycle fastest, bindings every 100 sends.
      return { to: [`u${i}r${round}@d${i % MANY_DOMAINS}.example`], binding: Math.floor(i / MANY_DOMAINS) % BINDING_ADDRESSES.length };
    case 'fanout':
      return { to: Array.from({ length: FANOUT_RECIPIENTS }, (_, j) => `u${i}x${j}r${round}@f${j % FANOUT_DOMAINS}.example`) };
  }
}

/** Splits recipients by domain, in first-seen order (what a per-domain caller does). */
export function byDomain(to: readonly string[]): Map<string, string[]> {
  const groups = new Map<string, string[]>();
  for (const address of to) {
    const domain = address.slice(address.lastIndexOf('@') + 1);
    let group = groups.get(domain);
    if (!group) groups.set(domain, (group = []));
    group.push(address);
  }
  return groups;
}

/**
 * Runs `n` sends with at most `window` in flight; each send resolves to the number of recipients
 * accepted. Failures are counted, not thrown.
 */
export async function pump(
  n: number,
  window: number,
  send: (i: number) => Promise<number>,
): Promise<{ accepted: number; failed: number; firstError?: string }> {
  let next = 0;
  let accepted = 0;
  let failed = 0;
  let firstError: string | undefined;
  const worker = async (): Promise<void> => {
    while (next < n) {
      const i = next++;
      try {
        // Not `accepted += await …`: that reads `accepted` before the await and loses updates.
        const n = await send(i);
        accepted += n;
      } catch (err) {
        failed++;
        firstError ??= err instanceof Error ? `${(err as { code?: string }).code ?? err.name}: ${err.message}` : String(err);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(window, n) }, worker));
  return { accepted, failed, ...(firstError !== undefined && { firstError }) };
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** The line prefix a child prints its JSON result after. */
export const RESULT_PREFIX = 'BENCH-RESULT ';
