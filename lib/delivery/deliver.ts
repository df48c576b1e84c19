/**
 * Delivery of one message to one destination domain: recipients go out in transactions sized to
 * what each pooled connection has left under its limits; what did not fit, or whose transaction
 * the connection broke under, goes on over another pooled connection, a bounded number of times.
 * Every recipient ends with exactly one outcome; one the server may have taken is never resent.
 */
import { describeError, type BindingPoolError } from '../errors';
import type { CountingConnection, TransactionEnvelope } from '../smtp/connection';
import type { DestinationPool } from '../pool/registry';
import type { Recipient } from '../message/recipients';
import type { RecipientReply } from '../smtp/verdicts';
import type { ResolvedOptions } from '../policy/options';
import { deliveryLog } from '../log';

export type RecipientStatus = 'accepted' | 'rejected' | 'pending';

export interface RecipientOutcome {
  /** The address as the message gave it. */
  recipient: string;
  status: RecipientStatus;
  /** The server's reply, or why there was none. */
  response: string;
  responseCode?: number;
  /** The host that gave the reply, when a connection was made. */
  host?: string;
  /** Pending only: when the destination could take it, when known (the end of a backoff or throttle pause). */
  retryAfter?: Date;
  /**
   * Pending only: the final dot left but no reply came, so the server may have the message
   * (the response starts `outcome unknown:`). Sending it again risks a duplicate.
   */
  outcomeUnknown?: true;
}

export interface ConnectionUse {
  id: string;
  host: string;
  encrypted: boolean;
}

export interface DomainResult {
  domain: string;
  binding: string;
  /** Hosts that carried this domain's transactions. */
  hosts: string[];
  /** The connections used, and whether each was TLS-encrypted. */
  connections: ConnectionUse[];
  accepted: RecipientOutcome[];
  rejected: RecipientOutcome[];
  pending: RecipientOutcome[];
}

export interface DomainDelivery {
  domain: string;
  binding: string;
  pool: DestinationPool;
  envelope: TransactionEnvelope;
  message: Buffer;
  recipients: readonly Recipient[];
}

interface QueuedRecipient {
  recipient: Recipient;
  /** Transactions it was in that ended without a verdict for it. */
  attempts: number;
  /** When a server first answered it 421 (epoch ms). */
  firstClosedAt?: number;
}

/** RFC 5321 3.3: 452 "too many recipients" asks for the rest in a new transaction. */
const TOO_MANY_RECIPIENTS = 452;
/** 421: the server closes the connection without taking the message. */
const CLOSING = 421;

/**
 * Whether a recipient goes into another transaction. A retry costs an attempt (maxAttempts), with
 * two exceptions that are the server pacing, not failing: a 452 in a transaction that settled
 * others (without progress it costs one, so a server that takes nobody ends), and a 421, which
 * closes the connection without the message: its per-connection limit, or a throttle the pool
 * waits out (pool/dial-gate.ts). 421s are free for acquireTimeout from the recipient's first one.
 */
function goesAgain(item: QueuedRecipient, reply: RecipientReply, progressed: boolean, now: number, options: ResolvedOptions): boolean {
  const tooMany = reply.verdict === 'deferred' && reply.responseCode === TOO_MANY_RECIPIENTS;
  if (reply.verdict !== 'retry' && !tooMany) return false;
  if (reply.responseCode === CLOSING) {
    item.firstClosedAt ??= now;
    if (now - item.firstClosedAt < options.acquireTimeout) return true;
  }
  if (tooMany && progressed) return item.attempts < options.maxAttempts;
  return ++item.attempts < options.maxAttempts;
}

export function emptyDomainResult(domain: string, binding: string): DomainResult {
  return { domain, binding, hosts: [], connections: [], accepted: [], rejected: [], pending: [] };
}

/** Records a recipient's outcome in its status's list. */
function settleOutcome(
  result: DomainResult,
  item: QueuedRecipient,
  status: RecipientStatus,
  response: string,
  responseCode?: number,
  host?: string,
  retryAfter?: number,
): RecipientOutcome {
  const outcome: RecipientOutcome = { recipient: item.recipient.address, status, response };
  if (responseCode !== undefined) outcome.responseCode = responseCode;
  if (host !== undefined) outcome.host = host;
  if (retryAfter !== undefined) outcome.retryAfter = new Date(retryAfter);
  result[status].push(outcome);
  return outcome;
}

/** Notes the connection (and its host) in the result, once each. */
function noteConnection(result: DomainResult, connection: CountingConnection): void {
  const host = connection.targetName;
  if (!result.hosts.includes(host)) result.hosts.push(host);
  const { connections } = result;
  for (let i = 0; i < connections.length; i++) if (connections[i].id === connection.id) return;
  connections.push({ id: connection.id, host, encrypted: connection.encrypted });
}

/**
 * Written for the code V8 runs before it optimizes (most of a fresh process's first thousands of
 * messages): plain loops and module functions, no Set or Map per delivery. The pool is held for
 * the whole delivery, so it is not dropped as idle under it.
 */
export async function deliverToDomain(job: DomainDelivery): Promise<DomainResult> {
  job.pool.enter();
  try {
    const result = emptyDomainResult(job.domain, job.binding);
    const queue: QueuedRecipient[] = [];
    for (let i = 0; i < job.recipients.length; i++) queue.push({ recipient: job.recipients[i], attempts: 0 });
    const { policy } = job.pool;
    // Each worker holds one connection at a time; a large recipient list spreads over several.
    const perTransaction = Math.max(1, policy.limits.maxRecipientsPerTransaction);
    const workers = Math.min(policy.maxOutboundConnections, Math.ceil(queue.length / perTransaction));
    if (workers <= 1) await runWorker(job, queue, result);
    else await Promise.all(Array.from({ length: workers }, () => runWorker(job, queue, result)));
    return result;
  } finally {
    job.pool.leave();
  }
}

/** Takes connections from the pool one at a time and sends the queue's recipients over them until none is left. */
async function runWorker(job: DomainDelivery, queue: QueuedRecipient[], result: DomainResult): Promise<void> {
  const { pool } = job;
  const wants = (): number => queue.length;
  while (queue.length > 0) {
    let grant;
    try {
      grant = await pool.acquire(wants);
    } catch (err) {
      // The destination cannot be reached now: what is left is pending with that reason.
      const retryAfter = (err as BindingPoolError).retryAfter;
      const response = describeError(err);
      for (const item of queue.splice(0)) settleOutcome(result, item, 'pending', response, undefined, undefined, retryAfter?.getTime());
      return;
    }
    // Nothing left for this send: the delivery's other sends took it.
    if (!grant) continue;
    // As many as the pool granted (the rates' room; at most the connection's capacity, which a
    // rule or a learned limit may have lowered since it was handed out).
    const { connection } = grant;
    const batch = queue.splice(0, Math.min(grant.recipients, connection.capacity()));
    if (batch.length === 0) {
      pool.settle(grant, 0);
      pool.release(connection);
      continue;
    }
    noteConnection(result, connection);
    const rcpts: string[] = [];
    for (let i = 0; i < batch.length; i++) rcpts.push(batch[i].recipient.rcpt);
    let replies;
    try {
      replies = await connection.send(job.envelope, rcpts, job.message);
    } finally {
      // Whatever happened, the rate room is settled and the connection goes back.
      pool.settle(grant, batch.length);
      pool.release(connection);
    }
    const again = settleReplies(result, batch, replies, connection.targetName, pool);
    if (again.length > 0) {
      if (deliveryLog.enabled)
        deliveryLog(
          '%s: %d recipient(s) go on over another connection after %s',
          connection.id,
          again.length,
          replies.find((r) => r.verdict !== 'delivered')?.response,
        );
      queue.unshift(...again);
    }
  }
}

/** A transaction's replies: each recipient settled, or returned to go again. */
function settleReplies(result: DomainResult, batch: QueuedRecipient[], replies: RecipientReply[], host: string, pool: DestinationPool): QueuedRecipient[] {
  const { options } = pool.policy;
  const again: QueuedRecipient[] = [];
  let progressed = false;
  for (let i = 0; i < replies.length; i++) if (replies[i].verdict === 'delivered' || replies[i].verdict === 'rejected') progressed = true;
  const now = Date.now();
  // A pending recipient is told when the pair could send again, when the transaction's replies
  // made that known (a rule suspended the pair, the receiver throttles it).
  const reopensAt = pool.reopensAt(now);
  for (let i = 0; i < replies.length; i++) {
    const reply = replies[i];
    const item = batch[i];
    if (goesAgain(item, reply, progressed, now, options)) {
      again.push(item);
      continue;
    }
    const status = reply.verdict === 'delivered' ? 'accepted' : reply.verdict === 'rejected' ? 'rejected' : 'pending';
    const outcome = settleOutcome(result, item, status, reply.response, reply.responseCode, host, status === 'pending' ? reopensAt : undefined);
    if (reply.verdict === 'unknown') outcome.outcomeUnknown = true;
  }
  return again;
}
