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
 * - a learned per-connection limit: a receiver that closed a connection with a 421 after k
 *   deliveries, and then closed one opened after that 421 after k again (Exim's "421 too many
 *   messages in this connection"), gets k deliveries per connection for LEARNED_LIMIT_MS, then
 *   the configured value again (a receiver that still enforces it is learned again). A 421
 *   after fewer than k drops it at once: that receiver limits something else.
 *
 * A policy outlives its pool (a pool is dropped when idle; a suspension of two hours is not), so
 * the PolicyRegistry keeps it while something is in force.
 */
import { poolLog } from '../log';
import { RateBucket, type Bucket, type BucketStats, type Rate } from '../shaping/rate';
import type { CompiledRule, ReplyRuleSettings, RuleBook, RuleMatch } from '../shaping/reply-rules';
import type { ConnectionLimits, ResolvedOptions } from './options';

/** How long a learned per-connection limit holds after the 421s that taught it. */
export const LEARNED_LIMIT_MS = 60 * 60_000;

/** How long a first 421-after-k waits for the second that confirms it. */
const CANDIDATE_MS = 10 * 60_000;

/** A rule's stricter options, in force until `until`. */
interface Override {
  /** The rule (by identity: two rules may share a name). */
  source: CompiledRule;
  rule: string;
  reply: string;
  set: ReplyRuleSettings;
  until: number;
  messageBucket?: Bucket;
  connectionBucket?: Bucket;
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
  /** Set when the suspension came from another process (`coordination`). */
  fromCluster?: true;
}

/** A limit this pair learned, for the other processes (`coordination`). */
export interface LearnedEvent {
  binding: string;
  domain: string;
  maxDeliveriesPerConnection: number;
  reply: string;
  until: number;
}

export interface ShapingStats {
  binding: string;
  domain: string;
  suspended?: { until: number; rule: string; reply: string };
  overrides: { rule: string; reply: string; set: ReplyRuleSettings; until: number; rates: BucketStats[] }[];
  learned?: { maxDeliveriesPerConnection: number; until: number; reply: string };
  /** The limits in force now (configured, tightened by rules and learned limits). */
  effective: { maxOutboundConnections: number; maxDeliveriesPerConnection: number; maxRecipientsPerConnection: number; maxRecipientsPerTransaction: number };
}

export interface PolicyEvents {
  (name: 'suspended' | 'resumed', event: SuspensionEvent): void;
  (name: 'learned', event: LearnedEvent): void;
}

export class PairPolicy {
  /** The limits connections of this pair check, updated in place when what is in force changes. */
  readonly limits: ConnectionLimits;
  private outbound: number;
  private readonly rules: RuleBook;
  private suspension: { until: number; rule: string; reply: string; timer: NodeJS.Timeout } | undefined;
  private overrides: Override[] = [];
  private learned: { k: number; until: number; reply: string } | undefined;
  /** The last 421-after-k seen, waiting for a second one with the same k (within CANDIDATE_MS). */
  private candidate: { k: number; at: number } | undefined;
  /** The retryAfter times given to sends the rates turned away, still to come (ascending). */
  private readonly promised: number[] = [];
  /** The buckets in force, made again only when the overrides change (every send reads them). */
  private messageList: Bucket[] = [];
  private connectionList: Bucket[] = [];
  /** The earliest time something in force ends (refresh does nothing before it). */
  private nextExpiry = Infinity;

  constructor(
    readonly binding: string,
    readonly domain: string,
    readonly options: ResolvedOptions,
    private readonly messageBucket: Bucket | undefined,
    private readonly connectionBucket: Bucket | undefined,
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
    // Asked several times per message: the refresh only when something is due to end.
    if (now >= this.nextExpiry) this.refresh(now);
    return this.suspension?.until;
  }

  get suspensionReply(): string {
    return this.suspension ? `${this.suspension.rule}: ${this.suspension.reply}` : '';
  }

  /** True while a message or connection rate is in force. */
  get rated(): boolean {
    return this.messageList.length > 0 || this.connectionList.length > 0;
  }

  /** Recipients every message bucket has room for now (Infinity without a rate). */
  messageRoom(now: number): number {
    return room(this.messageList, now);
  }

  /** When the nth recipient from now could go (now if it can). */
  messageAvailableAt(now: number, nth = 1): number {
    return availableAt(this.messageList, now, nth);
  }

  /** Takes `n` recipients from every message bucket in force; returns them, to settle or refund there. */
  takeMessages(n: number, now: number): Bucket[] {
    const buckets = this.messageList;
    for (let i = 0; i < buckets.length; i++) buckets[i].take(n, now);
    return buckets;
  }

  connectionRoom(now: number): number {
    return room(this.connectionList, now);
  }

  connectionAvailableAt(now: number): number {
    return availableAt(this.connectionList, now, 1);
  }

  takeConnection(now: number): void {
    // A connect counts from when it starts: settled at once.
    for (const bucket of this.connectionList) {
      bucket.take(1, now);
      bucket.settle(1, now);
    }
  }

  /**
   * The `retryAfter` for a send the message rates turn away: when the rates have room for it
   * and for every send already told to come back, so that a batch turned away comes back spread
   * out as the rates allow, not all at once.
   */
  rateRetryAfter(now: number): number {
    while (this.promised.length > 0 && this.promised[0] <= now) this.promised.shift();
    const at = this.messageAvailableAt(now, this.promised.length + 1);
    this.promised.push(at);
    return at;
  }

  /** Which rate holds a send back, for its error: the first bucket without room. */
  describeMessageRate(now: number): string {
    const full = this.messageList.find((b) => b.room(now) < 1);
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
    const suspensions: RuleMatch[] = [];
    for (const match of acting) {
      if (match.rule.action === 'suspend') suspensions.push(match);
      else this.override(match.rule, match.reply, now + match.rule.durationMs);
    }
    if (acting.length > 0) this.recompute();
    // Last, with everything in force: a listener (or the delivery thread's stats) sees it all.
    for (const { rule, reply } of suspensions) this.suspend(rule.name, reply, now + rule.durationMs);
    return acting;
  }

  /** A connection the receiver closed with a 421 after `k` deliveries: its per-connection limit, once seen twice. */
  learnFromClose(k: number, openedAt: number, reply: string, now: number): void {
    // A 421 before the learned k (or before any delivery) says the receiver limits something else
    // (a rate window, whose 421s come after any number): the learned limit was wrong.
    if (this.learned && k < this.learned.k) {
      poolLog('%s/%s: learned limit of %d dropped: a 421 after %d deliveries', this.binding, this.domain, this.learned.k, k);
      this.learned = undefined;
      this.recompute();
    }
    const configured = this.options.maxDeliveriesPerConnection;
    if (k < 1 || (configured > 0 && k >= configured) || (this.learned && k >= this.learned.k)) return;
    const fresh = this.candidate === undefined || this.candidate.k !== k || now - this.candidate.at > CANDIDATE_MS;
    if (fresh) {
      this.candidate = { k, at: now };
      return;
    }
    // The second must come from a connection opened after the first 421: connections that ran in
    // step under a receiver's rate window all meet its 421 after the same number.
    if (openedAt <= this.candidate!.at) return;
    this.candidate = undefined;
    this.applyLearned(k, reply, now + LEARNED_LIMIT_MS);
    this.emit('learned', { binding: this.binding, domain: this.domain, maxDeliveriesPerConnection: k, reply, until: now + LEARNED_LIMIT_MS });
  }

  /** A per-connection limit learned here or by another process (`coordination`). */
  applyLearned(k: number, reply: string, until: number): void {
    if (this.learned && this.learned.k <= k && this.learned.until >= until) return;
    this.learned = { k, until, reply };
    poolLog('%s/%s: learned %d deliveries per connection from "%s"', this.binding, this.domain, k, reply);
    this.recompute();
  }

  /** Another process's suspension of this pair (`coordination`): in force here too, announced as `fromCluster`. */
  applySuspension(rule: string, reply: string, until: number): void {
    if (this.suspension && this.suspension.until >= until) return;
    this.suspend(rule, reply, until, true);
  }

  /** Nothing in force and nothing counting: the policy can go with its pool. */
  dormant(now: number): boolean {
    this.refresh(now);
    const candidate = this.candidate !== undefined && now - this.candidate.at <= CANDIDATE_MS;
    return !this.suspension && this.overrides.length === 0 && !this.learned && !candidate && !this.rules.counting(now);
  }

  /** What is in force, for stats(); undefined when nothing is. */
  stats(now: number): ShapingStats | undefined {
    this.refresh(now);
    if (!this.suspension && this.overrides.length === 0 && !this.learned) return undefined;
    const stats: ShapingStats = {
      binding: this.binding,
      domain: this.domain,
      overrides: this.overrides.map(({ rule, reply, set, until, messageBucket, connectionBucket }) => ({
        rule,
        reply,
        set,
        until,
        rates: [messageBucket?.stats(now), connectionBucket?.stats(now)].filter((b) => b !== undefined),
      })),
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

  private suspend(rule: string, reply: string, until: number, fromCluster = false): void {
    if (this.suspension) clearTimeout(this.suspension.timer);
    this.suspension = { until, rule, reply, timer: this.resumeTimer(until) };
    this.recompute();
    poolLog(
      '%s/%s suspended until %s by %s%s: %s',
      this.binding,
      this.domain,
      new Date(until).toISOString(),
      rule,
      fromCluster ? ' (another process)' : '',
      reply,
    );
    const event: SuspensionEvent = { binding: this.binding, domain: this.domain, rule, reply, until: new Date(until) };
    if (fromCluster) event.fromCluster = true;
    this.emit('suspended', event);
  }

  /** A timer of its own, so that `resumed` comes when the suspension ends, sends or not (again if it fired early). */
  private resumeTimer(until: number): NodeJS.Timeout {
    return setTimeout(
      () => {
        const now = Date.now();
        if (this.suspension && this.suspension.until > now) this.suspension.timer = this.resumeTimer(this.suspension.until);
        else this.refresh(now);
      },
      Math.max(0, until - Date.now()),
    ).unref();
  }

  private resume(): void {
    const { rule, reply, until, timer } = this.suspension!;
    clearTimeout(timer);
    this.suspension = undefined;
    poolLog('%s/%s resumed (%s)', this.binding, this.domain, rule);
    this.emit('resumed', { binding: this.binding, domain: this.domain, rule, reply, until: new Date(until) });
  }

  private override(source: CompiledRule, reply: string, until: number): void {
    if (source.action === 'suspend') return;
    const { set, rates } = source.action;
    // The same rule again extends its override (its buckets keep what they counted).
    const previous = this.overrides.find((o) => o.source === source);
    const scope = `${source.name} (rule)`;
    const bucket = (rate: Rate | undefined, existing: Bucket | undefined): Bucket | undefined =>
      rate ? (existing ?? new RateBucket(scope, () => rate)) : undefined;
    const next: Override = {
      source,
      rule: source.name,
      reply,
      set,
      until,
      messageBucket: bucket(rates.maxMessageRate, previous?.messageBucket),
      connectionBucket: bucket(rates.maxConnectionRate, previous?.connectionBucket),
    };
    this.overrides = [...this.overrides.filter((o) => o !== previous), next];
    poolLog('%s/%s: %s sets %j until %s: %s', this.binding, this.domain, source.name, set, new Date(until).toISOString(), reply);
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
    this.messageList = buckets(this.messageBucket, this.overrides, 'messageBucket');
    this.connectionList = buckets(this.connectionBucket, this.overrides, 'connectionBucket');
    const ends = [...this.overrides.map((o) => o.until), this.learned?.until ?? Infinity, this.suspension?.until ?? Infinity];
    this.nextExpiry = Math.min(...ends);
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

function buckets(declared: Bucket | undefined, overrides: Override[], field: 'messageBucket' | 'connectionBucket'): Bucket[] {
  const found = declared ? [declared] : [];
  for (const override of overrides) if (override[field]) found.push(override[field]!);
  return found;
}

// Indexed loops: asked for every message, mostly over an empty list, before V8 optimizes them.
function room(list: Bucket[], now: number): number {
  let least = Infinity;
  for (let i = 0; i < list.length; i++) least = Math.min(least, list[i].room(now));
  return least;
}

function availableAt(list: Bucket[], now: number, nth: number): number {
  let latest = now;
  for (let i = 0; i < list.length; i++) latest = Math.max(latest, list[i].availableAt(now, nth));
  return latest;
}
