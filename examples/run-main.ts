import type { AddressInfo } from 'node:net';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';

/** Runs an example's main(): exits with the code it returns, or 1 (with the error) when it throws. */
export function runMain(main: () => Promise<number>): void {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}

/** A loopback SMTP server an example started, and how to reach and stop it. */
export interface LoopbackSmtp {
  server: SMTPServer;
  port: number;
  route: { host: string; port: number };
  close(): Promise<void>;
}

/**
 * An SMTP server on 127.0.0.1, on a free port (plain text, no AUTH, no reverse lookups), with
 * the example's own handlers: what the examples' receivers have in common.
 */
export async function startLoopbackSmtp(handlers: Pick<SMTPServerOptions, 'onMailFrom' | 'onRcptTo' | 'onData'>): Promise<LoopbackSmtp> {
  const server = new SMTPServer({ disableReverseLookup: true, authOptional: true, logger: false, disabledCommands: ['STARTTLS'], ...handlers });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const port = (server.server.address() as AddressInfo).port;
  return { server, port, route: { host: '127.0.0.1', port }, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

/**
 * An SMTP server on 127.0.0.1 that accepts every message after `delayMs` (a slow receiver when
 * large), for the examples that only need somewhere to deliver.
 */
export async function startSlowSink(delayMs: number): Promise<{ server: SMTPServer; route: { host: string; port: number } }> {
  return startLoopbackSmtp({
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => setTimeout(() => callback(null, 'Ok'), delayMs));
    },
  });
}
