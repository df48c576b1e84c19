/**
 * "Nothing lost, nothing duplicated", checked from both sides after a batch of sends against
 * FaultServers:
 *
 * - every recipient of every sendMail has exactly one outcome (accepted ∪ rejected ∪ pending,
 *   from the info or from the rejection error's fields);
 * - a recipient reported accepted was accepted by the server (250 to the final dot);
 * - the server took no (Message-ID, recipient) pair twice ("took": answered the dot with 250, or
 *   received the dot and never answered);
 * - a recipient reported rejected, or pending for any reason but "outcome unknown", was not taken
 *   by the server (the caller may send it again); one the server took is reported accepted or
 *   pending "outcome unknown";
 * - per-connection limits hold on the server (deliveries and RCPT commands per connection, RCPTs
 *   per transaction) and in the client's connection summaries;
 * - no pool passes maxOutboundConnections: on the server (sessions open at once per source
 *   address, one server per destination domain; see FaultServer.maxConcurrent) and in
 *   `stats().pools[].open`, sampled;
 * - after close() no socket is left on either side and no pool is left;
 * - no unhandled rejection, uncaught exception or transport 'error' event happened meanwhile.
 *
 * `check()` returns the violations as sentences (empty = all held) and the figures. No jest here:
 * bench/soak.ts uses it too.
 */
import { runInThisContext } from 'node:vm';
import type { Transporter } from 'nodemailer';
import type { BindingPoolSendError, BindingPoolSentMessageInfo, BindingPoolTransport, ConnectionSummary, RecipientOutcome } from '../../lib';
import type { FaultServer } from './fault-server';

export interface Limits {
  maxDeliveriesPerConnection?: number;
  maxRecipientsPerConnection?: number;
  maxRecipientsPerTransaction?: number;
  maxOutboundConnections: number;
}

export interface SendRecord {
  subject: string;
  /** The recipients as the envelope gives them. */
  recipients: string[];
  info?: BindingPoolSentMessageInfo;
  error?: Error & Partial<BindingPoolSendError>;
}

export interface Figures {
  sends: number;
  recipients: number;
  accepted: number;
  rejected: number;
  pending: number;
  /** Pending because the server may have the message ("outcome unknown"). */
  unknown: number;
  /** Recipients without an outcome, or reported accepted without the server's 250. */
  lost: number;
  /** (message, recipient) pairs the server took more than once. */
  duplicates: number;
  connectionsOpened: number;
  retired: Record<string, number>;
  serverConnections: number;
  serverTransactions: number;
  /** Faults the servers injected, by kind. */
  faults: Record<string, number>;
  /** Most sessions open at once from one source address on one server. */
  peakServerConcurrency: number;
  /** Most connections `stats()` showed open in one pool. */
  peakClientOpen: number;
}

/** The real `process`: under jest, the test's `process` is a copy whose listeners never fire. */
function realProcess(): NodeJS.Process {
  try {
    return runInThisContext('process') as NodeJS.Process;
  } catch {
    return process;
  }
}

const UNKNOWN = /outcome unknown/;

/** What goes into RCPT TO for an address: its domain in lower case (tests use ASCII domains). */
export function rcptOf(address: string): string {
  const at = address.lastIndexOf('@');
  return at < 0 ? address : `${address.slice(0, at)}@${address.slice(at + 1).toLowerCase()}`;
}

export class InvariantChecker {
  readonly sends: SendRecord[] = [];
  readonly summaries: ConnectionSummary[] = [];
  readonly unhandled: unknown[] = [];
  readonly transportErrors: unknown[] = [];
  /** Client-side samples over the limit, as sentences. */
  private readonly openViolations: string[] = [];
  private peakClientOpen = 0;
  private readonly sampler: NodeJS.Timeout;
  private readonly process = realProcess();
  private readonly onUnhandled = (reason: unknown): void => {
    this.unhandled.push(reason);
  };
  private readonly onError = (err: unknown): void => {
    this.transportErrors.push(err);
  };
  private readonly onClosed = (summary: ConnectionSummary): void => {
    this.summaries.push(summary);
    this.sample();
  };
  private finished = false;

  constructor(
    readonly pool: BindingPoolTransport,
    readonly servers: FaultServer[],
    readonly limits: Limits,
    /** How often stats() is sampled (ms). */
    sampleEvery = 2,
  ) {
    this.process.on('unhandledRejection', this.onUnhandled);
    this.process.on('uncaughtException', this.onUnhandled);
    pool.on('error', this.onError);
    pool.on('connectionClosed', this.onClosed);
    this.sampler = setInterval(() => this.sample(), sampleEvery);
    this.sampler.unref();
  }

  /** Sends one message and records its outcome; never rejects. */
  async send(
    transporter: Transporter<BindingPoolSentMessageInfo>,
    mail: Record<string, unknown> & { subject: string },
    recipients: string[],
  ): Promise<SendRecord> {
    const record: SendRecord = { subject: mail.subject, recipients };
    this.sends.push(record);
    try {
      record.info = await transporter.sendMail(mail);
    } catch (err) {
      record.error = err as SendRecord['error'];
    }
    return record;
  }

  /**
   * Closes the transport, waits (up to `ms`) for every server to see its connections closed,
   * removes the listeners, and checks every invariant.
   */
  async finish(transporter: Transporter<BindingPoolSentMessageInfo>, ms = 3_000): Promise<{ violations: string[]; figures: Figures }> {
    await transporter.close();
    // The server sees the last FINs a moment after close() resolved.
    const deadline = Date.now() + ms;
    while (!this.servers.every((s) => s.allClosed()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    // A rejection left unhandled by the last sends is reported on a later turn.
    await new Promise((r) => setImmediate(r));
    this.stop();
    return this.check();
  }

  /** Removes the listeners and the sampler (finish() does it). */
  stop(): void {
    if (this.finished) return;
    this.finished = true;
    clearInterval(this.sampler);
    this.process.removeListener('unhandledRejection', this.onUnhandled);
    this.process.removeListener('uncaughtException', this.onUnhandled);
    this.pool.removeListener('error', this.onError);
    this.pool.removeListener('connectionClosed', this.onClosed);
  }

  check(): { violations: string[]; figures: Figures } {
    const v: string[] = [];
    const { limits } = this;
    const figures: Figures = {
      sends: this.sends.length,
      recipients: 0,
      accepted: 0,
      rejected: 0,
      pending: 0,
      unknown: 0,
      lost: 0,
      duplicates: 0,
      connectionsOpened: this.summaries.length,
      retired: {},
      serverConnections: 0,
      serverTransactions: 0,
      faults: {},
      peakServerConcurrency: 0,
      peakClientOpen: this.peakClientOpen,
    };

    // --- What the servers took, per (Message-ID, rcpt).
    const taken = new Map<string, { delivered: number; unanswered: number }>();
    for (const server of this.servers) {
      figures.serverConnections += server.connections.length;
      for (const connection of server.connections) {
        for (const fault of connection.faults) count(figures.faults, fault.split(':').slice(0, 2).join(':'));
        let deliveries = 0;
        let rcpts = 0;
        for (const t of connection.transactions) {
          figures.serverTransactions++;
          for (const fault of t.faults) count(figures.faults, fault.split(':').slice(0, 2).join(':'));
          rcpts += t.rcptAttempts.length;
          if (limits.maxRecipientsPerTransaction && t.rcptAttempts.length > limits.maxRecipientsPerTransaction) {
            v.push(
              `server ${server.port}: transaction ${t.n} had ${t.rcptAttempts.length} RCPTs, over maxRecipientsPerTransaction ${limits.maxRecipientsPerTransaction}`,
            );
          }
          const unanswered = t.received && t.dataReply === undefined;
          if (t.delivered) deliveries += t.rcptAccepted.length;
          if (!t.delivered && !unanswered) continue;
          for (const rcpt of t.rcptAccepted) {
            const key = `${t.messageId}|${rcpt}`;
            const entry = taken.get(key) ?? { delivered: 0, unanswered: 0 };
            if (t.delivered) entry.delivered++;
            else entry.unanswered++;
            taken.set(key, entry);
          }
        }
        if (limits.maxDeliveriesPerConnection && deliveries > limits.maxDeliveriesPerConnection) {
          v.push(
            `server ${server.port}: connection ${connection.n} from ${connection.remoteAddress} had ${deliveries} deliveries, over maxDeliveriesPerConnection ${limits.maxDeliveriesPerConnection}`,
          );
        }
        if (limits.maxRecipientsPerConnection && rcpts > limits.maxRecipientsPerConnection) {
          v.push(
            `server ${server.port}: connection ${connection.n} from ${connection.remoteAddress} had ${rcpts} RCPTs, over maxRecipientsPerConnection ${limits.maxRecipientsPerConnection}`,
          );
        }
      }
      for (const [address, peak] of server.maxConcurrent) {
        figures.peakServerConcurrency = Math.max(figures.peakServerConcurrency, peak);
        if (peak > limits.maxOutboundConnections) {
          v.push(`server ${server.port}: ${peak} connections open at once from ${address}, over maxOutboundConnections ${limits.maxOutboundConnections}`);
        }
      }
    }
    for (const [key, entry] of taken) {
      if (entry.delivered + entry.unanswered > 1) {
        figures.duplicates++;
        v.push(`duplicate: the server took ${key} ${entry.delivered + entry.unanswered} times (${entry.delivered} with 250)`);
      }
    }

    // --- What the client reported, per send.
    const reported = new Map<string, { status: string; response: string }>();
    for (const send of this.sends) {
      const source = send.info ?? send.error;
      const messageId = source?.messageId;
      const domains = source?.domains;
      if (!source || !domains || !messageId) {
        figures.recipients += send.recipients.length;
        figures.lost += send.recipients.length;
        v.push(
          `${send.subject}: the send failed without a per-recipient breakdown (${send.error?.name} ${(send.error as { code?: string })?.code}: ${send.error?.message})`,
        );
        continue;
      }
      const outcomes: RecipientOutcome[] = domains.flatMap((d) => [...d.accepted, ...d.rejected, ...d.pending]);
      // The flat lists and the per-domain breakdown must agree.
      const flat = [...(source.accepted ?? []), ...(source.rejected ?? []), ...(source.pending ?? [])].sort();
      if (JSON.stringify(flat) !== JSON.stringify(outcomes.map((o) => o.recipient).sort())) {
        v.push(`${send.subject}: accepted/rejected/pending ${JSON.stringify(flat)} disagree with the per-domain outcomes`);
      }
      const expected = [...new Set(send.recipients)];
      figures.recipients += expected.length;
      const seen = new Map<string, number>();
      for (const outcome of outcomes) seen.set(outcome.recipient, (seen.get(outcome.recipient) ?? 0) + 1);
      for (const recipient of expected) {
        const times = seen.get(recipient) ?? 0;
        if (times === 0) {
          figures.lost++;
          v.push(`lost: ${send.subject} ${recipient} has no outcome`);
        } else if (times > 1) v.push(`${send.subject}: ${recipient} is reported ${times} times`);
      }
      for (const recipient of seen.keys()) if (!expected.includes(recipient)) v.push(`${send.subject}: outcome for ${recipient}, who is no recipient`);

      for (const outcome of outcomes) {
        const key = `${messageId}|${rcptOf(outcome.recipient)}`;
        reported.set(key, { status: outcome.status, response: outcome.response });
        const onServer = taken.get(key);
        if (outcome.status === 'accepted') {
          figures.accepted++;
          if (!onServer || onServer.delivered === 0) {
            figures.lost++;
            v.push(`lost: ${send.subject} ${outcome.recipient} is reported accepted, the server never answered 250 for it`);
          }
        } else if (outcome.status === 'rejected') {
          figures.rejected++;
          if (onServer) v.push(`${send.subject} ${outcome.recipient} is reported rejected (${outcome.response}) but the server took it`);
        } else {
          figures.pending++;
          if (UNKNOWN.test(outcome.response)) figures.unknown++;
          else if (onServer)
            v.push(`${send.subject} ${outcome.recipient} is pending (${outcome.response}), a caller would send it again, but the server took it`);
        }
      }
    }
    for (const [key, entry] of taken) {
      const client = reported.get(key);
      if (!client) v.push(`the server took ${key}, which no send reported`);
      else if (client.status === 'rejected' || (client.status === 'pending' && !UNKNOWN.test(client.response)))
        continue; // reported above
      else if (entry.delivered === 0 && client.status !== 'pending') v.push(`${key}: the server never answered the dot, yet the client says ${client.status}`);
    }

    // --- The client's own view of its connections.
    for (const summary of this.summaries) {
      count(figures.retired, summary.reason);
      if (limits.maxDeliveriesPerConnection && summary.deliveries > limits.maxDeliveriesPerConnection) {
        v.push(`client: connection ${summary.id} reports ${summary.deliveries} deliveries, over ${limits.maxDeliveriesPerConnection}`);
      }
      if (limits.maxRecipientsPerConnection && summary.recipients > limits.maxRecipientsPerConnection) {
        v.push(`client: connection ${summary.id} reports ${summary.recipients} RCPTs, over ${limits.maxRecipientsPerConnection}`);
      }
    }
    v.push(...this.openViolations.slice(0, 5));
    if (this.openViolations.length > 5)
      v.push(`client: … and ${this.openViolations.length - 5} more samples of stats() with more connections open in pool than maxOutboundConnections`);

    // --- After close().
    for (const server of this.servers) {
      const open = server.connections.filter((c) => !c.closed);
      if (open.length > 0) v.push(`server ${server.port}: ${open.length} session(s) still open after close()`);
      if (server.openSockets > 0) v.push(`server ${server.port}: ${server.openSockets} socket(s) still open after close()`);
    }
    const after = this.pool.stats();
    if (after.pools.length > 0) v.push(`stats() still lists ${after.pools.length} pool(s) after close()`);
    if (after.sending > 0) v.push(`stats() still counts ${after.sending} send(s) in flight after close()`);
    for (const reason of this.unhandled) v.push(`unhandled rejection or uncaught exception: ${describe(reason)}`);
    for (const err of this.transportErrors) v.push(`'error' event on the transport: ${describe(err)}`);
    return { violations: v, figures };
  }

  private sample(): void {
    if (this.finished) return;
    for (const pool of this.pool.stats().pools) {
      if (pool.open > this.peakClientOpen) this.peakClientOpen = pool.open;
      if (pool.open > this.limits.maxOutboundConnections) {
        this.openViolations.push(
          `client: stats() shows ${pool.open} connections open in pool ${pool.binding}/${pool.domain}, over maxOutboundConnections ${this.limits.maxOutboundConnections}`,
        );
      }
    }
  }
}

function count(into: Record<string, number>, key: string): void {
  into[key] = (into[key] ?? 0) + 1;
}

function describe(value: unknown): string {
  return value instanceof Error ? `${value.name}: ${value.message}` : String(value);
}
