/**
 * The delivery engine in a worker thread (`deliveryThread: true`). Composing a message in
 * `sendMail` and speaking SMTP each cost about as much CPU as the other; in one thread they take
 * turns, here the application's thread composes while the worker delivers, so a second core
 * does half the work.
 *
 * Jobs and results cross as plain data, batched per event-loop turn so the cost of a crossing is
 * shared by every message sent in that turn. stats() returns the worker's last report (at most
 * STATS_INTERVAL_MS old while it is busy, exact after close()).
 */
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import type { DomainResult } from '../delivery/deliver';
import type { Engine, EngineStats, MessageJob } from './local';
import type { FromWorker, ToWorker } from './protocol';
import { BindingPoolError, ConfigError } from '../errors';
import type { BindingPoolOptions } from '../policy/options';
import type { SuspensionEvent } from '../policy/pair-policy';
import { loadIoredis } from '../coordination/redis-store';
import { transportLog } from '../log';

interface Waiter {
  resolve(value: unknown): void;
  reject(err: Error): void;
  /** The recipients of a delivery, to report them if the worker dies under it (not its bytes: the worker has those). */
  job?: Omit<MessageJob, 'message'>;
}

const EMPTY_STATS: EngineStats = {
  pools: [],
  hosts: [],
  rates: [],
  shaping: [],
  droppedPools: { pools: 0, opened: 0, connectFailures: 0, transactions: 0, deliveries: 0, recipients: 0 },
  dns: { queries: 0, cachedDomains: 0, cachedHosts: 0 },
};

export class ThreadEngine extends EventEmitter implements Engine {
  private readonly workerOptions: BindingPoolOptions;
  private worker: Worker | undefined;
  private readonly waiting = new Map<number, Waiter>();
  private nextId = 1;
  private outbox: { id: number; job: MessageJob }[] = [];
  private flushScheduled = false;
  private lastStats: EngineStats = EMPTY_STATS;

  constructor(options: BindingPoolOptions) {
    super();
    // selectBinding runs in the application's thread (the transport applies it); the rest must
    // be plain data to cross.
    const { selectBinding: _selectBinding, ...rest } = options;
    // A missing ioredis is a ConfigError here, not a delivery thread that dies on start.
    if (options.coordination) loadIoredis();
    try {
      structuredClone(rest);
    } catch (err) {
      throw new ConfigError(
        'deliveryThread',
        `the options must be plain data to reach the delivery thread (${(err as Error).message}); functions such as tlsOptions.checkServerIdentity need deliveryThread: false`,
      );
    }
    this.workerOptions = rest;
    workerScript();
  }

  deliver(job: MessageJob): Promise<DomainResult[]> {
    const id = this.nextId++;
    this.outbox.push({ id, job });
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
    return this.request(id, job) as Promise<DomainResult[]>;
  }

  stats(): EngineStats {
    return this.lastStats;
  }

  verify(): Promise<true> {
    const id = this.nextId++;
    this.post({ type: 'verify', id });
    return this.request(id) as Promise<true>;
  }

  async close(): Promise<void> {
    // Jobs still waiting to cross go first (to a new worker, when the last one died).
    if (!this.worker && this.outbox.length === 0) return;
    this.flush();
    const id = this.nextId++;
    this.post({ type: 'close', id });
    await this.request(id);
    const worker = this.worker;
    this.worker = undefined;
    await worker?.terminate();
  }

  private request(id: number, job?: MessageJob): Promise<unknown> {
    this.ensureWorker().ref();
    const recipients = job && { sender: job.sender, envelope: job.envelope, domains: job.domains };
    return new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject, job: recipients }));
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.outbox.length === 0) return;
    // A batch's messages are copied into one buffer that is transferred, not cloned: one
    // allocation and one transfer per batch instead of per message (and a Buffer is often a
    // view into a larger shared slab, which cloning would copy whole). The worker frees a batch's
    // buffer only once every message in it is delivered, so a batch stays small: a large message
    // crosses alone, and its memory goes as soon as it is sent.
    let batch: { id: number; job: MessageJob }[] = [];
    let batchBytes = 0;
    for (const entry of this.outbox) {
      const size = entry.job.message.length;
      if (batch.length > 0 && batchBytes + size > MAX_BATCH_BYTES) {
        this.post(crossing(batch, batchBytes));
        batch = [];
        batchBytes = 0;
      }
      batch.push(entry);
      batchBytes += size;
    }
    this.post(crossing(batch, batchBytes));
    this.outbox = [];
  }

  private post(message: ToWorker): void {
    this.ensureWorker().postMessage(message, message.type === 'jobs' ? [message.bytes.buffer as ArrayBuffer] : []);
  }

  private ensureWorker(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(workerScript(), { workerData: { options: this.workerOptions } });
    worker.on('message', (message: FromWorker) => this.receive(message));
    worker.on('error', (err) => this.lost(worker, err));
    worker.on('exit', (code) => this.lost(worker, new Error(`the delivery thread exited with code ${code}`)));
    this.worker = worker;
    transportLog('delivery thread started');
    return worker;
  }

  private receive(message: FromWorker): void {
    if (message.type === 'connectionClosed') {
      this.emit('connectionClosed', message.summary);
      return;
    }
    if (message.type === 'event') {
      this.lastStats = message.stats;
      // A Date made by this thread (a cloned one comes from the structured-clone realm).
      const event = message.event as SuspensionEvent;
      this.emit(message.name, { ...event, until: new Date(event.until.getTime()) });
      return;
    }
    if (message.stats) this.lastStats = message.stats;
    for (const { id, domains, error } of message.results) {
      const waiter = this.waiting.get(id);
      if (!waiter) continue;
      this.waiting.delete(id);
      if (error) waiter.reject(new BindingPoolError((error.code as BindingPoolError['code']) ?? 'ECONNECT', error.message));
      else waiter.resolve(domains ?? true);
    }
    // Let the process exit when nothing is asked of the worker (as an idle in-thread pool would).
    if (this.waiting.size === 0) this.worker?.unref();
  }

  /**
   * The worker died: what it was delivering may or may not have reached the servers, so those
   * recipients are reported pending with the outcome unknown, never re-sent. The next send (or
   * the outbox's next flush) starts a new worker.
   */
  private lost(worker: Worker, err: Error): void {
    if (this.worker !== worker) return;
    this.worker = undefined;
    // Jobs still in the outbox never reached the dead worker: they go to the next one, and their
    // senders get the real outcome.
    const unsent = new Set(this.outbox.map(({ id }) => id));
    for (const [id, waiter] of this.waiting) {
      if (unsent.has(id)) continue;
      this.waiting.delete(id);
      if (!waiter.job) {
        waiter.reject(err);
        continue;
      }
      waiter.resolve(
        waiter.job.domains.map(([domain, recipients]) => ({
          domain,
          binding: 'binding' in waiter.job!.sender ? waiter.job!.sender.binding : waiter.job!.sender.group,
          hosts: [],
          connections: [],
          accepted: [],
          rejected: [],
          pending: recipients.map((r) => ({
            recipient: r.address,
            status: 'pending' as const,
            response: `outcome unknown: ${err.message}`,
            outcomeUnknown: true as const,
          })),
        })),
      );
    }
  }
}

/** Messages in one crossing at most (a larger message crosses alone). */
const MAX_BATCH_BYTES = 256 * 1024;

/** One crossing: the batch's messages copied into one transferable buffer. */
function crossing(batch: { id: number; job: MessageJob }[], total: number): ToWorker {
  const bytes = new Uint8Array(total);
  let offset = 0;
  const jobs = batch.map(({ id, job }) => {
    const { message, ...rest } = job;
    bytes.set(message, offset);
    const entry = { id, job: rest, offset, length: message.length };
    offset += message.length;
    return entry;
  });
  return { type: 'jobs', jobs, bytes };
}

/**
 * The compiled worker entry beside this file; when this file runs from TypeScript source (under
 * a test runner), the one the build wrote to dist/.
 */
function workerScript(): string {
  const beside = join(__dirname, 'worker.js');
  if (existsSync(beside)) return beside;
  const built = join(__dirname, '..', '..', 'dist', 'cjs', 'engine', 'worker.js');
  if (__filename.endsWith('.ts') && existsSync(built)) return built;
  throw new ConfigError('deliveryThread', `the delivery thread's script ${beside} is missing (from a source checkout, run npm run build first)`);
}
