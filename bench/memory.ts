/**
 * Memory scenario, in its own process with --expose-gc: `node --expose-gc build/bench/memory.js '<MemorySpec JSON>'`.
 * One message to each of N distinct domains through one transport (a global route sends every
 * domain to the sink), so N (binding, domain) pools are created; then the pools are left to be
 * dropped for idleness. Measures memory before, after the sends, and after the drop.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport } from '../lib';
import { RESULT_PREFIX, SENDER, buildRawMessage, pump, sleep } from './common';

export interface MemorySpec {
  host: string;
  port: number;
  domains: number;
  /** ms; 0 = long enough that every pool is still live when the sends end (from the warm-up's rate). */
  idleTimeout: number;
  window: number;
  /** ms to wait after the last pool was dropped before the final measurement. */
  settleMs: number;
}

export interface Memory {
  rss: number;
  heapUsed: number;
  /** Heap V8 holds from the OS (used or not): RSS that heapUsed does not explain. */
  heapTotal: number;
  external: number;
  arrayBuffers: number;
}

export interface MemoryResult {
  idleTimeout: number;
  /** Pools already dropped (or being closed) when the sends ended. */
  droppedAtSends: number;
  before: Memory;
  afterSends: Memory;
  /** Right after the last pool was dropped (its sockets closed). */
  atDrop: Memory;
  /** settleMs later. */
  afterDrop: Memory;
  poolsAfterSends: number;
  openAfterSends: number;
  poolsAfterDrop: number;
  openAfterDrop: number;
  droppedPools: number;
  opened: number;
  closed: number;
  accepted: number;
  failed: number;
  sendMs: number;
  dropMs: number;
  peakPools: number;
  peakRss: number;
}

const RAW = buildRawMessage();

async function settle(): Promise<Memory> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error('run with node --expose-gc');
  for (let i = 0; i < 4; i++) {
    gc();
    await sleep(50);
  }
  const { rss, heapUsed, heapTotal, external, arrayBuffers } = process.memoryUsage();
  return { rss, heapUsed, heapTotal, external, arrayBuffers };
}

async function sendToDomains(transport: BindingPoolTransport, prefix: string, count: number, window: number) {
  const transporter = nodemailer.createTransport(transport);
  return pump(count, window, async (i) => {
    const info = await transporter.sendMail({ envelope: { from: SENDER, to: [`user@${prefix}${i}.example`] }, raw: RAW });
    return info.accepted.length;
  });
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]) as MemorySpec;
  const route = { host: spec.host, port: spec.port };

  // Warm up code paths (and V8's code space) on a transport of its own, so "before" is not the cold process.
  const warm = new BindingPoolTransport({ route, maxOutboundConnections: 5, idleTimeout: 60_000 });
  const warmCount = Math.min(500, spec.domains);
  const warmStarted = Date.now();
  await sendToDomains(warm, 'warm', warmCount, spec.window);
  const warmMs = Math.max(1, Date.now() - warmStarted);
  await warm.close();
  // Auto: 1.5 × the expected send time plus 3 s, so all pools are live (idle, one connection each) at the end.
  const idleTimeout = spec.idleTimeout > 0 ? spec.idleTimeout : Math.max(500, Math.ceil(((1.5 * warmMs * spec.domains) / warmCount + 3_000) / 1000) * 1000);
  const options = { route, maxOutboundConnections: 5, idleTimeout };
  console.log(`idleTimeout ${idleTimeout} ms${spec.idleTimeout > 0 ? '' : ` (auto: warm-up ran ${Math.round((warmCount / warmMs) * 1000)} msg/s)`}`);

  // The warm-up's closed connections are held by their close timers for a while too.
  await sleep(spec.settleMs);
  const before = await settle();
  const transport = new BindingPoolTransport(options);
  let closed = 0;
  transport.on('connectionClosed', () => closed++);
  let peakPools = 0;
  let peakRss = 0;
  // stats() walks every pool: sample once a second so the sampling does not weigh on the sends.
  const sampler = setInterval(() => {
    peakPools = Math.max(peakPools, transport.stats().pools.length);
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
  }, 1_000);

  const started = Date.now();
  const outcome = await sendToDomains(transport, 'm', spec.domains, spec.window);
  const sendMs = Date.now() - started;
  const sendsDone = Date.now();
  const statsAfterSends = transport.stats();
  const droppedAtSends = spec.domains - statsAfterSends.pools.length;
  peakPools = Math.max(peakPools, statsAfterSends.pools.length);
  const afterSends = await settle();
  const poolsAfterSends = statsAfterSends.pools.length;
  const openAfterSends = statsAfterSends.pools.reduce((sum, p) => sum + p.open, 0);
  console.log(
    `sent ${outcome.accepted}/${spec.domains} in ${sendMs} ms; ${poolsAfterSends} pools live, ${openAfterSends} connections open; waiting for the idle drop`,
  );

  // The pools go after idleTimeout; wait until every one is dropped and its sockets are closed.
  const deadline = Date.now() + idleTimeout * 2 + 60_000;
  let stats = transport.stats();
  while ((stats.pools.length > 0 || stats.droppedPools.pools < spec.domains) && Date.now() < deadline) {
    await sleep(100);
    stats = transport.stats();
  }
  const dropMs = Date.now() - sendsDone;
  clearInterval(sampler);
  peakRss = Math.max(peakRss, process.memoryUsage.rss());
  const atDrop = await settle();
  // A closed connection stays reachable for a while from timers its close armed (2 s in
  // lib/smtp/connection.ts): measure again once those have run.
  await sleep(spec.settleMs);
  const afterDrop = await settle();

  const result: MemoryResult = {
    idleTimeout,
    droppedAtSends,
    before,
    afterSends,
    atDrop,
    afterDrop,
    poolsAfterSends,
    openAfterSends,
    poolsAfterDrop: stats.pools.length,
    openAfterDrop: stats.pools.reduce((sum, p) => sum + p.open, 0),
    droppedPools: stats.droppedPools.pools,
    opened: stats.droppedPools.opened + stats.pools.reduce((sum, p) => sum + p.opened, 0),
    closed,
    accepted: outcome.accepted,
    failed: outcome.failed,
    sendMs,
    dropMs,
    peakPools,
    peakRss,
  };
  if (outcome.failed > 0) console.log(`!! ${outcome.failed} sends failed, first: ${outcome.firstError}`);
  process.stdout.write(RESULT_PREFIX + JSON.stringify(result) + '\n');
  await transport.close();
}

main().catch((err: unknown) => {
  process.stderr.write(`memory scenario failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
