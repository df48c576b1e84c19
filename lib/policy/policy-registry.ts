/**
 * The pairs' policies (pair-policy.ts), and the rate buckets they share: one per scope a rate is
 * declared in (Momentum's throttles are shared by reference the same way). A pair's policy is
 * made on first use and kept while its pool lives or something is in force for it (a
 * suspension, a rule's options, a learned limit, a trigger still counting).
 */
import { compileRule, RuleBook } from '../shaping/reply-rules';
import { parseRate, RateBucket, type Bucket, type BucketStats, type Rate } from '../shaping/rate';
import { ClusterRateBucket } from '../shaping/cluster-rate';
import type { RedisStore } from '../coordination/redis-store';
import { Warmup, type WarmupStep } from '../shaping/warmup';
import type { ResolvedOptions } from './options';
import { PairPolicy, type PolicyEvents, type ShapingStats } from './pair-policy';
import type { Binding, ScopeResolver } from './scopes';

/** A rate bucket's figures with the warm-up step in force, for stats(). */
export interface RateStats extends BucketStats {
  kind: 'maxMessageRate' | 'maxConnectionRate';
  warmup?: WarmupStep;
}

export class PolicyRegistry {
  private readonly policies = new Map<string, PairPolicy>();
  /** Set by the engine: pools waiting for rate room look again (a cluster bucket's takes arrived). */
  onRoom: () => void = () => undefined;
  /** Policies whose pool was dropped while something was in force: looked at again at each drop. */
  private readonly unpooled = new Set<string>();
  private readonly buckets = new Map<string, { bucket: Bucket; kind: RateStats['kind']; warmup?: Warmup }>();

  constructor(
    private readonly scopes: ScopeResolver,
    private readonly emit: PolicyEvents,
    /** With `coordination`: the declared rate buckets are the cluster's (and, while Redis fails, each process's share). */
    private readonly store?: RedisStore,
    private readonly processes?: number,
  ) {}

  get(binding: Binding, domain: string): PairPolicy {
    const key = `${binding.name}\0${domain}`;
    let policy = this.policies.get(key);
    this.unpooled.delete(key);
    if (!policy) {
      const rules = this.scopes.replyRulesFor(binding, domain).map(({ rule, path }) => compileRule(rule, path));
      policy = new PairPolicy(
        binding.name,
        domain,
        this.scopes.resolve(binding, domain),
        this.messageBucketFor(binding, domain),
        this.connectionBucketFor(binding, domain),
        new RuleBook(rules),
        this.emit,
      );
      this.policies.set(key, policy);
    }
    return policy;
  }

  /** The pair's pool was dropped: its policy goes too unless something is in force (then at a later drop, once it ends). */
  release(binding: string, domain: string): void {
    const now = Date.now();
    this.unpooled.add(`${binding}\0${domain}`);
    for (const key of this.unpooled) {
      const policy = this.policies.get(key);
      if (policy && !policy.dormant(now)) continue;
      this.policies.delete(key);
      this.unpooled.delete(key);
    }
  }

  rateStats(now: number): RateStats[] {
    const found: RateStats[] = [];
    for (const { bucket, kind, warmup } of this.buckets.values()) {
      const stats = bucket.stats(now);
      if (!stats) continue;
      found.push(warmup ? { kind, ...stats, warmup: warmup.stepAt(now) } : { kind, ...stats });
    }
    return found;
  }

  shapingStats(now: number): ShapingStats[] {
    const found: ShapingStats[] = [];
    for (const policy of this.policies.values()) {
      const stats = policy.stats(now);
      if (stats) found.push(stats);
    }
    return found;
  }

  close(): void {
    for (const policy of this.policies.values()) policy.close();
    for (const { bucket } of this.buckets.values()) bucket.close?.();
  }

  /**
   * The policy another process's event concerns (`coordination`): made if need be, and then
   * counted as without a pool, so that it goes once the event is over.
   */
  forEvent(binding: Binding, domain: string): PairPolicy {
    const key = `${binding.name}\0${domain}`;
    if (this.policies.has(key)) return this.policies.get(key)!;
    const policy = this.get(binding, domain);
    this.unpooled.add(key);
    return policy;
  }

  private messageBucketFor(binding: Binding, domain: string): Bucket | undefined {
    const declared = this.scopes.declaration(binding, domain, ['maxMessageRate', 'warmup'] as const);
    if (!declared) return undefined;
    return this.shared('maxMessageRate', declared.path, (scope) => {
      if (declared.name === 'warmup') {
        const warmup = new Warmup(declared.value as NonNullable<ResolvedOptions['warmup']>);
        return { bucket: this.bucket('maxMessageRate', scope, (now) => warmup.rateAt(now)), warmup };
      }
      const rate = parseRateChecked(declared.value as string);
      return { bucket: this.bucket('maxMessageRate', scope, () => rate) };
    });
  }

  private connectionBucketFor(binding: Binding, domain: string): Bucket | undefined {
    const declared = this.scopes.declaration(binding, domain, ['maxConnectionRate'] as const);
    if (!declared) return undefined;
    const rate = parseRateChecked(declared.value);
    return this.shared('maxConnectionRate', declared.path, (scope) => ({ bucket: this.bucket('maxConnectionRate', scope, () => rate) }));
  }

  /** This process's bucket, or with `coordination` the cluster's (keyed by kind and scope, the same in every process). */
  private bucket(kind: RateStats['kind'], scope: string, rateAt: (now: number) => Rate | undefined): Bucket {
    if (!this.store) return new RateBucket(scope, rateAt);
    return new ClusterRateBucket(scope, rateAt, this.store, `${kind}:${scope}`, this.processes, () => this.onRoom());
  }

  /** The bucket of a declaration, made once: every pair the scope covers shares it (Momentum's throttles). */
  private shared(kind: RateStats['kind'], path: string, make: (scope: string) => { bucket: Bucket; warmup?: Warmup }): Bucket {
    const key = `${kind}\0${path}`;
    let entry = this.buckets.get(key);
    // The global scope's path is '': named for stats and errors.
    path ||= 'global';
    if (!entry) this.buckets.set(key, (entry = { kind, ...make(path) }));
    return entry.bucket;
  }
}

/** A rate validate.ts has already accepted. */
function parseRateChecked(text: string): Rate {
  return parseRate(text) as Rate;
}
