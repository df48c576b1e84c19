/**
 * The consumer side of the delivery queue: a BullMQ Worker whose processor sends a queued
 * message's due recipients through a BindingPoolTransport, records each recipient's outcome
 * (record.ts decides what is final and when the rest goes again), and puts the job back as
 * delayed until its next due recipient, or completes it with the final record.
 *
 * Crash safety comes from the order of the writes: an attempt's outcomes are recorded (the job's
 * data, or its completion) before anything else happens, and a job whose worker died goes back
 * to the queue with the record of its last recorded attempt. A recipient can therefore reach a
 * server twice only when a worker died between the final dot and that record.
 */
import { EventEmitter } from 'node:events';
import type { Readable } from 'node:stream';
import nodemailer, { type SentMessageInfo, type Transporter } from 'nodemailer';
import type { Job, Worker } from 'bullmq';
import { BindingPoolTransport, type BindingPoolSentMessageInfo } from '../transport';
import type { BindingPoolOptions } from '../policy/options';
import type { DomainResult } from '../delivery/deliver';
import { describeError } from '../errors';
import { checkWorkerOptions, DEFAULT_PREFIX, type CheckedWorkerOptions, type MailWorkerOptions } from './options';
import { closeClient, connect, loadBullmq, MessageStore, reportError, type BullMq, type QueueRedis } from './redis';
import { domainGroups } from '../message/recipients';
import {
  applyAttempt,
  dueRecipients,
  endFailed,
  endQueued,
  nextAttemptAt,
  type AttemptOutcome,
  type AttemptResult,
  type MailRecord,
  type RecipientRecord,
} from './record';
import { finalEvent, toOutcome, type FinalEvent, type MailOutcome } from './outcome';

/** Whole-message errors no later attempt can change: the message's own addresses or size. */
const PERMANENT_CODES = new Set(['EADDRESS', 'ENORECIPIENTS', 'ESIZE']);

type Sender = Pick<Transporter<SentMessageInfo>, 'sendMail'>;

/** A MailWorker's events. */
export interface MailWorkerEvents {
  /** Recipients an attempt made final, once that is recorded. */
  final: [event: FinalEvent];
  /** Every recipient of a message is final (recorded). */
  done: [outcome: MailOutcome];
  /** Redis or BullMQ trouble, a listener or hook that threw, a send the worker could not make; the worker goes on. */
  error: [err: Error];
}

export class MailWorker extends EventEmitter<MailWorkerEvents> {
  /** The BullMQ worker underneath. */
  readonly worker: Worker<MailRecord, MailRecord>;
  private readonly options: CheckedWorkerOptions;
  private readonly redis: QueueRedis;
  private readonly ownsRedis: boolean;
  private readonly store: MessageStore;
  private readonly sender: Sender;
  /** The transport the worker made from options (closed with it). */
  private readonly ownTransport: BindingPoolTransport | undefined;
  private readonly bullmq: BullMq;
  private closing: Promise<void> | undefined;
  /** Recipients made final by a job's last attempt, announced once BullMQ has recorded its completion. */
  private readonly completing = new Map<string, RecipientRecord[]>();

  constructor(
    readonly name: string,
    private readonly settings: MailWorkerOptions,
  ) {
    super();
    this.options = checkWorkerOptions(settings);
    this.bullmq = loadBullmq();
    ({ sender: this.sender, owned: this.ownTransport } = senderFor(settings.transport));
    ({ redis: this.redis, owned: this.ownsRedis } = connect(settings.connection, 'worker'));
    const prefix = settings.prefix ?? DEFAULT_PREFIX;
    this.store = new MessageStore(this.redis, `${prefix}:${name}:`);
    const { concurrency, lockDuration, stalledInterval, maxStalledCount } = this.options;
    this.worker = new this.bullmq.Worker<MailRecord, MailRecord>(name, (job, token) => this.process(job, token), {
      connection: this.redis as never,
      prefix,
      concurrency,
      lockDuration,
      stalledInterval,
      maxStalledCount,
    });
    this.worker.on('completed', (job, record) => this.finished(job.id!, record));
    this.worker.on('failed', (job, err) => this.failed(job, err));
    this.worker.on('error', (err) => this.report(err));
  }

  /** Resolves when the worker is connected and taking messages. */
  async waitUntilReady(): Promise<void> {
    await this.worker.waitUntilReady();
  }

  /** Lets the messages in progress finish their attempt, then stops; closes the transport when the worker made it. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.worker.close();
      await this.ownTransport?.close();
      if (this.ownsRedis) await closeClient(this.redis);
    })();
    return this.closing;
  }

  private async process(job: Job<MailRecord, MailRecord>, token: string | undefined): Promise<MailRecord> {
    const id = job.id!;
    let record = job.data;
    // A run that died after recording failures but before the bounce hook returned: the hook again, first.
    if (record.unannounced) record = await this.announce(job, record, true);
    let settled: RecipientRecord[] = [];
    const due = dueRecipients(record, Date.now());
    if (due.length > 0) ({ record, settled } = await this.attempt(job, record, due));
    const failures = failuresOf(settled);
    if (failures.length > 0 && this.settings.onFinalFailure) record = await this.announce(job, { ...record, unannounced: failures }, false);
    const next = nextAttemptAt(record);
    if (next === undefined) {
      // Completing the job records the final states; 'final' and 'done' follow (see finished()).
      this.completing.set(id, settled);
      return record;
    }
    // Recorded before the job leaves this worker: a crash from here on resends nothing recorded.
    await job.updateData(record);
    if (settled.length > 0) this.emitSafely('final', finalEvent(id, record, settled));
    await job.moveToDelayed(next, token);
    throw new this.bullmq.DelayedError();
  }

  /**
   * Sends the due recipients once, one sendMail per destination domain, and records each
   * domain's outcomes as they come while others are still going (a slow domain does not keep a
   * fast one's outcomes unrecorded, which is the window a crash can duplicate them in).
   */
  private async attempt(job: Job<MailRecord, MailRecord>, record: MailRecord, due: string[]): Promise<AttemptResult> {
    const first = await this.store.read(record.bytesKey, record.size);
    if (!first) {
      const expired = Date.now() >= record.expiresAt;
      const why = expired ? 'not delivered within maxAge, and its bytes are gone from Redis' : 'its bytes are missing from Redis; it cannot be sent';
      return endQueued(record, expired ? 'expired' : 'rejected', `the queued message ${why}`, Date.now());
    }
    const policy = { schedule: this.options.retrySchedule, retryUnknown: this.options.retryUnknown };
    const groups = domainGroups(due);
    let current = record;
    const settled: RecipientRecord[] = [];
    let left = groups.length;
    let writes = Promise.resolve();
    let writeFailed: unknown;
    await Promise.all(
      groups.map(async (addresses, i) => {
        const outcomes = await this.sendGroup(current, addresses, i === 0 || Buffer.isBuffer(first) ? first : undefined);
        const result = applyAttempt(current, outcomes, Date.now(), policy);
        current = result.record;
        settled.push(...result.settled);
        if (--left === 0) return;
        // With a bounce hook, a failure recorded here is marked unannounced: a crash before the
        // attempt ends leaves the next run to call the hook for it.
        const snapshot = this.settings.onFinalFailure ? { ...current, unannounced: failuresOf(settled) } : current;
        writes = writes.then(() => job.updateData(snapshot)).catch((err: unknown) => void (writeFailed ??= err));
      }),
    );
    await writes;
    if (writeFailed) throw writeFailed;
    return { record: current, settled };
  }

  /** One domain's share of an attempt; never throws (bytes that cannot be read are a retry). */
  private async sendGroup(record: MailRecord, addresses: string[], bytes: Buffer | Readable | undefined): Promise<Map<string, AttemptOutcome>> {
    let raw = bytes;
    try {
      // A Buffer serves every domain; a stream is read once per domain.
      raw ??= await this.store.read(record.bytesKey, record.size);
    } catch (err) {
      return unsent(addresses, `the queued message's bytes could not be read: ${describeError(err)}`);
    }
    return raw ? this.send(record, addresses, raw) : unsent(addresses, 'the queued message’s bytes went missing during the attempt');
  }

  private async send(record: MailRecord, due: string[], raw: Buffer | Readable): Promise<Map<string, AttemptOutcome>> {
    let domains: DomainResult[];
    try {
      const mail = { envelope: { from: record.from, to: due }, raw, binding: record.binding, bindingGroup: record.bindingGroup, dsn: record.dsn };
      domains = ((await this.sender.sendMail(mail as never)) as BindingPoolSentMessageInfo).domains;
    } catch (err) {
      const withDomains = (err as { domains?: DomainResult[] }).domains;
      if (withDomains) domains = withDomains;
      else {
        // The whole send failed before any recipient had an outcome: final only when the message
        // itself is at fault; a worker's own trouble (its options, a read) is a retry, and reported.
        const code = (err as { code?: string }).code ?? '';
        if (PERMANENT_CODES.has(code)) return new Map(due.map((address) => [address, { status: 'rejected', response: describeError(err) }]));
        this.report(new Error(`message ${record.messageId}: ${describeError(err)}; its recipients go again`, { cause: err }));
        return unsent(due, describeError(err));
      }
    }
    const outcomes = new Map<string, AttemptOutcome>();
    for (const domain of domains)
      for (const outcome of [...domain.accepted, ...domain.rejected, ...domain.pending]) {
        const recorded: AttemptOutcome = { status: outcome.status, response: outcome.response };
        if (outcome.responseCode !== undefined) recorded.responseCode = outcome.responseCode;
        if (outcome.retryAfter) recorded.retryAfter = new Date(outcome.retryAfter).getTime();
        if (outcome.outcomeUnknown) recorded.outcomeUnknown = true;
        outcomes.set(outcome.recipient, recorded);
      }
    // A due recipient the report does not name still counts as attempted, and goes again.
    for (const address of due) if (!outcomes.has(address)) outcomes.set(address, { status: 'pending', response: 'the transport reported no outcome for it' });
    return outcomes;
  }

  /**
   * Calls onFinalFailure for the record's `unannounced` recipients once their final states are
   * recorded (so a slow hook never widens the window in which a crash duplicates deliveries);
   * a crash before it returns leaves them unannounced, and the next run calls it again.
   */
  private async announce(job: Job<MailRecord, MailRecord>, record: MailRecord, recorded: boolean): Promise<MailRecord> {
    const { unannounced = [], ...announced } = record;
    if (!this.settings.onFinalFailure) return announced;
    if (!recorded) await job.updateData(record);
    const failures = record.recipients.filter((r) => unannounced.includes(r.address));
    try {
      await this.settings.onFinalFailure({ ...finalEvent(job.id!, record, failures), outcome: toOutcome(job.id!, record) });
    } catch (err) {
      this.report(new Error(`onFinalFailure threw for message ${job.id}: ${describeError(err)}`, { cause: err }));
    }
    return announced;
  }

  /** A job completed with its final record: the events, then the bytes go. */
  private finished(id: string, record: MailRecord): void {
    const settled = this.completing.get(id) ?? [];
    this.completing.delete(id);
    this.store.delete(record.bytesKey).catch((err: Error) => this.report(err));
    if (settled.length > 0) this.emitSafely('final', finalEvent(id, record, settled));
    this.emitSafely('done', toOutcome(id, record));
  }

  /**
   * A job BullMQ failed (its processor threw on every try, or its workers died maxStalledCount
   * times): its unfinished recipients end as unknown. The bytes stay (until their TTL), so that
   * BullMQ's job.retry() can take it up again.
   */
  private failed(job: Job<MailRecord, MailRecord> | undefined, err: Error): void {
    this.report(new Error(`message ${job?.id ?? '?'} failed: ${describeError(err)}`, { cause: err }));
    if (job?.id) this.completing.delete(job.id);
    if (!job?.finishedOn) return;
    const id = job.id!;
    // Failures recorded but not yet announced get their hook call now (once more: BullMQ runs nothing for this job again).
    const announcing = job.data.unannounced && this.settings.onFinalFailure ? this.announce(job, job.data, true) : Promise.resolve(job.data);
    void announcing.then((announced) => {
      const { record, settled } = endFailed(announced, describeError(err), job.finishedOn!);
      if (settled.length > 0) this.emitSafely('final', finalEvent(id, record, settled));
      this.emitSafely('done', toOutcome(id, record));
    });
  }

  /** A listener that throws must not fail the job (which would send its recipients again). */
  private emitSafely<E extends 'final' | 'done'>(event: E, ...payload: MailWorkerEvents[E]): void {
    try {
      (this.emit as (event: E, ...args: MailWorkerEvents[E]) => boolean)(event, ...payload);
    } catch (err) {
      this.report(new Error(`a '${event}' listener threw: ${describeError(err)}`, { cause: err }));
    }
  }

  private report(err: Error): void {
    reportError(this, err);
  }
}

/** What the worker sends through, and whether it made it (and closes it). */
function senderFor(transport: MailWorkerOptions['transport']): { sender: Sender; owned?: BindingPoolTransport } {
  if (transport instanceof BindingPoolTransport) return { sender: nodemailer.createTransport(transport) };
  if (typeof (transport as Sender).sendMail === 'function') return { sender: transport as Sender };
  const owned = new BindingPoolTransport(transport as BindingPoolOptions);
  return { sender: nodemailer.createTransport(owned), owned };
}

/** The same pending outcome for each address: nothing reached a server. */
function unsent(addresses: readonly string[], response: string): Map<string, AttemptOutcome> {
  return new Map(addresses.map((address) => [address, { status: 'pending', response }]));
}

/** The recipients among `settled` whose failure onFinalFailure hears of: rejected or expired. */
function failuresOf(settled: readonly RecipientRecord[]): string[] {
  return settled.filter((r) => r.status === 'rejected' || r.status === 'expired').map((r) => r.address);
}
