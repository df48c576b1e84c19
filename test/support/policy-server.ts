/**
 * An SMTP receiver (smtp-server) on loopback that defends itself the way real receivers do, each
 * defence configurable and off unless asked for:
 *
 * - a per-client-IP cap on concurrent sessions (Exim's `smtp_accept_max_per_host`): a session
 *   beyond it is greeted `421 Too many concurrent SMTP connections from this IP address; please
 *   try again later` and closed. The server tells clients apart by source address only, so the
 *   cap holds across every domain the client sends for: this is also the relay's "20 connections
 *   per client" (issue 11);
 * - a cap on concurrent sessions from every client together (Exim's `smtp_accept_max`);
 * - refusing 1 new connection in N with a 421 greeting, drawn from a seeded PRNG (`chance()` of
 *   fault-server.ts, keyed by the connection's number, so the same seed refuses the same ones);
 * - a rate window: once it has accepted M messages in the last W ms (from that client IP, or from
 *   every client), it answers MAIL FROM with `421 4.7.0 too many messages, slow down`, and closes
 *   the connection, as a 421 does.
 * - refusing the first N connections with a 421 greeting (a receiver throttling a newcomer);
 * - a per-connection message limit (Exim's `smtp_accept_max_per_connection`): MAIL FROM after
 *   the Nth message of a session is answered `421 4.7.0 too many messages in this connection`;
 * - any other reply at MAIL FROM a test asks for (`mailReply`: Yahoo's [TSS04], Gmail's 4.7.28);
 * - never greeting connections after the first N (a host that hangs): the client's greeting
 *   timeout ends them.
 *
 * A session counts against the caps from the moment it is greeted with 220 to the first of: the
 * server closing it (the 221 to QUIT, a 421), the socket closing. (Not to the socket close alone:
 * a client that has its 221 has let go, and this server may see the close a moment after that
 * client's next connection arrives.) A connection refused at the greeting never counts.
 *
 * It records, per source address and in total: TCP accepts, greetings refused (and why), MAIL FROM
 * commands (and those refused by the rate window), messages accepted (250 after the final dot),
 * with the recipients and the time of each, and the peak number of concurrent sessions (and of TCP
 * sockets, refused ones included).
 *
 * STARTTLS is hidden and AUTH optional, as in the other servers. No jest here: bench/ uses it too.
 */
import type { Socket } from 'node:net';
import { LoopbackServer, type ServerConnection } from './smtp-server-internals';
import type { SMTPServerOptions } from 'smtp-server';
import { chance } from './fault-server';

export interface PolicyReply {
  code: number;
  message: string;
}

export const PER_IP_REPLY: PolicyReply = { code: 421, message: 'Too many concurrent SMTP connections from this IP address; please try again later' };
export const TOTAL_REPLY: PolicyReply = { code: 421, message: 'Too many concurrent SMTP connections; please try again later' };
export const REFUSE_REPLY: PolicyReply = { code: 421, message: 'Service temporarily unavailable; please try again later' };
export const RATE_REPLY: PolicyReply = { code: 421, message: '4.7.0 too many messages, slow down' };
export const PER_CONNECTION_REPLY: PolicyReply = { code: 421, message: '4.7.0 too many messages in this connection' };

export interface RateWindow {
  /** Messages accepted in the window after which MAIL FROM is refused. */
  messages: number;
  /** Length of the sliding window (ms). */
  windowMs: number;
  /** Count the messages of each client IP apart (default), or of every client together. */
  scope?: 'ip' | 'server';
}

export interface PolicyServerOptions {
  /** 127.0.0.x to listen on. Default 127.0.0.1. */
  host?: string;
  /** Port to listen on; 0 (default) picks a free one. */
  port?: number;
  /** Name in the greeting and EHLO reply. */
  name?: string;
  /** Seed of the connection refusals (`refuseOneIn`). Default 1. */
  seed?: number;
  /** A name for the server that does not change between runs (its port does), for `chance()` keys. Default: `name`, else the host. */
  label?: string;
  /** Concurrent sessions one client IP may have, across every domain; the next is refused at the greeting. Default: no cap. */
  maxConnectionsPerIp?: number;
  perIpReply?: PolicyReply;
  /** Concurrent sessions from every client together. Default: no cap. */
  maxConnections?: number;
  totalReply?: PolicyReply;
  /** Refuse the first this many connections at the greeting (with `refuseReply`), then greet every one. Default: none. */
  refuseFirst?: number;
  /**
   * Greet only the first this many connections; every later one is accepted and never greeted (a
   * tarpit, or a host that hangs), until the client gives up. Such a session never counts against
   * the caps; it is counted in `stalled`. Default: greet every connection.
   */
  stallAfter?: number;
  /** Refuse 1 new connection in this many at the greeting, at random (seeded). Default: none. */
  refuseOneIn?: number;
  refuseReply?: PolicyReply;
  /** Refuse MAIL FROM with `rateReply` (and close) once this many messages were accepted in the window. */
  rateLimit?: RateWindow;
  rateReply?: PolicyReply;
  /** Messages one session may carry; MAIL FROM after that many is answered `perConnectionReply` (421, and closed). Default: no limit. */
  maxMessagesPerConnection?: number;
  perConnectionReply?: PolicyReply;
  /** A reply for a MAIL FROM, decided by the test (undefined: go on); a 421 closes the session. */
  mailReply?: (context: { session: PolicySession; accepted: number }) => PolicyReply | undefined;
  /** A reply for a RCPT TO, decided by the test (undefined: accept it): greylisting, a permanent 5xx. */
  rcptReply?: (context: { address: string; from: string; session: PolicySession }) => PolicyReply | undefined;
  /** Keep each accepted message's bytes (`accepted[].body`). Default false. */
  keepBodies?: boolean;
  /** Wait this long before answering the final dot (a slow receiver: transactions in flight for a while). Default 0. */
  dataDelayMs?: number;
  /** Keep smtp-server's 100 ms early-talker pause before the greeting. Default false (faster runs). */
  earlyTalkerPause?: boolean;
}

/** Why a greeting was refused. */
export type RefusalReason = 'perIp' | 'total' | 'random' | 'first';

/** What the server counted, for one source address or for all of them. */
export interface PolicyCounts {
  /** TCP connections accepted. */
  connects: number;
  /** Connections greeted with a refusal (421) instead of 220. */
  refusedGreetings: number;
  refusedBy: Record<RefusalReason, number>;
  /** Connections never greeted (`stallAfter`). */
  stalled: number;
  /** MAIL FROM commands received, refused ones included. */
  mailCommands: number;
  /** MAIL FROM commands refused by the rate window. */
  mailRefused: number;
  /** Messages answered with 250 after the final dot. */
  messages: number;
  /** Recipients of those messages. */
  recipients: number;
  /** Sessions open now (greeted, not yet closed). */
  openSessions: number;
  /** Most sessions open at once. */
  peakSessions: number;
  /** TCP sockets open now (refused ones included, until their socket closes). */
  openSockets: number;
  /** Most TCP sockets open at once. */
  peakSockets: number;
}

export interface AcceptedMessage {
  /** Milliseconds since the server started. */
  at: number;
  remoteAddress: string;
  /** smtp-server's session id. */
  session: string;
  recipients: string[];
  messageId?: string;
  subject?: string;
  /** Bytes of the message as received (after dot-unstuffing). */
  bytes: number;
  /** The message itself, with `keepBodies`. */
  body?: Buffer;
}

export interface PolicySession {
  /** 1-based number of the session, in the order the server greeted or refused them. */
  n: number;
  id: string;
  remoteAddress: string;
  /** When the server accepted its TCP connection (ms since the server started). */
  at: number;
  /** Why the greeting was refused, when it was. */
  refused?: RefusalReason;
  /** Never greeted (`stallAfter`). */
  stalled?: boolean;
  mailCommands: number;
  mailRefused: number;
  messages: number;
  /** The session no longer counts against the caps. */
  ended: boolean;
}

const emptyCounts = (): PolicyCounts => ({
  connects: 0,
  refusedGreetings: 0,
  refusedBy: { perIp: 0, total: 0, random: 0, first: 0 },
  stalled: 0,
  mailCommands: 0,
  mailRefused: 0,
  messages: 0,
  recipients: 0,
  openSessions: 0,
  peakSessions: 0,
  openSockets: 0,
  peakSockets: 0,
});

const plainAddress = (address: string | undefined): string => (address ?? '').replace(/^::ffff:/, '');

const refusal = (reply: PolicyReply): Error => Object.assign(new Error(reply.message), { responseCode: reply.code });

export class PolicyServer extends LoopbackServer {
  readonly options: PolicyServerOptions;
  /** Counts over every source address. */
  readonly total: PolicyCounts = emptyCounts();
  /** Source address → its counts. */
  readonly bySource = new Map<string, PolicyCounts>();
  /** Every message accepted, in order. */
  readonly accepted: AcceptedMessage[] = [];
  /** Every session, refused ones included, in order. */
  readonly sessions: PolicySession[] = [];
  /** Every RCPT TO, with its time (ms since the server started): what a message rate counts. */
  readonly rcpts: { at: number; remoteAddress: string; address: string }[] = [];
  /** Every MAIL FROM refused by a policy (rate, per-connection limit, `mailReply`), with the reply and time. */
  readonly refusedMail: { at: number; session: string; reply: string }[] = [];
  /** Errors smtp-server reported (resets from clients that went away, mostly); never thrown. */
  /** Date.now() when the server started listening. */
  startedAt = 0;
  private readonly sockets = new Set<Socket>();
  private readonly byId = new Map<string, PolicySession>();
  /** Times of the accepted messages still inside the rate window, per source address and ('') for all. */
  private readonly recent = new Map<string, number[]>();

  private constructor(options: PolicyServerOptions) {
    super(options);
    this.options = options;
  }

  static async start(options: PolicyServerOptions = {}): Promise<PolicyServer> {
    const server = new PolicyServer(options);
    await server.listen(options.port ?? 0);
    return server;
  }

  /** The counts of one source address (zeros when it never connected). */
  counts(source: string): PolicyCounts {
    return this.bySource.get(source) ?? emptyCounts();
  }

  /** Recipient → times the server accepted a message for it (more than 1 is a duplicate). */
  acceptedRecipients(): Map<string, number> {
    const seen = new Map<string, number>();
    for (const message of this.accepted) for (const rcpt of message.recipients) seen.set(rcpt, (seen.get(rcpt) ?? 0) + 1);
    return seen;
  }

  /** Most messages the server accepted in any window of `windowMs` (to check a rate limit held). */
  peakRate(windowMs: number): number {
    return peakInWindow(
      this.accepted.map((m) => m.at),
      windowMs,
    );
  }

  /** No session open and no socket left. */
  allClosed(): boolean {
    return this.sockets.size === 0 && this.total.openSessions === 0;
  }

  /** Stops listening and drops every connection left; resolves when the listener is closed. */
  async stop(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.server.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  // -------------------------------------------------------------------------------------------

  private source(address: string): PolicyCounts {
    let counts = this.bySource.get(address);
    if (!counts) {
      counts = emptyCounts();
      this.bySource.set(address, counts);
    }
    return counts;
  }

  /** Applies `change` to the counts of the address and to the total. */
  private count(address: string, change: (counts: PolicyCounts) => void): void {
    change(this.source(address));
    change(this.total);
  }

  /** Why this new session must be refused, or undefined to greet it. */
  private refusalFor(session: PolicySession): RefusalReason | undefined {
    const { maxConnectionsPerIp, maxConnections, refuseOneIn, refuseFirst } = this.options;
    if (refuseFirst !== undefined && session.n <= refuseFirst) return 'first';
    if (maxConnectionsPerIp !== undefined && this.counts(session.remoteAddress).openSessions >= maxConnectionsPerIp) return 'perIp';
    if (maxConnections !== undefined && this.total.openSessions >= maxConnections) return 'total';
    if (refuseOneIn !== undefined && refuseOneIn > 0 && chance(this.options.seed ?? 1, `${this.label}|connect|${session.n}`) < 1 / refuseOneIn) return 'random';
    return undefined;
  }

  /** The rate window is full for this address: MAIL FROM is refused. */
  private rateExceeded(address: string): boolean {
    const rate = this.options.rateLimit;
    if (!rate) return false;
    const key = rate.scope === 'server' ? '' : address;
    const times = this.recent.get(key) ?? [];
    const since = Date.now() - rate.windowMs;
    while (times.length > 0 && times[0] <= since) times.shift();
    this.recent.set(key, times);
    return times.length >= rate.messages;
  }

  private noteAccepted(address: string): void {
    const now = Date.now();
    for (const key of [address, '']) {
      const times = this.recent.get(key) ?? [];
      times.push(now);
      this.recent.set(key, times);
    }
  }

  /** The session stops counting against the caps (first call only). */
  private end(id: string): void {
    const session = this.byId.get(id);
    if (!session || session.ended) return;
    session.ended = true;
    if (session.refused === undefined) this.count(session.remoteAddress, (c) => c.openSessions--);
  }

  private async listen(port: number): Promise<void> {
    const options: SMTPServerOptions = {
      name: this.options.name ?? 'policy.test',
      authOptional: true,
      disabledCommands: ['STARTTLS'],
      hideSTARTTLS: true,
      // Reverse lookups would leave the machine.
      disableReverseLookup: true,
      logger: false,
      // Lets stop() finish without waiting for clients to go away.
      closeTimeout: 100,
      onConnect: (smtpSession, callback) => {
        const session: PolicySession = {
          n: this.sessions.length + 1,
          at: Date.now() - this.startedAt,
          id: smtpSession.id,
          remoteAddress: plainAddress(smtpSession.remoteAddress),
          mailCommands: 0,
          mailRefused: 0,
          messages: 0,
          ended: false,
        };
        this.sessions.push(session);
        this.byId.set(session.id, session);
        if (this.options.stallAfter !== undefined && session.n > this.options.stallAfter) {
          // No callback: smtp-server never sends the greeting; the client times out and leaves.
          session.stalled = true;
          session.ended = true;
          this.count(session.remoteAddress, (c) => c.stalled++);
          return;
        }
        const reason = this.refusalFor(session);
        if (reason) {
          session.refused = reason;
          session.ended = true;
          this.count(session.remoteAddress, (c) => {
            c.refusedGreetings++;
            c.refusedBy[reason]++;
          });
          const reply =
            reason === 'perIp'
              ? (this.options.perIpReply ?? PER_IP_REPLY)
              : reason === 'total'
                ? (this.options.totalReply ?? TOTAL_REPLY)
                : (this.options.refuseReply ?? REFUSE_REPLY);
          return callback(refusal(reply));
        }
        this.count(session.remoteAddress, (c) => {
          c.openSessions++;
          c.peakSessions = Math.max(c.peakSessions, c.openSessions);
        });
        callback();
      },
      onMailFrom: (_address, smtpSession, callback) => {
        const session = this.byId.get(smtpSession.id);
        if (!session) return callback(refusal({ code: 451, message: '4.3.0 unknown session' }));
        session.mailCommands++;
        this.count(session.remoteAddress, (c) => c.mailCommands++);
        const { maxMessagesPerConnection, mailReply } = this.options;
        let reply: PolicyReply | undefined;
        if (this.rateExceeded(session.remoteAddress)) reply = this.options.rateReply ?? RATE_REPLY;
        else if (maxMessagesPerConnection !== undefined && session.messages >= maxMessagesPerConnection)
          reply = this.options.perConnectionReply ?? PER_CONNECTION_REPLY;
        else reply = mailReply?.({ session, accepted: this.accepted.length });
        if (reply) {
          session.mailRefused++;
          this.count(session.remoteAddress, (c) => c.mailRefused++);
          this.refusedMail.push({ at: Date.now() - this.startedAt, session: session.id, reply: `${reply.code} ${reply.message}` });
          // smtp-server closes the connection after any 421 it sends.
          return callback(refusal(reply));
        }
        callback();
      },
      onRcptTo: (address, smtpSession, callback) => {
        this.rcpts.push({ at: Date.now() - this.startedAt, remoteAddress: plainAddress(smtpSession.remoteAddress), address: address.address });
        const session = this.byId.get(smtpSession.id);
        const from = smtpSession.envelope.mailFrom ? smtpSession.envelope.mailFrom.address : '';
        const reply = session && this.options.rcptReply?.({ address: address.address, from, session });
        callback(reply ? refusal(reply) : undefined);
      },
      onData: (stream, smtpSession, callback) => {
        const session = this.byId.get(smtpSession.id);
        let bytes = 0;
        let head = '';
        const chunks: Buffer[] = [];
        stream.on('data', (chunk: Buffer) => {
          bytes += chunk.length;
          if (this.options.keepBodies) chunks.push(chunk);
          if (head.length < 65_536 && !/\r?\n\r?\n/.test(head)) head += chunk.toString('latin1');
        });
        stream.on('error', () => undefined);
        stream.on('end', () => {
          if (!session) return callback(null, 'Ok: queued');
          const headerEnd = head.search(/\r?\n\r?\n/);
          const headers = (headerEnd < 0 ? head : head.slice(0, headerEnd)).replace(/\r?\n[ \t]+/g, ' ');
          const recipients = smtpSession.envelope.rcptTo.map((r) => r.address);
          this.accepted.push({
            at: Date.now() - this.startedAt,
            remoteAddress: session.remoteAddress,
            session: session.id,
            recipients,
            messageId: /^Message-ID:\s*(.*)$/im.exec(headers)?.[1]?.trim(),
            subject: /^Subject:\s*(.*)$/im.exec(headers)?.[1]?.trim(),
            bytes,
            ...(this.options.keepBodies && { body: Buffer.concat(chunks) }),
          });
          session.messages++;
          this.count(session.remoteAddress, (c) => {
            c.messages++;
            c.recipients += recipients.length;
          });
          this.noteAccepted(session.remoteAddress);
          const delay = this.options.dataDelayMs ?? 0;
          if (delay > 0) setTimeout(() => callback(null, 'Ok: queued'), delay);
          else callback(null, 'Ok: queued');
        });
      },
    };
    await this.startSmtp(options, port);
    this.startedAt = Date.now();
  }

  /** Counts TCP accepts and open sockets per source address. */
  protected track(socket: Socket): void {
    const address = plainAddress(socket.remoteAddress);
    this.sockets.add(socket);
    this.count(address, (c) => {
      c.connects++;
      c.openSockets++;
      c.peakSockets = Math.max(c.peakSockets, c.openSockets);
    });
    socket.once('close', () => {
      this.sockets.delete(socket);
      this.count(address, (c) => c.openSockets--);
    });
  }

  /**
   * Reaches into each smtp-server connection as it is created (smtp-server adds it to its
   * `connections` set right before init()): drops the 100 ms early-talker pause, and ends the
   * session's count when the server closes it (221, 421) or its socket closes.
   */

  protected patch(connection: ServerConnection): void {
    if (!this.options.earlyTalkerPause) {
      connection.init = function (this: ServerConnection) {
        this._setListeners(() => this.connectionReady());
      };
    }
    const serverClose = connection.close.bind(connection);
    connection.close = () => {
      this.end(connection.id);
      serverClose();
    };
    const onClose = connection._onClose.bind(connection);
    connection._onClose = () => {
      this.end(connection.id);
      onClose();
    };
  }
}

/** Most of `times` (ms) in any half-open window [t, t + windowMs), wherever it is placed. */
export function peakInWindow(times: readonly number[], windowMs: number): number {
  const sorted = [...times].sort((a, b) => a - b);
  let best = 0;
  for (let i = 0, j = 0; j < sorted.length; j++) {
    while (sorted[j] - sorted[i] >= windowMs) i++;
    best = Math.max(best, j - i + 1);
  }
  return best;
}
