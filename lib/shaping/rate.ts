/**
 * Rates as users write them, and the bucket that enforces one.
 *
 * A rate is KumoMTA's throttle syntax, `'N/period'` with an optional `,max_burst=B`: `'20/s'`,
 * `'100/min'`, `'20/30s'`, `'10_000/d'`, `'600/h,max_burst=10'` (Momentum writes the same
 * budget `outbound_throttle_messages = "600/3600"`). Its meaning is the one a receiver's counter
 * checks: never more than N in any window of that period, however the window is placed. Two rules
 * enforce it together:
 *
 * - a sliding window: the times of the last N takes; one more waits until the oldest of them is a
 *   period old, so no window of the period ever holds more than N;
 * - a GCRA (generic cell rate algorithm, a token bucket kept as one timestamp) with emission
 *   interval period / N and a burst of B: B at once, then one per interval. B defaults to N (the
 *   sliding window alone decides: a full period's budget may go at once, as with a counter), and
 *   `max_burst=1` paces evenly (one every period / N).
 *
 * The window counts by the receiver's clock, not by when a take was made here: a take is in
 * flight (counted, not ageing) from the moment a connection is handed out with it until its
 * transaction has had DATA's 354 (the server has read the RCPTs by then), and ages from that
 * moment. A receiver reads each command some milliseconds after it was taken, and a burst of
 * transactions reaches it spread over tens of milliseconds: counted from the take, two takes a
 * period apart here could fall in one of its windows. The window is also held 1 % longer than
 * the period (at least 5 ms, at most 1 s), for the clocks.
 */

/** A parsed rate. */
export interface Rate {
  count: number;
  periodMs: number;
  burst: number;
  /** As written, for stats and messages. */
  text: string;
}

const UNIT_MS: Record<string, number> = {
  ms: 1,
  s: 1_000,
  sec: 1_000,
  second: 1_000,
  seconds: 1_000,
  m: 60_000,
  min: 60_000,
  minute: 60_000,
  minutes: 60_000,
  h: 3_600_000,
  hr: 3_600_000,
  hour: 3_600_000,
  hours: 3_600_000,
  d: 86_400_000,
  day: 86_400_000,
  days: 86_400_000,
};

/** The most takes a window may count (the sliding window keeps one time per take). */
export const MAX_RATE_COUNT = 1_000_000;

/** How much longer than its period a window holds its takes (see above). */
export function guardOf(periodMs: number): number {
  return Math.min(1_000, Math.max(5, periodMs / 100));
}

/** `'10min'`, `'30s'`, `'1h'`, `'2d'`, `'1.5h'` as milliseconds; undefined when it is not one. */
export function parseDuration(text: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$/i.exec(text);
  const key = match?.[2].toLowerCase();
  const unit = key !== undefined && Object.hasOwn(UNIT_MS, key) ? UNIT_MS[key] : undefined;
  if (!match || unit === undefined) return undefined;
  const ms = Number(match[1] ?? '1') * unit;
  return ms >= 1 && Number.isFinite(ms) ? Math.round(ms) : undefined;
}

/** A rate from its text, or a message saying what is wrong with it. */
export function parseRate(value: unknown): Rate | string {
  const expected = `a rate such as '20/s', '100/min', '20/30s', '10000/d' or '100/min,max_burst=10'`;
  if (typeof value !== 'string') return `must be ${expected}`;
  const match = /^\s*(\d{1,3}(?:[,_]\d{3})+|\d+)\s*\/\s*([^,]+?)\s*(?:,\s*max_burst\s*=\s*(\d+)\s*)?$/i.exec(value);
  if (!match) return `must be ${expected}, got ${JSON.stringify(value)}`;
  const count = Number(match[1].replace(/[,_]/g, ''));
  const periodMs = parseDuration(match[2]);
  if (periodMs === undefined) return `has an unknown period ${JSON.stringify(match[2])} (use s, min, h or d, optionally with a number: 30s, 10min)`;
  if (count < 1 || count > MAX_RATE_COUNT) return `must allow 1 to ${MAX_RATE_COUNT} per period, got ${count}`;
  const burst = match[3] === undefined ? count : Number(match[3]);
  if (burst < 1 || burst > count) return `max_burst must be 1 to ${count} (the rate's count), got ${burst}`;
  return { count, periodMs, burst, text: value.trim() };
}

/** A bucket's state, for stats(). */
export interface BucketStats {
  /** Where the rate was declared: the option path (one bucket per declaration, shared by reference). */
  scope: string;
  rate: string;
  /** Takes in the last period, and how many more could go now. */
  used: number;
  available: number;
}

/** What a pair's policy needs of a rate bucket: this process's (RateBucket) or the cluster's (cluster-rate.ts). */
export interface Bucket {
  readonly scope: string;
  rateAt(now: number): Rate | undefined;
  room(now: number): number;
  availableAt(now: number, nth?: number): number;
  take(n: number, now: number): void;
  settle(n: number, at: number): void;
  refund(n: number, now: number): void;
  stats(now: number): BucketStats | undefined;
  /** Gives back what it holds for others (the transport closes). */
  close?(): void;
}

/**
 * One rate's bucket, shared by every pair its declaration covers. `rateAt` gives the rate in force
 * (a warm-up plan changes it by date; undefined: no limit now).
 */
export class RateBucket implements Bucket {
  /** Times of the takes still inside the longest period, oldest first, from `head`. */
  private times: number[] = [];
  private head = 0;
  /** GCRA's theoretical arrival time: when the next take would be on schedule. */
  private tat = 0;
  /** Takes handed out and not yet settled (their transactions have not reached DATA yet). */
  private inFlight = 0;

  constructor(
    readonly scope: string,
    readonly rateAt: (now: number) => Rate | undefined,
  ) {}

  /** How many takes could go now. */
  room(now: number): number {
    const rate = this.rateAt(now);
    if (!rate) return Infinity;
    this.forget(now, rate);
    const windowRoom = rate.count - this.inWindow() - this.inFlight;
    const interval = rate.periodMs / rate.count;
    const tolerance = (rate.burst - 1) * interval;
    const paced = Math.floor((now + tolerance - Math.max(this.tat, now)) / interval + 1e-9) + 1;
    return Math.max(0, Math.min(windowRoom, paced));
  }

  /**
   * When the `nth` take from now could go, taken one at a time and nothing else taking (now when
   * the room is there): the wake time of a waiting send, and a `retryAfter` for the nth in line.
   */
  availableAt(now: number, nth = 1): number {
    const rate = this.rateAt(now);
    if (!rate) return now;
    this.forget(now, rate);
    const guard = guardOf(rate.periodMs);
    const held = this.inWindow();
    // Take number k beyond the room waits for the take N before it to age out: one of those in
    // the window, or (past them) one still to come, a whole period later again.
    let mustAge = nth - (rate.count - held - this.inFlight);
    let windowAt = now;
    if (mustAge > 0) {
      let periods = 1;
      while (mustAge > held) {
        mustAge -= rate.count;
        periods++;
      }
      // Takes in flight age no earlier than now.
      const base = mustAge > 0 && mustAge <= held ? this.times[this.head + mustAge - 1] : now;
      windowAt = base + (mustAge > 0 ? periods : periods - 1) * (rate.periodMs + guard);
    }
    const interval = rate.periodMs / rate.count;
    const pacedAt = Math.max(this.tat, now) + (nth - 1) * interval - (rate.burst - 1) * interval;
    const at = Math.max(windowAt, pacedAt);
    // A millisecond past the exact time, so that the check then finds the room.
    return at > now ? Math.ceil(at) + 1 : now;
  }

  /** Takes `n` now: in flight until `settle`d (or `refund`ed). */
  take(n: number, now: number): void {
    const rate = this.rateAt(now);
    if (!rate) return;
    const interval = rate.periodMs / rate.count;
    this.tat = Math.max(this.tat, now) + n * interval;
    this.inFlight += n;
  }

  /** `n` takes in flight reached the server by `at`: they age from then. */
  settle(n: number, at: number): void {
    const settled = Math.min(n, this.inFlight);
    this.inFlight -= settled;
    for (let i = 0; i < settled; i++) {
      // Nearly always the latest; else into its place, so the window stays in order.
      let index = this.times.length;
      while (index > this.head && this.times[index - 1] > at) index--;
      this.times.splice(index, 0, at);
    }
  }

  /** Gives back takes in flight that were not used (a send that needed fewer recipients than it took). */
  refund(n: number, now: number): void {
    const rate = this.rateAt(now);
    const back = Math.min(n, this.inFlight);
    if (back <= 0) return;
    this.inFlight -= back;
    if (rate) this.tat = Math.max(now, this.tat - back * (rate.periodMs / rate.count));
  }

  stats(now: number): BucketStats | undefined {
    const rate = this.rateAt(now);
    if (!rate) return undefined;
    const available = this.room(now);
    return { scope: this.scope, rate: rate.text, used: this.inWindow() + this.inFlight, available };
  }

  private inWindow(): number {
    return this.times.length - this.head;
  }

  /** Drops takes older than the period; compacts the array now and then. */
  private forget(now: number, rate: Rate): void {
    const oldest = now - rate.periodMs - guardOf(rate.periodMs);
    while (this.head < this.times.length && this.times[this.head] <= oldest) this.head++;
    if (this.head > 1024 && this.head * 2 > this.times.length) {
      this.times = this.times.slice(this.head);
      this.head = 0;
    }
  }
}
