/**
 * A queued message's record (the data of its BullMQ job) and the pure rules that move it on:
 * which recipients are due, how one attempt's outcomes settle them, and when the next attempt
 * is. No Redis and no clock here (the caller passes `now`): test/queue-record.test.ts is a table.
 *
 * Each recipient is either `queued` or final. Accepted and rejected are final at once; a pending
 * one goes again on the retry schedule (or at its `retryAfter`, when later) until the message's
 * `expiresAt`, then it is final as `expired`. "Outcome unknown" (the final dot left, no reply
 * came) is final as `unknown` unless the worker allows sending it again (`retryUnknown`).
 */

export type QueuedStatus = 'queued' | 'accepted' | 'rejected' | 'expired' | 'unknown';
export type FinalStatus = Exclude<QueuedStatus, 'queued'>;

export interface RecipientRecord {
  /** The address as the envelope holds it (Nodemailer's parsed form). */
  address: string;
  status: QueuedStatus;
  /** Attempts that included this recipient and were recorded. */
  attempts: number;
  /** The last server reply, or why there was none. */
  response?: string;
  responseCode?: number;
  /** ms since the epoch. */
  lastAttemptAt?: number;
  /** Queued only: when it is due (ms since the epoch). */
  nextAttemptAt?: number;
}

/** The job's data: everything but the message bytes, which are stored once beside it. */
export interface MailRecord {
  version: 1;
  messageId: string;
  /** The envelope sender; '' or false for the null sender. */
  from: string | false;
  binding?: string;
  bindingGroup?: string;
  /** Nodemailer's `dsn` (RFC 3461 NOTIFY, RET, ENVID, ORCPT), passed on every attempt. */
  dsn?: object;
  /** Where the message's bytes are: `<prefix>:<queue>:message:<bytesKey>` (one key per add). */
  bytesKey: string;
  /** The message's size in bytes, as stored. */
  size: number;
  addedAt: number;
  expiresAt: number;
  recipients: RecipientRecord[];
  /** Recipients whose final failure is recorded but onFinalFailure has not returned for yet (a crash calls it again). */
  unannounced?: string[];
}

/** One recipient's outcome in one attempt, as the transport reported it. */
export interface AttemptOutcome {
  status: 'accepted' | 'rejected' | 'pending';
  response: string;
  responseCode?: number;
  /** ms since the epoch. */
  retryAfter?: number;
  outcomeUnknown?: boolean;
}

export interface RetryPolicy {
  /** ms to wait after the 1st, 2nd, … failed attempt; the last one repeats. */
  schedule: readonly number[];
  /** Send "outcome unknown" recipients again (risking a duplicate) instead of ending them as unknown. */
  retryUnknown: boolean;
}

/** A recipient due within this much is sent with the attempt at hand rather than alone just after it. */
export const DUE_WITHIN_MS = 250;

/** The recipients to send now: queued and due. */
export function dueRecipients(record: MailRecord, now: number): string[] {
  return record.recipients.filter((r) => r.status === 'queued' && (r.nextAttemptAt ?? 0) <= now + DUE_WITHIN_MS).map((r) => r.address);
}

/** When the message should be looked at next (the earliest queued recipient), or undefined when every recipient is final. */
export function nextAttemptAt(record: MailRecord): number | undefined {
  let next: number | undefined;
  for (const r of record.recipients) if (r.status === 'queued') next = Math.min(next ?? Infinity, r.nextAttemptAt ?? 0);
  return next;
}

export interface AttemptResult {
  record: MailRecord;
  /** The recipients this attempt made final, in their final state. */
  settled: RecipientRecord[];
}

/**
 * Records one attempt: every recipient in `outcomes` took part in it (a sent recipient without
 * an outcome counts as pending). Returns a new record; the given one is not changed.
 */
export function applyAttempt(record: MailRecord, outcomes: ReadonlyMap<string, AttemptOutcome>, now: number, policy: RetryPolicy): AttemptResult {
  const settled: RecipientRecord[] = [];
  const recipients = record.recipients.map((r) => {
    const outcome = outcomes.get(r.address);
    if (r.status !== 'queued' || !outcome) return r;
    const next = settle(r, outcome, now, record.expiresAt, policy);
    if (next.status !== 'queued') settled.push(next);
    return next;
  });
  return { record: { ...record, recipients }, settled };
}

function settle(r: RecipientRecord, outcome: AttemptOutcome, now: number, expiresAt: number, policy: RetryPolicy): RecipientRecord {
  const attempts = r.attempts + 1;
  const base: RecipientRecord = { address: r.address, status: 'queued', attempts, response: outcome.response, lastAttemptAt: now };
  if (outcome.responseCode !== undefined) base.responseCode = outcome.responseCode;
  if (outcome.status !== 'pending') return { ...base, status: outcome.status };
  if (outcome.outcomeUnknown && !policy.retryUnknown) return { ...base, status: 'unknown' };
  if (now >= expiresAt) return { ...base, status: 'expired' };
  const wait = policy.schedule[Math.min(attempts, policy.schedule.length) - 1];
  // The later of the schedule and the destination's own hint, but never past the message's age
  // limit: the last attempt is made at expiresAt (Postfix bounces after a failed attempt past
  // maximal_queue_lifetime; here that attempt is not left to chance).
  const due = Math.min(Math.max(now + wait, outcome.retryAfter ?? 0), expiresAt);
  return { ...base, nextAttemptAt: due };
}

/** Ends every queued recipient with one status and reason (the message cannot be sent at all). */
export function endQueued(record: MailRecord, status: FinalStatus, response: string, now: number): AttemptResult {
  const settled: RecipientRecord[] = [];
  const recipients = record.recipients.map((r) => {
    if (r.status !== 'queued') return r;
    const next: RecipientRecord = { address: r.address, status, attempts: r.attempts, response, lastAttemptAt: now };
    settled.push(next);
    return next;
  });
  return { record: { ...record, recipients }, settled };
}

/** A message BullMQ failed (its processor threw on every try, or its workers kept dying): what was being sent may have arrived. */
export function endFailed(record: MailRecord, reason: string, at: number): AttemptResult {
  // Nothing runs for a failed job again: no failure is left waiting for its announcement.
  const { unannounced: _, ...rest } = record;
  return endQueued(rest, 'unknown', `outcome unknown: the message failed in the queue (${reason})`, at);
}
