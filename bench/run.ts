/**
 * Benchmark harness: starts an SMTP sink on loopback, runs every candidate of every chosen
 * scenario ALTERNATELY (A B C D, A B C D, …) for a number of rounds, each round in a fresh child
 * process, and prints per scenario the median rate, the ratio to Nodemailer's pool, CPU time, peak
 * RSS and connections opened. Then the memory scenario, the big-queue scenario when named, and
 * optionally a CPU profile.
 *
 *   npm run bench                         all scenarios, full counts, 5 rounds
 *   BENCH_QUICK=1 npm run bench           small counts, 2 rounds
 *   npm run bench -- one-domain limit-100 chosen scenarios (or BENCH_SCENARIOS=a,b)
 *   npm run bench -- --sends 5000 --rounds 7 --window 200 --md out.md --profile
 *   npm run bench -- real-mix             the realistic size mix (bench/mix.ts)
 *   npm run bench -- big-queue            200 queued 20 MiB messages, memory (only when named)
 *
 * See bench/README.md.
 */
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import type { Readable } from 'node:stream';
import nodemailer from 'nodemailer';
import os from 'node:os';
import path from 'node:path';
import {
  BASELINE,
  BIG_QUEUE_SCENARIO,
  MEMORY_SCENARIO,
  RESULT_PREFIX,
  SCENARIOS,
  bigQueueMail,
  median,
  type CandidateName,
  type RunResult,
  type RunSpec,
  type Scenario,
} from './common';
import { startSink, type Sink } from './sink';
import { compareProfiles, formatProfileSummary, summarizeProfile, type CpuProfile, type NamedSummary } from './cpuprofile';
import type { MemoryResult, MemorySpec } from './memory';
import type { BigQueueCandidate, BigQueueResult, BigQueueSpec } from './big-queue';
import { MIX_CLASSES, MIX_DESCRIPTION, mixTotals, mixVariantSizes } from './mix';

interface Settings {
  scenarios: string[];
  /** Warm-up sends per candidate round (`--warmup`); unset, a tenth of the round. */
  warmup?: number;
  quick: boolean;
  rounds: number;
  sends: number | undefined;
  window: number;
  md: string | undefined;
  profile: boolean;
  sink: 'smtp-sink' | 'smtp-server' | undefined;
  memoryDomains: number;
  memoryIdleMs: number;
  childTimeoutMs: number;
  big: {
    count: number;
    attachment: 'path' | 'buffer';
    mib: number;
    rssLimitMiB: number;
    deadlineS: number;
    candidates: BigQueueCandidate[];
    /** > 0: a sink of its own that waits this many seconds before answering DATA (smtp-sink -w): a slow receiver. */
    sinkWaitS: number;
  };
}

const BIG_QUEUE_CANDIDATES: BigQueueCandidate[] = ['binding-pool', 'binding-pool-thread', 'nodemailer-pool'];

function parseSettings(argv: string[]): Settings {
  const env = process.env;
  const flag = (name: string): string | undefined => {
    const i = argv.indexOf(`--${name}`);
    if (i < 0) return undefined;
    const value = argv[i + 1];
    argv.splice(i, 2);
    return value;
  };
  const bool = (name: string): boolean => {
    const i = argv.indexOf(`--${name}`);
    if (i < 0) return false;
    argv.splice(i, 1);
    return true;
  };
  const int = (value: string | undefined, fallback: number): number => (value === undefined || value === '' ? fallback : Number.parseInt(value, 10));
  const quick = bool('quick') || env.BENCH_QUICK === '1';
  const profile = bool('profile') || env.BENCH_PROFILE === '1';
  const sendsText = flag('sends') ?? env.BENCH_SENDS ?? env.BENCH_MESSAGES;
  const warmupText = flag('warmup') ?? env.BENCH_WARMUP;
  const settings: Settings = {
    quick,
    profile,
    rounds: int(flag('rounds') ?? env.BENCH_ROUNDS, quick ? 2 : 5),
    sends: sendsText ? int(sendsText, 0) : undefined,
    window: int(flag('window') ?? env.BENCH_WINDOW, 100),
    md: flag('md') ?? env.BENCH_MD,
    sink: (flag('sink') ?? env.BENCH_SINK) as Settings['sink'],
    memoryDomains: int(flag('memory-domains') ?? env.BENCH_MEMORY_DOMAINS, quick ? 1_000 : 10_000),
    // 0: long enough that every pool is still live when the sends end (sized from the warm-up's rate).
    memoryIdleMs: int(flag('memory-idle') ?? env.BENCH_MEMORY_IDLE_MS, 0),
    // Sends on the warm-up instance; unset, a tenth of the round (50 to 1 000).
    warmup: warmupText === undefined ? undefined : int(warmupText, 0),
    childTimeoutMs: int(env.BENCH_CHILD_TIMEOUT_MS, 180_000),
    big: {
      count: int(flag('big-count') ?? env.BENCH_BIG_COUNT, quick ? 20 : 200),
      attachment: (flag('big-attach') ?? env.BENCH_BIG_ATTACH ?? 'path') as 'path' | 'buffer',
      mib: int(flag('big-mib') ?? env.BENCH_BIG_MIB, 20),
      // ~8 GiB, or 60 % of the machine's memory when it has less than ~13 GiB.
      rssLimitMiB: int(flag('big-rss-limit') ?? env.BENCH_BIG_RSS_LIMIT_MIB, Math.min(8192, Math.floor((os.totalmem() / 2 ** 20) * 0.6))),
      deadlineS: int(flag('big-deadline') ?? env.BENCH_BIG_DEADLINE_S, 300),
      sinkWaitS: int(flag('big-sink-wait') ?? env.BENCH_BIG_SINK_WAIT_S, 0),
      candidates: (flag('big-candidates') ?? env.BENCH_BIG_CANDIDATES ?? 'binding-pool,nodemailer-pool')
        .split(',')
        .map((c) => c.trim())
        .filter(Boolean) as BigQueueCandidate[],
    },
    scenarios: [],
  };
  if (!['path', 'buffer'].includes(settings.big.attachment)) throw new Error(`--big-attach must be path or buffer, got ${settings.big.attachment}`);
  for (const c of settings.big.candidates) {
    if (!BIG_QUEUE_CANDIDATES.includes(c)) throw new Error(`unknown big-queue candidate ${JSON.stringify(c)}; known: ${BIG_QUEUE_CANDIDATES.join(', ')}`);
  }
  const named = argv.filter((a) => !a.startsWith('--'));
  const fromEnv = env.BENCH_SCENARIOS
    ? env.BENCH_SCENARIOS.split(',')
        .map((s) => s.trim())
        .filter(Boolean)
    : [];
  const chosen = named.length > 0 ? named : fromEnv;
  const all = [...SCENARIOS.map((s) => s.name), MEMORY_SCENARIO.name];
  // big-queue takes several GiB: it runs only when named.
  const known = [...all, BIG_QUEUE_SCENARIO.name];
  settings.scenarios =
    chosen.length === 0 || chosen.includes('all')
      ? [...all, ...chosen.filter((name) => name === BIG_QUEUE_SCENARIO.name)]
      : chosen.filter((name) => name !== 'profile');
  // `profile` as a name runs only the profile (with others, like --profile, it comes last).
  if (chosen.includes('profile')) settings.profile = true;
  for (const name of settings.scenarios) {
    if (!known.includes(name)) throw new Error(`unknown scenario ${JSON.stringify(name)}; known: ${[...known, 'profile'].join(', ')}`);
  }
  return settings;
}

const childScript = (name: string): string => path.join(__dirname, name);

/** The resident set of a process, bytes, from /proc (undefined when it cannot be read). */
function rssOf(pid: number): number | undefined {
  try {
    const match = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Runs a child script and returns its stdout lines; rejects on a non-zero exit or timeout. With
 * `rssKillBytes`, the child's RSS is watched (every 200 ms) and the child killed past it.
 */
function runChild(script: string, args: string[], nodeFlags: string[], timeoutMs: number, rssKillBytes?: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...nodeFlags, childScript(script), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const timer = setTimeout(() => {
      stderr += `\n(killed after ${timeoutMs} ms)`;
      child.kill('SIGKILL');
    }, timeoutMs);
    const watchdog =
      rssKillBytes === undefined || child.pid === undefined
        ? undefined
        : setInterval(() => {
            const rss = rssOf(child.pid!);
            if (rss !== undefined && rss > rssKillBytes) {
              stderr += `\n(killed by the parent's RSS guard at ${Math.round(rss / 2 ** 20)} MiB)`;
              child.kill('SIGKILL');
            }
          }, 200);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (watchdog) clearInterval(watchdog);
      if (code === 0) resolve(stdout.split('\n'));
      else reject(new Error(`${script} exited with ${code ?? signal}: ${stderr.trim().split('\n').slice(-5).join(' | ')}`));
    });
  });
}

interface Round {
  result: RunResult;
  sinkSessions: number;
  sinkMessages: number;
}

function sendsFor(scenario: Scenario, settings: Settings): number {
  if (settings.sends !== undefined && scenario.shape !== 'fanout') return settings.sends;
  return settings.quick ? scenario.sends.quick : scenario.sends.full;
}

/** The real-mix workload of one round, added up from the composed size of each variant (bench/mix.ts). */
interface MixFigures {
  /** Composed bytes of the measured sends (every send accepted). */
  bytes: number;
  perClass: number[];
  line: string;
}

async function mixFigures(sends: number): Promise<MixFigures> {
  const sizes = await mixVariantSizes();
  const { bytes, perClass } = mixTotals(sends, sizes);
  const kib = (b: number): string => (b / 1024).toFixed(1);
  const classes = MIX_CLASSES.map((c, k) => {
    const row = sizes[k];
    return `${perClass[k]} ${c.name} (${kib(Math.min(...row))}–${kib(Math.max(...row))} KiB)`;
  });
  const line = `mix per round: ${classes.join(', ')}; ${(bytes / 1e6).toFixed(1)} MB composed, mean ${kib(bytes / sends)} KiB per message`;
  return { bytes, perClass, line };
}

/** MB/s (10^6 bytes) of one round of the mix: its composed bytes in proportion to the recipients accepted. */
const roundMBps = (result: RunResult, mix: MixFigures): number => (mix.bytes * (result.accepted / Math.max(1, result.expected))) / result.ms / 1000;

async function runScenario(scenario: Scenario, settings: Settings, sink: Sink, mix?: MixFigures): Promise<Map<CandidateName, Round[]>> {
  const sends = sendsFor(scenario, settings);
  const warmupSends = settings.warmup ?? (scenario.shape === 'fanout' ? 1 : Math.min(1_000, Math.max(50, Math.floor(sends / 10))));
  const window = scenario.window === 'all' ? sends : settings.window;
  const rounds = new Map<CandidateName, Round[]>(scenario.candidates.map((c) => [c, []]));
  console.log(`\n=== ${scenario.name}: ${scenario.title}`);
  console.log(
    `    ${sends} sends per round (+${warmupSends} warm-up on a separate instance), window ${window === sends ? 'all' : window}, ${settings.rounds} rounds, candidates alternate`,
  );
  if (mix) console.log(`    ${mix.line}`);
  for (let round = 1; round <= settings.rounds; round++) {
    const line: string[] = [];
    for (const candidate of scenario.candidates) {
      const spec: RunSpec = {
        scenario: scenario.name,
        candidate,
        shape: scenario.shape,
        message: scenario.message,
        limit: scenario.limit,
        sends,
        warmupSends,
        window,
        host: sink.host,
        port: sink.port,
        round,
      };
      const before = await sink.settledCounters();
      const lines = await runChild('child.js', [JSON.stringify(spec)], [], settings.childTimeoutMs);
      const after = await sink.settledCounters();
      const resultLine = lines.find((l) => l.startsWith(RESULT_PREFIX));
      if (!resultLine) throw new Error(`${candidate} printed no result`);
      const result = JSON.parse(resultLine.slice(RESULT_PREFIX.length)) as RunResult;
      if (result.failed > 0 || result.accepted !== result.expected) {
        console.log(
          `    !! ${candidate} round ${round}: ${result.accepted}/${result.expected} accepted, ${result.failed} failed sends${result.firstError ? ` (first: ${result.firstError})` : ''}`,
        );
      }
      rounds.get(candidate)!.push({ result, sinkSessions: after.sessions - before.sessions, sinkMessages: after.messages - before.messages });
      line.push(`${candidate} ${Math.round(result.rate)}${mix ? ` (${roundMBps(result, mix).toFixed(1)} MB/s)` : ''}`);
    }
    console.log(`    round ${round}: ${line.join('  ')}  (${unit(scenario)})`);
  }
  return rounds;
}

const unit = (scenario: Scenario): string => (scenario.shape === 'fanout' ? 'rcpt/s' : 'msg/s');

interface Row {
  candidate: CandidateName;
  rate: number;
  min: number;
  max: number;
  ratio: number;
  ratioToNoop: number;
  /** real-mix: median MB/s. */
  mbps?: number;
  cpuMs: number;
  cpuUsPerRcpt: number;
  rssMiB: number;
  connections: string;
  sink: string;
  failures: number;
}

function tabulate(scenario: Scenario, rounds: Map<CandidateName, Round[]>, mix?: MixFigures): Row[] {
  const medianRate = (c: CandidateName): number => median((rounds.get(c) ?? []).map((r) => r.result.rate));
  const baseline = medianRate(BASELINE);
  const noop = medianRate('noop-transport');
  return scenario.candidates.map((candidate) => {
    const list = rounds.get(candidate)!;
    const rates = list.map((r) => r.result.rate);
    const cpu = list.map((r) => r.result.cpuUserMs + r.result.cpuSystemMs);
    const counted = median(list.map((r) => r.result.connections));
    const own = list[0]?.result.ownConnections !== undefined ? median(list.map((r) => r.result.ownConnections ?? 0)) : undefined;
    const connections =
      candidate === 'noop-transport'
        ? 'n/a (none)'
        : candidate === 'two-thread-ceiling'
          ? 'n/a (its worker; see sink)'
          : own !== undefined
            ? `${counted} (stats: ${own})`
            : String(counted);
    return {
      candidate,
      rate: medianRate(candidate),
      min: Math.min(...rates),
      max: Math.max(...rates),
      ratio: medianRate(candidate) / baseline,
      ratioToNoop: medianRate(candidate) / noop,
      ...(mix && { mbps: median(list.map((r) => roundMBps(r.result, mix))) }),
      cpuMs: median(cpu),
      cpuUsPerRcpt: median(list.map((r) => ((r.result.cpuUserMs + r.result.cpuSystemMs) * 1000) / Math.max(1, r.result.accepted))),
      rssMiB: median(list.map((r) => r.result.peakRssMiB)),
      connections,
      sink: `${median(list.map((r) => r.sinkSessions))} / ${median(list.map((r) => r.sinkMessages))}`,
      failures: list.reduce((sum, r) => sum + r.result.failed + (r.result.expected - r.result.accepted), 0),
    };
  });
}

function formatTable(scenario: Scenario, rows: Row[], sends: number, messageBytes: number, mix?: MixFigures): string {
  const u = unit(scenario);
  const header = [
    `candidate`,
    `median ${u}`,
    `min–max`,
    ...(mix ? ['median MB/s'] : []),
    `× ${BASELINE}`,
    `× noop`,
    `CPU ms`,
    `CPU µs/rcpt`,
    `peak RSS MiB`,
    `connections opened`,
    `sink sess / txns`,
    `failures`,
  ];
  const body = rows.map((r) => [
    r.candidate,
    fmt(r.rate),
    `${fmt(r.min)}–${fmt(r.max)}`,
    ...(mix ? [(r.mbps ?? NaN).toFixed(1)] : []),
    r.ratio.toFixed(2),
    Number.isFinite(r.ratioToNoop) ? r.ratioToNoop.toFixed(2) : 'n/a',
    fmt(r.cpuMs),
    r.cpuUsPerRcpt.toFixed(0),
    r.rssMiB.toFixed(0),
    r.connections,
    r.sink,
    String(r.failures),
  ]);
  const lines = [
    `#### ${scenario.name} — ${scenario.title}`,
    '',
    mix
      ? `${sends} sends × 1 recipient, composed by Nodemailer: ${MIX_DESCRIPTION}; ${mix.line}. MB = 10^6 bytes of composed message. Limit ${scenario.limit || 'none'}. Medians over the rounds.`
      : `${sends} sends × ${scenario.shape === 'fanout' ? '1 000 recipients' : '1 recipient'}, ${scenario.message} ${messageBytes}-byte message, limit ${scenario.limit || 'none'}. Medians over the rounds.`,
    '',
    `| ${header.join(' | ')} |`,
    `|${header.map(() => '---').join('|')}|`,
    ...body.map((cells) => `| ${cells.join(' | ')} |`),
  ];
  return lines.join('\n');
}

const fmt = (n: number): string => (Number.isFinite(n) ? Math.round(n).toString() : 'n/a');

function machine(): string {
  let cpuModel = 'unknown';
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    cpuModel = /model name\s*:\s*(.*)/.exec(info)?.[1]?.trim() ?? cpuModel;
  } catch {
    cpuModel = os.cpus()[0]?.model ?? cpuModel;
  }
  return `nproc ${os.availableParallelism?.() ?? os.cpus().length}, ${cpuModel}, Node ${process.version}, ${os.type()} ${os.release()}, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM`;
}

/** The commit measured, and lib/ files changed since it (benchmarks of uncommitted code say so); BENCH_CODE overrides. */
function codeState(): string {
  // A copy of the tree outside git (say, a commit's lib/ built elsewhere) can name itself.
  if (process.env.BENCH_CODE) return process.env.BENCH_CODE;
  const root = path.join(__dirname, '..', '..');
  const git = (...args: string[]): string => spawnSync('git', args, { cwd: root, encoding: 'utf8' }).stdout?.trimEnd() ?? '';
  const head = git('rev-parse', '--short', 'HEAD') || 'unknown commit';
  const dirty = git('status', '--porcelain', '--', 'lib')
    .split('\n')
    .filter(Boolean)
    .map((l) => l.slice(3));
  return dirty.length > 0 ? `${head} + uncommitted ${dirty.join(', ')}` : head;
}

async function runMemory(settings: Settings, mainSink: Sink): Promise<string> {
  console.log(`\n=== ${MEMORY_SCENARIO.name}: ${settings.memoryDomains} distinct domains, one message each, then idle`);
  // Up to `domains` sessions may be open at once when the pools outlive the sends: a sink of its own
  // with room for them (smtp-sink -m caps concurrent sessions).
  const sink =
    settings.memoryDomains + 100 > 1000 ? await startSink({ maxSessions: settings.memoryDomains + 1000, prefer: settings.sink ?? mainSink.kind }) : mainSink;
  try {
    const spec: MemorySpec = {
      host: sink.host,
      port: sink.port,
      domains: settings.memoryDomains,
      idleTimeout: settings.memoryIdleMs,
      window: settings.window,
      settleMs: 3_000,
    };
    console.log(
      `    ${spec.domains} domains, one message each, idleTimeout ${spec.idleTimeout || 'auto'} ms, window ${spec.window}, node --expose-gc; sink: ${sink.command}`,
    );
    const lines = await runChild('memory.js', [JSON.stringify(spec)], ['--expose-gc'], settings.childTimeoutMs);
    for (const line of lines) if (line && !line.startsWith(RESULT_PREFIX)) console.log(`    ${line}`);
    const resultLine = lines.find((l) => l.startsWith(RESULT_PREFIX));
    if (!resultLine) throw new Error('memory scenario printed no result');
    const result = JSON.parse(resultLine.slice(RESULT_PREFIX.length)) as MemoryResult;
    return formatMemory(result, spec);
  } finally {
    if (sink !== mainSink) await sink.stop();
  }
}

function formatMemory(r: MemoryResult, spec: MemorySpec): string {
  const mib = (b: number): string => (b / 2 ** 20).toFixed(1);
  const n = spec.domains;
  // What each dropped pool leaves behind, and from it what each live pool holds: pools already
  // dropped when the sends ended are counted at the dropped-pool rate, the rest at the live rate.
  const residue = (field: 'heapUsed' | 'rss'): number => (r.afterDrop[field] - r.before[field]) / n;
  const live = (field: 'heapUsed' | 'rss'): number =>
    r.poolsAfterSends > 0 ? (r.afterSends[field] - r.before[field] - r.droppedAtSends * residue(field)) / r.poolsAfterSends : NaN;
  const bytes = (b: number): string => (Number.isFinite(b) ? `${Math.round(b)} B` : 'n/a');
  const rows = [
    ['before (warmed up, after gc)', r.before, '-', '-'],
    ['after sends (after gc)', r.afterSends, String(r.poolsAfterSends), String(r.openAfterSends)],
    ['all pools dropped for idleness (after gc)', r.atDrop, String(r.poolsAfterDrop), String(r.openAfterDrop)],
    [`${spec.settleMs / 1000} s later (after gc)`, r.afterDrop, String(r.poolsAfterDrop), String(r.openAfterDrop)],
  ] as const;
  const lines = [
    `#### ${MEMORY_SCENARIO.name} — ${n} distinct domains, one message each, then idle`,
    '',
    `${n} domains (one pool each), idleTimeout ${r.idleTimeout} ms; sends took ${Math.round(r.sendMs)} ms (${Math.round((n / r.sendMs) * 1000)} msg/s, a new connection per message), ${r.accepted}/${n} accepted; last pool dropped ${(r.dropMs / 1000).toFixed(1)} s after the last send; peak live pools ${r.peakPools}, peak RSS ${mib(r.peakRss)} MiB.`,
    '',
    '| moment | RSS MiB | heapUsed MiB | heapTotal MiB | external MiB | live pools | open connections |',
    '|---|---|---|---|---|---|---|',
    ...rows.map(
      ([label, m, pools, open]) => `| ${label} | ${mib(m.rss)} | ${mib(m.heapUsed)} | ${mib(m.heapTotal)} | ${mib(m.external)} | ${pools} | ${open} |`,
    ),
    '',
    `- per live idle pool (with its one idle connection): heapUsed ${bytes(live('heapUsed'))}, RSS ${bytes(live('rss'))}${r.droppedAtSends > 0 ? ` (${r.droppedAtSends} pools were already dropped when the sends ended; counted at the after-drop rate)` : ''}`,
    `- per pool after the drop (${spec.settleMs / 1000} s later): heapUsed ${bytes(residue('heapUsed'))}, RSS ${bytes(residue('rss'))} (target < 2 KiB); right at the drop: heapUsed ${bytes((r.atDrop.heapUsed - r.before.heapUsed) / n)}, RSS ${bytes((r.atDrop.rss - r.before.rss) / n)}`,
    `- RSS after drop − before: ${mib(r.afterDrop.rss - r.before.rss)} MiB (peak − before: ${mib(r.peakRss - r.before.rss)} MiB); stats().pools.length ${r.poolsAfterSends} after sends → ${r.poolsAfterDrop} after drop; droppedPools.pools ${r.droppedPools}; connections opened ${r.opened}, connectionClosed events ${r.closed}`,
  ];
  return lines.join('\n');
}

/** Composed size of one big-queue message (composed once, through Nodemailer's stream transport). */
async function bigQueueMessageBytes(attachment: { path: string } | { content: Buffer }): Promise<number> {
  const info = await nodemailer.createTransport({ streamTransport: true, buffer: false }).sendMail(bigQueueMail(0, attachment));
  let n = 0;
  for await (const chunk of info.message as unknown as Readable) n += (chunk as Buffer).length;
  return n;
}

async function runBigQueue(settings: Settings, mainSink: Sink): Promise<string> {
  const big = settings.big;
  const sink =
    big.sinkWaitS > 0 ? await startSink({ maxSessions: 1000, prefer: 'smtp-sink', install: false, extraArgs: ['-w', String(big.sinkWaitS)] }) : mainSink;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'bench-big-queue-'));
  const file = path.join(dir, `attachment-${big.mib}MiB.bin`);
  const attachmentBytes = big.mib * 2 ** 20;
  const rssLimit = big.rssLimitMiB * 2 ** 20;
  const results: { candidate: BigQueueCandidate; result?: BigQueueResult; error?: string; sinkMessages: number; sinkSessions: number }[] = [];
  try {
    // Pseudo-random (incompressible) bytes, written once; in 'buffer' mode each child makes its own Buffer of the same size.
    const data = Buffer.allocUnsafe(attachmentBytes);
    for (let o = 0, x = 0x2545f491; o < data.length; o += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      data.writeInt32LE(x | 0, o);
    }
    writeFileSync(file, data);
    const messageBytes = await bigQueueMessageBytes({ path: file });
    const how = big.attachment === 'path' ? `attached by path (${file}; Nodemailer streams it)` : 'attached as one Buffer shared by every message';
    console.log(`\n=== ${BIG_QUEUE_SCENARIO.name}: ${big.count} sendMail calls at once, each with one ${big.mib} MiB attachment, one domain`);
    console.log(
      `    attachment ${how}; composed message ${(messageBytes / 2 ** 20).toFixed(1)} MiB; ${CONNECTIONS_NOTE}; sink: ${sink.command}; guard: abandon past ${big.rssLimitMiB} MiB RSS (parent kills at +512 MiB), deadline ${big.deadlineS} s; one run per candidate`,
    );
    for (const candidate of big.candidates) {
      const spec: BigQueueSpec = {
        candidate,
        host: sink.host,
        port: sink.port,
        count: big.count,
        attachment: big.attachment,
        file,
        attachmentBytes,
        rssLimit,
        deadlineMs: big.deadlineS * 1000,
        sampleMs: 50,
      };
      const before = await sink.settledCounters();
      let result: BigQueueResult | undefined;
      let error: string | undefined;
      try {
        const lines = await runChild('big-queue.js', [JSON.stringify(spec)], [], spec.deadlineMs + 60_000, rssLimit + 512 * 2 ** 20);
        const resultLine = lines.find((l) => l.startsWith(RESULT_PREFIX));
        if (!resultLine) throw new Error(`${candidate} printed no result`);
        result = JSON.parse(resultLine.slice(RESULT_PREFIX.length)) as BigQueueResult;
      } catch (err) {
        error = (err as Error).message;
      }
      const after = await sink.settledCounters();
      const entry = { candidate, result, error, sinkSessions: after.sessions - before.sessions, sinkMessages: after.messages - before.messages };
      results.push(entry);
      console.log(`    ${bigQueueLine(entry, messageBytes)}`);
    }
    return formatBigQueue(settings, results, messageBytes);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    if (sink !== mainSink) await sink.stop();
  }
}

const CONNECTIONS_NOTE = '5 connections (maxOutboundConnections / maxConnections), no limit';

const mibOf = (b: number): string => (b / 2 ** 20).toFixed(0);

function bigQueueLine(entry: { candidate: BigQueueCandidate; result?: BigQueueResult; error?: string; sinkMessages: number }, messageBytes: number): string {
  const r = entry.result;
  if (!r) return `${entry.candidate}: failed: ${entry.error}`;
  const s = r.ms / 1000;
  return (
    `${entry.candidate}: ${r.outcome}, ${r.accepted}/${r.count} accepted, ${r.failed} failed${r.firstError ? ` (first: ${r.firstError})` : ''} in ${s.toFixed(1)} s ` +
    `(${(r.accepted / s).toFixed(1)} msg/s, ${((r.accepted * messageBytes) / 1e6 / s).toFixed(0)} MB/s); peak RSS ${mibOf(r.peak.rss)} MiB at ${(r.peakRssAtMs / 1000).toFixed(1)} s ` +
    `(maxRSS ${mibOf(r.maxRss)}), heapUsed ${mibOf(r.peak.heapUsed)}, external ${mibOf(r.peak.external)}, arrayBuffers ${mibOf(r.peak.arrayBuffers)} MiB; sink ${entry.sinkMessages} txns`
  );
}

function formatBigQueue(
  settings: Settings,
  results: { candidate: BigQueueCandidate; result?: BigQueueResult; error?: string; sinkMessages: number; sinkSessions: number }[],
  messageBytes: number,
): string {
  const big = settings.big;
  const header = [
    'candidate',
    'outcome',
    'accepted',
    'failed',
    'duration s',
    'first accept s',
    'msg/s',
    'MB/s',
    'peak RSS MiB',
    'maxRSS MiB',
    'peak heapUsed MiB',
    'peak heapTotal MiB',
    'peak external MiB',
    'peak arrayBuffers MiB',
    'RSS at start MiB',
    'sink sess / txns',
  ];
  const body = results.map(({ candidate, result: r, error, sinkMessages, sinkSessions }) => {
    if (!r) return [candidate, `failed: ${error ?? '?'}`, ...header.slice(2, -1).map(() => '-'), `${sinkSessions} / ${sinkMessages}`];
    const s = r.ms / 1000;
    return [
      candidate,
      r.outcome === 'rss-limit' ? `aborted: RSS > ${big.rssLimitMiB} MiB` : r.outcome === 'deadline' ? `aborted: deadline ${big.deadlineS} s` : 'done',
      `${r.accepted}/${r.count}`,
      String(r.failed),
      s.toFixed(1),
      r.firstAcceptMs !== undefined ? (r.firstAcceptMs / 1000).toFixed(1) : '-',
      (r.accepted / s).toFixed(1),
      ((r.accepted * messageBytes) / 1e6 / s).toFixed(0),
      mibOf(r.peak.rss),
      mibOf(r.maxRss),
      mibOf(r.peak.heapUsed),
      mibOf(r.peak.heapTotal),
      mibOf(r.peak.external),
      mibOf(r.peak.arrayBuffers),
      mibOf(r.start.rss),
      `${sinkSessions} / ${sinkMessages}`,
    ];
  });
  return [
    `#### ${BIG_QUEUE_SCENARIO.name} — ${big.count} sendMail calls at once, one ${big.mib} MiB attachment each`,
    '',
    `Each message: short text + HTML and one ${big.mib} MiB attachment (${big.attachment === 'path' ? 'by path' : 'one shared Buffer'}), ${(messageBytes / 2 ** 20).toFixed(1)} MiB composed; one domain, ${CONNECTIONS_NOTE}` +
      `${big.sinkWaitS > 0 ? `; a slow receiver: the sink waits ${big.sinkWaitS} s before answering each DATA (smtp-sink -w ${big.sinkWaitS})` : ''}. ` +
      `Peaks are process.memoryUsage() sampled every 50 ms (each field's own maximum); maxRSS is the kernel's peak. A candidate is abandoned past ${big.rssLimitMiB} MiB RSS or after ${big.deadlineS} s.`,
    '',
    `| ${header.join(' | ')} |`,
    `|${header.map(() => '---').join('|')}|`,
    ...body.map((cells) => `| ${cells.join(' | ')} |`),
  ].join('\n');
}

async function runProfile(settings: Settings, sink: Sink): Promise<string> {
  // BENCH_PROFILE_SCENARIO=real-mix profiles another scenario.
  const scenario = SCENARIOS.find((s) => s.name === (process.env.BENCH_PROFILE_SCENARIO ?? 'one-domain'))!;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'bench-prof-'));
  const sends = sendsFor(scenario, settings);
  const warmupSends = Math.min(500, Math.floor(sends / 10));
  const candidates: CandidateName[] = ['binding-pool', 'nodemailer-pool', 'noop-transport'];
  console.log(`\n=== profile: ${candidates.join(', ')} on one-domain, ${sends} sends each, node --cpu-prof (${dir})`);
  const profiles: NamedSummary[] = [];
  for (const candidate of candidates) {
    const spec: RunSpec = {
      scenario: scenario.name,
      candidate,
      shape: scenario.shape,
      message: scenario.message,
      limit: 0,
      sends,
      warmupSends,
      window: settings.window,
      host: sink.host,
      port: sink.port,
      round: 1,
    };
    const candidateDir = path.join(dir, candidate);
    await runChild('child.js', [JSON.stringify(spec)], ['--cpu-prof', `--cpu-prof-dir=${candidateDir}`], settings.childTimeoutMs);
    const file = readdirSync(candidateDir).find((f) => f.endsWith('.cpuprofile'));
    if (!file) throw new Error(`no .cpuprofile written for ${candidate}`);
    const summary = summarizeProfile(JSON.parse(readFileSync(path.join(candidateDir, file), 'utf8')) as CpuProfile);
    profiles.push({ name: candidate, summary, units: sends + warmupSends });
  }
  const text = [
    `#### CPU profile — ${scenario.name}, ${sends} sends (+${warmupSends} warm-up) per candidate`,
    '',
    `Profiles in ${dir}/<candidate>/ (open in Chrome DevTools or speedscope).`,
    '',
    compareProfiles(profiles),
    '',
    '##### binding-pool alone',
    '',
    formatProfileSummary(profiles[0].summary, 25),
  ].join('\n');
  console.log(text);
  return text;
}

async function main(): Promise<void> {
  const settings = parseSettings(process.argv.slice(2));
  const report: string[] = [];
  const machineLine = machine();
  console.log(`machine: ${machineLine}`);
  const code = codeState();
  console.log(`code: ${code}`);
  report.push(
    `Machine: ${machineLine}. Code: ${code}. Started ${new Date().toISOString()}. Settings: ${settings.quick ? 'quick' : 'full'}, ${settings.rounds} rounds, window ${settings.window}.`,
  );

  const sink = await startSink({ maxSessions: 1000, prefer: settings.sink });
  console.log(`sink: ${sink.kind} on ${sink.host}:${sink.port} (${sink.command})`);
  report.push(`Sink: ${sink.kind} (\`${sink.command}\`).`);
  const checks: string[] = [];
  try {
    for (const name of settings.scenarios) {
      const scenario = SCENARIOS.find((s) => s.name === name);
      if (!scenario) continue;
      const mix = scenario.message === 'mix' ? await mixFigures(sendsFor(scenario, settings)) : undefined;
      const rounds = await runScenario(scenario, settings, sink, mix);
      const rows = tabulate(scenario, rounds, mix);
      const bytes = rounds.get(scenario.candidates[0])![0].result.messageBytes;
      const table = formatTable(scenario, rows, sendsFor(scenario, settings), bytes, mix);
      console.log('\n' + table);
      report.push(table);
      const ceiling = rows.find((r) => r.candidate === 'two-thread-ceiling');
      for (const ours of rows.filter((r) => r.candidate.startsWith('binding-pool'))) {
        const toCeiling = ceiling ? `, ${(ours.rate / ceiling.rate).toFixed(2)} × two-thread-ceiling` : '';
        checks.push(`${scenario.name}: ${ours.candidate} ${ours.ratio.toFixed(2)} × ${BASELINE}, ${ours.ratioToNoop.toFixed(2)} × noop-transport${toCeiling}`);
      }
    }
    if (settings.scenarios.includes(MEMORY_SCENARIO.name)) {
      const memory = await runMemory(settings, sink);
      console.log('\n' + memory);
      report.push(memory);
    }
    if (settings.scenarios.includes(BIG_QUEUE_SCENARIO.name)) {
      const bigQueue = await runBigQueue(settings, sink);
      console.log('\n' + bigQueue);
      report.push(bigQueue);
    }
    if (settings.profile) report.push(await runProfile(settings, sink));
  } finally {
    await sink.stop();
  }
  if (checks.length > 0) {
    const summary = [
      'Ratios of binding-pool (targets: one-domain ≥ 1.3 × nodemailer-pool; limit-100 ≥ 2 × nodemailer-pool, where that pool loses to its limit (limit-100-queued); ≥ 0.85 × noop-transport):',
      ...checks.map((c) => `- ${c}`),
    ].join('\n');
    console.log('\n' + summary);
    report.push(summary);
  }
  if (settings.md) {
    writeFileSync(settings.md, report.join('\n\n') + '\n');
    console.log(`\nreport written to ${settings.md}`);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.stack : err);
  process.exit(1);
});
