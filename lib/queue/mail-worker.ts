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
import { checkWorkerOptions, type CheckedWorkerOptions, type MailWorkerOptions } from './options';
import { connect, loadBullmq, MessageStore, reportError, type BullMq, type QueueRedis } from './redis';
import { applyAttempt, dueRecipients, endQueued, nextAttemptAt, type AttemptOutcome, type AttemptResult, type MailRecord } from './record';
import { finalEvent, toOutcome } from './outcome';

/** Whole-message errors no later attempt can change: the message or its binding is wrong. */
const PERMANENT_CODES = new Set(['EBINDING', 'EADDRESS', 'ENORECIPIENTS', 'EMESSAGE', 'ECONFIG', 'ESIZE']);

type Sender = Pick<Transporter<SentMessageInfo>, 'sendMail'>;

/**
 * Events: `final` (FinalEvent: recipients that became final in an attempt), `done` (MailOutcome:
 * every recipient of a message is final), `error` (Redis or BullMQ trouble; the worker goes on).
 */
export class MailWorker extends EventEmitter {
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

  constructor(
    readonly name: string,
    private readonly settings: MailWorkerOptions,
  ) {
    super();
    this.options = checkWorkerOptions(settings);
    this.bullmq = loadBullmq();
    ({ sender: this.sender, owned: this.ownTransport } = senderFor(settings.transport));
    ({ redis: this.redis, owned: this.ownsRedis } = connect(settings.connection));
    const prefix = settings.prefix ?? 'bull';
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
    this.worker.on('failed', (job, err) => {
      if (job && job.finishedOn) this.store.delete(job.id!).catch(() => undefined);
      this.report(new Error(`message ${job?.id ?? '?'} failed: ${describeError(err)}`, { cause: err }));
    });
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
      if (this.ownsRedis) await this.redis.quit().catch(() => undefined);
    })();
    return this.closing;
  }

  private async process(job: Job<MailRecord, MailRecord>, token: string | undefined): Promise<MailRecord> {
    const id = job.id!;
    let record = job.data;
    const due = dueRecipients(record, Date.now());
    if (due.length > 0) {
      const result = await this.attempt(id, record, due);
      await this.settled(id, result);
      record = result.record;
    }
    const next = nextAttemptAt(record);
    if (next === undefined) return record;
    // Recorded before the job leaves this worker: a crash from here on resends nothing recorded.
    await job.updateData(record);
    await job.moveToDelayed(next, token);
    throw new this.bullmq.DelayedError();
  }

  /** Sends the due recipients once and turns the transport's report into the next record. */
  private async attempt(id: string, record: MailRecord, due: string[]): Promise<AttemptResult> {
    const bytes = await this.store.read(id, record.size);
    const now = (): number => Date.now();
    if (!bytes) {
      const expired = now() >= record.expiresAt;
      const why = expired ? 'not delivered within maxAge, and its bytes are gone from Redis' : 'its bytes are missing from Redis; it cannot be sent';
      return endQueued(record, expired ? 'expired' : 'rejected', `the queued message ${why}`, now());
    }
    const outcomes = await this.send(record, due, bytes);
    return applyAttempt(record, outcomes, now(), { schedule: this.options.retrySchedule, retryUnknown: this.options.retryUnknown });
  }

  private async send(record: MailRecord, due: string[], raw: Buffer | Readable): Promise<Map<string, AttemptOutcome>> {
    const outcomes = new Map<string, AttemptOutcome>();
    let domains: DomainResult[];
    try {
      const mail = { envelope: { from: record.from, to: due }, raw, binding: record.binding, bindingGroup: record.bindingGroup, dsn: record.dsn };
      domains = ((await this.sender.sendMail(mail as never)) as BindingPoolSentMessageInfo).domains;
    } catch (err) {
      const withDomains = (err as { domains?: DomainResult[] }).domains;
      if (!withDomains) {
        // The whole message failed before any recipient had an outcome.
        const code = (err as { code?: string }).code ?? '';
        const status = PERMANENT_CODES.has(code) ? 'rejected' : 'pending';
        for (const address of due) outcomes.set(address, { status, response: describeError(err) });
        return outcomes;
      }
      domains = withDomains;
    }
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

  /** Tells the application about the recipients an attempt made final, the failures first through its hook (before they are recorded: a crash calls it again). */
  private async settled(id: string, { record, settled }: AttemptResult): Promise<void> {
    if (settled.length === 0) return;
    const failures = settled.filter((r) => r.status === 'rejected' || r.status === 'expired');
    if (failures.length > 0 && this.settings.onFinalFailure) {
      try {
        await this.settings.onFinalFailure({ ...finalEvent(id, record, failures), outcome: toOutcome(id, record) });
      } catch (err) {
        this.report(new Error(`onFinalFailure threw for message ${id}: ${describeError(err)}`, { cause: err }));
      }
    }
    this.emit('final', finalEvent(id, record, settled));
  }

  private finished(id: string, record: MailRecord): void {
    this.store.delete(id).catch((err: Error) => this.report(err));
    this.emit('done', toOutcome(id, record));
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
