/**
 * One SMTP connection with its counters: the counting wrapper around Nodemailer's SMTPConnection.
 *
 * It counts successful deliveries (recipients accepted at RCPT in a transaction whose DATA was
 * accepted; with LMTP, recipients whose own DATA reply was 2xx) and attempted RCPT TO commands,
 * hands out no more room than the limits leave, and turns every transaction into one verdict per
 * recipient. It knows nothing of pools, domains or retries: the caller decides what a verdict
 * means for the work left.
 */
import type { Readable, Writable } from 'node:stream';
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import { connectionLog } from './log';
import type { RouteAuth } from './options';

/** Where and how to connect, already resolved for one (binding, domain). */
export interface ConnectionTarget {
  /** Host name or address to connect to. */
  host: string;
  /** The MX host's name when `host` is its address: for SNI, the certificate check and reports. */
  servername: string | undefined;
  port: number;
  secure: boolean;
  requireTLS: boolean;
  ignoreTLS: boolean;
  /** Go on in plain text when the server answers STARTTLS with an error. */
  opportunisticTLS: boolean;
  lmtp: boolean;
  tls: TlsConnectionOptions | undefined;
  auth: RouteAuth | undefined;
  /** Log in even over a plain-text connection. */
  allowUnencryptedAuth: boolean;
  localAddress: string | undefined;
  ehloName: string | undefined;
  connectionTimeout: number;
  greetingTimeout: number;
  socketTimeout: number;
}

/** Per-connection limits; 0 = no limit. */
export interface ConnectionLimits {
  maxDeliveries: number;
  maxRecipients: number;
  maxRecipientsPerTransaction: number;
}

export type RetireReason =
  /** maxDeliveriesPerConnection reached. */
  | 'maxDeliveries'
  /** maxRecipientsPerConnection reached. */
  | 'maxRecipients'
  /** The server closed the connection (421, or dropped it). */
  | 'serverClosed'
  /** A socket error, timeout or protocol error. */
  | 'error'
  /** Unused for idleTimeout. */
  | 'idle'
  /** The transport closed. */
  | 'shutdown';

/**
 * What happened to one recipient in one transaction:
 * - delivered: accepted at RCPT and the server accepted the DATA;
 * - rejected: a 5xx for it (at RCPT, or for the whole transaction);
 * - deferred: a 4xx for it; the server's verdict, not a broken connection;
 * - retry: the connection broke (or the server sent 421) before the server took the message:
 *   safe to send again on another connection;
 * - unknown: the whole message was sent but the connection broke before the final reply; the
 *   server may have it, so it must not be sent again.
 */
export type RecipientVerdict = 'delivered' | 'rejected' | 'deferred' | 'retry' | 'unknown';

export interface RecipientReply {
  rcpt: string;
  verdict: RecipientVerdict;
  /** The server's reply, or the error that ended the transaction. */
  response: string;
  responseCode?: number;
}

export interface TransactionEnvelope {
  /** Envelope sender; '' for the null sender. */
  from: string;
  size?: number;
  dsn?: SMTPConnection.DSNOptions;
  use8BitMime?: boolean;
}

/** The error fields SMTPConnection sets, read defensively. */
interface SmtpError extends Error {
  code?: string;
  command?: string;
  response?: string;
  responseCode?: number;
  recipient?: string;
}

/**
 * SMTPConnection records each recipient's RCPT reply on the envelope object it is given; its
 * error callback does not carry them (except when every recipient was rejected), so they are
 * read from that object.
 */
interface EnvelopeState extends SMTPConnection.Envelope {
  accepted?: string[];
  rejectedErrors?: SmtpError[];
}

let nextConnectionId = 1;

/** How long a closing connection waits for the server's QUIT reply, then for its socket to close. */
const CLOSE_GRACE_MS = 2_000;

export class CountingConnection {
  readonly id: string;
  readonly target: ConnectionTarget;
  readonly limits: ConnectionLimits;
  deliveries = 0;
  recipients = 0;
  transactions = 0;
  retireReason: RetireReason | undefined;
  private readonly smtp: SMTPConnection;
  private ended = false;
  private readonly endWaiters: (() => void)[] = [];

  private constructor(label: string, target: ConnectionTarget, limits: ConnectionLimits) {
    this.id = `${label}#${nextConnectionId++}`;
    this.target = target;
    this.limits = limits;
    this.smtp = new SMTPConnection({
      host: target.host,
      port: target.port,
      secure: target.secure,
      requireTLS: target.requireTLS,
      ignoreTLS: target.ignoreTLS,
      opportunisticTLS: target.opportunisticTLS,
      servername: target.servername,
      lmtp: target.lmtp,
      tls: target.tls,
      localAddress: target.localAddress,
      name: target.ehloName,
      connectionTimeout: target.connectionTimeout,
      greetingTimeout: target.greetingTimeout,
      socketTimeout: target.socketTimeout,
      logger: false,
    });
    // SMTPConnection emits 'error' and also hands the error to the callback in flight; the
    // callback is where it is handled, the event only must not crash the process.
    this.smtp.on('error', (err: Error) => connectionLog('%s error: %s', this.id, err.message));
    this.smtp.once('end', () => {
      this.ended = true;
      for (const waiter of this.endWaiters.splice(0)) waiter();
    });
  }

  /** Opens, greets, upgrades and authenticates; rejects with the connection error. */
  static async open(label: string, target: ConnectionTarget, limits: ConnectionLimits): Promise<CountingConnection> {
    const connection = new CountingConnection(label, target, limits);
    connectionLog('%s connecting to %s from %s', connection.id, describeTarget(target), target.localAddress ?? 'any address');
    try {
      await new Promise<void>((resolve, reject) => {
        // A failed connect is reported through the callback for a silent close before the
        // greeting, and through 'error' (refused, timed out, 4xx greeting, TLS) otherwise.
        const fail = (err: Error): void => reject(err);
        connection.smtp.once('error', fail);
        connection.smtp.once('end', () => reject(new Error('connection closed during setup')));
        connection.smtp.connect((err) => {
          connection.smtp.removeListener('error', fail);
          if (err) reject(err);
          else resolve();
        });
      });
      if (target.auth) {
        if (!connection.encrypted && !target.allowUnencryptedAuth) {
          throw new Error(
            `refusing to send credentials to ${describeTarget(target)} over an unencrypted connection (set route.allowUnencryptedAuth to allow it)`,
          );
        }
        const auth = target.auth;
        await new Promise<void>((resolve, reject) => connection.smtp.login({ user: auth.user, pass: auth.pass }, (err) => (err ? reject(err) : resolve())));
      }
    } catch (err) {
      connection.retireReason = 'error';
      connection.smtp.close();
      throw err;
    }
    connectionLog('%s open (%s)', connection.id, connection.encrypted ? 'TLS' : 'plain');
    return connection;
  }

  get encrypted(): boolean {
    return this.smtp.secure;
  }

  /** False once the socket is gone or the connection was retired. */
  get usable(): boolean {
    return !this.ended && this.retireReason === undefined;
  }

  /** How many recipients the next transaction may carry without passing a limit. */
  capacity(): number {
    const { maxDeliveries, maxRecipients, maxRecipientsPerTransaction } = this.limits;
    let room = maxRecipientsPerTransaction;
    if (maxDeliveries > 0) room = Math.min(room, maxDeliveries - this.deliveries);
    if (maxRecipients > 0) room = Math.min(room, maxRecipients - this.recipients);
    return this.usable ? Math.max(0, room) : 0;
  }

  /**
   * Runs one transaction (MAIL, RCPT…, DATA) and resolves with a verdict per recipient; never
   * rejects. Retires the connection when it reached a limit or broke.
   */
  send(envelope: TransactionEnvelope, rcpts: readonly string[], message: Buffer): Promise<RecipientReply[]> {
    if (rcpts.length === 0 || rcpts.length > this.capacity()) {
      throw new RangeError(`${this.id}: ${rcpts.length} recipients offered, room for ${this.capacity()}`);
    }
    this.transactions++;
    // Counted before sending: a limit must hold even when the replies never come.
    this.recipients += rcpts.length;
    const source = new MessageHandover(message, this.smtp._socket || undefined);
    // A fresh object per transaction: SMTPConnection records the RCPT replies on it.
    const state: EnvelopeState = { from: envelope.from, size: envelope.size, dsn: envelope.dsn, use8BitMime: envelope.use8BitMime, to: rcpts as string[] };
    return new Promise((resolve) => {
      this.smtp.send(state, source as unknown as Readable, (err, info) => {
        const replies = err ? this.failedTransaction(rcpts, state, err as SmtpError, source.handedOver) : this.completedTransaction(rcpts, info);
        let delivered = 0;
        for (const reply of replies) if (reply.verdict === 'delivered') delivered++;
        this.deliveries += delivered;
        if (connectionLog.enabled)
          connectionLog('%s transaction %d: %d rcpt, %d delivered%s', this.id, this.transactions, rcpts.length, delivered, err ? ` (${err.message})` : '');
        this.retireIfSpent();
        if (err && !this.ended && this.usable) {
          // The transaction failed but the session is alive: RSET before it carries another.
          this.resetSession().then(() => resolve(replies));
          return;
        }
        resolve(replies);
      });
    });
  }

  /**
   * RSET after a failed transaction. SMTPConnection forgets the RSET callback when the socket
   * closes before the reply, so the end of the connection settles it too (a retired connection).
   */
  private resetSession(): Promise<void> {
    return new Promise((resolve) => {
      const ended = (): void => {
        this.retire('error');
        resolve();
      };
      this.endWaiters.push(ended);
      this.smtp.reset((resetErr) => {
        const waiting = this.endWaiters.indexOf(ended);
        if (waiting >= 0) this.endWaiters.splice(waiting, 1);
        if (resetErr) this.retire('error');
        resolve();
      });
    });
  }

  /** Marks the connection as done; it will be closed and not handed out again. */
  retire(reason: RetireReason): void {
    this.retireReason ??= reason;
  }

  /** QUITs (or drops a broken session) and resolves when the socket is gone. */
  close(reason: RetireReason): Promise<void> {
    this.retire(reason);
    if (this.ended) return this.socketClosed();
    connectionLog('%s closing: %s (%d deliveries, %d rcpt)', this.id, this.retireReason, this.deliveries, this.recipients);
    return new Promise<void>((resolve) => {
      // A server that never answers QUIT must not hold close() up.
      const quitTimer = setTimeout(() => this.smtp.close(), CLOSE_GRACE_MS).unref();
      this.endWaiters.push(() => {
        clearTimeout(quitTimer);
        resolve();
      });
      if (this.smtp.stage === 'connected') this.smtp.quit();
      else this.smtp.close();
    }).then(() => this.socketClosed());
  }

  /** Resolves when the socket is gone; a peer that never closes its side gets CLOSE_GRACE_MS. */
  private socketClosed(): Promise<void> {
    const socket = this.smtp._socket;
    if (!socket || socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        socket.destroy();
        resolve();
      }, CLOSE_GRACE_MS).unref();
      socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private retireIfSpent(): void {
    const { maxDeliveries, maxRecipients } = this.limits;
    if (maxDeliveries > 0 && this.deliveries >= maxDeliveries) this.retire('maxDeliveries');
    else if (maxRecipients > 0 && this.recipients >= maxRecipients) this.retire('maxRecipients');
  }

  private completedTransaction(rcpts: readonly string[], info: SMTPConnection.SentMessageInfo): RecipientReply[] {
    const responseCode = replyCode(info.response);
    const rejectedErrors = (info.rejectedErrors ?? []) as SmtpError[];
    if (rejectedErrors.length === 0) return rcpts.map((rcpt) => ({ rcpt, verdict: 'delivered', response: info.response, responseCode }));
    const failures = new Map<string, SmtpError>();
    for (const err of rejectedErrors) if (err.recipient) failures.set(err.recipient, err);
    return rcpts.map((rcpt) => {
      const failure = failures.get(rcpt);
      return failure ? verdictFromReply(rcpt, failure) : { rcpt, verdict: 'delivered', response: info.response, responseCode };
    });
  }

  private failedTransaction(rcpts: readonly string[], envelope: EnvelopeState, err: SmtpError, messageSent: boolean): RecipientReply[] {
    const rcptFailures = new Map<string, SmtpError>();
    for (const failure of envelope.rejectedErrors ?? []) if (failure.recipient) rcptFailures.set(failure.recipient, failure);
    const acceptedAtRcpt = new Set(envelope.accepted ?? []);
    // The server gave a verdict on the whole transaction (sender refused, DATA refused, message
    // refused after the dot), other than 421 which only says the connection is going away.
    const transactionVerdict = err.responseCode !== undefined && err.responseCode !== 421 && err.command !== 'CONN';
    // Refused before a byte went out (SIZE over the server's limit, a bad address).
    const refusedLocally = err.responseCode === undefined && (err.command === 'API' || err.command === 'MAIL FROM');
    // The server refused MAIL FROM: with PIPELINING the replies to the RCPTs sent along with it
    // (503 "need MAIL command") say nothing about the recipients; the MAIL FROM reply decides.
    const senderRefused = err.command === 'MAIL FROM' && err.responseCode !== undefined;
    if (err.responseCode === 421) this.retire('serverClosed');
    else if (this.ended || err.command === 'CONN') this.retire('error');

    return rcpts.map((rcpt): RecipientReply => {
      const rcptFailure = senderRefused ? undefined : rcptFailures.get(rcpt);
      if (rcptFailure && rcptFailure.responseCode !== 421) return verdictFromReply(rcpt, rcptFailure);
      if (transactionVerdict) return verdictFromReply(rcpt, err);
      if (refusedLocally) return { rcpt, verdict: 'rejected', response: err.message };
      // A reply to the final dot, 421 included, is the server's verdict: only no reply is unknown.
      if (messageSent && acceptedAtRcpt.has(rcpt) && err.responseCode === undefined) {
        return {
          rcpt,
          verdict: 'unknown',
          response: `outcome unknown: the message was sent but the connection ended before the server's reply (${err.message})`,
        };
      }
      return { rcpt, verdict: 'retry', response: err.message, responseCode: err.responseCode };
    });
  }
}

/** `mx1.example.org[192.0.2.1]:25`, or `relay.example.net:587` for a host given by name. */
export function describeTarget(target: Pick<ConnectionTarget, 'host' | 'servername' | 'port'>): string {
  return target.servername ? `${target.servername}[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}

function verdictFromReply(rcpt: string, err: SmtpError): RecipientReply {
  const code = err.responseCode;
  const response = err.response ?? err.message;
  if (code === 421) return { rcpt, verdict: 'retry', response, responseCode: code };
  return { rcpt, verdict: code !== undefined && code >= 500 ? 'rejected' : 'deferred', response, responseCode: code };
}

function replyCode(response: string | undefined): number | undefined {
  const match = response ? /^\d{3}/.exec(response) : null;
  return match ? Number(match[0]) : undefined;
}

/**
 * The message for one transaction, in the shape SMTPConnection reads a stream: it pipes it only
 * after the server answered DATA with 354, and then writes it whole, so `handedOver` tells
 * whether the message (and so possibly the final dot) went out. Much cheaper than a Readable
 * per transaction.
 */
class MessageHandover {
  handedOver = false;

  constructor(
    private readonly bytes: Buffer,
    private readonly socket: Writable | undefined,
  ) {}

  pipe<T extends NodeJS.WritableStream>(destination: T): T {
    this.handedOver = true;
    // SMTPConnection pipes the message (dot-stuffed) and then the final dot to the socket as two
    // writes, two system calls. Corked until the message stream ends, they leave as one.
    const socket = this.socket;
    if (socket && !socket.destroyed && !socket.writableCorked) {
      socket.cork();
      let corked = true;
      const uncork = (): void => {
        if (!corked) return;
        corked = false;
        process.nextTick(() => socket.uncork());
      };
      destination.once('end', uncork);
      destination.once('close', uncork);
      destination.once('error', uncork);
    }
    destination.write(this.bytes);
    destination.end();
    return destination;
  }

  // SMTPConnection listens for a stream error and destroys the stream on teardown: nothing to do here.
  on(): this {
    return this;
  }

  removeListener(): this {
    return this;
  }

  destroy(): void {}
}
