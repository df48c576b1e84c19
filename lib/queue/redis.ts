/**
 * The queue's Redis side: loading BullMQ and ioredis (optional peers, loaded only when the queue
 * is used), one ioredis client per MailQueue or MailWorker, and the message bytes, stored once
 * per message under `<prefix>:<queue>:message:<bytes key>` beside the job (whose data is the small
 * record). The bytes are read whole when small, and in 1 MiB ranges as a stream when large, so a
 * worker's transport reads them only when its read-ahead budget has room (maxReadAheadBytes).
 */
import { createRequire } from 'node:module';
import { Readable } from 'node:stream';
import type { Redis, RedisOptions } from 'ioredis';
import { ConfigError, describeError } from '../errors';
import { queueLog } from '../log';
import { loadIoredis } from '../coordination/redis-store';

/** The part of an ioredis client the queue uses. */
export interface QueueRedis {
  set(key: string, value: Buffer, px: 'PX', ttl: number, nx: 'NX'): Promise<unknown>;
  getBuffer(key: string): Promise<Buffer | null>;
  getrangeBuffer(key: string, start: number, end: number): Promise<Buffer>;
  strlen(key: string): Promise<number>;
  del(...keys: string[]): Promise<number>;
  quit(): Promise<unknown>;
  disconnect(): void;
  readonly status: string;
  duplicate(override?: object): QueueRedis;
}

/** Where the queue's Redis is: a URL, an ioredis client (used as it is), or ioredis options. */
export type QueueConnection = string | Redis | RedisOptions;

export type BullMq = typeof import('bullmq');

export function loadBullmq(): BullMq {
  try {
    return createRequire(__filename)('bullmq') as BullMq;
  } catch (err) {
    throw new ConfigError('connection', `the queue needs the optional dependencies bullmq and ioredis (npm install bullmq ioredis): ${(err as Error).message}`);
  }
}

function isClient(value: unknown): boolean {
  return typeof value === 'object' && value !== null && typeof (value as { duplicate?: unknown }).duplicate === 'function';
}

/**
 * The client to use and whether this object owns it. BullMQ's workers (and QueueEvents) need
 * `maxRetriesPerRequest: null`; with it, their commands wait through a Redis restart instead of
 * failing, which is what lets a worker ride out one and record its outcomes after it.
 */
export function connect(connection: unknown, use: 'worker' | 'producer'): { redis: QueueRedis; owned: boolean } {
  if (isClient(connection)) return { redis: connection as QueueRedis, owned: false };
  const Redis = loadIoredis('connection') as unknown as new (...args: unknown[]) => QueueRedis;
  // A producer's add() fails after ioredis's retries (20) instead of waiting for Redis forever.
  const forced = use === 'worker' ? { maxRetriesPerRequest: null } : {};
  // A client closed while it connects waits disconnectTimeout (2 s by default) for its socket to
  // close, which keeps a process that is done alive that long.
  const defaults = { disconnectTimeout: 200 };
  if (typeof connection === 'string') return { redis: new Redis(connection, { ...defaults, ...forced }), owned: true };
  if (typeof connection === 'object' && connection !== null) return { redis: new Redis({ ...defaults, ...connection, ...forced }), owned: true };
  throw new ConfigError('connection', `must be a Redis URL ('redis://127.0.0.1:6379'), an ioredis client or ioredis options, got ${String(connection)}`);
}

/**
 * Closes a client this package made: QUIT when it is connected (commands sent before it are
 * answered first); when it is not (still connecting, or reconnecting), a plain disconnect, which
 * does not wait for a Redis that may never answer.
 */
export async function closeClient(redis: QueueRedis): Promise<void> {
  if (redis.status === 'ready') await redis.quit().catch(() => redis.disconnect());
  else redis.disconnect();
}

/** What reportError needs of an emitter with an `error` event. */
interface ErrorEmitter {
  listenerCount(event: 'error'): number;
  emit(event: 'error', err: Error): boolean;
}

/**
 * Hands Redis or BullMQ trouble to the emitter's 'error' listeners, or only logs it when there
 * are none (an 'error' event nobody listens to would throw; BullMQ's own classes would print it).
 */
export function reportError(emitter: ErrorEmitter, err: unknown): void {
  if (emitter.listenerCount('error') > 0) emitter.emit('error', err instanceof Error ? err : new Error(describeError(err)));
  else queueLog('%s', describeError(err));
}

/** Messages up to this size are read in one GET; larger ones as a stream of ranges. */
const READ_WHOLE_UP_TO = 1024 * 1024;
const RANGE = 1024 * 1024;

export class MessageStore {
  constructor(
    private readonly redis: QueueRedis,
    /** `<prefix>:<queue>:`, as BullMQ names the queue's keys. */
    private readonly keyPrefix: string,
  ) {}

  key(bytesKey: string): string {
    return `${this.keyPrefix}message:${bytesKey}`;
  }

  /** Stores a message's bytes under a key of their own (MailRecord.bytesKey). */
  async put(bytesKey: string, bytes: Buffer, ttlMs: number): Promise<void> {
    await this.redis.set(this.key(bytesKey), bytes, 'PX', ttlMs, 'NX');
  }

  /** The bytes, or undefined when they are gone (or are not the size the record says). */
  async read(bytesKey: string, size: number): Promise<Buffer | Readable | undefined> {
    const key = this.key(bytesKey);
    if (size <= READ_WHOLE_UP_TO) {
      const bytes = await this.redis.getBuffer(key);
      return bytes?.length === size ? bytes : undefined;
    }
    if ((await this.redis.strlen(key)) !== size) return undefined;
    const redis = this.redis;
    return Readable.from(
      (async function* () {
        for (let start = 0; start < size; start += RANGE) {
          const end = Math.min(start + RANGE, size);
          const chunk = await redis.getrangeBuffer(key, start, end - 1);
          // A key removed mid-read gives empty ranges: fail the read rather than send a cut message.
          if (chunk.length !== end - start) throw new Error(`the queued message's bytes changed while being read (${key})`);
          yield chunk;
        }
      })(),
      { objectMode: false },
    );
  }

  async delete(bytesKey: string): Promise<void> {
    await this.redis.del(this.key(bytesKey));
  }
}
