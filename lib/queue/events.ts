/**
 * A message's final outcome in any process: BullMQ's QueueEvents (a Redis stream) carries each
 * completed job's final record, and each failed job's id (its outcome is then read from the job),
 * turned here into a MailOutcome. Emits `done` (MailOutcome) and `error`.
 */
import { EventEmitter } from 'node:events';
import type { Job, Queue, QueueEvents } from 'bullmq';
import { ConfigError, describeError } from '../errors';
import { closeClient, connect, loadBullmq, reportError, type QueueConnection, type QueueRedis } from './redis';
import { jobOutcome, toOutcome, type MailOutcome } from './outcome';
import type { MailRecord } from './record';
import { DEFAULT_PREFIX } from './options';

export interface MailQueueEventsOptions {
  connection: QueueConnection;
  prefix?: string;
}

/** MailQueueEvents' events. */
export interface MailQueueEventsMap {
  /** Every recipient of a message is final (from any worker, in any process). */
  done: [outcome: MailOutcome];
  error: [err: Error];
}

export class MailQueueEvents extends EventEmitter<MailQueueEventsMap> {
  /** The BullMQ QueueEvents underneath. */
  readonly events: QueueEvents;
  /** For reading a failed job. */
  private readonly queue: Queue<MailRecord>;
  /** QueueEvents blocks on its connection (XREAD): one made here, so closed here. */
  private readonly blocking: QueueRedis;
  private readonly client: QueueRedis;
  private readonly ownsClient: boolean;

  constructor(
    readonly name: string,
    options: MailQueueEventsOptions,
  ) {
    super();
    if (typeof options !== 'object' || options === null || options.connection === undefined) throw new ConfigError('connection', 'is required');
    const { Queue, QueueEvents } = loadBullmq();
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    ({ redis: this.client, owned: this.ownsClient } = connect(options.connection, 'producer'));
    // BullMQ wants a blocking connection to wait through Redis's absence (maxRetriesPerRequest null).
    this.blocking = this.client.duplicate({ maxRetriesPerRequest: null });
    this.queue = new Queue<MailRecord>(name, { connection: this.client as never, prefix });
    this.events = new QueueEvents(name, { connection: this.blocking as never, prefix });
    this.events.on('completed', ({ jobId, returnvalue }) => {
      const record = (typeof returnvalue === 'string' ? JSON.parse(returnvalue) : returnvalue) as MailRecord | undefined;
      if (record?.version === 1) this.done(toOutcome(jobId, record));
    });
    this.events.on('failed', ({ jobId }) => void this.failed(jobId));
    this.events.on('error', (err) => reportError(this, err));
    this.queue.on('error', (err) => reportError(this, err));
  }

  async waitUntilReady(): Promise<void> {
    await this.events.waitUntilReady();
  }

  async close(): Promise<void> {
    await this.events.close();
    await this.queue.close();
    await closeClient(this.blocking);
    if (this.ownsClient) await closeClient(this.client);
  }

  /** A listener that throws must not stop BullMQ's event stream (it would stop for good). */
  private done(outcome: MailOutcome): void {
    try {
      this.emit('done', outcome);
    } catch (err) {
      reportError(this, new Error(`a 'done' listener threw: ${describeError(err)}`, { cause: err }));
    }
  }

  /** A failed attempt that BullMQ will not retry ends the message: its unfinished recipients are unknown. */
  private async failed(jobId: string): Promise<void> {
    try {
      const job = (await this.queue.getJob(jobId)) as Job<MailRecord, MailRecord> | undefined;
      if (job?.finishedOn && job.data?.version === 1) this.done(jobOutcome(job));
    } catch (err) {
      reportError(this, err);
    }
  }
}
