/**
 * One policy per (binding, domain) pair: the options its scopes resolve to, and what is in force
 * on top of them now. Every layer below (routing, pool, connections) reads the pair's limits
 * here, so a reply rule's override or a learned limit changes them in one place:
 *
 * - rate buckets (shaping/rate.ts): the declared ones, shared with every pair their scope covers,
 *   and any a rule set for a while;
 * - a suspension from a reply rule: the pair sends nothing and opens nothing until it ends;
 * - stricter options from a rule's `set`, each for its rule's duration (several may hold at once:
 *   the strictest value of each applies, never looser than configured);
 * - a learned per-connection limit: a receiver that closed connections with a 421 after k
 *   deliveries, twice in a row with the same k (Exim's "421 too many messages in this
 *   connection"), gets k deliveries per connection for LEARNED_LIMIT_MS, then the configured value
 *   again (a receiver that still enforces it is learned again from two more 421s).
 *
 * A policy outlives its pool (a pool is dropped when idle; a suspension of two hours is not), so
 * the PolicyRegistry keeps it while something is in force.
 */
import { poolLog } from '../log';
import { parseRate, RateBucket, type BucketStats, type Rate } from '../shaping/rate';
import { compileRule, RuleBook, type ReplyRuleSettings, type RuleMatch } from '../shaping/reply-rules';
import { Warmup, type WarmupStep } from '../shaping/warmup';
import type { Binding, ScopeResolver } from './scopes';
import type { ConnectionLimits, ResolvedOptions } from './options';

/** How long a learned per-connection limit holds after the 421s that taught it. */
export const LEARNED_LIMIT_MS = 60 * 60_000;

/** A rule's stricter options, in force until `until`. */
interface Override {
  rule: string;
  reply: string;
  set: ReplyRuleSettings;
  until: number;
  messageBucket?: RateBucket;
  connectionBucket?: RateBucket;
}

/** What `suspended` and `resumed` events carry. */
export interface SuspensionEvent {
  binding: string;
  domain: string;
  /** The rule's name (or its option path) and the server reply that matched it. */
  rule: string;
  reply: string;
  /** When the suspension ends. */
  until: Date;
}

export interface ShapingStats {
  binding: string;
  domain: string;
  suspended?: { until: number; rule: string; reply: string };
  overrides: { rule: string; reply: string; set: ReplyRuleSettings; until: number }[];
  learned?: { maxDeliveriesPerConnection: number; until: number; reply: string };
  /** The limits in force now (configured, tightened by rules and learned limits). */
  effective: { maxOutboundConnections: number; maxDeliveriesPerConnection: number; maxRecipientsPerConnection: number; maxRecipientsPerTransaction: number };
}

export type PolicyEvents = (name: 'suspended' | 'resumed', event: SuspensionEvent) => void;

export class PairPolicy {
  /** The limits connections of this pair check, updated in place when what is in force changes. */
  readonly limits: ConnectionLimits;
  private outbound: number;
  private readonly rules: RuleBook;
  private suspension: { until: number; rule: string; reply: string; timer: NodeJS.Timeout } | undefined;
  private overrides: Override[] = [];
  private learned: { k: number; until: number; reply: string } | undefined;
  /** The last 421-after-k seen, waiting for a second one with the same k. */
  private candidate: number | undefined;
  /** The retryAfter times given to sends the rates turned away, still to come (ascending). */
  private readonly promised: number[] = [];
  /** The earliest time something in force ends (refresh does nothing before it). */
  private nextExpiry = Infinity;

  constructor(
    readonly binding: string,
    readonly domain: string,
    readonly options: ResolvedOptions,
    private readonly messageBucket: RateBucket | undefined,
    private readonly connectionBucket: RateBucket | undefined,
    rules: RuleBook,
    private readonly emit: PolicyEvents,
  ) {
    this.rules = rules;
    this.limits = { maxDeliveries: 0, maxRecipients: 0, maxRecipientsPerTransaction: 1 };
    this.outbound = options.maxOutboundConnections;
    this.recompute();
  }

  get maxOutboundConnections(): number {
    return this.outbound;
  }

  /** Ends what has run out (overrides, a learned limit, a suspension: then `resumed`). */
  refresh(now: number): void {
    if (now < this.nextExpiry) return;
    if (this.suspension && this.suspension.until <= now) this.resume();
    this.overrides = this.overrides.filter((o) => o.until > now);
    if (this.learned && this.learned.until <= now) {
      poolLog('%s/%s: learned limit of %d deliveries per connection relaxed', this.binding, this.domain, this.learned.k);
      this.learned = undefined;
    }
    this.recompute();
  }

  /** The end of a suspension in force (epoch ms), else undefined. */
  suspendedUntil(now: number): number | undefined {
    this.refresh(now);
    return this.suspension?.until;
  }

  get suspensionReply(): string {
    return this.suspension ? `${this.suspension.rule}: ${this.suspension.reply}` : '';
  }

  /** Recipients every message bucket has room for now (Infinity without a rate). */
  messageRoom(now: number): number {
    return room(this.messageBuckets(), now);
  }

  /** When the nth recipient from now could go (now if it can). */
  messageAvailableAt(now: number, nth = 1): number {
    return availableAt(this.messageBuckets(), now, nth);
  }

  takeMessages(n: number, now: number): void {
    for (const bucket of this.messageBuckets()) bucket.take(n, now);
  }

  refundMessages(n: number, now: number): void {
    for (const bucket of this.messageBuckets()) bucket.refund(n, now);
  }

  /** `n` recipients taken from the message rates reached the server by `at` (shaping/rate.ts). */
  settleMessages(n: number, at: number): void {
    for (const bucket of this.messageBuckets()) bucket.settle(n, at);
  }

  connectionRoom(now: number): number {
    return room(this.connectionBuckets(), now);
  }

  connectionAvailableAt(now: number): number {
    return availableAt(this.connectionBuckets(), now, 1);
  }

  takeConnection(now: number): void {
    // A connect counts from when it starts: settled at once.
    for (const bucket of this.connectionBuckets()) {
      bucket.take(1, now);
      bucket.settle(1, now);
    }
  }

  /**
   * The `retryAfter` for a send the message rates turn away, `ahead` sends in line before it:
   * when the rates have room for it and for every send already told to come back, so that a
   * batch turned away together comes back spread out as the rates allow, not all at once.
   */
  rateRetryAfter(now: number, ahead: number): number {
    while (this.promised.length > 0 && this.promised[0] <= now) this.promised.shift();
    const at = this.messageAvailableAt(now, ahead + this.promised.length + 1);
    this.promised.push(at);
    return at;
  }

  /** Which rate holds a send back, for its error: the first bucket without room. */
  describeMessageRate(now: number): string {
    const full = this.messageBuckets().find((b) => b.room(now) < 1);
    const rate = full?.rateAt(now);
    return full && rate ? `maxMessageRate '${rate.text}' (${full.scope})` : 'maxMessageRate';
  }

  /**
   * The server's replies (4xx/5xx) of one transaction or dial, read before the generic 421
   * handling: the rules that act now suspend the pair or tighten its options.
   */
  observe(replies: readonly string[], now: number): RuleMatch[] {
    if (replies.length === 0) return [];
    const acting = this.rules.observe(replies, now);
    for (const { rule, reply } of acting) {
      const until = now + rule.durationMs;
      if (rule.action === 'suspend') this.suspend(rule.name, reply, until);
      else this.override(rule.name, reply, rule.action.set, rule.action.rates, until);
    }
    if (acting.length > 0) this.recompute();
    return acting;
  }

  /** A connection the receiver closed with a 421 after `k` deliveries: its per-connection limit, once seen twice. */
  learnFromClose(k: number, reply: string, now: number): void {
    const configured = this.options.maxDeliveriesPerConnection;
    if (k < 1 || (configured > 0 && k >= configured) || (this.learned && k >= this.learned.k)) return;
    if (this.candidate !== k) {
      this.candidate = k;
      return;
    }
    this.candidate = undefined;
    this.learned = { k, until: now + LEARNED_LIMIT_MS, reply };
    poolLog('%s/%s: learned %d deliveries per connection from "%s"', this.binding, this.domain, k, reply);
    this.recompute();
  }

  /** Nothing in force and nothing counting: the policy can go with its pool. */
  dormant(now: number): boolean {
    this.refresh(now);
    return !this.suspension && this.overrides.length === 0 && !this.learned && this.candidate === undefined && !this.rules.counting(now);
  }

  /** What is in force, for stats(); undefined when nothing is. */
  stats(now: number): ShapingStats | undefined {
    this.refresh(now);
    if (!this.suspension && this.overrides.length === 0 && !this.learned) return undefined;
    const stats: ShapingStats = {
      binding: this.binding,
      domain: this.domain,
      overrides: this.overrides.map(({ rule, reply, set, until }) => ({ rule, reply, set, until })),
      effective: {
        maxOutboundConnections: this.outbound,
        maxDeliveriesPerConnection: this.limits.maxDeliveries,
        maxRecipientsPerConnection: this.limits.maxRecipients,
        maxRecipientsPerTransaction: this.limits.maxRecipientsPerTransaction,
      },
    };
    if (this.suspension) stats.suspended = { until: this.suspension.until, rule: this.suspension.rule, reply: this.suspension.reply };
    if (this.learned) stats.learned = { maxDeliveriesPerConnection: this.learned.k, until: this.learned.until, reply: this.learned.reply };
    return stats;
  }

  /** Ends a suspension at once (the transport closes). */
  close(): void {
    if (this.suspension) clearTimeout(this.suspension.timer);
  }

  private suspend(rule: string, reply: string, until: number): void {
    if (this.suspension) clearTimeout(this.suspension.timer);
    // A timer of its own, so that `resumed` comes when the suspension ends, sends or not.
    const timer = setTimeout(() => this.refresh(Date.now()), Math.max(0, until - Date.now())).unref();
    this.suspension = { until, rule, reply, timer };
    poolLog('%s/%s suspended until %s by %s: %s', this.binding, this.domain, new Date(until).toISOString(), rule, reply);
    this.emit('suspended', { binding: this.binding, domain: this.domain, rule, reply, until: new Date(until) });
  }

  private resume(): void {
    const { rule, reply, until, timer } = this.suspension!;
    clearTimeout(timer);
    this.suspension = undefined;
    poolLog('%s/%s resumed (%s)', this.binding, this.domain, rule);
    this.emit('resumed', { binding: this.binding, domain: this.domain, rule, reply, until: new Date(until) });
  }

  private override(rule: string, reply: string, set: ReplyRuleSettings, rates: { maxMessageRate?: Rate; maxConnectionRate?: Rate }, until: number): void {
    // The same rule again extends its override (its buckets keep what they counted).
    const previous = this.overrides.find((o) => o.rule === rule);
    const scope = `${rule} (rule)`;
    const bucket = (rate: Rate | undefined, existing: RateBucket | undefined): RateBucket | undefined =>
      rate ? (existing ?? new RateBucket(scope, () => rate)) : undefined;
    const next: Override = {
      rule,
      reply,
      set,
      until,
      messageBucket: bucket(rates.maxMessageRate, previous?.messageBucket),
      connectionBucket: bucket(rates.maxConnectionRate, previous?.connectionBucket),
    };
    this.overrides = [...this.overrides.filter((o) => o !== previous), next];
    poolLog('%s/%s: %s sets %j until %s: %s', this.binding, this.domain, rule, set, new Date(until).toISOString(), reply);
  }

  /** The limits in force: the strictest of the configured value, each override's and the learned one. */
  private recompute(): void {
    const { options } = this;
    const sets = this.overrides.map((o) => o.set);
    this.limits.maxDeliveries = strictest(options.maxDeliveriesPerConnection, [...sets.map((s) => s.maxDeliveriesPerConnection), this.learned?.k]);
    this.limits.maxRecipients = strictest(
      options.maxRecipientsPerConnection,
      sets.map((s) => s.maxRecipientsPerConnection),
    );
    this.limits.maxRecipientsPerTransaction = strictest(
      options.maxRecipientsPerTransaction,
      sets.map((s) => s.maxRecipientsPerTransaction),
    );
    this.outbound = strictest(
      options.maxOutboundConnections,
      sets.map((s) => s.maxOutboundConnections),
    );
    const ends = [...this.overrides.map((o) => o.until), this.learned?.until ?? Infinity, this.suspension?.until ?? Infinity];
    this.nextExpiry = Math.min(...ends);
  }

  private messageBuckets(): RateBucket[] {
    return buckets(this.messageBucket, this.overrides, 'messageBucket');
  }

  private connectionBuckets(): RateBucket[] {
    return buckets(this.connectionBucket, this.overrides, 'connectionBucket');
  }
}

/** The strictest of a configured limit and overrides (0 is "no limit", the loosest). */
function strictest(configured: number, others: (number | undefined)[]): number {
  let value = configured;
  for (const other of others) {
    if (other === undefined || other === 0) continue;
    value = value === 0 ? other : Math.min(value, other);
  }
  return value;
}

function buckets(declared: RateBucket | undefined, overrides: Override[], field: 'messageBucket' | 'connectionBucket'): RateBucket[] {
  const found = declared ? [declared] : [];
  for (const override of overrides) if (override[field]) found.push(override[field]!);
  return found;
}

function room(list: RateBucket[], now: number): number {
  let least = Infinity;
  for (const bucket of list) least = Math.min(least, bucket.room(now));
  return least;
}

function availableAt(list: RateBucket[], now: number, nth: number): number {
  let latest = now;
  for (const bucket of list) latest = Math.max(latest, bucket.availableAt(now, nth));
  return latest;
}

/** A rate bucket's figures with the warm-up step in force, for stats(). */
export interface RateStats extends BucketStats {
  kind: 'maxMessageRate' | 'maxConnectionRate';
  warmup?: WarmupStep;
}

/**
 * The pairs' policies, and the rate buckets they share: one per scope a rate is declared in.
 * A pair's policy is made on first use and kept while its pool lives or something is in force.
 */
export class PolicyRegistry {
  private readonly policies = new Map<string, PairPolicy>();
  private readonly buckets = new Map<string, { bucket: RateBucket; kind: RateStats['kind']; warmup?: Warmup }>();

  constructor(
    private readonly scopes: ScopeResolver,
    private readonly emit: PolicyEvents,
  ) {}

  get(binding: Binding, domain: string): PairPolicy {
    const key = `${binding.name}\0${domain}`;
    let policy = this.policies.get(key);
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

  /** The pair's pool was dropped: its policy goes too unless something is in force. */
  release(binding: string, domain: string): void {
    const key = `${binding}\0${domain}`;
    if (this.policies.get(key)?.dormant(Date.now())) this.policies.delete(key);
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
  }

  private messageBucketFor(binding: Binding, domain: string): RateBucket | undefined {
    const declared = this.scopes.declaration(binding, domain, ['maxMessageRate', 'warmup'] as const);
    if (!declared) return undefined;
    return this.shared('maxMessageRate', declared.path, (scope) => {
      if (declared.name === 'warmup') {
        const warmup = new Warmup(declared.value as NonNullable<ResolvedOptions['warmup']>);
        return { bucket: new RateBucket(scope, (now) => warmup.rateAt(now)), warmup };
      }
      const rate = parseRateChecked(declared.value as string);
      return { bucket: new RateBucket(scope, () => rate) };
    });
  }

  private connectionBucketFor(binding: Binding, domain: string): RateBucket | undefined {
    const declared = this.scopes.declaration(binding, domain, ['maxConnectionRate'] as const);
    if (!declared) return undefined;
    const rate = parseRateChecked(declared.value);
    return this.shared('maxConnectionRate', declared.path, (scope) => ({ bucket: new RateBucket(scope, () => rate) }));
  }

  /** The bucket of a declaration, made once: every pair the scope covers shares it (Momentum's throttles). */
  private shared(kind: RateStats['kind'], path: string, make: (scope: string) => { bucket: RateBucket; warmup?: Warmup }): RateBucket {
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
