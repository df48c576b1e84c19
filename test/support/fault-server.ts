/**
 * A fault-injecting SMTP server (smtp-server) on loopback. A scenario's `FaultPlan` decides, at
 * every step of every session, whether the server behaves or misbehaves: refuses the greeting
 * (421 / 554) or never sends it, refuses or breaks STARTTLS, answers 421 after k messages on a
 * connection (Exim's `421 too many messages in this connection`), refuses recipients (4xx, 5xx,
 * 452), refuses the message after the dot, drops the socket after MAIL, after RCPT, at the DATA
 * command, in the middle of the message, after the final dot before the reply or at the RSET
 * after a failed transaction, or stops answering at a chosen point (greeting, RCPT, final dot,
 * RSET) so the client's timeouts have to end it. It can also restart:
 * close every socket and listen again on the same port while a batch is in flight.
 *
 * Faults are chosen deterministically (the n-th transaction, a given recipient) or at random,
 * always from a seeded PRNG (`chance(seed, key)` hashes the seed with a key naming the decision,
 * so the same seed makes the same decisions even when concurrency reorders them).
 *
 * The server records what it saw, per connection and per transaction: every RCPT it was sent and
 * accepted, whether it received the message (final dot), whether it answered that dot with 250,
 * and the message's Message-ID and Subject; the last commands and replies of each session; and,
 * per source address, how many sessions were open at once at most (see `maxConcurrent`).
 *
 * No jest here: the soak benchmark (bench/soak.ts) uses it too.
 */
import type { Socket } from 'node:net';
import { LoopbackServer, type ServerConnection } from './smtp-server-internals';
import type { SMTPServerOptions, SMTPServerSession } from 'smtp-server';

// ---------------------------------------------------------------------------------------------
// Seeded randomness

/** mulberry32: a small, fast, seeded PRNG; returns floats in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** FNV-1a of a string, 32 bits. */
export function hash32(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/**
 * A number in [0, 1) fixed by the seed and a key naming one decision ("rcpt|a@x.test|2"). Unlike
 * a shared PRNG stream, the value does not depend on the order concurrent sessions ask in.
 */
export function chance(seed: number, key: string): number {
  return mulberry32(hash32(`${seed}|${key}`))();
}

// ---------------------------------------------------------------------------------------------
// What the server saw

export interface FaultTransaction {
  /** 1-based number of this transaction across the server's life (restarts included). */
  n: number;
  from: string;
  /** Every RCPT TO the client sent in it, accepted or not. */
  rcptAttempts: string[];
  /** Recipients the server accepted at RCPT. */
  rcptAccepted: string[];
  /** The server answered DATA with 354: message bytes may have reached its socket from then on. */
  dataStarted: boolean;
  /** The final dot arrived: the server has the message, whatever happened to its reply. */
  received: boolean;
  /** The reply the server sent to the final dot (250 = accepted), undefined when it sent none. */
  dataReply?: number;
  /** The server answered the final dot with 250. */
  delivered: boolean;
  messageId?: string;
  subject?: string;
  /** Faults injected into this transaction, by name. */
  faults: string[];
}

export interface FaultConnection {
  /** smtp-server's session id. */
  id: string;
  /** 1-based number of this connection across the server's life. */
  n: number;
  remoteAddress: string;
  /** How many times the server had restarted when this connection came in. */
  generation: number;
  ehloName: string;
  secure: boolean;
  transactions: FaultTransaction[];
  /** The session is over: the client sent QUIT, or the socket closed (see `openSockets` for sockets). */
  closed: boolean;
  /** Faults injected on this connection outside a transaction (greeting, STARTTLS), by name. */
  faults: string[];
  /** The last commands received and replies sent ("C: RSET", "S: 250"), for diagnosing a stuck session. */
  trail: string[];
}

// ---------------------------------------------------------------------------------------------
// Fault plans

export interface Reply {
  code: number;
  message: string;
}

export interface FaultContext {
  server: FaultServer;
  connection: FaultConnection;
  /** The transaction in progress (MAIL, RCPT, DATA hooks). */
  transaction?: FaultTransaction;
  /** The recipient (RCPT hook). */
  rcpt?: string;
  /** How many times this server has seen an RCPT for this address before (RCPT hook). */
  rcptSeen?: number;
}

export type GreetingFault = Reply | 'stall';
export type StartTlsFault = 'refuse' | 'break';
/** `dropAfter`: answer 250, then drop the socket. */
export type MailFault = Reply | 'dropAfter';
export type RcptFault = Reply | 'dropAfter' | 'stall';
/** At the DATA command, before the 354: nothing of the message has been sent. */
export type DataCommandFault = 'drop';
/** At the message: a reply to the final dot other than 250, or a drop / stall. */
export type DataFault = Reply | 'dropMidData' | 'dropAfterDot' | 'stallAfterDot';
/** At RSET (which a client sends after a failed transaction): a reply other than 250, or a drop / stall. */
export type RsetFault = Reply | 'drop' | 'stall';

/** Every hook may return undefined: behave. Hooks not given always behave. */
export interface FaultPlan {
  greeting?(ctx: FaultContext): GreetingFault | undefined;
  /** Only asked when the server offers STARTTLS (`tls` given to the server). */
  starttls?(ctx: FaultContext): StartTlsFault | undefined;
  mail?(ctx: FaultContext): MailFault | undefined;
  rcpt?(ctx: FaultContext): RcptFault | undefined;
  dataCommand?(ctx: FaultContext): DataCommandFault | undefined;
  data?(ctx: FaultContext): DataFault | undefined;
  rset?(ctx: FaultContext): RsetFault | undefined;
  /** Answer `421 4.7.0 too many messages in this connection` to MAIL FROM once this many messages were received on the connection. */
  messagesPerConnection?: number;
  /** Called once per transaction at MAIL FROM, e.g. to restart the server after the n-th. */
  onTransaction?(ctx: FaultContext): void;
}

export interface FaultServerOptions {
  /** 127.0.0.x to listen on. */
  host?: string;
  /** Port to listen on; 0 (default) picks a free one. */
  port?: number;
  plan?: FaultPlan;
  /** Offer STARTTLS with this key and certificate. */
  tls?: { key: Buffer; cert: Buffer };
  /** smtp-server's `size`: advertised SIZE, and MAIL FROM with a larger SIZE is refused. */
  size?: number;
  /** Name in the greeting and EHLO reply. */
  name?: string;
  /** A name for the server that does not change between runs (its port does), for `chance()` keys. Default: `name`, else the host. */
  label?: string;
  /** Keep smtp-server's 100 ms early-talker pause before the greeting. Default false (faster tests). */
  earlyTalkerPause?: boolean;
  /** Keep the raw bytes every client sent, per connection (for injection checks). Default false. */
  recordRaw?: boolean;
}

/** Commands and replies kept per connection in `trail`. */
const TRAIL = 12;

const TOO_MANY_MESSAGES: Reply = { code: 421, message: '4.7.0 too many messages in this connection' };

export class FaultServer extends LoopbackServer {
  readonly connections: FaultConnection[] = [];
  /**
   * Source address → most sessions open at once from it. A session counts from the TCP accept to
   * the first of: QUIT received, the server closing it (421, or the 221 to QUIT), the socket
   * closing. (Not to the socket close alone: a client that has its 221, or that gave up after a
   * timeout, has let go of its socket, and this server may see the close a moment after the
   * client's next connection, in the same turn of its event loop.)
   */
  readonly maxConcurrent = new Map<string, number>();
  /** Source address → sessions open now. */
  readonly openNow = new Map<string, number>();
  /** Connection n → raw bytes the client sent (with `recordRaw`). */
  readonly raw = new Map<number, Buffer[]>();
  /** Errors smtp-server reported (resets from dropped clients, mostly); never thrown. */
  /** Times the server restarted. */
  restarts = 0;
  plan: FaultPlan;
  private readonly options: FaultServerOptions;
  private readonly sockets = new Set<Socket>();
  private readonly byId = new Map<string, FaultConnection>();
  private readonly smtpById = new Map<string, ServerConnection>();
  /** Sessions the server decided to drop or stall: nothing more is recorded for them. */
  private readonly silenced = new Set<string>();
  private transactionCount = 0;
  private connectionCount = 0;
  /** smtp-server assigns the session id after its connection object exists; matched by socket. */
  private readonly pendingBySocket = new Map<Socket, FaultConnection>();
  private readonly rcptSeen = new Map<string, number>();
  /** The 'close' listener of each raw socket (STARTTLS removes every listener; it is put back). */
  private readonly closeListeners = new Map<Socket, () => void>();
  /** Per raw socket: marks its session closed (called from smtp-server's close of the session). */
  private readonly sessionClosers = new Map<Socket, () => void>();
  private restarting: Promise<void> | undefined;
  private stopped = false;

  private constructor(options: FaultServerOptions) {
    super(options);
    this.options = options;
    this.plan = options.plan ?? {};
  }

  static async start(options: FaultServerOptions = {}): Promise<FaultServer> {
    const server = new FaultServer(options);
    await server.listen(options.port ?? 0);
    return server;
  }

  get transactions(): FaultTransaction[] {
    return this.connections.flatMap((c) => c.transactions);
  }

  /** Transactions whose message the server may have taken: 250 to the dot, or the dot received and never answered. */
  takenTransactions(): FaultTransaction[] {
    return this.transactions.filter((t) => t.delivered || (t.received && t.dataReply === undefined));
  }

  /** Every (Message-ID, recipient) the server answered 250 for, duplicates kept. */
  deliveredPairs(): string[] {
    return this.transactions.filter((t) => t.delivered).flatMap((t) => t.rcptAccepted.map((r) => `${t.messageId}|${r}`));
  }

  /** How many RCPTs for this address the server has seen so far. */
  timesSeen(rcpt: string): number {
    return this.rcptSeen.get(rcpt) ?? 0;
  }

  /** Most sessions open at once from any one source address (see `maxConcurrent`). */
  peakConcurrency(): number {
    return Math.max(0, ...this.maxConcurrent.values());
  }

  /** TCP sockets still open on the server side. */
  get openSockets(): number {
    return this.sockets.size;
  }

  allClosed(): boolean {
    return this.sockets.size === 0 && this.connections.every((c) => c.closed);
  }

  /** Forgets what the server recorded (for memory measurements after a long run). */
  clearRecords(): void {
    this.connections.length = 0;
    this.byId.clear();
    this.rcptSeen.clear();
    this.raw.clear();
    this.errors.length = 0;
  }

  /** Drops every connection and listens again on the same port; resolves when it listens. */
  restart(): Promise<void> {
    this.restarting ??= (async () => {
      await this.close();
      if (this.stopped) return;
      this.restarts++;
      await this.listen(this.port);
    })().finally(() => {
      this.restarting = undefined;
    });
    return this.restarting;
  }

  /** Stops listening and drops every connection left; resolves when every socket is closed. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.restarting) await this.restarting;
    await this.close();
  }

  // -------------------------------------------------------------------------------------------

  private async close(): Promise<void> {
    const server = this.server;
    const closed = new Promise<void>((resolve) => server.server.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  private async listen(port: number): Promise<void> {
    const plan = (): FaultPlan => this.plan;
    const options: SMTPServerOptions = {
      name: this.options.name ?? 'fault.test',
      authOptional: true,
      disabledCommands: this.options.tls ? [] : ['STARTTLS'],
      hideSTARTTLS: !this.options.tls,
      // Reverse lookups would leave the machine.
      disableReverseLookup: true,
      logger: false,
      size: this.options.size,
      ...(this.options.tls ? { key: this.options.tls.key, cert: this.options.tls.cert } : {}),
      onConnect: (session, callback) => {
        const seen = this.sessionRecord(session);
        if (!seen) return callback();
        const fault = plan().greeting?.({ server: this, connection: seen });
        if (fault === 'stall') {
          seen.faults.push('greeting:stall');
          this.silenced.add(session.id);
          return; // never greets: the client's greetingTimeout ends it
        }
        if (fault) {
          seen.faults.push(`greeting:${fault.code}`);
          return callback(Object.assign(new Error(fault.message), { responseCode: fault.code }));
        }
        callback();
      },
      onMailFrom: (address, session, callback) => {
        const seen = this.byId.get(session.id);
        if (!seen || this.silenced.has(session.id)) return;
        seen.ehloName = String(session.hostNameAppearsAs);
        seen.secure = session.secure;
        const received = seen.transactions.filter((t) => t.received).length;
        const limit = plan().messagesPerConnection;
        if (limit !== undefined && received >= limit) {
          seen.faults.push('mail:421-too-many-messages');
          return callback(Object.assign(new Error(TOO_MANY_MESSAGES.message), { responseCode: TOO_MANY_MESSAGES.code }));
        }
        const transaction: FaultTransaction = {
          n: ++this.transactionCount,
          from: address.address,
          rcptAttempts: [],
          rcptAccepted: [],
          dataStarted: false,
          received: false,
          delivered: false,
          faults: [],
        };
        seen.transactions.push(transaction);
        const ctx: FaultContext = { server: this, connection: seen, transaction };
        plan().onTransaction?.(ctx);
        const fault = plan().mail?.(ctx);
        if (fault === 'dropAfter') {
          transaction.faults.push('mail:dropAfter');
          callback();
          this.drop(session.id);
          return;
        }
        if (fault) {
          transaction.faults.push(`mail:${fault.code}`);
          return callback(Object.assign(new Error(fault.message), { responseCode: fault.code }));
        }
        callback();
      },
      onRcptTo: (address, session, callback) => {
        const seen = this.byId.get(session.id);
        if (!seen || this.silenced.has(session.id)) return;
        const transaction = seen.transactions.at(-1)!;
        const rcpt = address.address;
        transaction.rcptAttempts.push(rcpt);
        const rcptSeen = this.rcptSeen.get(rcpt) ?? 0;
        this.rcptSeen.set(rcpt, rcptSeen + 1);
        const fault = plan().rcpt?.({ server: this, connection: seen, transaction, rcpt, rcptSeen });
        if (fault === 'stall') {
          transaction.faults.push(`rcpt:stall:${rcpt}`);
          this.silenced.add(session.id);
          return; // never answers: the client's socketTimeout ends it
        }
        if (fault === 'dropAfter') {
          transaction.faults.push(`rcpt:dropAfter:${rcpt}`);
          transaction.rcptAccepted.push(rcpt);
          callback();
          this.drop(session.id);
          return;
        }
        if (fault) {
          transaction.faults.push(`rcpt:${fault.code}:${rcpt}`);
          return callback(Object.assign(new Error(fault.message), { responseCode: fault.code }));
        }
        transaction.rcptAccepted.push(rcpt);
        callback();
      },
      onData: (stream, session, callback) => {
        const seen = this.byId.get(session.id);
        const transaction = seen?.transactions.at(-1);
        if (!seen || !transaction || this.silenced.has(session.id)) {
          stream.resume();
          return;
        }
        const ctx: FaultContext = { server: this, connection: seen, transaction };
        if (plan().dataCommand?.(ctx) === 'drop') {
          // smtp-server calls onData before it writes the 354: the client never gets it.
          transaction.faults.push('data:dropAtCommand');
          stream.resume();
          // smtp-server writes the 354 as soon as onData returns: dropped before it.
          this.drop(session.id);
          return;
        }
        const fault = plan().data?.(ctx);
        transaction.dataStarted = true;
        // Message-ID and Subject from the header block, as soon as it has arrived.
        let head = '';
        const noteHeaders = (chunk: Buffer): void => {
          if (transaction.messageId !== undefined || head.length > 65_536) return;
          head += chunk.toString('latin1');
          const end = head.search(/\r?\n\r?\n/);
          if (end < 0) return;
          const headers = head.slice(0, end).replace(/\r?\n[ \t]+/g, ' ');
          transaction.messageId = /^Message-ID:\s*(.*)$/im.exec(headers)?.[1]?.trim() ?? '';
          transaction.subject = /^Subject:\s*(.*)$/im.exec(headers)?.[1]?.trim();
        };
        stream.on('error', () => undefined);
        if (fault === 'dropMidData') {
          transaction.faults.push('data:dropMidData');
          stream.once('data', (chunk: Buffer) => {
            noteHeaders(chunk);
            this.drop(session.id);
          });
          stream.resume();
          return;
        }
        stream.on('data', noteHeaders);
        stream.on('end', () => {
          if (this.silenced.has(session.id)) return;
          transaction.received = true;
          if (fault === 'dropAfterDot') {
            // The message is in, the reply never comes: the client cannot know the outcome.
            transaction.faults.push('data:dropAfterDot');
            this.drop(session.id);
            return;
          }
          if (fault === 'stallAfterDot') {
            transaction.faults.push('data:stallAfterDot');
            this.silenced.add(session.id);
            return;
          }
          if (stream.sizeExceeded) {
            transaction.dataReply = 552;
            return callback(Object.assign(new Error('5.3.4 message exceeds fixed maximum message size'), { responseCode: 552 }));
          }
          if (fault) {
            transaction.faults.push(`data:${fault.code}`);
            transaction.dataReply = fault.code;
            return callback(Object.assign(new Error(fault.message), { responseCode: fault.code }));
          }
          transaction.dataReply = 250;
          transaction.delivered = true;
          callback(null, 'Ok: queued');
        });
      },
    };
    await this.startSmtp(options, port);
  }

  /** Counts TCP connections per source address from accept to close, and creates the record. */
  protected track(socket: Socket): void {
    const address = (socket.remoteAddress ?? '').replace(/^::ffff:/, '');
    this.sockets.add(socket);
    const open = (this.openNow.get(address) ?? 0) + 1;
    this.openNow.set(address, open);
    if (open > (this.maxConcurrent.get(address) ?? 0)) this.maxConcurrent.set(address, open);
    const seen: FaultConnection = {
      id: '',
      n: ++this.connectionCount,
      remoteAddress: address,
      generation: this.restarts,
      ehloName: '',
      secure: false,
      transactions: [],
      closed: false,
      faults: [],
      trail: [],
    };
    this.connections.push(seen);
    this.pendingBySocket.set(socket, seen);
    if (this.options.recordRaw) {
      const chunks: Buffer[] = [];
      this.raw.set(seen.n, chunks);
      socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    }
    // The session counts as closed at the first of: the raw socket's close, or smtp-server's
    // own close of the session (after STARTTLS the TLS socket closes first, the raw one later).
    let live = true;
    const sessionClosed = (): void => {
      if (!live) return;
      live = false;
      this.openNow.set(address, (this.openNow.get(address) ?? 1) - 1);
      seen.closed = true;
      if (seen.id) {
        this.smtpById.delete(seen.id);
        this.silenced.delete(seen.id);
      }
    };
    const onClose = (): void => {
      this.sockets.delete(socket);
      this.pendingBySocket.delete(socket);
      this.closeListeners.delete(socket);
      this.sessionClosers.delete(socket);
      sessionClosed();
    };
    this.closeListeners.set(socket, onClose);
    this.sessionClosers.set(socket, sessionClosed);
    socket.once('close', onClose);
  }

  private sessionRecord(session: SMTPServerSession): FaultConnection | undefined {
    return this.byId.get(session.id);
  }

  /**
   * Reaches into each smtp-server connection as it is created (smtp-server adds it to its
   * `connections` set right before init()): links it to its record, drops the 100 ms
   * early-talker pause, and wraps STARTTLS for the plan's TLS faults.
   */

  protected patch(connection: ServerConnection): void {
    const raw = connection._socket;
    const seen = this.pendingBySocket.get(connection._socket);
    if (seen) {
      seen.id = connection.id;
      this.byId.set(connection.id, seen);
      this.smtpById.set(connection.id, connection);
    }
    if (seen) {
      const note = (line: string): void => {
        seen.trail.push(line);
        if (seen.trail.length > TRAIL) seen.trail.shift();
      };
      const onCommand = connection._onCommand.bind(connection);
      connection._onCommand = (command, callback) => {
        const line = command.toString('latin1');
        note(`C: ${line.slice(0, 60)}`);
        // The client says the session is over: from here on it no longer counts as open (it
        // closes its socket once it has the 221, and may dial a new connection right then,
        // possibly before this server has seen the socket close).
        if (/^QUIT\b/i.test(line)) this.sessionClosers.get(raw)?.();
        onCommand(command, callback);
      };
      const send = connection.send.bind(connection);
      connection.send = (code, message, ...rest) => {
        note(`S: ${code} ${String(message).slice(0, 40)}`);
        send(code, message, ...rest);
      };
    }
    if (!this.options.earlyTalkerPause) {
      connection.init = function (this: ServerConnection) {
        this._setListeners(() => this.connectionReady());
      };
    }
    // The server ends the session itself (after a 421, or the 221 to QUIT): over from here on.
    const serverClose = connection.close.bind(connection);
    connection.close = () => {
      this.sessionClosers.get(raw)?.();
      serverClose();
    };
    const onSessionClose = connection._onClose.bind(connection);
    connection._onClose = () => {
      this.sessionClosers.get(raw)?.();
      onSessionClose();
    };
    // smtp-server's upgrade() removes every listener from the raw socket: put the close count back.
    const upgrade = connection.upgrade.bind(connection);
    connection.upgrade = (callback, secureCallback) => {
      const raw = connection._socket;
      upgrade(callback, secureCallback);
      const onClose = this.closeListeners.get(raw);
      if (onClose && !raw.listeners('close').includes(onClose)) raw.once('close', onClose);
    };
    const rset = connection.handler_RSET.bind(connection);
    connection.handler_RSET = (command, callback) => {
      const record = this.byId.get(connection.id);
      if (!record || this.silenced.has(connection.id)) return callback();
      const fault = this.plan.rset?.({ server: this, connection: record, transaction: record.transactions.at(-1) });
      if (fault === 'drop') {
        record.faults.push('rset:drop');
        this.drop(connection.id);
        return callback();
      }
      if (fault === 'stall') {
        record.faults.push('rset:stall');
        this.silenced.add(connection.id);
        return callback();
      }
      if (fault) {
        record.faults.push(`rset:${fault.code}`);
        connection.send(fault.code, fault.message);
        return callback();
      }
      rset(command, callback);
    };
    const original = connection.handler_STARTTLS.bind(connection);
    connection.handler_STARTTLS = (command, callback) => {
      const record = this.byId.get(connection.id);
      const fault = record ? this.plan.starttls?.({ server: this, connection: record }) : undefined;
      if (fault === 'refuse') {
        record!.faults.push('starttls:454');
        connection.send(454, '4.7.0 TLS not available due to temporary reason');
        return callback();
      }
      if (fault === 'break') {
        // Says yes, then answers the ClientHello with bytes that are no TLS record.
        record!.faults.push('starttls:break');
        connection.send(220, 'Ready to start TLS');
        const socket = connection._socket;
        socket.write('this is not a TLS record\r\n', () => socket.destroy());
        return callback();
      }
      original(command, callback);
    };
  }

  /**
   * Destroys a session's socket at once (a reply just written has reached the kernel and goes
   * out, as from a server that crashes right after it); nothing more is recorded or answered
   * for it. At once, because with PIPELINING the client's next commands are already queued and
   * smtp-server would answer them (a 354 to DATA, say) on a later turn.
   */
  private drop(sessionId: string): void {
    this.silenced.add(sessionId);
    this.smtpById.get(sessionId)?._socket.destroy();
  }
}
