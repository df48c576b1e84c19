/**
 * Soak: nothing lost, nothing duplicated, at volume. 20 000 messages (1–4 recipients each) over
 * 10 destination domains from a group of 3 bindings (127.0.0.2–.4), against one FaultServer per
 * domain on loopback that injects every kind of fault at random (greeting refusals and stalls,
 * STARTTLS refusals and broken handshakes, Exim's 421 after k messages, RCPT 4xx/5xx/452/421,
 * drops after MAIL, after RCPT, at DATA, mid-message and after the dot, stalls at RCPT and after
 * the dot, drops and stalls at the RSET after a failed transaction, and server restarts). Every fault is drawn from SOAK_SEED (printed), so a failure can
 * be replayed: `SOAK_SEED=<seed> npm run soak`.
 *
 * Prints messages sent; recipients accepted / rejected / pending; duplicates and lost (both must
 * be 0: the process exits 1 otherwise); connections opened and retired by reason; the faults the
 * servers injected; peak RSS. Then every other invariant of test/support/invariants.ts.
 *
 *   npm run soak
 *   SOAK_SEED=42 SOAK_MESSAGES=5000 SOAK_WINDOW=100 npm run soak
 *   SOAK_THREAD=1 npm run soak     # with deliveryThread: true
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import nodemailer, { type Transporter } from 'nodemailer';
import { BindingPoolTransport, type BindingPoolOptions, type BindingPoolSentMessageInfo } from '../lib';
import { FaultServer, chance, mulberry32, type FaultPlan } from '../test/support/fault-server';
import { InvariantChecker, type Limits } from '../test/support/invariants';

const SEED = Number(process.env.SOAK_SEED ?? Math.floor(Math.random() * 2 ** 31));
const MESSAGES = Number(process.env.SOAK_MESSAGES ?? 20_000);
const WINDOW = Number(process.env.SOAK_WINDOW ?? 200);
/** SOAK_THREAD=1: deliveryThread: true (the delivery engine in a worker thread). */
const THREAD = process.env.SOAK_THREAD === '1';
/** No send settling for this long while some are in flight is a hang: reported, and the run fails. */
const HANG_MS = Number(process.env.SOAK_HANG_MS ?? 30_000);
const DOMAINS = Array.from({ length: 10 }, (_, i) => `d${i}.soak.test`);
const BINDINGS = { b1: '127.0.0.2', b2: '127.0.0.3', b3: '127.0.0.4' };
const LIMITS: Limits = { maxDeliveriesPerConnection: 20, maxRecipientsPerConnection: 40, maxRecipientsPerTransaction: 10, maxOutboundConnections: 3 };

const fixtures = path.resolve(__dirname, '../../test/fixtures');
const tls = { key: readFileSync(path.join(fixtures, 'mx-test.key')), cert: readFileSync(path.join(fixtures, 'mx-test.crt')) };

/** Rare faults of every kind, each decision drawn from the seed and a key naming it. */
function plan(seed: number, domainIndex: number): FaultPlan {
  const p = (key: string) => chance(seed, key);
  return {
    // Half the domains are Exim-like: 421 after 15 messages on a connection (the client's limit is 20).
    messagesPerConnection: domainIndex % 2 === 0 ? 15 : undefined,
    greeting: ({ server, connection }) => {
      const x = p(`${server.label}|greeting|${connection.n}`);
      if (x < 0.005) return { code: 421, message: '4.3.2 too busy' };
      if (x < 0.007) return { code: 554, message: '5.7.1 no service' };
      return x < 0.008 ? 'stall' : undefined;
    },
    starttls: ({ server, connection }) => {
      const x = p(`${server.label}|starttls|${connection.n}`);
      return x < 0.01 ? 'refuse' : x < 0.013 ? 'break' : undefined;
    },
    mail: ({ server, transaction }) => {
      const x = p(`${server.label}|mail|${transaction!.n}`);
      return x < 0.003 ? 'dropAfter' : x < 0.005 ? { code: 421, message: '4.3.2 shutting down' } : undefined;
    },
    rcpt: ({ server, rcpt, rcptSeen }) => {
      const x = p(`${server.label}|rcpt|${rcpt}|${rcptSeen}`);
      if (x < 0.01) return { code: 550, message: '5.1.1 no such user' };
      if (x < 0.02) return { code: 450, message: '4.2.1 mailbox busy' };
      if (x < 0.025) return { code: 452, message: '4.5.3 too many recipients' };
      if (x < 0.026) return { code: 421, message: '4.3.2 shutting down' };
      if (x < 0.028) return 'dropAfter';
      return x < 0.0282 ? 'stall' : undefined;
    },
    dataCommand: ({ server, transaction }) => (p(`${server.label}|datacmd|${transaction!.n}`) < 0.002 ? 'drop' : undefined),
    data: ({ server, transaction }) => {
      const x = p(`${server.label}|data|${transaction!.n}`);
      if (x < 0.005) return { code: 451, message: '4.3.0 try later' };
      if (x < 0.01) return { code: 554, message: '5.6.0 content rejected' };
      if (x < 0.012) return 'dropMidData';
      if (x < 0.015) return 'dropAfterDot';
      return x < 0.0155 ? 'stallAfterDot' : undefined;
    },
    rset: ({ server, connection }) => {
      const x = p(`${server.label}|rset|${connection.n}|${connection.transactions.length}`);
      return x < 0.01 ? 'drop' : x < 0.012 ? 'stall' : undefined;
    },
    onTransaction: ({ server, transaction }) => {
      if (p(`${server.label}|restart|${transaction!.n}`) < 0.0003) void server.restart();
    },
  };
}

function messages(seed: number): { subject: string; to: string[] }[] {
  const rng = mulberry32(seed);
  return Array.from({ length: MESSAGES }, (_, i) => {
    const count = 1 + Math.floor(rng() * 4);
    const to = Array.from({ length: count }, (_, j) => `u${Math.floor(rng() * 5_000)}.m${i}r${j}@${DOMAINS[Math.floor(rng() * DOMAINS.length)]}`);
    return { subject: `soak-${i}`, to };
  });
}

async function main(): Promise<number> {
  console.log(
    `soak: SOAK_SEED=${SEED}, ${MESSAGES} messages, window ${WINDOW}, ${DOMAINS.length} domains × ${Object.keys(BINDINGS).length} bindings${THREAD ? ', deliveryThread' : ''}`,
  );
  const started = Date.now();
  const servers = await Promise.all(
    DOMAINS.map((domain, i) => FaultServer.start({ label: domain, name: domain, plan: plan(SEED, i), tls: i < 5 ? tls : undefined })),
  );
  const options: BindingPoolOptions = {
    ...LIMITS,
    deliveryThread: THREAD,
    dnsServers: ['127.0.0.1:1'],
    greetingTimeout: 1_000,
    socketTimeout: 1_000,
    connectionTimeout: 3_000,
    connectBackoff: 20,
    maxConnectBackoff: 200,
    acquireTimeout: 60_000,
    bindings: Object.fromEntries(Object.entries(BINDINGS).map(([name, localAddress]) => [name, { localAddress, name: `${name}.soak.test` }])),
    bindingGroups: { all: { bindings: Object.keys(BINDINGS) } },
    defaultBinding: 'all',
    domains: Object.fromEntries(
      DOMAINS.map((d, i) => [d, { route: { ...servers[i].route, ...(i < 5 ? { tls: { ca: tls.cert, servername: 'relay.test' } } : {}) } }]),
    ),
  };
  const pool = new BindingPoolTransport(options);
  const transporter = nodemailer.createTransport(pool);
  const checker = new InvariantChecker(pool, servers, LIMITS, 50);

  const queue = messages(SEED);
  let done = 0;
  let lastDone = 0;
  let lastProgressAt = Date.now();
  const inFlight = new Map<string, { to: string[]; since: number }>();
  const progress = setInterval(() => {
    console.log(`  ${done} / ${MESSAGES} sent, ${checker.summaries.length} connections closed, rss ${mib(process.memoryUsage.rss())} MiB`);
    if (done !== lastDone) {
      lastDone = done;
      lastProgressAt = Date.now();
    } else if (Date.now() - lastProgressAt > HANG_MS) {
      // A send that never settles loses its recipients: show what it is stuck on, and fail.
      console.log(`HANG: no send settled for ${HANG_MS} ms; ${inFlight.size} in flight`);
      for (const [subject, { to, since }] of inFlight) {
        console.log(`  ${subject} (${Date.now() - since} ms): ${to.join(', ')}`);
        for (const server of servers) {
          for (const c of server.connections.filter((x) => x.transactions.some((t) => t.rcptAttempts.some((r) => to.includes(r))))) {
            console.log(
              `    ${server.label} (restarts ${server.restarts}) conn ${c.n} ${c.id} from ${c.remoteAddress} gen ${c.generation} closed=${c.closed} faults=${c.faults}:`,
            );
            console.log(`      trail: ${c.trail.join(' | ')}`);
            for (const t of c.transactions) {
              const mine = t.rcptAttempts.some((r) => to.includes(r)) ? ' ←' : '';
              console.log(
                `      tx ${t.n} ${t.subject ?? '?'} rcpt ${t.rcptAttempts.length}/${t.rcptAccepted.length} received=${t.received} reply=${t.dataReply} faults=${t.faults}${mine}`,
              );
            }
          }
        }
      }
      console.log(`  pools busy or waiting: ${JSON.stringify(pool.stats().pools.filter((p) => p.busy > 0 || p.waiting > 0))}`);
      console.log(`FAIL: hung; replay with SOAK_SEED=${SEED}${THREAD ? ' SOAK_THREAD=1' : ''}`);
      process.exit(1);
    }
  }, 5_000);
  await Promise.all(
    Array.from({ length: WINDOW }, async () => {
      for (let m = queue.shift(); m; m = queue.shift()) {
        inFlight.set(m.subject, { to: m.to, since: Date.now() });
        await checker.send(
          transporter as Transporter<BindingPoolSentMessageInfo>,
          { from: 'sender@example.com', to: m.to, subject: m.subject, text: `soak message ${m.subject}\n` },
          m.to,
        );
        inFlight.delete(m.subject);
        done++;
      }
    }),
  );
  clearInterval(progress);
  const sendMs = Date.now() - started;
  const { violations, figures } = await checker.finish(transporter as Transporter<BindingPoolSentMessageInfo>, 10_000);
  const totals = pool.stats().droppedPools;
  await Promise.all(servers.map((s) => s.stop()));

  // Heap after close(), with and without this harness's own records (every result, every
  // server-side transaction), to tell the transport's memory from the bookkeeping's.
  const heapWithRecords = heapAfterGc();
  const records = checker.sends.length;
  checker.sends.length = 0;
  checker.summaries.length = 0;
  for (const server of servers) server.clearRecords();
  const heapWithoutRecords = heapAfterGc();

  const restarts = servers.reduce((n, s) => n + s.restarts, 0);
  console.log(`
seed                      ${SEED}   (replay: SOAK_SEED=${SEED} npm run soak)
messages sent             ${figures.sends} in ${(sendMs / 1000).toFixed(1)} s (${Math.round(figures.sends / (sendMs / 1000))} msg/s)
recipients                ${figures.recipients}
  accepted                ${figures.accepted}
  rejected                ${figures.rejected}
  pending                 ${figures.pending} (of which "outcome unknown": ${figures.unknown})
duplicates                ${figures.duplicates}
lost                      ${figures.lost}
connections opened        ${figures.connectionsOpened} (server saw ${figures.serverConnections}, incl. refused/failed setups; client connect failures ${totals.connectFailures})
retired by reason         ${JSON.stringify(figures.retired)}
server transactions       ${figures.serverTransactions}, restarts ${restarts}
faults injected           ${JSON.stringify(figures.faults)}
peak open per pool        client stats() ${figures.peakClientOpen}, server per source address ${figures.peakServerConcurrency} (limit ${LIMITS.maxOutboundConnections})
peak RSS                  ${mib(process.resourceUsage().maxRSS * 1024)} MiB (whole process: transport, 10 servers and this harness's records)
heap after close()        ${mib(heapWithRecords)} MiB with the ${records} send records and server records, ${mib(heapWithoutRecords)} MiB without them
other invariants          ${violations.length === 0 ? 'all held' : `${violations.length} violation(s)`}`);
  for (const line of violations.slice(0, 20)) console.log(`  ✗ ${line}`);
  if (figures.duplicates !== 0 || figures.lost !== 0) {
    console.log(`FAIL: ${figures.duplicates} duplicate(s), ${figures.lost} lost; replay with SOAK_SEED=${SEED}`);
    return 1;
  }
  if (violations.length > 0) {
    console.log(`FAIL: invariant violations; replay with SOAK_SEED=${SEED}`);
    return 1;
  }
  console.log('OK: nothing lost, nothing duplicated');
  return 0;
}

/** heapUsed after a full collection (gc exposed at run time). */
function heapAfterGc(): number {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  gc();
  gc();
  return process.memoryUsage().heapUsed;
}

function mib(bytes: number): string {
  return (bytes / 1024 / 1024).toFixed(0);
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err);
    process.exit(2);
  },
);
