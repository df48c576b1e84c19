/**
 * Entry point of the delivery thread (see engine/thread.ts): a LocalEngine fed with jobs from the
 * application's thread, answering with results and stats, batched per event-loop turn.
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { DomainResult } from '../delivery/deliver';
import { LocalEngine } from './local';
import { STATS_INTERVAL_MS, type FromWorker, type ToWorker } from './protocol';
import { BindingPoolError, describeError } from '../errors';
import type { BindingPoolOptions } from '../policy/options';

type Result = Extract<FromWorker, { type: 'results' }>['results'][number];

const port = parentPort!;
const engine = new LocalEngine((workerData as { options: BindingPoolOptions }).options);
let results: Result[] = [];
let flushScheduled = false;
let lastStatsAt = 0;

engine.on('connectionClosed', (summary) => port.postMessage({ type: 'connectionClosed', summary } satisfies FromWorker));
// With the stats of that moment, so that stats() in the application's thread shows the suspension.
for (const name of ['suspended', 'resumed'] as const) {
  engine.on(name, (event) => port.postMessage({ type: 'event', name, event, stats: engine.stats() } satisfies FromWorker));
}

function settle(result: Result, final = false): void {
  results.push(result);
  // Stats are costly with many pools: sent with at most one batch per interval, and at the end.
  if (final) flush(true);
  else if (!flushScheduled) {
    flushScheduled = true;
    setImmediate(() => flush(false));
  }
}

function flush(forceStats: boolean): void {
  flushScheduled = false;
  if (results.length === 0) return;
  const now = Date.now();
  const withStats = forceStats || now - lastStatsAt >= STATS_INTERVAL_MS;
  if (withStats) lastStatsAt = now;
  const batch = results;
  results = [];
  // The main thread keeps its last stats when a batch carries none.
  port.postMessage({ type: 'results', results: batch, stats: withStats ? engine.stats() : undefined } satisfies FromWorker);
}

function failure(err: unknown): Result['error'] {
  return { message: describeError(err), code: err instanceof BindingPoolError ? err.code : undefined };
}

port.on('message', (message: ToWorker) => {
  switch (message.type) {
    case 'jobs':
      for (const { id, job, offset, length } of message.jobs) {
        const { bytes } = message;
        engine.deliver({ ...job, message: Buffer.from(bytes.buffer, bytes.byteOffset + offset, length) }).then(
          (domains: DomainResult[]) => settle({ id, domains }),
          (err) => settle({ id, error: failure(err) }),
        );
      }
      break;
    case 'verify':
      engine.verify().then(
        () => settle({ id: message.id }),
        (err) => settle({ id: message.id, error: failure(err) }),
      );
      break;
    case 'close':
      engine.close().then(
        () => settle({ id: message.id }, true),
        (err) => settle({ id: message.id, error: failure(err) }, true),
      );
      break;
  }
});
