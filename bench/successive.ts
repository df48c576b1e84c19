/**
 * Start-up cost, build against build: the many-domains workload (100 domains × 2 bindings on one
 * smtp-sink, raw messages, 100 in flight) through transports made one after another in one
 * process: a 500-send warm-up, then `--transports` of `--sends` each, each closed before the next.
 * The benchmark's measured instance is the second transport of its process; from the third on,
 * what is left is the steady cost. Every run is a fresh process, builds alternate, and the
 * report gives per transport the median CPU per message and rate, each build as a ratio to the
 * first (the baseline, run in the same run on the same noisy machine).
 *
 *   npm run build && npx tsc -p bench/tsconfig.json
 *   node build/bench/successive.js --dist /tmp/old/build/lib --dist dist/cjs --runs 8
 */
import { fork } from 'node:child_process';
import path from 'node:path';
import { createRequire } from 'node:module';
import nodemailer, { type Transport } from 'nodemailer';
import { buildRawMessage, median, pump, sendFor } from './common';
import { startSink } from './sink';

interface TransportModule {
  BindingPoolTransport: new (options: object) => Transport & { close(): Promise<void> };
}

interface Figures {
  /** Per transport after the warm-up: CPU µs per message and msg/s. */
  cpu: number[];
  rate: number[];
}

const WARMUP_SENDS = 500;
const WINDOW = 100;

function parseArgs(argv: string[]): { dists: string[]; runs: number; sends: number; transports: number } {
  const dists: string[] = [];
  let runs = 8;
  let sends = 5_000;
  let transports = 3;
  for (let i = 0; i < argv.length; i++) {
    const value = (): string => argv[++i] ?? '';
    if (argv[i] === '--dist') dists.push(path.resolve(value()));
    else if (argv[i] === '--runs') runs = Number(value());
    else if (argv[i] === '--sends') sends = Number(value());
    else if (argv[i] === '--transports') transports = Number(value());
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  if (dists.length === 0) dists.push(path.resolve(__dirname, '../lib'));
  return { dists, runs, sends, transports };
}

/** One process: the warm-up transport, then each measured one. */
async function child(dist: string, sends: number, transports: number): Promise<Figures> {
  const { BindingPoolTransport } = createRequire(__filename)(dist) as TransportModule;
  const sink = await startSink();
  const raw = buildRawMessage();
  const figures: Figures = { cpu: [], rate: [] };
  try {
    for (let round = 0; round <= transports; round++) {
      const pool = new BindingPoolTransport({
        route: { host: sink.host, port: sink.port },
        maxOutboundConnections: 5,
        bindings: { b0: { localAddress: '127.0.0.2' }, b1: { localAddress: '127.0.0.3' } },
        defaultBinding: 'b0',
      });
      const transport = nodemailer.createTransport(pool);
      const n = round === 0 ? WARMUP_SENDS : sends;
      const cpu0 = process.cpuUsage();
      const t0 = process.hrtime.bigint();
      const outcome = await pump(n, WINDOW, async (i) => {
        const send = sendFor('many-domains', i, round);
        const info = await transport.sendMail({ envelope: { from: 'bench@sender.example', to: send.to }, raw, binding: `b${send.binding}` } as never);
        return info.accepted?.length ?? 0;
      });
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const cpu = process.cpuUsage(cpu0);
      await pool.close();
      if (outcome.accepted !== n) throw new Error(`transport ${round}: ${outcome.accepted} of ${n} accepted (${String(outcome.firstError)})`);
      if (round === 0) continue;
      figures.cpu.push((cpu.user + cpu.system) / n);
      figures.rate.push(n / seconds);
    }
  } finally {
    await sink.stop();
  }
  return figures;
}

function runChild(dist: string, sends: number, transports: number): Promise<Figures> {
  return new Promise((resolve, reject) => {
    const proc = fork(__filename, ['--child', dist, String(sends), String(transports)], { stdio: ['ignore', 'pipe', 'inherit', 'ipc'] });
    proc.once('message', (figures) => resolve(figures as Figures));
    proc.once('exit', (code) => (code === 0 ? undefined : reject(new Error(`child for ${dist} exited ${code}`))));
  });
}

async function main(): Promise<void> {
  const { dists, runs, sends, transports } = parseArgs(process.argv.slice(2));
  const results = new Map<string, Figures[]>(dists.map((dist) => [dist, []]));
  for (let run = 0; run < runs; run++) for (const dist of dists) results.get(dist)!.push(await runChild(dist, sends, transports));
  console.log(`many-domains, ${sends} sends per transport after a ${WARMUP_SENDS}-send warm-up, ${runs} runs per build, medians`);
  console.log(`baseline: ${dists[0]}\n`);
  const header = Array.from({ length: transports }, (_, i) => `transport ${i + 2}: CPU µs/msg (×), msg/s (×)`);
  console.log(`| build | ${header.join(' | ')} |`);
  console.log(`|---|${header.map(() => '---').join('|')}|`);
  const base = results.get(dists[0])!;
  for (const dist of dists) {
    const figures = results.get(dist)!;
    const cells = header.map((_, t) => {
      const cpu = median(figures.map((f) => f.cpu[t]));
      const rate = median(figures.map((f) => f.rate[t]));
      const baseCpu = median(base.map((f) => f.cpu[t]));
      const baseRate = median(base.map((f) => f.rate[t]));
      return `${cpu.toFixed(0)} (${(cpu / baseCpu).toFixed(2)}), ${rate.toFixed(0)} (${(rate / baseRate).toFixed(2)})`;
    });
    console.log(`| ${dist} | ${cells.join(' | ')} |`);
  }
}

if (process.argv[2] === '--child') {
  const [dist, sends, transports] = process.argv.slice(3);
  child(dist, Number(sends), Number(transports)).then(
    (figures) => process.send!(figures, () => process.exit(0)),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
} else {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
