/** Per-test setup shared by the test files: servers and transports closed after each test. */
import type { BindingPoolOptions, BindingPoolSendError, BindingPoolSentMessageInfo } from '../../lib';
import { PolicyServer, type PolicyServerOptions } from './policy-server';
import { RecordingServer, type Behaviour } from './recording-server';
import { makeTransport } from './send';

/**
 * Registers an afterEach that closes what the test opened, whether it passed or not (transports
 * first, they QUIT; then the servers), and returns the functions that open them.
 */
export function closedAfterEach() {
  const cleanups: (() => Promise<unknown>)[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });
  return {
    /** Runs `close` after the test. */
    onCleanup(close: () => Promise<unknown>): void {
      cleanups.push(close);
    },
    /** A PolicyServer (per-IP caps, refusals, replies at MAIL FROM, timestamps), stopped after the test. */
    async policyServer(options: PolicyServerOptions = {}): Promise<PolicyServer> {
      const server = await PolicyServer.start(options);
      cleanups.push(() => server.stop());
      return server;
    },
    async startServer(behaviour: Behaviour = {}, port = 0): Promise<RecordingServer> {
      const server = await RecordingServer.start('127.0.0.1', behaviour, port);
      cleanups.push(() => server.stop());
      return server;
    },
    transport(options: BindingPoolOptions): ReturnType<typeof makeTransport> {
      const made = makeTransport(options);
      cleanups.push(() => made.pool.close());
      return made;
    },
  };
}

/** The error a send rejected with; fails the test when it resolved. */
export async function rejection(sending: Promise<BindingPoolSentMessageInfo>): Promise<BindingPoolSendError> {
  return sending.then(
    (info) => {
      throw new Error(`expected the send to fail, it resolved with ${JSON.stringify(info.accepted)} accepted`);
    },
    (err: BindingPoolSendError) => err,
  );
}

/**
 * Figures a test file prints once it is done (the numbers a closing note quotes): returns
 * `note(name, values)`, which adds a line `- name: key value, …`.
 */
export function printedFigures(title: string): (name: string, values: Record<string, unknown>) => void {
  const figures: string[] = [];
  afterAll(() => console.log(`${title}:\n${figures.join('\n')}`));
  return (name, values) => {
    figures.push(
      `- ${name}: ${Object.entries(values)
        .map(([k, v]) => `${k} ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`)
        .join(', ')}`,
    );
  };
}
