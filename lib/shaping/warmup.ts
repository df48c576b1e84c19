/**
 * Warm-up plans: a new IP's message rate that rises by date, so it ramps up without a deploy each
 * day. Plain data:
 *
 *   warmup: { start: '2026-12-01', steps: [[0, '200/d'], [3, '1000/d'], [7, '5000/d']] }
 *
 * Each step is [day offset from `start`, rate]: from day 0 (the start, UTC midnight of a date, or
 * the exact instant of an ISO time) 200 a day, from day 3 1 000, from day 7 on 5 000. Before the
 * start the first step applies (a new IP is never unthrottled); after the last, the last stays. A
 * plan stands where `maxMessageRate` would (one bucket for the scope it is written in).
 */
import { parseRate, type Rate } from './rate';

export interface WarmupPlan {
  /** A date (`'2026-12-01'`, UTC midnight) or an ISO date and time. */
  start: string;
  /** [day offset, rate], offsets ascending from 0. */
  steps: [day: number, rate: string][];
}

/** The step in force, for stats(). */
export interface WarmupStep {
  /** The step's day offset, and when it began and ends (epoch ms; no end for the last step). */
  day: number;
  rate: string;
  since: number;
  until?: number;
}

const DAY_MS = 86_400_000;

/** What is wrong with a plan, or undefined when it is a good one. */
export function warmupProblem(plan: unknown): { path: string; problem: string } | undefined {
  if (typeof plan !== 'object' || plan === null) return { path: '', problem: 'must be { start, steps }' };
  const { start, steps } = plan as Partial<WarmupPlan>;
  // ISO 8601 only: Date.parse also takes 'Dec 1' and reads it in local time.
  const iso = /^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))?$/;
  if (typeof start !== 'string' || !iso.test(start) || Number.isNaN(Date.parse(start)))
    return {
      path: 'start',
      problem: `must be an ISO date ('2026-12-01', UTC midnight) or date and time with its zone ('2026-12-01T09:00:00Z'), got ${JSON.stringify(start)}`,
    };
  if (!Array.isArray(steps) || steps.length === 0)
    return { path: 'steps', problem: "must be a non-empty array of [day, rate], e.g. [[0, '200/d'], [3, '1000/d']]" };
  let previous = -1;
  for (const [i, step] of steps.entries()) {
    if (!Array.isArray(step) || step.length !== 2) return { path: `steps[${i}]`, problem: 'must be [day offset, rate]' };
    const [day, rate] = step as unknown[];
    if (!Number.isInteger(day) || (day as number) <= previous)
      return { path: `steps[${i}][0]`, problem: `must be a whole day offset above the previous step's (${previous}), got ${JSON.stringify(day)}` };
    if (i === 0 && day !== 0) return { path: 'steps[0][0]', problem: 'the first step must start on day 0' };
    const parsed = parseRate(rate);
    if (typeof parsed === 'string') return { path: `steps[${i}][1]`, problem: parsed };
    previous = day as number;
  }
  return undefined;
}

/** A checked plan, compiled: the rate in force at any time. */
export class Warmup {
  private readonly startMs: number;
  private readonly steps: { day: number; rate: Rate }[];

  constructor(plan: WarmupPlan) {
    this.startMs = Date.parse(plan.start);
    this.steps = plan.steps.map(([day, rate]) => ({ day, rate: parseRate(rate) as Rate }));
  }

  rateAt(now: number): Rate {
    return this.steps[this.indexAt(now)].rate;
  }

  stepAt(now: number): WarmupStep {
    const index = this.indexAt(now);
    const { day, rate } = this.steps[index];
    const next = this.steps[index + 1];
    const step: WarmupStep = { day, rate: rate.text, since: this.startMs + day * DAY_MS };
    if (next) step.until = this.startMs + next.day * DAY_MS;
    return step;
  }

  private indexAt(now: number): number {
    const day = (now - this.startMs) / DAY_MS;
    let index = 0;
    while (index + 1 < this.steps.length && this.steps[index + 1].day <= day) index++;
    return index;
  }
}
