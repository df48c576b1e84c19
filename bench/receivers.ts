/**
 * Issue 11's receiver policies, measured: runs the scenarios of test/support/receiver-scenarios.ts
 * (names from argv, default all) against the build in `NBP_DIST` (default `<repo>/dist/cjs`, so
 * `npm run build` first) and prints one Markdown table row per scenario, then the pending reasons
 * and DNS figures. `--json FILE` also writes the figures as JSON; `--md FILE` writes the report;
 * `--small` sends one-line text messages instead of the realistic mix.
 *
 *   npm run build && npx tsc -p bench/tsconfig.json && node build/bench/receivers.js
 *   NBP_DIST=/tmp/nbp-before/dist/cjs node build/bench/receivers.js perIpCap slowDown
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import {
  RECEIVER_SCENARIO_NAMES,
  runReceiverScenario,
  type ReceiverFigures,
  type ReceiverScenarioName,
  type TransportModule,
} from '../test/support/receiver-scenarios';

/** The repository root: the nearest directory up from here whose package.json is this package's. */
function repoRoot(): string {
  for (let dir = __dirname; ; dir = path.dirname(dir)) {
    const manifest = path.join(dir, 'package.json');
    if (existsSync(manifest) && (JSON.parse(readFileSync(manifest, 'utf8')) as { name?: string }).name === 'nodemailer-binding-pool') return dir;
    if (path.dirname(dir) === dir) throw new Error('repository root not found');
  }
}

function parseArgs(argv: string[]): { names: ReceiverScenarioName[]; json?: string; md?: string; small: boolean } {
  const names: ReceiverScenarioName[] = [];
  let json: string | undefined;
  let md: string | undefined;
  let small = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--small') small = true;
    else if (arg === '--json') json = argv[++i];
    else if (arg === '--md') md = argv[++i];
    else if (arg === 'all') names.push(...RECEIVER_SCENARIO_NAMES);
    else if ((RECEIVER_SCENARIO_NAMES as string[]).includes(arg)) names.push(arg as ReceiverScenarioName);
    else throw new Error(`unknown scenario ${arg}; known: ${RECEIVER_SCENARIO_NAMES.join(', ')}`);
  }
  return { names: names.length > 0 ? names : RECEIVER_SCENARIO_NAMES, json, md, small };
}

const HEADER =
  '| scenario | messages | accepted | rejected | pending | connects | refused greetings | MAIL | MAIL refused | peak concurrent | MAIL / msg | connects / msg | lost / dup | elapsed |\n' +
  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|';

function row(f: ReceiverFigures): string {
  return `| ${f.scenario} | ${f.messages} | ${f.accepted} | ${f.rejected} | ${f.pending} | ${f.connects} | ${f.refusedGreetings} | ${f.mailCommands} | ${f.mailRefused} | ${f.peakConcurrent} | ${f.mailPerMessage.toFixed(2)} | ${f.connectsPerMessage.toFixed(2)} | ${f.lost} / ${f.duplicates} | ${(f.elapsedMs / 1000).toFixed(1)} s |`;
}

function details(f: ReceiverFigures): string {
  const lines = [`- **${f.scenario}**: ${f.title}.`];
  const reasons = Object.entries(f.pendingReasons).sort((a, b) => b[1] - a[1]);
  const shown = reasons.slice(0, 6).map(([text, n]) => `${n} × \`${text}\``);
  if (reasons.length > 6) shown.push(`${reasons.length - 6} other texts (${reasons.slice(6).reduce((sum, [, n]) => sum + n, 0)} recipients)`);
  if (reasons.length > 0) lines.push(`  pending reasons: ${shown.join('; ')}`);
  if (f.dns)
    lines.push(
      `  DNS: ${f.dns.mx} MX queries (${f.domains} domains), ${f.dns.hostA} A and ${f.dns.hostAAAA} AAAA queries for the MX host, ${f.dns.total} queries in all`,
    );
  if (f.peakRate !== undefined) lines.push(`  most messages accepted in one rate window: ${f.peakRate}`);
  if (f.unreported > 0) lines.push(`  ${f.unreported} recipients accepted by the receiver but not reported accepted`);
  if (f.sendErrors > 0) lines.push(`  ${f.sendErrors} sends failed without a breakdown`);
  return lines.join('\n');
}

async function main(): Promise<void> {
  const { names, json, md, small } = parseArgs(process.argv.slice(2));
  const dist = path.resolve(process.env.NBP_DIST ?? path.join(repoRoot(), 'dist/cjs'));
  const transportModule = createRequire(__filename)(dist) as TransportModule;
  console.log(`transport: ${dist}; messages: ${small ? 'small (one line of text)' : 'mix (text + html, 1 in 3 with a 20–60 KiB attachment)'}\n`);
  console.log(HEADER);
  const all: ReceiverFigures[] = [];
  for (const name of names) {
    const figures = await runReceiverScenario(name, { transportModule, messageKind: small ? 'small' : 'mix' });
    all.push(figures);
    console.log(row(figures));
  }
  const report = [
    `transport: \`${dist}\`, Node ${process.version}, ${new Date().toISOString()}`,
    '',
    HEADER,
    ...all.map(row),
    '',
    ...all.map(details),
    '',
  ].join('\n');
  console.log('');
  console.log(all.map(details).join('\n'));
  if (json) writeFileSync(json, JSON.stringify(all, null, 2));
  if (md) writeFileSync(md, report);
  const broken = all.filter((f) => f.lost > 0 || f.duplicates > 0);
  process.exitCode = broken.length > 0 ? 1 : 0;
}

main().then(
  () => setTimeout(() => process.exit(), 200).unref(),
  (err: unknown) => {
    console.error(err);
    process.exit(2);
  },
);
