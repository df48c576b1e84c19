/**
 * A rate bucket shared by every process (`coordination`): Redis keeps the window
 * (coordination/redis-store.ts), this process keeps a few takes fetched ahead so that a send
 * does not wait for a round trip, and its own RateBucket for bursts (`max_burst` holds per
 * process) and stats.
 *
 * Takes are fetched in small batches (a 32nd of the rate's count, at most 500) before the room
 * runs out (at half a batch left), and the pools waiting for room are woken as a batch arrives;
 * a take fetched and not handed out within PERMIT_HOLD_MS goes back, so that other processes
 * can use it (many processes each holding a batch would leave the window full of takes nobody
 * sends). In Redis a take is in flight until its transaction settles it, as here.
 */
import type { RedisStore } from '../coordination/redis-store';
import { guardOf, RateBucket, type Bucket, type BucketStats, type Rate } from './rate';

/** How long a fetched take waits here to be handed out before it goes back to Redis. */
const PERMIT_HOLD_MS = 100;
/** How soon to ask again while a fetch is under way, or after Redis failed. */
const POLL_MS = 20;
const FAILED_RETRY_MS = 500;
/** A take made from this process's share while Redis failed: nothing of it is in Redis. */
const SHARE_TAKE = '';

export class ClusterRateBucket implements Bucket {
  private readonly local: RateBucket;
  /** With `onFailure: { processes: N }`: this process's share of the rate (count / N), used while Redis fails. */
  private readonly share: RateBucket | undefined;
  private permits: string[] = [];
  private fetchedAt = 0;
  private readonly inFlight: string[] = [];
  private fetching = false;
  /** When Redis said the window has room again, or when to try again after it failed. */
  private retryAt = 0;
  private holdTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly scope: string,
    readonly rateAt: (now: number) => Rate | undefined,
    private readonly store: RedisStore,
    private readonly key: string,
    processes: number | undefined,
    /** Called when fetched takes arrive: the pools waiting for room look again. */
    private readonly onRoom: () => void,
  ) {
    this.local = new RateBucket(scope, rateAt);
    if (processes !== undefined) {
      this.share = new RateBucket(scope, (now) => {
        const rate = rateAt(now);
        return rate && { ...rate, count: Math.max(1, Math.floor(rate.count / processes)), burst: Math.max(1, Math.floor(rate.burst / processes)) };
      });
    }
  }

  room(now: number): number {
    const local = this.local.room(now);
    if (local === Infinity) return local;
    if (this.share && this.store.failure) {
      // Redis fails: this process's share, asking Redis again now and then.
      this.fetch(now);
      return Math.min(local, this.share.room(now));
    }
    this.giveBackStale(now);
    if (this.permits.length <= Math.min(local, this.batch(now)) / 2) this.fetch(now);
    return Math.min(local, this.permits.length);
  }

  availableAt(now: number, nth = 1): number {
    const local = this.local.availableAt(now, nth);
    if (this.permits.length >= nth) return local;
    return Math.max(local, this.fetching ? now + POLL_MS : Math.max(this.retryAt, now + POLL_MS));
  }

  take(n: number, now: number): void {
    this.local.take(n, now);
    this.share?.take(n, now);
    const members = this.permits.splice(0, n);
    // While Redis fails (and a share applies) there may be fewer permits than takes: those are the
    // share's, kept as placeholders so that a settle or refund never touches another send's.
    while (members.length < n) members.push(SHARE_TAKE);
    this.inFlight.push(...members);
  }

  settle(n: number, at: number): void {
    this.local.settle(n, at);
    this.share?.settle(n, at);
    this.store.settleRate(
      this.key,
      this.inFlight.splice(0, n).filter((m) => m !== SHARE_TAKE),
      at,
    );
  }

  refund(n: number, now: number): void {
    this.local.refund(n, now);
    this.share?.refund(n, now);
    if (n > 0)
      this.store.refundRate(
        this.key,
        this.inFlight.splice(Math.max(0, this.inFlight.length - n)).filter((m) => m !== SHARE_TAKE),
      );
  }

  close(): void {
    clearTimeout(this.holdTimer);
    this.giveBackStale(Infinity);
  }

  stats(now: number): BucketStats | undefined {
    const stats = this.local.stats(now);
    return stats && { ...stats, available: Math.min(stats.available, this.permits.length) };
  }

  private batch(now: number): number {
    const rate = this.rateAt(now);
    return rate ? Math.min(500, Math.max(1, Math.ceil(rate.count / 32))) : 1;
  }

  private fetch(now: number): void {
    const rate = this.rateAt(now);
    if (!rate || this.fetching || now < this.retryAt) return;
    this.fetching = true;
    const wanted = this.batch(now);
    this.store.takeRate(this.key, rate.count, rate.periodMs + guardOf(rate.periodMs), wanted).then(
      ({ members, retryAt }) => {
        this.fetching = false;
        if (members.length > 0) {
          this.permits.push(...members);
          this.fetchedAt = Date.now();
          // Not left to the next look: a pair that stops sending gives them back too.
          clearTimeout(this.holdTimer);
          this.holdTimer = setTimeout(() => this.giveBackStale(Date.now()), PERMIT_HOLD_MS).unref();
        }
        this.retryAt = members.length === 0 && retryAt !== undefined ? retryAt : 0;
        if (members.length > 0) this.onRoom();
      },
      () => {
        this.fetching = false;
        this.retryAt = Date.now() + FAILED_RETRY_MS;
      },
    );
  }

  /** Fetched takes nobody used in time go back to the cluster. */
  private giveBackStale(now: number): void {
    if (this.permits.length === 0 || now - this.fetchedAt < PERMIT_HOLD_MS) return;
    this.store.refundRate(this.key, this.permits);
    this.permits = [];
  }
}
