/**
 * A real SMTP or LMTP server (smtp-server) on loopback that keeps, for every message it
 * received, the exact bytes (after SMTP dot-unstuffing, as smtp-server hands them over) with
 * their sha256, the MAIL FROM and RCPT TO parameters, and whether the session was encrypted.
 * It also records every MAIL FROM and RCPT TO command line as it arrived, before smtp-server
 * checks its parameters, so a test can tell that a command was never sent at all.
 *
 * For the size and envelope tests (test/sizes.test.ts): plain, STARTTLS (`tls`), implicit TLS
 * (`secure`), LMTP (`lmtp`), an advertised SIZE (`size`), no SMTPUTF8 (`hideSMTPUTF8`), DSN and
 * REQUIRETLS (`offer`; smtp-server hides both by default).
 */
import { createHash } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';

export type CommandArgs = Record<string, string | boolean>;

export interface StoredMessage {
  /** smtp-server's session id. */
  session: string;
  secure: boolean;
  from: string;
  mailArgs: CommandArgs;
  rcpts: { address: string; args: CommandArgs }[];
  /** The message as received, dot-unstuffed. */
  bytes: Buffer;
  sha256: string;
}

export interface ByteServerOptions {
  /** Offer STARTTLS with this key and certificate. */
  tls?: { key: Buffer; cert: Buffer };
  /** TLS from the first byte (needs `tls`). */
  secure?: boolean;
  lmtp?: boolean;
  /** Advertised SIZE; the server refuses a larger SIZE= at MAIL FROM and a larger message after its final dot (552). */
  size?: number;
  /** Do not offer SMTPUTF8. */
  hideSMTPUTF8?: boolean;
  /** Offer these extensions smtp-server hides by default (REQUIRETLS is only offered over TLS). */
  offer?: ('DSN' | 'REQUIRETLS')[];
  /** Reply for a RCPT: a code and text to refuse it, undefined to accept. */
  rcpt?: (address: string) => { code: number; message: string } | undefined;
  server?: Partial<SMTPServerOptions>;
}

/** The parts of smtp-server's connection object this server reaches into. */
interface ServerConnection {
  id: string;
  _onCommand(command: Buffer, callback: () => void): void;
}

export const sha256 = (bytes: Buffer | string): string => createHash('sha256').update(bytes).digest('hex');

export class ByteServer {
  readonly host = '127.0.0.1';
  port = 0;
  /** Every message received in full, in order. */
  readonly messages: StoredMessage[] = [];
  /** Every MAIL FROM / RCPT TO command line the server read, in order, as `session: line`. */
  readonly commands: string[] = [];
  private server!: SMTPServer;
  private stopping: Promise<void> | undefined;

  private constructor(private readonly options: ByteServerOptions) {}

  static async start(options: ByteServerOptions = {}): Promise<ByteServer> {
    const server = new ByteServer(options);
    await server.listen();
    return server;
  }

  get route(): { host: string; port: number } {
    return { host: this.host, port: this.port };
  }

  /** MAIL FROM lines the server read (the command as sent, parameters included). */
  mailCommands(): string[] {
    return this.commands.map((c) => c.replace(/^[^:]*: /, '')).filter((line) => /^MAIL FROM:/i.test(line));
  }

  rcptCommands(): string[] {
    return this.commands.map((c) => c.replace(/^[^:]*: /, '')).filter((line) => /^RCPT TO:/i.test(line));
  }

  /** The messages with this envelope sender, removed from the record (so large ones are freed). */
  take(from: string): StoredMessage[] {
    const taken: StoredMessage[] = [];
    for (let i = this.messages.length - 1; i >= 0; i--) {
      if (this.messages[i].from === from) taken.unshift(...this.messages.splice(i, 1));
    }
    return taken;
  }

  stop(): Promise<void> {
    this.stopping ??= new Promise<void>((resolve) => this.server.close(() => resolve()));
    return this.stopping;
  }

  private listen(): Promise<void> {
    const { tls, secure, lmtp, size, hideSMTPUTF8 } = this.options;
    this.server = new SMTPServer({
      authOptional: true,
      disabledCommands: tls && !secure ? ['AUTH'] : ['AUTH', 'STARTTLS'],
      logger: false,
      closeTimeout: 100,
      disableReverseLookup: true,
      ...(tls ? { key: tls.key, cert: tls.cert } : {}),
      secure: secure ?? false,
      lmtp: lmtp ?? false,
      size: size ?? 0,
      rejectOversized: true,
      hideSMTPUTF8: hideSMTPUTF8 ?? false,
      hideDSN: !this.options.offer?.includes('DSN'),
      hideREQUIRETLS: !this.options.offer?.includes('REQUIRETLS'),
      onRcptTo: (address, _session, callback) => {
        const refusal = this.options.rcpt?.(address.address);
        if (refusal) return callback(Object.assign(new Error(refusal.message), { responseCode: refusal.code }));
        callback();
      },
      onData: (stream, session, callback) => {
        const chunks: Buffer[] = [];
        const hash = createHash('sha256');
        stream.on('data', (chunk: Buffer) => {
          chunks.push(chunk);
          hash.update(chunk);
        });
        stream.on('end', () => {
          const envelope = session.envelope;
          const mailFrom = envelope.mailFrom || { address: '', args: {} };
          this.messages.push({
            session: session.id,
            secure: session.secure,
            from: mailFrom.address,
            mailArgs: (mailFrom.args || {}) as CommandArgs,
            rcpts: envelope.rcptTo.map((r) => ({ address: r.address, args: (r.args || {}) as CommandArgs })),
            bytes: Buffer.concat(chunks),
            sha256: hash.digest('hex'),
          });
          if (lmtp)
            (callback as unknown as (err: null, replies: string[]) => void)(
              null,
              envelope.rcptTo.map((r) => `delivered to ${r.address}`),
            );
          else callback(null, 'Ok: queued');
        });
      },
      ...this.options.server,
    });
    this.recordCommands();
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(0, this.host, () => {
        this.port = (this.server.server.address() as AddressInfo).port;
        resolve();
      });
    });
  }

  /** Wraps each connection's command handler (smtp-server adds the connection to its set right before init()). */
  private recordCommands(): void {
    const connections = (this.server as unknown as { connections: Set<ServerConnection> }).connections;
    const add = connections.add.bind(connections);
    connections.add = (connection: ServerConnection) => {
      if (!connections.has(connection)) {
        const onCommand = connection._onCommand.bind(connection);
        connection._onCommand = (command, callback) => {
          const line = command.toString('utf8');
          if (/^(MAIL FROM|RCPT TO):/i.test(line)) this.commands.push(`${connection.id}: ${line}`);
          onCommand(command, callback);
        };
      }
      return add(connection);
    };
  }
}
