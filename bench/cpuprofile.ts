/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`): self time and total (inclusive) time per
 * function, and self time per area (this package, each Nodemailer module, generic-pool, Node
 * internals, GC). Also usable alone: `node build/bench/cpuprofile.js FILE.cpuprofile [N]`.
 */
import { readFileSync } from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

export interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface FunctionTime {
  name: string;
  where: string;
  area: string;
  selfMs: number;
  totalMs: number;
}

export interface ProfileSummary {
  totalMs: number;
  functions: FunctionTime[];
  areas: { area: string; selfMs: number }[];
}

function area(url: string, name: string): string {
  if (!url) return name.startsWith('(') ? name : '(native)';
  if (url.startsWith('node:')) return `node:${url.slice(5).split('/')[0]}`;
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)\/(?:dist\/cjs\/)?([^/]+)?/.exec(url);
  if (nm) return nm[1] === 'nodemailer' && nm[2] ? `nodemailer/${nm[2].replace(/\.js$/, '')}` : nm[1];
  const own = /\/(lib|bench)\/([^/]+)\.js$/.exec(url);
  if (own) return `${own[1]}/${own[2]}`;
  return url;
}

function where(frame: CallFrame): string {
  if (!frame.url) return '';
  const short = frame.url
    .replace(/^file:\/\//, '')
    .replace(/^.*node_modules\//, '')
    .replace(/^.*\/build\//, '');
  return `${short}:${frame.lineNumber + 1}`;
}

export function summarizeProfile(profile: CpuProfile): ProfileSummary {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);
  const key = (n: ProfileNode): string => `${n.callFrame.functionName || '(anonymous)'}@${where(n.callFrame)}`;
  const functions = new Map<string, FunctionTime>();
  const entry = (n: ProfileNode): FunctionTime => {
    const k = key(n);
    let f = functions.get(k);
    if (!f) {
      f = {
        name: n.callFrame.functionName || '(anonymous)',
        where: where(n.callFrame),
        area: area(n.callFrame.url, n.callFrame.functionName),
        selfMs: 0,
        totalMs: 0,
      };
      functions.set(k, f);
    }
    return f;
  };
  let totalMs = 0;
  for (let i = 0; i < profile.samples.length; i++) {
    // timeDeltas[i] is the time since the previous sample; charge it to this sample's stack.
    const ms = (profile.timeDeltas[i] ?? 0) / 1000;
    const node = byId.get(profile.samples[i]);
    if (!node) continue;
    totalMs += ms;
    entry(node).selfMs += ms;
    const seen = new Set<FunctionTime>();
    for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
      const f = entry(byId.get(id)!);
      if (!seen.has(f)) {
        seen.add(f);
        f.totalMs += ms;
      }
    }
  }
  const areas = new Map<string, number>();
  for (const f of functions.values()) areas.set(f.area, (areas.get(f.area) ?? 0) + f.selfMs);
  return {
    totalMs,
    functions: [...functions.values()].filter((f) => f.name !== '(root)'),
    areas: [...areas].map(([a, selfMs]) => ({ area: a, selfMs })).sort((a, b) => b.selfMs - a.selfMs),
  };
}

export function formatProfileSummary(summary: ProfileSummary, top = 25): string {
  const pct = (ms: number): string => `${((ms / summary.totalMs) * 100).toFixed(1)}%`;
  const bySelf = [...summary.functions].sort((a, b) => b.selfMs - a.selfMs).slice(0, top);
  const ownTotals = [...summary.functions]
    .filter((f) => f.area.startsWith('lib/'))
    .sort((a, b) => b.totalMs - a.totalMs)
    .slice(0, 12);
  return [
    `Sampled ${Math.round(summary.totalMs)} ms.`,
    '',
    'Self time by area:',
    '',
    '| area | self ms | share |',
    '|---|---|---|',
    ...summary.areas.slice(0, 16).map((a) => `| ${a.area} | ${Math.round(a.selfMs)} | ${pct(a.selfMs)} |`),
    '',
    `Top ${top} functions by self time:`,
    '',
    '| function | where | self ms | self | total |',
    '|---|---|---|---|---|',
    ...bySelf.map((f) => `| ${f.name} | ${f.where} | ${Math.round(f.selfMs)} | ${pct(f.selfMs)} | ${pct(f.totalMs)} |`),
    '',
    "This package's functions by total (inclusive) time:",
    '',
    '| function | where | total | self |',
    '|---|---|---|---|',
    ...ownTotals.map((f) => `| ${f.name} | ${f.where} | ${pct(f.totalMs)} | ${pct(f.selfMs)} |`),
  ].join('\n');
}

export interface NamedSummary {
  name: string;
  summary: ProfileSummary;
  /** Messages (or recipients) the profiled process handled, to express time per unit. */
  units: number;
}

/**
 * Side by side: self time per area in µs per unit for each profile, then the functions where the
 * first profile spends the most more than the second (µs per unit).
 */
export function compareProfiles(profiles: NamedSummary[], topDiff = 20): string {
  const per = (ms: number, units: number): number => (ms * 1000) / units;
  const areaNames = new Set<string>();
  for (const p of profiles) for (const a of p.summary.areas) areaNames.add(a.area);
  const areaOf = (p: NamedSummary, area: string): number => per(p.summary.areas.find((a) => a.area === area)?.selfMs ?? 0, p.units);
  const sortedAreas = [...areaNames].sort((a, b) => areaOf(profiles[0], b) - areaOf(profiles[0], a));
  const lines = [
    'Self time per area, µs per message (whole process: startup, warm-up and measured sends):',
    '',
    `| area | ${profiles.map((p) => p.name).join(' | ')} |`,
    `|---|${profiles.map(() => '---').join('|')}|`,
    ...sortedAreas
      .filter((area) => profiles.some((p) => areaOf(p, area) >= 1))
      .map((area) => `| ${area} | ${profiles.map((p) => areaOf(p, area).toFixed(1)).join(' | ')} |`),
    `| **total sampled** | ${profiles.map((p) => `**${per(p.summary.totalMs, p.units).toFixed(1)}**`).join(' | ')} |`,
  ];
  if (profiles.length >= 2) {
    const [a, b] = profiles;
    const key = (f: FunctionTime): string => `${f.name}@${f.where}`;
    const bSelf = new Map(b.summary.functions.map((f) => [key(f), f.selfMs]));
    const diffs = a.summary.functions
      .map((f) => ({ f, diff: per(f.selfMs, a.units) - per(bSelf.get(key(f)) ?? 0, b.units) }))
      .sort((x, y) => y.diff - x.diff)
      .slice(0, topDiff);
    lines.push(
      '',
      `Functions with the most more self time in ${a.name} than in ${b.name}, µs per message:`,
      '',
      `| function | where | area | ${a.name} | ${b.name} | more |`,
      '|---|---|---|---|---|---|',
      ...diffs.map(
        ({ f, diff }) =>
          `| ${f.name} | ${f.where} | ${f.area} | ${per(f.selfMs, a.units).toFixed(1)} | ${per(bSelf.get(key(f)) ?? 0, b.units).toFixed(1)} | ${diff.toFixed(1)} |`,
      ),
    );
  }
  return lines.join('\n');
}

if (require.main === module) {
  const [file, top] = process.argv.slice(2);
  if (!file) {
    console.error('usage: node build/bench/cpuprofile.js FILE.cpuprofile [TOP]');
    process.exit(2);
  }
  console.log(formatProfileSummary(summarizeProfile(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile), top ? Number(top) : 25));
}
