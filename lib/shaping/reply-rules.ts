/**
 * Reply rules (Momentum's Adaptive Delivery, KumoMTA's shaping automation): what a pair does when
 * a server's reply matches a pattern. A rule `suspend`s the pair for a while (it sends nothing,
 * opens nothing; its sends go pending until the end) or `set`s stricter options for a while
 * (fewer connections, fewer deliveries per connection, a lower rate). With a `trigger` it acts
 * only once it matched that often in that window.
 *
 * Rules see only what a server said: its replies to the greeting, EHLO, STARTTLS, MAIL, RCPT,
 * DATA and the final dot, codes 4xx and 5xx, never a reply the transport made up (a timeout, a
 * refusal of its own). The first rule that matches a reply counts it; later rules do not see it.
 */
import { parseDuration, parseRate, type Rate } from './rate';

/** What a rule may set while it is in force (each only tightens: the stricter of this and the configured value applies). */
export interface ReplyRuleSettings {
  maxDeliveriesPerConnection?: number;
  maxRecipientsPerConnection?: number;
  maxRecipientsPerTransaction?: number;
  maxOutboundConnections?: number;
  maxMessageRate?: string;
  maxConnectionRate?: string;
}

export const RULE_SETTING_NAMES = [
  'maxDeliveriesPerConnection',
  'maxRecipientsPerConnection',
  'maxRecipientsPerTransaction',
  'maxOutboundConnections',
  'maxMessageRate',
  'maxConnectionRate',
] as const satisfies readonly (keyof ReplyRuleSettings)[];

export interface ReplyRule {
  /** A name for stats, events and logs. Default: the rule's option path. */
  name?: string;
  /** Tested against the server's whole reply, code included (`421 4.7.0 [TSS04] …`); a string matches as a case-insensitive substring. */
  match: RegExp | string;
  /** `'suspend'`: the pair sends nothing for `duration`. `{ set }`: these options are in force for `duration`. */
  action: 'suspend' | { set: ReplyRuleSettings };
  /** How long the action holds: milliseconds, or `'30s'`, `'10min'`, `'2h'`. */
  duration: number | string;
  /** Act only when the rule matched this often within the window: `'3/10min'`. Default: at the first match. */
  trigger?: string;
}

/**
 * On by default (the `defaultReplyRules` option replaces them; `[]` turns them off), after every
 * scope's own `replyRules`. Each is the throttling reply a large receiver documents.
 */
export const DEFAULT_REPLY_RULES: readonly ReplyRule[] = Object.freeze([
  {
    // Yahoo: "421 4.7.0 [TSS04] Messages from x.x.x.x temporarily deferred due to unexpected
    // volume or user complaints". Yahoo's Sender Hub and help article SLN3434 ask senders to
    // retry such deferrals hours later, not at once; KumoMTA's community shaping rules suspend
    // Yahoo for this reply.
    name: 'yahoo-tss04',
    match: /\[TSS04\]/,
    action: 'suspend',
    duration: '2h',
  },
  {
    // Gmail: "421-4.7.28 … Our system has detected an unusual rate of unsolicited mail originating
    // from your IP address … temporarily rate limited" (Google Workspace Admin Help, SMTP error
    // reference, and support.google.com/mail/?p=UnsolicitedRateLimitError: lower the sending rate).
    name: 'gmail-4.7.28',
    match: /\b4\.7\.28\b/,
    action: { set: { maxOutboundConnections: 1, maxMessageRate: '60/h' } },
    duration: '1h',
  },
  {
    // Microsoft Exchange: "exceeded the maximum number of messages per connection". Exchange's
    // receive connectors allow MaxMessagesPerConnection = 20 by default (Set-ReceiveConnector
    // reference); a lower limit is learned from the 421 itself (see learned limits).
    name: 'microsoft-messages-per-connection',
    match: /maximum number of messages per connection/i,
    action: { set: { maxDeliveriesPerConnection: 20 } },
    duration: '1h',
  },
  {
    // Generic: "421 Too many concurrent SMTP connections from this IP address" (Exim's
    // smtp_accept_max_per_host), Microsoft's "451 4.7.652 The mail server has exceeded the
    // maximum number of connections", Postfix's "421 4.7.0 … Error: too many connections from
    // …" (anvil's smtpd_client_connection_count_limit). The host's own cap is learned as well
    // (maxHostConnections); this keeps the pair's pool small for a while.
    name: 'too-many-connections',
    match: /too many (?:concurrent |simultaneous )?(?:smtp )?connections|maximum number of connections/i,
    action: { set: { maxOutboundConnections: 2 } },
    duration: '10min',
  },
]) as readonly ReplyRule[];

/** A rule ready to test replies with: checked when the transport was built. */
export interface CompiledRule {
  /** `name`, else where it was written (`domains["yahoo.com"].replyRules[0]`). */
  name: string;
  test(reply: string): boolean;
  action: 'suspend' | { set: ReplyRuleSettings; rates: { maxMessageRate?: Rate; maxConnectionRate?: Rate } };
  durationMs: number;
  trigger?: { count: number; windowMs: number };
}

/** Compiled rules by rule object and path: a rule holds no per-pair state (RuleBook counts), so every pair it covers shares one. */
const compiled = new WeakMap<ReplyRule, Map<string, CompiledRule>>();

/** A checked rule (validate.ts has checked every field) with its path; compiled once per rule and path. */
export function compileRule(rule: ReplyRule, path: string): CompiledRule {
  let byPath = compiled.get(rule);
  if (!byPath) compiled.set(rule, (byPath = new Map()));
  let done = byPath.get(path);
  if (!done) byPath.set(path, (done = compile(rule, path)));
  return done;
}

function compile(rule: ReplyRule, path: string): CompiledRule {
  const { match } = rule;
  const needle = typeof match === 'string' ? match.toLowerCase() : undefined;
  // A RegExp with the g or y flag keeps lastIndex between tests: test a copy without them.
  const pattern = match instanceof RegExp ? new RegExp(match.source, match.flags.replace(/[gy]/g, '')) : undefined;
  const trigger = rule.trigger === undefined ? undefined : (parseRate(rule.trigger) as Rate);
  let action: CompiledRule['action'] = 'suspend';
  if (rule.action !== 'suspend') {
    const { set } = rule.action;
    action = {
      set,
      rates: {
        maxMessageRate: set.maxMessageRate === undefined ? undefined : (parseRate(set.maxMessageRate) as Rate),
        maxConnectionRate: set.maxConnectionRate === undefined ? undefined : (parseRate(set.maxConnectionRate) as Rate),
      },
    };
  }
  return {
    name: rule.name ?? path,
    test: needle !== undefined ? (reply) => reply.toLowerCase().includes(needle) : (reply) => pattern!.test(reply),
    action,
    durationMs: typeof rule.duration === 'number' ? rule.duration : parseDuration(rule.duration)!,
    trigger: trigger && { count: trigger.count, windowMs: trigger.periodMs },
  };
}

/** The rule that acted on a reply, and the reply. */
export interface RuleMatch {
  rule: CompiledRule;
  reply: string;
}

/**
 * A pair's rules with their trigger counts. `observe` takes the server's replies of one
 * transaction or dial and returns the rules that act now (each at most once per call).
 */
export class RuleBook {
  /** Times each triggered rule matched, within its window. */
  private readonly hits = new Map<CompiledRule, number[]>();

  constructor(readonly rules: readonly CompiledRule[]) {}

  observe(replies: readonly string[], now: number): RuleMatch[] {
    const acting: RuleMatch[] = [];
    for (const reply of replies) {
      const rule = this.rules.find((r) => r.test(reply));
      if (!rule || acting.some((m) => m.rule === rule)) continue;
      if (this.triggered(rule, now)) acting.push({ rule, reply });
    }
    return acting;
  }

  /** Whether some trigger still counts matches: the pair's state must be kept then. */
  counting(now: number): boolean {
    for (const [rule, times] of this.hits) if (times.some((t) => t > now - rule.trigger!.windowMs)) return true;
    return false;
  }

  private triggered(rule: CompiledRule, now: number): boolean {
    const { trigger } = rule;
    if (!trigger) return true;
    const times = (this.hits.get(rule) ?? []).filter((t) => t > now - trigger.windowMs);
    times.push(now);
    if (times.length < trigger.count) {
      this.hits.set(rule, times);
      return false;
    }
    this.hits.delete(rule);
    return true;
  }
}
