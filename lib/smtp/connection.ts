/**
 * One SMTP connection with its counters: the counting wrapper around Nodemailer's SMTPConnection.
 *
 * It counts successful deliveries (recipients accepted at RCPT in a transaction whose DATA was
 * accepted; with LMTP, recipients whose own DATA reply was 2xx) and attempted RCPT TO commands,
 * hands out no more room than the limits leave, and turns every transaction into one verdict per
 * recipient (the rule itself is smtp/verdicts.ts). It knows nothing of pools, domains or retries: the caller decides what a verdict
 * means for the work left.
 */
import type { Readable } from 'node:stream';
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import { connectionLog } from '../log';
import type { ConnectionLimits, RouteAuth } from '../policy/options';
import {
  MessageHandover,
  offers,
  PeerWatch,
  peerOpen,
  rcptsSent,
  recordLmtpReplies,
  serverSizeLimit,
  socketOf,
  type EnvelopeRecord,
  type LmtpReply,
} from './internals';
import { decideVerdicts, serverRefusals, type MessageProgress, type RecipientReply, type ServerReply, type TransactionFailure } from './verdicts';

export type { RecipientReply, RecipientVerdict } from './verdicts';

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

export type { ConnectionLimits };

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
  /** Closed while idle to free a slot on its host for another pool (maxHostConnections). */
  | 'evicted'
  /** Retired because a reply rule lowered the pair's maxOutboundConnections below the connections open. */
  | 'shaped'
  /** The transport closed. */
  | 'shutdown';

export interface TransactionEnvelope {
  /** Envelope sender; '' for the null sender. */
  from: string;
  size?: number;
  dsn?: SMTPConnection.DSNOptions;
  /** BODY=8BITMIME when the server offers it (as the application's envelope asks). */
  use8BitMime?: boolean;
  /** RFC 8689 REQUIRETLS (Nodemailer's `requireTLSExtensionEnabled`). */
  requireTLSExtensionEnabled?: boolean;
}

/** The error fields SMTPConnection sets, read defensively. */
interface SmtpError extends Error {
  code?: string;
  /** The system error code (ECONNRESET…) when SMTPConnection replaced it with its own. */
  originalCode?: string;
  command?: string;
  response?: string;
  responseCode?: number;
}

/** The envelope object of one transaction, on which SMTPConnection records the RCPT replies. */
type TransactionState = SMTPConnection.Envelope & EnvelopeRecord & Pick<TransactionEnvelope, 'requireTLSExtensionEnabled'>;

/** What a transaction left to judge it by. */
interface EndedTransaction {
  rcpts: readonly string[];
  state: TransactionState;
  lmtpReplies: readonly LmtpReply[];
  info: SMTPConnection.SentMessageInfo | undefined;
}

let nextConnectionId = 1;

const NO_REFUSALS: readonly string[] = [];

/** How long a closing connection waits for the server's QUIT reply, then for its socket to close. */
const CLOSE_GRACE_MS = 2_000;

export class CountingConnection {
  readonly id: string;
  /** When it was opened (epoch ms). */
  readonly openedAt = Date.now();
  readonly target: ConnectionTarget;
  /** The target as results name it (describeTarget), made once: every transaction reports it. */
  readonly targetName: string;
  /** The limits of the pool that holds it (a pool that takes it over from another sets its own). */
  limits: ConnectionLimits;
  deliveries = 0;
  recipients = 0;
  transactions = 0;
  retireReason: RetireReason | undefined;
  /** The server's 421 that closed it, if one did: a pool reads it as a per-connection limit or a throttle. */
  closingReply: string | undefined;
  /**
   * A time by which the server had read the last transaction's RCPTs: DATA's 354 reply, else the
   * transaction's end. A message rate's takes are counted from it (shaping/rate.ts).
   */
  rcptsReadBy = 0;
  /** The server's 4xx/5xx replies in the last transaction, each once, until read (what reply rules read). */
  private refusals: readonly string[] = NO_REFUSALS;
  private readonly smtp: SMTPConnection;
  /** Set once the session is set up: how `usable` knows the peer is still there. */
  private peer: PeerWatch | undefined;
  /** What the server announced (SIZE, SMTPUTF8), read once the session is set up: it holds for the session. */
  private offered: ServerOffer = NO_OFFER;
  private ended = false;
  private readonly endWaiters: (() => void)[] = [];
  /** Where the LMTP replies of the transaction in flight are recorded (undefined: they cannot be). */
  private readonly lmtpSink: ((sink: LmtpReply[] | undefined) => void) | undefined;

  private constructor(label: string, target: ConnectionTarget, limits: ConnectionLimits) {
    this.id = `${label}#${nextConnectionId++}`;
    this.target = target;
    this.targetName = describeTarget(target);
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
    // Only an LMTP session has per-recipient replies to record (the hook shadows a method).
    this.lmtpSink = target.lmtp ? recordLmtpReplies(this.smtp) : undefined;
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
        const closed = (): void => reject(new Error('connection closed during setup'));
        connection.smtp.once('error', fail);
        connection.smtp.once('end', closed);
        connection.smtp.connect((err) => {
          // Both go once set up: left on, the 'end' listener built an Error (a stack trace) at
          // every connection's close, for a promise long settled.
          connection.smtp.removeListener('error', fail);
          connection.smtp.removeListener('end', closed);
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
    const socket = socketOf(connection.smtp);
    if (socket) connection.peer = new PeerWatch(socket);
    connection.offered = { sizeLimit: serverSizeLimit(connection.smtp), smtputf8: offers(connection.smtp, 'SMTPUTF8') };
    connectionLog('%s open (%s)', connection.id, connection.encrypted ? 'TLS' : 'plain');
    return connection;
  }

  get encrypted(): boolean {
    return this.smtp.secure;
  }

  /** False once the connection was retired, or the peer closed or half-closed it. */
  get usable(): boolean {
    return !this.ended && this.retireReason === undefined && (this.peer ? this.peer.open : peerOpen(this.smtp));
  }

  /** How many recipients the next transaction may carry without passing a limit. */
  capacity(): number {
    return this.usable ? this.roomUnder(this.limits) : 0;
  }

  /** The room `limits` would leave this connection, open as it is (for a pool that would take it over). */
  roomUnder(limits: ConnectionLimits): number {
    const { maxDeliveries, maxRecipients, maxRecipientsPerTransaction } = limits;
    let room = maxRecipientsPerTransaction;
    if (maxDeliveries > 0) room = Math.min(room, maxDeliveries - this.deliveries);
    if (maxRecipients > 0) room = Math.min(room, maxRecipients - this.recipients);
    return Math.max(0, room);
  }

  /**
   * Runs one transaction (MAIL, RCPT…, DATA) and resolves with a verdict per recipient; never
   * rejects. Recipients the server cannot take (SIZE, SMTPUTF8) are refused here, before MAIL
   * FROM. Retires the connection when it reached a limit or broke.
   */
  send(envelope: TransactionEnvelope, rcpts: readonly string[], message: Buffer): Promise<RecipientReply[]> {
    if (rcpts.length === 0 || rcpts.length > this.capacity()) {
      return Promise.reject(new RangeError(`${this.id}: ${rcpts.length} recipients offered, room for ${this.capacity()}`));
    }
    const local = refuseLocally(this.offered, envelope, rcpts, envelope.size ?? message.length);
    if (local === undefined) return this.transaction(envelope, rcpts, message);
    const { refused, sendable } = local;
    if (sendable.length === 0) return Promise.resolve(refused);
    return this.transaction(envelope, sendable, message).then((replies) => {
      const byRcpt = new Map([...refused, ...replies].map((reply) => [reply.rcpt, reply]));
      return rcpts.map((rcpt) => byRcpt.get(rcpt)!);
    });
  }

  /**
   * One transaction on the wire. Not an async function: a clean transaction settles in
   * SMTPConnection's callback, and only a failed one takes the slower path (failedTransaction).
   */
  private transaction(envelope: TransactionEnvelope, rcpts: readonly string[], message: Buffer): Promise<RecipientReply[]> {
    this.transactions++;
    // Counted before sending, so a limit holds even when the replies never come; corrected below
    // for RCPTs that never went out (a refused MAIL FROM without PIPELINING).
    this.recipients += rcpts.length;
    const handover = new MessageHandover(message, this.peer?.socket ?? socketOf(this.smtp));
    // A fresh object per transaction: SMTPConnection records the RCPT replies on it.
    // A plain literal of five fields, not a spread: SMTPConnection adds its own fields to this
    // object, and a spread copy, or a sixth field, made each message about 30 µs slower here
    // (one connection, raw messages, process.cpuUsage()). REQUIRETLS is added only when asked.
    const state: TransactionState = {
      from: envelope.from,
      size: envelope.size,
      dsn: envelope.dsn,
      use8BitMime: envelope.use8BitMime,
      to: rcpts as string[],
    };
    if (envelope.requireTLSExtensionEnabled) state.requireTLSExtensionEnabled = true;
    const lmtpReplies: LmtpReply[] = [];
    this.lmtpSink?.(lmtpReplies);
    return new Promise((resolve, reject) => {
      this.smtp.send(state, handover as unknown as Readable, (err, info) => {
        // Nothing thrown here may reach SMTPConnection, whose callback this is.
        try {
          this.lmtpSink?.(undefined);
          this.rcptsReadBy = handover.startedAt ?? Date.now();
          this.recipients -= rcpts.length - rcptsSent(state, rcpts.length);
          if (err) resolve(this.failedTransaction(err as SmtpError, { rcpts, state, lmtpReplies, info }, handover));
          else resolve(this.settle({ rcpts, state, lmtpReplies, info }, undefined, 'sent'));
        } catch (thrown) {
          reject(thrown as Error);
        }
      });
    });
  }

  /** A transaction that ended without its final reply, or with a refusal: how far the message got decides. */
  private async failedTransaction(err: SmtpError, ended: EndedTransaction, handover: MessageHandover): Promise<RecipientReply[]> {
    // A reset proves the dot unread only where no LMTP reply could have gone unrecorded.
    const failure = failureOf(err, !this.target.lmtp || this.lmtpSink !== undefined);
    handover.abort();
    // It waits for the socket to say whether the final dot left.
    const progress = await handover.progress();
    const replies = this.settle(ended, failure, progress, err);
    // The session is alive: RSET before it carries another transaction.
    if (this.usable) await this.resetSession();
    return replies;
  }

  /** The verdicts of an ended transaction, counted on the connection; retires it when it broke or is spent. */
  private settle(ended: EndedTransaction, failure: TransactionFailure | undefined, progress: MessageProgress, err?: SmtpError): RecipientReply[] {
    const { rcpts, state, lmtpReplies, info } = ended;
    // Built only when there is something in them: the common transaction has neither.
    const facts = {
      rcpts,
      lmtp: this.target.lmtp,
      rcptAccepted: lmtpReplies.length === 0 ? (state.accepted ?? []) : [...(state.accepted ?? []), ...lmtpReplies.map((r) => r.rcpt)],
      rcptRefused: state.rejectedErrors?.length ? rcptRefusals(state) : NO_REPLIES,
      lmtpReplies:
        lmtpReplies.length === 0 ? NO_REPLIES : new Map(lmtpReplies.map(({ rcpt, response }) => [rcpt, { code: replyCode(response) ?? 0, response }])),
      finalReply: info ? { code: replyCode(info.response) ?? 250, response: info.response } : undefined,
      failure,
      message: progress,
    };
    const replies = decideVerdicts(facts);
    this.refusals = failure || facts.rcptRefused.size > 0 || facts.lmtpReplies.size > 0 ? serverRefusals(facts) : NO_REFUSALS;
    let delivered = 0;
    for (const reply of replies) if (reply.verdict === 'delivered') delivered++;
    this.deliveries += delivered;
    if (connectionLog.enabled)
      connectionLog('%s transaction %d: %d rcpt, %d delivered%s', this.id, this.transactions, rcpts.length, delivered, err ? ` (${err.message})` : '');
    if (failure) this.retireAfter(failure, progress);
    this.retireIfSpent();
    return replies;
  }

  /**
   * A 421 is the server closing the connection; a broken one is done too, and so is one that
   * failed in the middle of the message (the server answered before the dot): what the server
   * takes for the next command would be the rest of the message.
   */
  private retireAfter(failure: TransactionFailure, progress: MessageProgress): void {
    const reply = failure.kind === 'refused' ? undefined : failure.reply;
    if (reply?.code === 421) {
      this.closingReply = reply.response;
      this.retire('serverClosed');
    } else if (failure.kind === 'broken' || progress === 'partial' || this.ended || !peerOpen(this.smtp)) this.retire('error');
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

  /** Resolves when the session has ended (the socket closed, for whatever reason). */
  whenEnded(): Promise<void> {
    if (this.ended) return Promise.resolve();
    return new Promise((resolve) => this.endWaiters.push(resolve));
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
      // A session broken off in the middle of a message gets no QUIT: the server would read it as
      // part of the message.
      if (this.smtp.stage === 'connected' && this.retireReason !== 'error') this.smtp.quit();
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

  /** The server's refusals in the transaction just ended, once: a later read (no transaction since) gets none. */
  takeRefusals(): readonly string[] {
    const refusals = this.refusals;
    this.refusals = NO_REFUSALS;
    return refusals;
  }

  /** Retires the connection when it has no room left under its limits (they may have tightened since its last transaction). */
  retireIfSpent(): void {
    const { maxDeliveries, maxRecipients } = this.limits;
    if (maxDeliveries > 0 && this.deliveries >= maxDeliveries) this.retire('maxDeliveries');
    else if (maxRecipients > 0 && this.recipients >= maxRecipients) this.retire('maxRecipients');
  }
}

/** `mx1.example.org[192.0.2.1]:25`, or `relay.example.net:587` for a host given by name. */
export function describeTarget(target: Pick<ConnectionTarget, 'host' | 'servername' | 'port'>): string {
  return target.servername ? `${target.servername}[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}

/** What the server announced that decides what it can take: its SIZE (0: none) and SMTPUTF8. */
interface ServerOffer {
  sizeLimit: number;
  smtputf8: boolean;
}

/** The field's value until open() has read the server's EHLO keywords (no transaction runs before). */
const NO_OFFER: ServerOffer = { sizeLimit: 0, smtputf8: false };

/**
 * Recipients the server cannot take, refused before MAIL FROM with a local reply: every one when
 * the message exceeds the server's SIZE (RFC 1870) or the sender needs SMTPUTF8 the server does
 * not offer; otherwise those whose local part needs SMTPUTF8 (RFC 6531 3.2), while the rest go.
 * Undefined when the server can take them all (the common case: nothing is allocated for it).
 */
function refuseLocally(
  offered: ServerOffer,
  envelope: TransactionEnvelope,
  rcpts: readonly string[],
  size: number,
): { refused: RecipientReply[]; sendable: readonly string[] } | undefined {
  const limit = offered.sizeLimit;
  if (limit > 0 && size > limit) {
    const response = `552 5.3.4 message of ${size} bytes is larger than the server's limit of ${limit} bytes (SIZE); not sent`;
    return { refused: rcpts.map((rcpt) => ({ rcpt, verdict: 'rejected', response, responseCode: 552 })), sendable: [] };
  }
  if (offered.smtputf8 || !needsSmtpUtf8(envelope.from, rcpts)) return undefined;
  const why = '(RFC 6531: the server does not offer SMTPUTF8); not sent';
  if (NON_ASCII.test(envelope.from)) {
    const response = `553 5.6.7 sender ${envelope.from} has a non-ASCII address ${why}`;
    return { refused: rcpts.map((rcpt) => ({ rcpt, verdict: 'rejected', response, responseCode: 553 })), sendable: [] };
  }
  const refused: RecipientReply[] = [];
  const sendable: string[] = [];
  for (const rcpt of rcpts) {
    if (NON_ASCII.test(rcpt))
      refused.push({ rcpt, verdict: 'rejected', response: `553 5.6.7 recipient ${rcpt} has a non-ASCII local part ${why}`, responseCode: 553 });
    else sendable.push(rcpt);
  }
  return { refused, sendable };
}

function needsSmtpUtf8(from: string, rcpts: readonly string[]): boolean {
  if (NON_ASCII.test(from)) return true;
  for (let i = 0; i < rcpts.length; i++) if (NON_ASCII.test(rcpts[i])) return true;
  return false;
}

const NON_ASCII = /[\u0080-\uffff]/;

/** Nodemailer's error as the facts the verdict rule reads. */
function failureOf(err: SmtpError, resetMeansUnread: boolean): TransactionFailure {
  const reply = err.responseCode !== undefined ? { code: err.responseCode, response: err.response ?? err.message } : undefined;
  if (reply && err.command !== 'CONN') {
    const command = err.code === 'EMESSAGE' ? 'MESSAGE' : err.command === 'MAIL FROM' || err.command === 'RCPT TO' ? err.command : 'DATA';
    return { kind: 'reply', command, reply };
  }
  // Refused by SMTPConnection before anything went out, for reasons that hold on any connection.
  if (err.code === 'EREQUIRETLS') return { kind: 'refused', code: 550, response: `550 5.7.30 REQUIRETLS: ${err.message}; not sent` };
  if (err.code === 'EENVELOPE' && err.command === 'API') return { kind: 'refused', code: 553, response: `553 5.1.3 ${err.message}; not sent` };
  // Anything else (a socket that is gone, a timeout, a closed connection) is the connection's fault.
  return { kind: 'broken', message: err.message, reply, peerReset: resetMeansUnread && err.originalCode === 'ECONNRESET' };
}

const NO_REPLIES: ReadonlyMap<string, ServerReply> = new Map();

/** RCPT TO refusals recorded on the envelope (LMTP's per-recipient DATA replies are recorded apart). */
function rcptRefusals(state: EnvelopeRecord): Map<string, ServerReply> {
  const refusals = new Map<string, ServerReply>();
  for (const failure of state.rejectedErrors ?? []) {
    if (failure.recipient === undefined || failure.responseCode === undefined || (failure as SmtpError).command !== 'RCPT TO') continue;
    refusals.set(failure.recipient, { code: failure.responseCode, response: failure.response ?? failure.message });
  }
  return refusals;
}

/** The three digits a reply starts with (what /^\d{3}/ reads), without a match array per transaction. */
function replyCode(response: string | undefined): number | undefined {
  if (response === undefined || response.length < 3) return undefined;
  let code = 0;
  for (let i = 0; i < 3; i++) {
    const digit = response.charCodeAt(i) - 48;
    if (digit < 0 || digit > 9) return undefined;
    code = code * 10 + digit;
  }
  return code;
}
