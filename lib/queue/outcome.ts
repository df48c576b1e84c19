/**
 * What the queue tells the application about a message: its recipients' states (final or
 * queued) with the last server reply and the attempt count. Built from the stored record, with
 * Dates where the record keeps ms.
 */
import type { Job } from 'bullmq';
import { endFailed, type FinalStatus, type MailRecord, type QueuedStatus, type RecipientRecord } from './record';

export interface QueuedRecipientState {
  address: string;
  /** `queued` until final: `accepted`, `rejected`, `expired` (not delivered within maxAge) or `unknown` (the final dot left, no reply came). */
  status: QueuedStatus;
  attempts: number;
  /** The last server reply, or why there was none. */
  response?: string;
  responseCode?: number;
  lastAttemptAt?: Date;
  /** Queued only: when it goes next. */
  nextAttemptAt?: Date;
}

export interface MailOutcome {
  /** The job id `add()` returned. */
  id: string;
  messageId: string;
  /** `queued` while a recipient is (or while onFinalFailure has yet to hear of a failure); `done` when every recipient is final. */
  state: 'queued' | 'done';
  from: string | false;
  addedAt: Date;
  expiresAt: Date;
  recipients: QueuedRecipientState[];
}

/** Recipients that became final in one attempt (the worker's `final` event). */
export interface FinalEvent {
  id: string;
  messageId: string;
  recipients: (QueuedRecipientState & { status: FinalStatus })[];
}

/** The `onFinalFailure` hook's argument: the recipients that ended rejected or expired, and the whole message's state. */
export interface FinalFailure extends FinalEvent {
  outcome: MailOutcome;
}

function recipientState(r: RecipientRecord): QueuedRecipientState {
  const state: QueuedRecipientState = { address: r.address, status: r.status, attempts: r.attempts };
  if (r.response !== undefined) state.response = r.response;
  if (r.responseCode !== undefined) state.responseCode = r.responseCode;
  if (r.lastAttemptAt !== undefined) state.lastAttemptAt = new Date(r.lastAttemptAt);
  if (r.status === 'queued' && r.nextAttemptAt !== undefined) state.nextAttemptAt = new Date(r.nextAttemptAt);
  return state;
}

export function toOutcome(id: string, record: MailRecord): MailOutcome {
  return {
    id,
    messageId: record.messageId,
    // A failure not yet announced to onFinalFailure keeps the message in the queue's hands.
    state: record.unannounced?.length || record.recipients.some((r) => r.status === 'queued') ? 'queued' : 'done',
    from: record.from,
    addedAt: new Date(record.addedAt),
    expiresAt: new Date(record.expiresAt),
    recipients: record.recipients.map(recipientState),
  };
}

export function finalEvent(id: string, record: MailRecord, settled: readonly RecipientRecord[]): FinalEvent {
  return { id, messageId: record.messageId, recipients: settled.map(recipientState) as FinalEvent['recipients'] };
}

/** Where a job's message stands: its final record once completed, its unfinished recipients unknown once failed, else its current record. */
export function jobOutcome(job: Job<MailRecord, MailRecord>): MailOutcome {
  const id = job.id!;
  if (job.returnvalue) return toOutcome(id, job.returnvalue);
  if (job.finishedOn && job.failedReason) return toOutcome(id, endFailed(job.data, job.failedReason, job.finishedOn).record);
  return toOutcome(id, job.data);
}
