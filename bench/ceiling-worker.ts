/**
 * The worker half of the `two-thread-ceiling` candidate (child.ts): runs the SMTPConnection
 * loop with prebuilt bytes when told to go, while the main thread runs the do-nothing transport.
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { RunSpec } from './common';
import { smtpConnectionLoop } from './smtp-loop';

const { spec } = workerData as { spec: RunSpec };
const port = parentPort!;
port.once('message', (n: number) => {
  const loop = smtpConnectionLoop(spec);
  loop.runAll(n).then(
    async (outcome) => {
      await loop.close();
      port.postMessage(outcome);
    },
    (err: unknown) => port.postMessage({ accepted: 0, failed: n, firstError: String(err) }),
  );
});
port.postMessage('ready');
