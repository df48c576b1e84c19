/**
 * The test servers' one door into smtp-server's internals: its per-connection object, caught as
 * it is created, and listening on a loopback address with every raw socket seen first.
 */
import type { AddressInfo, Socket } from 'node:net';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';

/** The parts of smtp-server's connection object the test servers reach into. */
export interface ServerConnection {
  id: string;
  _socket: Socket;
  init(): void;
  connectionReady(next?: () => void): void;
  _setListeners(callback: () => void): void;
  send(code: number, message: string | string[], ...rest: unknown[]): void;
  _onCommand(command: Buffer, callback: () => void): void;
  _onClose(): void;
  close(): void;
  handler_STARTTLS(command: Buffer, callback: () => void): void;
  handler_RSET(command: Buffer, callback: () => void): void;
  upgrade(callback: () => void, secureCallback?: () => void): void;
}

/** What a test server watches: errors, each smtp-server connection as it is created, each raw socket. */
export interface ServerHooks {
  errors: Error[];
  /** Called before the connection's init(), so a patch can still change how it starts. */
  patch(connection: ServerConnection): void;
  track(socket: Socket): void;
}

/** Starts smtp-server on `host:port` (0: any free port) with the hooks in place; resolves with it and its port. */
export async function startWatched(options: SMTPServerOptions, host: string, port: number, hooks: ServerHooks): Promise<{ server: SMTPServer; port: number }> {
  const server = new SMTPServer(options);
  server.on('error', (err: Error) => hooks.errors.push(err));
  // smtp-server adds each connection to its `connections` set right before init().
  const connections = server.connections as Set<ServerConnection>;
  const add = connections.add.bind(connections);
  connections.add = (connection: ServerConnection) => {
    if (!connections.has(connection)) hooks.patch(connection);
    return add(connection);
  };
  server.server.on('connection', (socket: Socket) => hooks.track(socket));
  const bound = await new Promise<number>((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(port, host, () => {
      server.server.removeListener('error', reject);
      resolve((server.server.address() as AddressInfo).port);
    });
  });
  return { server, port: bound };
}

/** Where a test server listens and what it is called in reports. */
export interface LoopbackPlace {
  /** Loopback address to listen on. Default 127.0.0.1. */
  host?: string;
  /** Port to listen on. Default: any free one. */
  port?: number;
  /** Name in reports. Default `name`, else the host. */
  label?: string;
  name?: string;
}

/** A test server's address and label, the route that reaches it, and its watched smtp-server. */
export abstract class LoopbackServer {
  readonly host: string;
  readonly label: string;
  port = 0;
  /** smtp-server's 'error' events. */
  readonly errors: Error[] = [];
  protected server!: SMTPServer;

  protected constructor(place: LoopbackPlace) {
    this.host = place.host ?? '127.0.0.1';
    this.label = place.label ?? place.name ?? this.host;
  }

  /** `{ host, port }` for a route to this server. */
  get route(): { host: string; port: number } {
    return { host: this.host, port: this.port };
  }

  /** Starts smtp-server with `options` on this.host:port, watching its connections (`patch`) and sockets (`track`). */
  protected async startSmtp(options: SMTPServerOptions, port: number): Promise<void> {
    const started = await startWatched(options, this.host, port, {
      errors: this.errors,
      patch: (connection) => this.patch(connection),
      track: (socket) => this.track(socket),
    });
    this.server = started.server;
    this.port = started.port;
  }

  protected abstract patch(connection: ServerConnection): void;
  protected abstract track(socket: Socket): void;
}
