/**
 * The `big-queue` memory scenario, one candidate per process:
 * `node build/bench/big-queue.js '<BigQueueSpec JSON>'`. Makes `count` sendMail calls at once
 * (all queued), each a composed message (short text + HTML) with one large attachment, to one
 * loopback sink, and samples process.memoryUsage() meanwhile. Prints one result line.
 *
 * Bounded: it stops by itself when every send has settled, when the deadline passes, or when RSS
 * passes `rssLimit` (the guard: the candidate is abandoned and the process exits at once, so a
 * transport that builds every queued message cannot take the machine down). The parent also
 * watches this process's RSS and kills it a little above the limit, in case the event loop is
 * too busy for the sampler to run.
 */
import nodemailer from 'nodemailer';
import type { SendMailOptions } from 'nodemailer';
import { randomBytes } from 'node:crypto';
import { BindingPoolTransport } from '../lib';
import { CONNECTIONS, RESULT_PREFIX, bigQueueMail, pump } from './common';

export type BigQueueCandidate = 'binding-pool' | 'binding-pool-thread' | 'nodemailer-pool';

export interface BigQueueSpec {
  candidate: BigQueueCandidate;
  host: string;
  port: number;
  /** sendMail calls, all made at once. */
  count: number;
  /** 'path': every message attaches `file` by path (Nodemailer streams it); 'buffer': one Buffer of `attachmentBytes`, shared by every message. */
  attachment: 'path' | 'buffer';
  file: string;
  attachmentBytes: number;
  /** RSS (bytes) past which the candidate is abandoned. */
  rssLimit: number;
  /** ms after the first sendMail call past which the candidate is abandoned. */
  deadlineMs: number;
  sampleMs: number;
}

export interface MemorySample {
  rss: number;
  heapUsed: number;
  heapTotal: number;
  external: number;
  arrayBuffers: number;
}

export interface BigQueueResult {
  candidate: BigQueueCandidate;
  /** done: every send settled; rss-limit: the guard fired; deadline: the time ran out. */
  outcome: 'done' | 'rss-limit' | 'deadline';
  count: number;
  /** Recipients accepted (one per message) when the run ended. */
  accepted: number;
  failed: number;
  firstError?: string;
  /** From the first sendMail call to the last settled send (or to the abort). */
  ms: number;
  /** When the first send was accepted, ms after the first call (undefined: none was). */
  firstAcceptMs?: number;
  /** Before the first sendMail call (transport created). */
  start: MemorySample;
  /** Each field's own maximum over the samples. */
  peak: MemorySample;
  peakRssAtMs: number;
  /** When the run ended (no GC forced). */
  end: MemorySample;
  /** process.resourceUsage().maxRSS, bytes: the kernel's peak, between samples too. */
  maxRss: number;
  samples: number;
}

interface Sender {
  sendMail(mail: SendMailOptions): Promise<{ accepted: unknown[] }>;
  close(): Promise<void>;
}

function makeSender(spec: BigQueueSpec): Sender {
  if (spec.candidate === 'nodemailer-pool') {
    const transporter = nodemailer.createTransport({
      pool: true,
      host: spec.host,
      port: spec.port,
      secure: false,
      ignoreTLS: true,
      maxConnections: CONNECTIONS,
      maxMessages: Infinity,
    });
    return { sendMail: (mail) => transporter.sendMail(mail), close: async () => transporter.close() };
  }
  const pool = new BindingPoolTransport({
    route: { host: spec.host, port: spec.port },
    maxOutboundConnections: CONNECTIONS,
    deliveryThread: spec.candidate === 'binding-pool-thread',
  });
  const transporter = nodemailer.createTransport(pool);
  return { sendMail: (mail) => transporter.sendMail(mail), close: () => pool.close() };
}

function memory(): MemorySample {
  const { rss, heapUsed, heapTotal, external, arrayBuffers } = process.memoryUsage();
  return { rss, heapUsed, heapTotal, external, arrayBuffers };
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]) as BigQueueSpec;
  const content = spec.attachment === 'buffer' ? randomBytes(spec.attachmentBytes) : undefined;
  const mailFor = (i: number): SendMailOptions => bigQueueMail(i, content ? { content } : { path: spec.file });
  const sender = makeSender(spec);

  const start = memory();
  const peak = { ...start };
  let peakRssAtMs = 0;
  let samples = 0;
  let accepted = 0;
  let failed = 0;
  let firstAcceptMs: number | undefined;
  let firstError: string | undefined;
  const started = Date.now();

  const finish = (outcome: BigQueueResult['outcome']): void => {
    const result: BigQueueResult = {
      candidate: spec.candidate,
      outcome,
      count: spec.count,
      accepted,
      failed,
      ...(firstError !== undefined && { firstError }),
      ms: Date.now() - started,
      ...(firstAcceptMs !== undefined && { firstAcceptMs }),
      start,
      peak,
      peakRssAtMs,
      end: memory(),
      maxRss: process.resourceUsage().maxRSS * 1024,
      samples,
    };
    // stdout is a pipe: written synchronously on Linux, so nothing is lost by exiting right after.
    process.stdout.write(RESULT_PREFIX + JSON.stringify(result) + '\n');
  };

  const sample = (): void => {
    const now = memory();
    samples++;
    if (now.rss > peak.rss) {
      peak.rss = now.rss;
      peakRssAtMs = Date.now() - started;
    }
    peak.heapUsed = Math.max(peak.heapUsed, now.heapUsed);
    peak.heapTotal = Math.max(peak.heapTotal, now.heapTotal);
    peak.external = Math.max(peak.external, now.external);
    peak.arrayBuffers = Math.max(peak.arrayBuffers, now.arrayBuffers);
    if (now.rss > spec.rssLimit) {
      finish('rss-limit');
      process.exit(0);
    }
    if (Date.now() - started > spec.deadlineMs) {
      finish('deadline');
      process.exit(0);
    }
  };
  const sampler = setInterval(sample, spec.sampleMs);

  // Every sendMail call at once: a window as large as the count.
  // (Counted here as well as by pump, so that an aborted run reports what had settled by then.)
  await pump(spec.count, spec.count, async (i) => {
    try {
      const info = await sender.sendMail(mailFor(i));
      const n = info.accepted.length;
      accepted += n;
      if (n > 0) firstAcceptMs ??= Date.now() - started;
      return n;
    } catch (err) {
      failed++;
      firstError ??= err instanceof Error ? `${(err as { code?: string }).code ?? err.name}: ${err.message}` : String(err);
      throw err;
    }
  });
  sample();
  clearInterval(sampler);
  finish('done');
  await sender.close();
  // Nodemailer's pool closes its sockets in the background; do not wait for them.
  setTimeout(() => process.exit(0), 200).unref();
}

main().catch((err: unknown) => {
  process.stderr.write(`big-queue failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
