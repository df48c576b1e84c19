/** The messages between the application's thread and the delivery thread (engine/thread.ts). */
import type { DomainResult } from '../delivery/deliver';
import type { EngineStats, MessageJob } from './local';

/** How often, at most, the delivery thread reports stats while it is busy. */
export const STATS_INTERVAL_MS = 100;

/** What crosses to the worker. */
export type ToWorker =
  /** Each job's message is `bytes` from `offset`, `length` long. */
  | { type: 'jobs'; jobs: { id: number; job: Omit<MessageJob, 'message'>; offset: number; length: number }[]; bytes: Uint8Array }
  | { type: 'verify'; id: number }
  | { type: 'close'; id: number };

/** What comes back. */
export type FromWorker =
  | { type: 'results'; results: { id: number; domains?: DomainResult[]; error?: { message: string; code?: string } }[]; stats?: EngineStats }
  | { type: 'connectionClosed'; summary: unknown }
  /** A pair suspended by a reply rule, or resumed (pair-policy.ts SuspensionEvent). */
  | { type: 'event'; name: 'suspended' | 'resumed'; event: unknown; stats: EngineStats };
