import type { AddressInfo } from 'node:net';
import { SMTPServer } from 'smtp-server';

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

/**
 * An SMTP server on 127.0.0.1 that accepts every message after `delayMs` (a slow receiver when
 * large), for the examples that only need somewhere to deliver.
 */
export async function startSlowSink(delayMs: number): Promise<{ server: SMTPServer; route: { host: string; port: number } }> {
  const server = new SMTPServer({
    disableReverseLookup: true,
    authOptional: true,
    logger: false,
    disabledCommands: ['STARTTLS'],
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => setTimeout(() => callback(null, 'Ok'), delayMs));
    },
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return { server, route: { host: '127.0.0.1', port: (server.server.address() as AddressInfo).port } };
}
