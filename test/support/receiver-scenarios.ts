/**
 * Issue 11's measured cases, each against a PolicyServer (and, for the shared MX host, a DnsServer)
 * on loopback: a batch of messages handed to the transport at once, as an application queueing a
 * batch does, and the figures of the run read from both sides (the transport's results and what
 * the receiver counted).
 *
 * The transport comes from a parameter, so the same runner drives this tree's build and an older
 * one: `runReceiverScenario('perIpCap', { transportModule: require('/some/dir/dist/cjs') })`.
 *
 * Every message goes to a distinct recipient (`r<i>@<domain>`), so the server side can be checked
 * per recipient (`lost`, `duplicates`). Messages are composed by Nodemailer from text + html; one
 * in three carries a 20–60 KiB attachment (sizes drawn from the seed). Traffic stays on
 * 127.0.0.0/8: the transport's default binding sends from 127.0.0.2, the receivers listen on
 * 127.0.0.10–.20, DNS is the loopback zone or a port where nothing listens.
 *
 * No jest here: bench/receivers.ts uses it too.
 */
import nodemailer, { type SendMailOptions, type Transporter } from 'nodemailer';
import type * as Lib from '../../lib';
import type { BindingPoolOptions, BindingPoolSendError, BindingPoolSentMessageInfo } from '../../lib';
import { DnsServer, type Zone } from './dns-server';
import { mulberry32 } from './fault-server';
import { PolicyServer, type PolicyServerOptions } from './policy-server';

/** What `require('<dir>/dist/cjs')` returns, as far as the runner uses it. */
export interface TransportModule {
  BindingPoolTransport: new (options: BindingPoolOptions) => Lib.BindingPoolTransport;
}

export type ReceiverScenarioName = 'perIpCap' | 'refuseOneIn20' | 'slowDown' | 'sharedRelay' | 'sharedMx';

export interface ReceiverScenarioRun {
  transportModule: TransportModule;
  /** Transport options merged over the scenario's (shallowly: a `bindings` given here replaces the scenario's). */
  options?: BindingPoolOptions & Record<string, unknown>;
  /** Messages to send instead of the scenario's count (domains stay the same; recipients cycle over them). */
  messages?: number;
  /**
   * `mix` (default): text + html, one in three with a 20–60 KiB attachment; `small`: a one-line
   * text message (~400 bytes built), which reaches the pool sooner, so more sends are waiting
   * when a dial fails (the issue's figures were taken with messages like these).
   */
  messageKind?: 'mix' | 'small';
  /** Seed of the receiver's refusals and of the message sizes. Default 1. */
  seed?: number;
  /** sendMail calls in flight at most. Default: all at once. */
  window?: number;
  /** Sends still unsettled after this long are counted pending (`unsettled at deadline`). Default 600 000 ms. */
  deadlineMs?: number;
  /** Receiver policy merged over the scenario's (a smaller rate window, say). */
  policy?: Partial<PolicyServerOptions>;
  /** Called with the transport once it is built (to listen to its events, read its stats). */
  onTransport?: (transport: Lib.BindingPoolTransport) => void;
  /** Called with the servers before they stop, for assertions beyond the figures. */
  onServers?: (servers: { receiver: PolicyServer; dns?: DnsServer }) => void;
}

export interface DnsFigures {
  /** MX queries, over every domain. */
  mx: number;
  /** A queries for the shared MX host name. */
  hostA: number;
  /** AAAA queries for the shared MX host name. */
  hostAAAA: number;
  /** Every query the server saw. */
  total: number;
}

export interface ReceiverFigures {
  scenario: ReceiverScenarioName;
  messageKind: 'mix' | 'small';
  title: string;
  /** sendMail calls (one recipient each). */
  messages: number;
  domains: number;
  /** Recipients by outcome, as the transport reported them. */
  accepted: number;
  rejected: number;
  pending: number;
  /** Sends that failed without a per-recipient breakdown (their recipients count as pending). */
  sendErrors: number;
  /** Receiver side: TCP accepts, greetings refused, MAIL FROM commands (refused ones included), those refused by the rate window. */
  connects: number;
  refusedGreetings: number;
  mailCommands: number;
  mailRefused: number;
  /** Receiver side: most sessions open at once from the binding's address. */
  peakConcurrent: number;
  /** Receiver side: messages answered 250 after the dot, and distinct recipients among them. */
  serverMessages: number;
  serverRecipients: number;
  /** Recipients the transport reports accepted that the receiver never accepted (must be 0). */
  lost: number;
  /** Recipients the receiver accepted more than once (must be 0). */
  duplicates: number;
  /** Recipients the receiver accepted that the transport did not report accepted. */
  unreported: number;
  mailPerMessage: number;
  connectsPerMessage: number;
  /** From the first sendMail to the last send settled. */
  elapsedMs: number;
  /** Pending recipients by response text (its first 60 characters, see `reasonKey`). */
  pendingReasons: Record<string, number>;
  /** sharedMx only: the queries the loopback DNS server saw. */
  dns?: DnsFigures;
  /** slowDown only: most messages the receiver accepted in any window of its rate limit. */
  peakRate?: number;
}

interface ScenarioSpec {
  title: string;
  messages: number;
  domains: number;
  /** Receiver address on loopback. */
  host: string;
  policy: PolicyServerOptions;
  /** Transport options of the scenario, over the common ones. */
  transport: (receiver: PolicyServer, dns: DnsServer | undefined) => BindingPoolOptions;
  /** Direct-to-MX delivery through a loopback DNS zone (else a route to the receiver). */
  mx?: boolean;
}

/** The binding's source address: every count per client IP is this address's. */
export const SOURCE_ADDRESS = '127.0.0.2';

/** A DNS server address on loopback where nothing listens: no lookup leaves the machine. */
const NO_DNS = ['127.0.0.1:1'];

/** The shared MX host of `sharedMx`. */
const SHARED_MX_HOST = 'mx.hosted.test';

const domainName = (scenario: ReceiverScenarioName, domains: number, i: number): string =>
  domains === 1 ? `${scenario.toLowerCase()}.test` : `d${i % domains}.${scenario.toLowerCase()}.test`;

export const RECEIVER_SCENARIOS: Record<ReceiverScenarioName, ScenarioSpec> = {
  perIpCap: {
    title: '2 concurrent connections per client IP (421 greeting beyond), 300 messages, one domain',
    messages: 300,
    domains: 1,
    host: '127.0.0.10',
    policy: { maxConnectionsPerIp: 2 },
    transport: (receiver) => ({ route: receiver.route }),
  },
  refuseOneIn20: {
    title: '1 new connection in 20 refused with a 421 greeting, 1 000 messages, one domain',
    messages: 1_000,
    domains: 1,
    host: '127.0.0.11',
    policy: { refuseOneIn: 20 },
    // Not the default: connections retired after 10 deliveries, so the batch takes ~100 dials
    // (about 5 of them refused) instead of the 5 a pool of long-lived connections would make.
    transport: (receiver) => ({ route: receiver.route, maxDeliveriesPerConnection: 10 }),
  },
  slowDown: {
    title: '421 4.7.0 at MAIL FROM once 30 messages were accepted in 10 s, 200 messages, one domain',
    messages: 200,
    domains: 1,
    host: '127.0.0.12',
    policy: { rateLimit: { messages: 30, windowMs: 10_000 } },
    // Default options, acquireTimeout 30 s included: at 30 messages per 10 s the batch needs
    // about a minute however well the transport behaves.
    transport: (receiver) => ({ route: receiver.route }),
  },
  sharedRelay: {
    title: '300 domains through one relay (a global route) allowing 20 connections per client IP, 600 messages',
    messages: 600,
    domains: 300,
    host: '127.0.0.13',
    policy: { maxConnectionsPerIp: 20 },
    transport: (receiver) => ({ route: receiver.route }),
  },
  sharedMx: {
    title: `150 domains whose MX is one host (${SHARED_MX_HOST}) capping 20 connections per client IP, 300 messages`,
    messages: 300,
    domains: 150,
    host: '127.0.0.20',
    policy: { maxConnectionsPerIp: 20 },
    transport: (receiver, dns) => ({ dnsServers: [dns!.address], port: receiver.port }),
    mx: true,
  },
};

export const RECEIVER_SCENARIO_NAMES = Object.keys(RECEIVER_SCENARIOS) as ReceiverScenarioName[];

// ---------------------------------------------------------------------------------------------
// Messages

const WORDS =
  'the of and to in is for on that with as this by from your at are be our you we will order account update report invoice meeting please thanks'.split(' ');

function prose(random: () => number, bytes: number): string {
  const lines: string[] = [];
  let line = '';
  let size = 0;
  while (size < bytes) {
    const word = WORDS[Math.floor(random() * WORDS.length)];
    line += (line ? ' ' : '') + word;
    size += word.length + 1;
    if (line.length > 66) {
      lines.push(line);
      line = '';
    }
  }
  if (line) lines.push(line);
  return lines.join('\n');
}

/** One attachment body per scenario run, sliced to each message's size. */
function attachmentBase(random: () => number): Buffer {
  const base = Buffer.alloc(60 * 1024);
  for (let i = 0; i < base.length; i++) base[i] = Math.floor(random() * 256);
  return base;
}

/**
 * `count` messages, message i to `r<i>@<domain of i>`: text of 1–6 KiB with an html version, and
 * every third one a 20–60 KiB PDF-typed attachment. Deterministic for a seed.
 */
export function receiverMessages(scenario: ReceiverScenarioName, count: number, domains: number, seed = 1, kind: 'mix' | 'small' = 'mix'): SendMailOptions[] {
  if (kind === 'small') {
    return Array.from({ length: count }, (_, i) => ({
      from: 'sender@sender.example',
      to: `r${i}@${domainName(scenario, domains, i)}`,
      subject: `${scenario} #${i}`,
      text: `message ${i}`,
    }));
  }
  const random = mulberry32(seed);
  const base = attachmentBase(random);
  return Array.from({ length: count }, (_, i) => {
    const text = prose(random, 1024 + Math.floor(random() * 5 * 1024));
    const message: SendMailOptions = {
      from: 'Newsletter <news@sender.example>',
      to: `r${i}@${domainName(scenario, domains, i)}`,
      subject: `${scenario} #${i}`,
      text,
      html: `<html><body>${text
        .split('\n')
        .map((l) => `<p>${l}</p>`)
        .join('\n')}</body></html>`,
    };
    if (i % 3 === 0) {
      const size = 20 * 1024 + Math.floor(random() * 40 * 1024);
      message.attachments = [{ filename: `statement-${i}.pdf`, content: base.subarray(0, size), contentType: 'application/pdf' }];
    }
    return message;
  });
}

// ---------------------------------------------------------------------------------------------
// The runner

interface SendResult {
  to: string;
  info?: BindingPoolSentMessageInfo | BindingPoolSendError;
  error?: Error;
}

const hasBreakdown = (err: unknown): err is BindingPoolSendError =>
  typeof err === 'object' && err !== null && Array.isArray((err as BindingPoolSendError).accepted) && Array.isArray((err as BindingPoolSendError).domains);

function sharedMxZone(domains: string[], address: string): Zone {
  return {
    mx: Object.fromEntries(domains.map((d) => [d, [{ priority: 10, exchange: SHARED_MX_HOST }]])),
    a: { [SHARED_MX_HOST]: [address] },
  };
}

/**
 * A pending reply as a key to count by: its first 60 characters once the parts that differ per
 * domain or connection are masked (`d17.` → `d#.`, ports → `:#`), so one cause counts once.
 */
export function reasonKey(text: string): string {
  return text
    .replace(/\bd\d+\./g, 'd#.')
    .replace(/:\d{2,5}\b/g, ':#')
    .slice(0, 60);
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Sends every message, at most `window` at once; results in message order. */
async function sendAll(
  transporter: Transporter<BindingPoolSentMessageInfo>,
  messages: SendMailOptions[],
  window: number,
  deadlineMs: number,
): Promise<SendResult[]> {
  const results: SendResult[] = messages.map((m) => ({ to: String(m.to) }));
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < messages.length) {
      const i = next++;
      try {
        results[i].info = await transporter.sendMail(messages[i]);
      } catch (err) {
        if (hasBreakdown(err)) results[i].info = err;
        else results[i].error = err instanceof Error ? err : new Error(String(err));
      }
    }
  };
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, deadlineMs);
    timer.unref();
  });
  await Promise.race([Promise.all(Array.from({ length: Math.min(window, messages.length) }, worker)), deadline]);
  clearTimeout(timer);
  return results;
}

/** Runs one of issue 11's cases against `run.transportModule` and returns its figures. */
export async function runReceiverScenario(name: ReceiverScenarioName, run: ReceiverScenarioRun): Promise<ReceiverFigures> {
  const spec = RECEIVER_SCENARIOS[name];
  if (!spec) throw new Error(`unknown receiver scenario ${name}; known: ${RECEIVER_SCENARIO_NAMES.join(', ')}`);
  const seed = run.seed ?? 1;
  const count = run.messages ?? spec.messages;
  const messages = receiverMessages(name, count, spec.domains, seed, run.messageKind);
  const domains = [...new Set(Array.from({ length: Math.min(count, spec.domains) }, (_, i) => domainName(name, spec.domains, i)))];

  const policy: PolicyServerOptions = { ...spec.policy, ...run.policy };
  const receiver = await PolicyServer.start({ host: spec.host, name: `${name}.receiver.test`, label: name, seed, ...policy });
  let dns: DnsServer | undefined;
  let pool: Lib.BindingPoolTransport | undefined;
  try {
    if (spec.mx) dns = await DnsServer.start(sharedMxZone(domains, receiver.host));
    const options: BindingPoolOptions = {
      bindings: { default: { localAddress: SOURCE_ADDRESS } },
      dnsServers: NO_DNS,
      ...spec.transport(receiver, dns),
      ...run.options,
    };
    pool = new run.transportModule.BindingPoolTransport(options);
    run.onTransport?.(pool);
    const transporter = nodemailer.createTransport(pool);

    const started = Date.now();
    const results = await sendAll(transporter, messages, run.window ?? messages.length, run.deadlineMs ?? 600_000);
    const elapsedMs = Date.now() - started;

    let accepted = 0;
    let rejected = 0;
    let pending = 0;
    let sendErrors = 0;
    const pendingReasons: Record<string, number> = {};
    const reason = (text: string) => {
      const key = reasonKey(text);
      pendingReasons[key] = (pendingReasons[key] ?? 0) + 1;
    };
    const clientAccepted = new Set<string>();
    for (const result of results) {
      if (result.info) {
        accepted += result.info.accepted.length;
        rejected += result.info.rejected.length;
        pending += result.info.pending.length;
        for (const r of result.info.accepted) clientAccepted.add(r.toLowerCase());
        const explained = result.info.domains.reduce((n, d) => n + d.pending.length, 0);
        for (const domain of result.info.domains) for (const outcome of domain.pending) reason(outcome.response);
        for (let k = explained; k < result.info.pending.length; k++) reason('(pending without a domain outcome)');
      } else if (result.error) {
        sendErrors++;
        pending++;
        reason(`send error: ${result.error.message}`);
      } else {
        pending++;
        reason('unsettled at deadline');
      }
    }

    await Promise.resolve(pool.close());
    pool = undefined;
    // What the receiver learns a moment after the client: the last QUITs and socket closes.
    for (let waited = 0; waited < 3_000 && !receiver.allClosed(); waited += 20) await sleep(20);
    run.onServers?.({ receiver, dns });

    const serverSeen = receiver.acceptedRecipients();
    let lost = 0;
    let unreported = 0;
    let duplicates = 0;
    for (const r of clientAccepted) if (!serverSeen.has(r)) lost++;
    for (const [r, times] of serverSeen) {
      if (times > 1) duplicates += times - 1;
      if (!clientAccepted.has(r)) unreported++;
    }
    const source = receiver.counts(SOURCE_ADDRESS);
    const figures: ReceiverFigures = {
      scenario: name,
      messageKind: run.messageKind ?? 'mix',
      title: spec.title,
      messages: count,
      domains: domains.length,
      accepted,
      rejected,
      pending,
      sendErrors,
      connects: receiver.total.connects,
      refusedGreetings: receiver.total.refusedGreetings,
      mailCommands: receiver.total.mailCommands,
      mailRefused: receiver.total.mailRefused,
      peakConcurrent: source.peakSessions,
      serverMessages: receiver.total.messages,
      serverRecipients: serverSeen.size,
      lost,
      duplicates,
      unreported,
      mailPerMessage: receiver.total.mailCommands / count,
      connectsPerMessage: receiver.total.connects / count,
      elapsedMs,
      pendingReasons,
    };
    if (dns) {
      const server = dns;
      figures.dns = {
        mx: domains.reduce((n, d) => n + server.count(d, 'MX'), 0),
        hostA: server.count(SHARED_MX_HOST, 'A'),
        hostAAAA: server.count(SHARED_MX_HOST, 'AAAA'),
        total: [...server.queries.values()].reduce((a, b) => a + b, 0),
      };
    }
    if (policy.rateLimit) figures.peakRate = receiver.peakRate(policy.rateLimit.windowMs);
    return figures;
  } finally {
    if (pool) await Promise.resolve(pool.close()).catch(() => undefined);
    await receiver.stop();
    if (dns) await dns.stop();
  }
}
