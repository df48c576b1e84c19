/**
 * One round of one candidate, in its own process so CPU time and peak RSS are its own:
 * `node build/bench/child.js '<RunSpec JSON>'`. Warms up on a separate instance (a few hundred
 * sends, closed before measuring), then runs the measured sends and prints one result line.
 */
import nodemailer from 'nodemailer';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import type { MailMessage, SendMailOptions, Transport } from 'nodemailer';
import { BindingPoolTransport, type BindingPoolOptions } from '../lib';
import {
  BINDING_ADDRESSES,
  CONNECTIONS,
  COMPOSED_TEXT,
  RESULT_PREFIX,
  SENDER,
  buildRawMessage,
  byDomain,
  pump,
  sendFor,
  sleep,
  type RunResult,
  type RunSpec,
  type Send,
} from './common';
import { mixMail } from './mix';
import { smtpConnectionLoop, type LoopOutcome } from './smtp-loop';

const RAW = buildRawMessage();

/** Every SMTP connection any candidate opens goes through SMTPConnection#connect. */
let connectCalls = 0;
const proto = SMTPConnection.prototype as unknown as { connect: (...args: unknown[]) => unknown };
const originalConnect = proto.connect;
proto.connect = function (this: unknown, ...args: unknown[]) {
  connectCalls++;
  return originalConnect.apply(this, args);
};

interface Candidate {
  /** Resolves to the number of recipients accepted. */
  send(i: number): Promise<number>;
  /** Runs all n sends itself instead of send() under the harness's window. */
  runAll?(n: number): Promise<LoopOutcome>;
  /** Work done before the clock starts (starting a thread). */
  prepare?(): Promise<void>;
  close(): Promise<void>;
  /** Connections by the candidate's own count, when it keeps one. */
  ownConnections?(): number;
}

function mailFor(spec: RunSpec, send: Send, i: number, to = send.to): SendMailOptions {
  if (spec.message === 'raw') return { envelope: { from: SENDER, to }, raw: RAW };
  const mail: SendMailOptions =
    spec.message === 'mix' ? mixMail(i, SENDER, send.to) : { from: SENDER, to: send.to, subject: `benchmark message ${i}`, text: COMPOSED_TEXT };
  // A per-domain caller keeps the headers and narrows the envelope.
  if (to !== send.to) mail.envelope = { from: SENDER, to };
  return mail;
}

function bindingPool(spec: RunSpec, deliveryThread = false): Candidate {
  const options: BindingPoolOptions = {
    deliveryThread,
    route: { host: spec.host, port: spec.port },
    maxOutboundConnections: CONNECTIONS,
    maxDeliveriesPerConnection: spec.limit,
  };
  if (spec.shape === 'many-domains') {
    options.bindings = Object.fromEntries(BINDING_ADDRESSES.map((address, k) => [`b${k}`, { localAddress: address }]));
    options.defaultBinding = 'b0';
  }
  const pool = new BindingPoolTransport(options);
  let closed = 0;
  pool.on('connectionClosed', () => closed++);
  const transporter = nodemailer.createTransport(pool);
  let openedBeforeClose = 0;
  return {
    async send(i) {
      const send = sendFor(spec.shape, i, spec.round);
      const mail = mailFor(spec, send, i);
      if (send.binding !== undefined) mail.binding = `b${send.binding}`;
      const info = await transporter.sendMail(mail);
      return info.accepted.length;
    },
    async close() {
      const stats = pool.stats();
      openedBeforeClose = stats.droppedPools.opened + stats.pools.reduce((sum, p) => sum + p.opened, 0);
      await pool.close();
    },
    ownConnections: () => Math.max(openedBeforeClose, closed),
  };
}

function smtpPoolOptions(spec: RunSpec, localAddress?: string) {
  return {
    pool: true as const,
    host: spec.host,
    port: spec.port,
    secure: false,
    ignoreTLS: true,
    maxConnections: CONNECTIONS,
    maxMessages: spec.limit > 0 ? spec.limit : Infinity,
    ...(localAddress !== undefined && { localAddress }),
  };
}

function nodemailerPool(spec: RunSpec): Candidate {
  const transporter = nodemailer.createTransport(smtpPoolOptions(spec));
  return {
    async send(i) {
      const send = sendFor(spec.shape, i, spec.round);
      const info = await transporter.sendMail(mailFor(spec, send, i));
      return info.accepted.length;
    },
    async close() {
      transporter.close();
    },
  };
}

/** One Nodemailer pool per (binding, domain), created on first use; a fan-out message is split per domain. */
function nodemailerMap(spec: RunSpec): Candidate {
  const pools = new Map<string, ReturnType<typeof nodemailer.createTransport>>();
  const poolFor = (binding: number | undefined, domain: string) => {
    const key = `${binding ?? ''}|${domain}`;
    let transporter = pools.get(key);
    if (!transporter) {
      transporter = nodemailer.createTransport(smtpPoolOptions(spec, binding === undefined ? undefined : BINDING_ADDRESSES[binding]));
      pools.set(key, transporter);
    }
    return transporter;
  };
  return {
    async send(i) {
      const send = sendFor(spec.shape, i, spec.round);
      const parts = [...byDomain(send.to)].map(async ([domain, to]) => {
        const info = await poolFor(send.binding, domain).sendMail(mailFor(spec, send, i, to.length === send.to.length ? send.to : to));
        return (info.accepted as unknown[]).length;
      });
      return (await Promise.all(parts)).reduce((a, b) => a + b, 0);
    },
    async close() {
      for (const transporter of pools.values()) transporter.close();
    },
  };
}

/** A transport that builds and reads the message and sends nothing: Nodemailer's own cost. */
class NoopTransport implements Transport<{ envelope: unknown; messageId: string; accepted: string[] }> {
  readonly name = 'noop';
  readonly version = '1';
  send(
    mail: MailMessage<{ envelope: unknown; messageId: string; accepted: string[] }>,
    callback: (err: Error | null, info?: { envelope: unknown; messageId: string; accepted: string[] }) => void,
  ): void {
    const envelope = mail.message.getEnvelope();
    const stream = mail.message.createReadStream();
    stream.on('data', () => {});
    stream.once('error', (err: Error) => callback(err));
    stream.once('end', () => callback(null, { envelope, messageId: mail.message.messageId(), accepted: envelope.to }));
  }
}

function noopTransport(spec: RunSpec): Candidate {
  const transporter = nodemailer.createTransport(new NoopTransport());
  return {
    async send(i) {
      const send = sendFor(spec.shape, i, spec.round);
      const info = await transporter.sendMail(mailFor(spec, send, i));
      return info.accepted.length;
    },
    async close() {},
  };
}

/**
 * Ceiling for any transport that composes with Nodemailer in the application's thread and sends
 * from a second thread: the do-nothing transport's sendMail loop here while a worker thread runs
 * the SMTPConnection loop over the same count, at the same time, with nothing crossing between
 * them. Its rate is sends over the time until both are done.
 */
function twoThreadCeiling(spec: RunSpec): Candidate {
  const composing = noopTransport(spec);
  let worker: Worker | undefined;
  return {
    send: () => Promise.reject(new Error('use runAll')),
    async prepare() {
      worker = new Worker(join(__dirname, 'ceiling-worker.js'), { workerData: { spec } });
      await new Promise((resolve, reject) => worker!.once('message', resolve).once('error', reject));
    },
    async runAll(n) {
      if (!worker) await this.prepare!();
      const sending = new Promise<LoopOutcome>((resolve, reject) => worker!.once('message', resolve).once('error', reject));
      worker!.postMessage(n);
      const [composed, sent] = await Promise.all([pump(n, spec.window, (i) => composing.send(i)), sending]);
      const failed = composed.failed + sent.failed;
      const firstError = composed.firstError ?? sent.firstError;
      return { accepted: Math.min(composed.accepted, sent.accepted), failed, ...(firstError !== undefined && { firstError }) };
    },
    async close() {
      await worker?.terminate();
    },
  };
}

function makeCandidate(spec: RunSpec): Candidate {
  switch (spec.candidate) {
    case 'binding-pool':
      return bindingPool(spec);
    case 'binding-pool-thread':
      return bindingPool(spec, true);
    case 'nodemailer-pool':
      return nodemailerPool(spec);
    case 'nodemailer-map':
      return nodemailerMap(spec);
    case 'noop-transport':
      return noopTransport(spec);
    case 'smtp-connection':
      return { ...smtpConnectionLoop(spec), send: () => Promise.reject(new Error('use runAll')) };
    case 'two-thread-ceiling':
      return twoThreadCeiling(spec);
  }
}

async function runSends(spec: RunSpec, candidate: Candidate, n: number) {
  if (candidate.runAll) return candidate.runAll(n);
  return pump(n, spec.window, (i) => candidate.send(i));
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]) as RunSpec;
  const gc = (globalThis as { gc?: () => void }).gc;

  if (spec.warmupSends > 0) {
    const warm = makeCandidate({ ...spec, round: -1 });
    const result = await runSends(spec, warm, spec.warmupSends);
    await warm.close();
    if (result.failed > 0) throw new Error(`warm-up failed: ${result.failed} sends, first: ${result.firstError}`);
    await sleep(50);
  }
  gc?.();

  const candidate = makeCandidate(spec);
  await candidate.prepare?.();
  connectCalls = 0;
  const cpu = process.cpuUsage();
  const started = process.hrtime.bigint();
  const outcome = await runSends(spec, candidate, spec.sends);
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  const used = process.cpuUsage(cpu);
  const connections = connectCalls;
  await candidate.close();

  const expected = Array.from({ length: spec.sends }, (_, i) => sendFor(spec.shape, i, spec.round).to.length).reduce((a, b) => a + b, 0);
  const result: RunResult = {
    scenario: spec.scenario,
    candidate: spec.candidate,
    round: spec.round,
    sends: spec.sends,
    accepted: outcome.accepted,
    expected,
    failed: outcome.failed,
    ...(outcome.firstError !== undefined && { firstError: outcome.firstError }),
    ms,
    rate: (outcome.accepted / ms) * 1000,
    cpuUserMs: used.user / 1000,
    cpuSystemMs: used.system / 1000,
    peakRssMiB: process.resourceUsage().maxRSS / 1024,
    connections,
    ...(candidate.ownConnections && { ownConnections: candidate.ownConnections() }),
    // The mix's sizes are the parent's to add up (bench/mix.ts mixVariantSizes).
    messageBytes: spec.message === 'raw' ? RAW.length : spec.message === 'mix' ? 0 : await composedSize(spec),
  };
  process.stdout.write(RESULT_PREFIX + JSON.stringify(result) + '\n');
  // Nodemailer's pool closes its sockets in the background; do not wait for them.
  setTimeout(() => process.exit(0), 200).unref();
}

/** Size of one composed message, for the report. */
async function composedSize(spec: RunSpec): Promise<number> {
  const transporter = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const info = await transporter.sendMail(mailFor(spec, sendFor('one-domain', 0, 0), 0));
  return (info.message as Buffer).length;
}

main().catch((err: unknown) => {
  process.stderr.write(`child failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
