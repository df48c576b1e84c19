/**
 * A real SMTP server (smtp-server) on loopback that records what it saw, per connection: where
 * the client connected from, its EHLO name, every transaction with the RCPTs it was sent and
 * accepted, and whether the message was accepted. Tests assert on this record, not only on what
 * the client reports.
 */
import type { AddressInfo } from 'node:net';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';

export interface SeenTransaction {
  from: string;
  /** Every RCPT TO the client sent, accepted or not. */
  rcptAttempts: string[];
  /** Recipients the server accepted at RCPT. */
  rcptAccepted: string[];
  /** True when the server answered the final dot with 250. */
  delivered: boolean;
  subject?: string;
  /** The message as the server received it (after SMTP dot-unstuffing). */
  text?: string;
}

export interface SeenConnection {
  id: string;
  remoteAddress: string;
  ehloName: string;
  transactions: SeenTransaction[];
  secure: boolean;
  closed: boolean;
  /** MAIL FROM commands answered with 421 because of `messagesPerConnection`. */
  mailRefused: number;
}

export interface Behaviour {
  /** Answer `421 too many messages in this connection` to MAIL FROM after this many accepted messages on a connection (Exim's limit). */
  messagesPerConnection?: number;
  /** Reply for a RCPT: return a code and text to refuse it, undefined to accept. */
  rcpt?: (address: string, connection: SeenConnection) => { code: number; message: string } | undefined;
  /** Reply for the final dot: return a code and text to refuse the message. */
  data?: (transaction: SeenTransaction, connection: SeenConnection) => { code: number; message: string } | undefined;
  /** Drop the socket instead of answering the final dot of the n-th message (1-based, across the server). */
  dropBeforeDataReplyOn?: number;
  /** Never answer this RCPT (the client's socket timeout has to end the transaction). */
  stallRcpt?: (address: string, connection: SeenConnection) => boolean;
  /** Drop the socket when the DATA command arrives, before answering it with 354 (so before any message byte is sent). */
  dropAtDataCommand?: (transaction: SeenTransaction, connection: SeenConnection) => boolean;
  /** Wait this long (ms) before answering the final dot. */
  dataReplyDelay?: number;
  /** Greeting for a client by source address: a code and text refuse the connection (not recorded in `connections`). */
  greeting?: (remoteAddress: string) => { code: number; message: string } | undefined;
  /** Extra smtp-server options. */
  server?: Partial<SMTPServerOptions>;
}

export class RecordingServer {
  readonly connections: SeenConnection[] = [];
  /** Source addresses of connections refused at the greeting. */
  readonly refusedConnections: string[] = [];
  /** Total messages whose final dot was reached, across connections. */
  private dataCount = 0;
  private readonly byId = new Map<string, SeenConnection>();
  private server!: SMTPServer;
  private stopping: Promise<void> | undefined;
  port = 0;

  constructor(
    readonly host = '127.0.0.1',
    private readonly behaviour: Behaviour = {},
  ) {}

  /** Listens on `host`, on `port` or any free one. */
  static async start(host = '127.0.0.1', behaviour: Behaviour = {}, port = 0): Promise<RecordingServer> {
    const server = new RecordingServer(host, behaviour);
    await server.listen(port);
    return server;
  }

  /** Every accepted (message subject or index, recipient) pair, for duplicate checks. */
  deliveredRecipients(): string[] {
    return this.connections.flatMap((c) => c.transactions.filter((t) => t.delivered).flatMap((t) => t.rcptAccepted));
  }

  /** MAIL FROM commands answered with 421 (`messagesPerConnection`), across connections. */
  mailRefusals(): number {
    return this.connections.reduce((sum, c) => sum + c.mailRefused, 0);
  }

  totalDelivered(): number {
    return this.deliveredRecipients().length;
  }

  /** Stops listening and drops the connections left; calling it again waits for the same stop. */
  stop(): Promise<void> {
    this.stopping ??= new Promise<void>((resolve) => this.server.close(() => resolve()));
    return this.stopping;
  }

  private connection(session: SMTPServerSession): SeenConnection {
    return this.byId.get(session.id)!;
  }

  private listen(port: number): Promise<void> {
    const behaviour = this.behaviour;
    this.server = new SMTPServer({
      authOptional: true,
      disabledCommands: ['STARTTLS'],
      logger: false,
      // Lets the test close it without waiting for clients to go away.
      closeTimeout: 100,
      // No PTR lookups of client addresses: 127.0.0.2/.3 are not in /etc/hosts, so they would go to the system resolver.
      disableReverseLookup: true,
      onConnect: (session, callback) => {
        const seen: SeenConnection = {
          id: session.id,
          remoteAddress: session.remoteAddress,
          ehloName: '',
          transactions: [],
          secure: session.secure,
          closed: false,
          mailRefused: 0,
        };
        const refusal = this.behaviour.greeting?.(session.remoteAddress.replace(/^::ffff:/, ''));
        if (refusal) {
          this.refusedConnections.push(session.remoteAddress.replace(/^::ffff:/, ''));
          return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
        }
        this.byId.set(session.id, seen);
        this.connections.push(seen);
        callback();
      },
      onMailFrom: (address, session, callback) => {
        const seen = this.connection(session);
        seen.ehloName = session.hostNameAppearsAs;
        // Known only after STARTTLS, which comes after the connect.
        seen.secure = session.secure;
        const delivered = seen.transactions.filter((t) => t.delivered).length;
        if (behaviour.messagesPerConnection !== undefined && delivered >= behaviour.messagesPerConnection) {
          seen.mailRefused++;
          return callback(Object.assign(new Error('too many messages in this connection'), { responseCode: 421 }));
        }
        seen.transactions.push({ from: address.address, rcptAttempts: [], rcptAccepted: [], delivered: false });
        callback();
      },
      onRcptTo: (address, session, callback) => {
        const seen = this.connection(session);
        const transaction = seen.transactions.at(-1)!;
        transaction.rcptAttempts.push(address.address);
        if (behaviour.stallRcpt?.(address.address, seen)) return;
        const refusal = behaviour.rcpt?.(address.address, seen);
        if (refusal) return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
        transaction.rcptAccepted.push(address.address);
        callback();
      },
      onData: (stream, session, callback) => {
        const seen = this.connection(session);
        const transaction = seen.transactions.at(-1)!;
        if (behaviour.dropAtDataCommand?.(transaction, seen)) {
          // smtp-server calls onData before it writes the 354, so the client never gets it.
          this.dropSocket(session);
          return;
        }
        const chunks: Buffer[] = [];
        stream.on('data', (chunk: Buffer) => chunks.push(chunk));
        stream.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          transaction.subject = /^Subject: (.*)$/m.exec(text)?.[1]?.trim();
          transaction.text = text;
          this.dataCount++;
          if (behaviour.dropBeforeDataReplyOn === this.dataCount) {
            // The message is in, the reply never comes: the client cannot know the outcome.
            transaction.delivered = true;
            this.dropSocket(session);
            return;
          }
          const reply = (): void => {
            const refusal = behaviour.data?.(transaction, seen);
            if (refusal) return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
            transaction.delivered = true;
            callback(null, 'Ok: queued');
          };
          if (behaviour.dataReplyDelay) setTimeout(reply, behaviour.dataReplyDelay);
          else reply();
        });
      },
      onClose: (session) => {
        const seen = this.byId.get(session.id);
        if (seen) seen.closed = true;
      },
      ...behaviour.server,
    });
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, this.host, () => {
        this.port = (this.server.server.address() as AddressInfo).port;
        resolve();
      });
    });
  }

  private dropSocket(session: SMTPServerSession): void {
    for (const connection of (this.server as unknown as { connections: Set<{ id: string; _socket: { destroy(): void } }> }).connections) {
      if (connection.id === session.id) connection._socket.destroy();
    }
  }
}
