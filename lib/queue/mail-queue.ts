/**
 * The producer side of the delivery queue: `add()` composes a message once, stores its bytes in
 * Redis and queues a BullMQ job holding its record; `outcome(id)` reads where its recipients
 * stand. Messages are delivered by MailWorkers (mail-worker.ts), in this process or others.
 */
import { EventEmitter } from 'node:events';
import type { SendMailOptions } from 'nodemailer';
import type { Job, JobsOptions, Queue } from 'bullmq';
import type { BindingChoice } from '../policy/options';
import { ConfigError } from '../errors';
import { compose } from './compose';
import { checkQueueOptions, DEFAULT_PREFIX, type CheckedQueueOptions, type MailQueueOptions } from './options';
import { closeClient, connect, loadBullmq, MessageStore, reportError, type QueueRedis } from './redis';
import { jobOutcome, type MailOutcome } from './outcome';
import type { MailRecord } from './record';

/** BullMQ's job name for every queued message. */
const JOB_NAME = 'mail';
/** The message bytes outlive the longest a job can be retried by this much (then Redis drops them even if a job never finished). */
const BYTES_OUTLIVE_MAX_AGE_MS = 24 * 3600_000;

/**
 * A processor that throws (Redis failing mid-attempt, a bug) runs again this often before the
 * message fails; each run sends only the recipients still queued.
 */
const RETRY_ON_ERROR: JobsOptions = { attempts: 3, backoff: { type: 'exponential', delay: 10_000 } };

export interface AddOptions {
  /** A job id of your own: adding again with an id already queued adds nothing (BullMQ's deduplication by id). No ':' in it. */
  jobId?: string;
  /** Send no earlier than this many ms from now. */
  delay?: number;
}

export type QueuedMail = SendMailOptions & BindingChoice;

/** BullMQ's rules for a custom job id, checked before anything is stored. */
function checkJobId(id: unknown): void {
  if (typeof id !== 'string' || id === '' || id.includes(':') || String(parseInt(id, 10)) === id)
    throw new ConfigError('jobId', `must be a non-empty string that is not an integer and has no ':' (BullMQ's rule), got ${JSON.stringify(id)}`);
}

/** Emits `error` (Redis or BullMQ trouble; calls wait for Redis to come back rather than fail). */
export class MailQueue extends EventEmitter<{ error: [err: Error] }> {
  /** The BullMQ queue underneath (for its own API: counts, pause, clean). */
  readonly queue: Queue<MailRecord>;
  private readonly options: CheckedQueueOptions;
  private readonly redis: QueueRedis;
  private readonly ownsRedis: boolean;
  private readonly store: MessageStore;

  constructor(
    readonly name: string,
    options: MailQueueOptions,
  ) {
    super();
    this.options = checkQueueOptions(options);
    const { Queue } = loadBullmq();
    ({ redis: this.redis, owned: this.ownsRedis } = connect(options.connection, 'producer'));
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    this.queue = new Queue<MailRecord>(name, { connection: this.redis as never, prefix });
    this.queue.on('error', (err) => reportError(this, err));
    this.store = new MessageStore(this.redis, `${prefix}:${name}:`);
  }

  /** Queues one message; resolves with its id once it is stored (it survives this process from then on). */
  async add(mail: QueuedMail, options: AddOptions = {}): Promise<string> {
    const [id] = await this.addBulk([mail], options);
    return id;
  }

  /** Queues several messages in one round trip per step; resolves with their ids in order. */
  async addBulk(mails: readonly QueuedMail[], options: AddOptions = {}): Promise<string[]> {
    if (options.jobId !== undefined) {
      if (mails.length !== 1) throw new TypeError('addBulk(): a jobId names one message; give each message its own add()');
      checkJobId(options.jobId);
      // Added before (and not yet removed): nothing more is stored (BullMQ would ignore the job; its bytes would stay behind).
      if (await this.queue.getJob(options.jobId)) return [options.jobId];
    }
    const addedAt = Date.now();
    const delay = options.delay ?? 0;
    // maxAge counts from when the message is first due.
    const times = { addedAt, dueAt: addedAt + delay, expiresAt: addedAt + delay + this.options.maxAge };
    const composed = await Promise.all(mails.map((mail) => compose(mail, times, this.options.maxMessageSize)));
    // A generated job id is the bytes' own key.
    const ids = composed.map(({ record }) => options.jobId ?? record.bytesKey);
    // The bytes first: a worker may take the job the moment it exists.
    const ttl = delay + this.options.maxAge + BYTES_OUTLIVE_MAX_AGE_MS;
    await Promise.all(composed.map(({ bytes, record }) => this.store.put(record.bytesKey, bytes, ttl)));
    const keep = { age: Math.ceil(this.options.keepFinished / 1000) };
    const jobOptions = (id: string): JobsOptions => ({ jobId: id, delay, removeOnComplete: keep, removeOnFail: keep, ...RETRY_ON_ERROR });
    await this.queue.addBulk(composed.map(({ record }, i) => ({ name: JOB_NAME, data: record, opts: jobOptions(ids[i]) })));
    return ids;
  }

  /** Where a message's recipients stand, or undefined when the id is unknown (never added, or finished longer ago than keepFinished). */
  async outcome(id: string): Promise<MailOutcome | undefined> {
    const job = (await this.queue.getJob(id)) as Job<MailRecord, MailRecord> | undefined;
    return job ? jobOutcome(job) : undefined;
  }

  async close(): Promise<void> {
    await this.queue.close();
    if (this.ownsRedis) await closeClient(this.redis);
  }
}
