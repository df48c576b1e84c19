/**
 * A message's final outcome in any process: BullMQ's QueueEvents (a Redis stream) carries each
 * completed job's final record, turned here into a MailOutcome. Emits `done` (MailOutcome) and
 * `error`.
 */
import { EventEmitter } from 'node:events';
import type { QueueEvents } from 'bullmq';
import { ConfigError } from '../errors';
import { connect, loadBullmq, reportError, type QueueRedis } from './redis';
import { toOutcome } from './outcome';
import type { MailRecord } from './record';
import type { QueueConnection } from './redis';

export interface MailQueueEventsOptions {
  connection: QueueConnection;
  prefix?: string;
}

export class MailQueueEvents extends EventEmitter {
  /** The BullMQ QueueEvents underneath. */
  readonly events: QueueEvents;
  /** Its blocking connection: made here (from options, or a duplicate of your client), so closed here. */
  private readonly redis: QueueRedis;

  constructor(
    readonly name: string,
    options: MailQueueEventsOptions,
  ) {
    super();
    if (typeof options !== 'object' || options === null || options.connection === undefined) throw new ConfigError('connection', 'is required');
    const { QueueEvents } = loadBullmq();
    // QueueEvents blocks on its connection (XREAD): it gets one of its own.
    const { redis, owned } = connect(options.connection);
    this.redis = owned ? redis : redis.duplicate();
    this.events = new QueueEvents(name, { connection: this.redis as never, prefix: options.prefix ?? 'bull' });
    this.events.on('completed', ({ jobId, returnvalue }) => {
      const record = (typeof returnvalue === 'string' ? JSON.parse(returnvalue) : returnvalue) as MailRecord | undefined;
      if (record?.version === 1) this.emit('done', toOutcome(jobId, record));
    });
    this.events.on('error', (err) => reportError(this, err));
  }

  async waitUntilReady(): Promise<void> {
    await this.events.waitUntilReady();
  }

  async close(): Promise<void> {
    await this.events.close();
    await this.redis.quit().catch(() => undefined);
  }
}
