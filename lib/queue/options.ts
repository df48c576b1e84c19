/**
 * The queue's options, their defaults and their checks (a ConfigError naming the option).
 * Durations are ms or text such as '5min', '4h', '5d' (the shaping options' syntax).
 */
import type { SentMessageInfo, Transporter } from 'nodemailer';
import { ConfigError } from '../errors';
import { parseDuration } from '../shaping/rate';
import { checkKeys } from '../policy/validate';
import type { BindingPoolOptions } from '../policy/options';
import type { BindingPoolTransport } from '../transport';
import type { QueueConnection } from './redis';
import type { FinalFailure } from './outcome';

export type Duration = number | string;

/** Like an MTA's: Postfix's minimal_backoff_time and maximal_backoff_time are 5 min and 4 h; the first retry comes sooner because greylisting asks for a few minutes. */
/** BullMQ's own default key prefix. */
export const DEFAULT_PREFIX = 'bull';
export const DEFAULT_RETRY_SCHEDULE: readonly string[] = ['1min', '5min', '15min', '1h', '4h'];
/** Postfix's maximal_queue_lifetime. */
export const DEFAULT_MAX_AGE = '5d';
export const DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024;
/** How long a finished message's outcome stays queryable. */
export const DEFAULT_KEEP_FINISHED = '7d';
export const DEFAULT_CONCURRENCY = 50;

interface CommonOptions {
  /** Where Redis is: a URL, an ioredis client, or ioredis options. */
  connection: QueueConnection;
  /** BullMQ's key prefix. Default 'bull' (DEFAULT_PREFIX). */
  prefix?: string;
}

export interface MailQueueOptions extends CommonOptions {
  /** How long a message may stay queued before its undelivered recipients end as `expired` (Postfix's maximal_queue_lifetime). Default '5d'. */
  maxAge?: Duration;
  /** The largest message `add()` takes, in bytes. Default 50 MiB. */
  maxMessageSize?: number;
  /** How long a finished message's outcome stays queryable with `outcome(id)`. Default '7d'. */
  keepFinished?: Duration;
}

export interface MailWorkerOptions extends CommonOptions {
  /** The transport to send through: one of yours (it stays open at close), or options for one the worker owns. */
  transport: BindingPoolTransport | Transporter<SentMessageInfo> | BindingPoolOptions;
  /** Messages in progress at once. Default 50. */
  concurrency?: number;
  /** Waits after the 1st, 2nd, … failed attempt of a recipient; the last repeats. Default ['1min', '5min', '15min', '1h', '4h']. */
  retrySchedule?: readonly Duration[];
  /** Send "outcome unknown" recipients again (risking a duplicate). Default false: they end as `unknown`. */
  retryUnknown?: boolean;
  /** Called with the recipients that ended rejected or expired, before that is recorded: write a bounce here. */
  onFinalFailure?: (failure: FinalFailure) => void | Promise<void>;
  /** BullMQ's lock: a worker that dies leaves its messages to others after this (ms). Default 30 000. */
  lockDuration?: number;
  /** BullMQ's check for messages whose worker died (ms). Default 30 000. */
  stalledInterval?: number;
  /** Times a message may be left by a dying worker before it fails (its unfinished recipients end as `unknown`). Default 3. */
  maxStalledCount?: number;
}

export interface CheckedQueueOptions {
  maxAge: number;
  maxMessageSize: number;
  keepFinished: number;
}

export interface CheckedWorkerOptions {
  concurrency: number;
  retrySchedule: number[];
  retryUnknown: boolean;
  lockDuration: number;
  stalledInterval: number;
  maxStalledCount: number;
}

const QUEUE_KEYS = ['connection', 'prefix', 'maxAge', 'maxMessageSize', 'keepFinished'];
const WORKER_KEYS = [
  'connection',
  'prefix',
  'transport',
  'concurrency',
  'retrySchedule',
  'retryUnknown',
  'onFinalFailure',
  'lockDuration',
  'stalledInterval',
  'maxStalledCount',
];

export function checkQueueOptions(options: MailQueueOptions): CheckedQueueOptions {
  checkCommon(options, QUEUE_KEYS);
  return {
    maxAge: duration(options.maxAge ?? DEFAULT_MAX_AGE, 'maxAge'),
    maxMessageSize: count(options.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE, 'maxMessageSize', 1),
    keepFinished: duration(options.keepFinished ?? DEFAULT_KEEP_FINISHED, 'keepFinished'),
  };
}

export function checkWorkerOptions(options: MailWorkerOptions): CheckedWorkerOptions {
  checkCommon(options, WORKER_KEYS);
  if (typeof options.transport !== 'object' || options.transport === null)
    throw new ConfigError('transport', 'must be a BindingPoolTransport, a Nodemailer transporter made from one, or BindingPoolOptions');
  const schedule = options.retrySchedule ?? DEFAULT_RETRY_SCHEDULE;
  if (!Array.isArray(schedule) || schedule.length === 0)
    throw new ConfigError('retrySchedule', 'must be a non-empty list of durations, for example ["1min", "5min", "1h"]');
  if (options.retryUnknown !== undefined && typeof options.retryUnknown !== 'boolean') throw new ConfigError('retryUnknown', 'must be true or false');
  if (options.onFinalFailure !== undefined && typeof options.onFinalFailure !== 'function') throw new ConfigError('onFinalFailure', 'must be a function');
  return {
    concurrency: count(options.concurrency ?? DEFAULT_CONCURRENCY, 'concurrency', 1),
    retrySchedule: schedule.map((wait, i) => duration(wait, `retrySchedule[${i}]`)),
    retryUnknown: options.retryUnknown ?? false,
    lockDuration: count(options.lockDuration ?? 30_000, 'lockDuration', 100),
    stalledInterval: count(options.stalledInterval ?? 30_000, 'stalledInterval', 100),
    maxStalledCount: count(options.maxStalledCount ?? 3, 'maxStalledCount', 0),
  };
}

function checkCommon(options: CommonOptions, allowed: string[]): void {
  if (typeof options !== 'object' || options === null) throw new ConfigError('options', 'must be an object with at least `connection`');
  checkKeys(options as unknown as Record<string, unknown>, allowed, '');
  if (options.connection === undefined)
    throw new ConfigError('connection', "is required: a Redis URL ('redis://127.0.0.1:6379'), an ioredis client or ioredis options");
  if (options.prefix !== undefined && (typeof options.prefix !== 'string' || options.prefix === '' || options.prefix.includes(':')))
    throw new ConfigError('prefix', `must be a non-empty string without ':', got ${JSON.stringify(options.prefix)}`);
}

function duration(value: Duration, path: string): number {
  const ms = typeof value === 'number' ? value : parseDuration(value);
  if (ms === undefined || !Number.isFinite(ms) || ms < 1)
    throw new ConfigError(path, `must be a duration in ms or text such as '5min', '4h', '5d', got ${JSON.stringify(value)}`);
  return ms;
}

function count(value: number, path: string, min: number): number {
  if (!Number.isInteger(value) || value < min) throw new ConfigError(path, `must be an integer of at least ${min}, got ${JSON.stringify(value)}`);
  return value;
}
