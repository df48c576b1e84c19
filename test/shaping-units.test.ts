/**
 * The shaping rules on their own, with a clock the test moves: rate syntax, the rate bucket (never
 * more than N in any window, whatever the burst), warm-up plans, reply-rule triggers, and a pair's
 * policy (the strictest override wins, a learned per-connection limit needs two 421s with the same
 * k, never goes above the configured value, and relaxes after LEARNED_LIMIT_MS), and the scope
 * resolution pairs without a domain stanza share.
 */
import { ConfigError } from '../lib';
import { LEARNED_LIMIT_MS, PairPolicy } from '../lib/policy/pair-policy';
import { ScopeResolver } from '../lib/policy/scopes';
import { SCOPED_OPTIONS } from '../lib/policy/options';
import { compileRule, DEFAULT_REPLY_RULES, RuleBook, type ReplyRule } from '../lib/shaping/reply-rules';
import { parseDuration, parseRate, RateBucket, type Rate } from '../lib/shaping/rate';
import { Warmup } from '../lib/shaping/warmup';
import { peakInWindow } from './support/policy-server';

describe('rate syntax (KumoMTA throttle strings)', () => {
  test.each([
    ['20/s', 20, 1_000, 20],
    ['100/min', 100, 60_000, 100],
    ['2000/h', 2000, 3_600_000, 2000],
    ['20/30s', 20, 30_000, 20],
    ['10000/d', 10_000, 86_400_000, 10_000],
    ['10_000/d', 10_000, 86_400_000, 10_000],
    ['1,000/hr', 1000, 3_600_000, 1000],
    ['50/minute', 50, 60_000, 50],
    ['100/min,max_burst=10', 100, 60_000, 10],
    [' 5 / 10min ', 5, 600_000, 5],
  ])('%s', (text, count, periodMs, burst) => {
    expect(parseRate(text)).toMatchObject({ count, periodMs, burst });
  });

  test.each([
    ['0/s', /1 to/],
    ['5/fortnight', /unknown period/],
    ['fast', /must be a rate/],
    ['5/s,max_burst=6', /max_burst must be 1 to 5/],
    [5, /must be a rate/],
    ['5/toString', /unknown period/],
  ])('%p is refused', (text, message) => {
    expect(parseRate(text)).toMatch(message);
  });

  test('durations', () => {
    expect([parseDuration('30s'), parseDuration('10min'), parseDuration('2h'), parseDuration('1d'), parseDuration('1.5h')]).toEqual([
      30_000, 600_000, 7_200_000, 86_400_000, 5_400_000,
    ]);
    expect(parseDuration('soon')).toBeUndefined();
  });
});

/** Takes whatever the bucket allows, as early as it allows it, for `ms`; returns the take times. */
function greedy(rate: Rate, ms: number, perTake = 1): number[] {
  const bucket = new RateBucket('test', () => rate);
  const times: number[] = [];
  let now = 1_000_000;
  const end = now + ms;
  while (now < end) {
    const room = bucket.room(now);
    if (room >= 1) {
      const n = Math.min(room, perTake);
      bucket.take(n, now);
      bucket.settle(n, now);
      for (let i = 0; i < n; i++) times.push(now);
      continue;
    }
    const next = bucket.availableAt(now);
    expect(next).toBeGreaterThan(now);
    now = next;
    // availableAt promises room then.
    expect(bucket.room(now)).toBeGreaterThanOrEqual(1);
  }
  return times;
}

describe('rate bucket: never more than N in any window of the period', () => {
  test.each([
    ['20/s', 10_000, 1],
    ['20/s', 10_000, 7],
    ['100/min', 300_000, 3],
    ['10/s,max_burst=1', 5_000, 1],
    ['30/s,max_burst=5', 5_000, 4],
    ['7/3s', 30_000, 2],
  ])('%s, taken greedily for %d ms, %d at a time', (text, ms, perTake) => {
    const rate = parseRate(text) as Rate;
    const times = greedy(rate, ms, perTake);
    expect(peakInWindow(times, rate.periodMs)).toBeLessThanOrEqual(rate.count);
    // And the budget is used: within 2 % of N per period (the window is held 1 % longer).
    const periods = ms / rate.periodMs;
    expect(times.length).toBeGreaterThanOrEqual(Math.floor(rate.count * periods * 0.97) - rate.count);
    expect(times.length).toBeLessThanOrEqual(rate.count * Math.ceil(periods) + rate.count);
  });

  test('a burst of max_burst at once, then one per period / N', () => {
    const times = greedy(parseRate('10/s,max_burst=3') as Rate, 1_000);
    expect(times.slice(0, 3).every((t) => t === times[0])).toBe(true);
    const gaps = times.slice(3).map((t, i) => t - times[i + 2]);
    expect(Math.min(...gaps)).toBeGreaterThanOrEqual(99);
  });

  test('takes in flight count and do not age until settled; a refund gives back room; availableAt tells the nth in line', () => {
    const bucket = new RateBucket('test', () => parseRate('4/s') as Rate);
    bucket.take(4, 0);
    expect(bucket.room(0)).toBe(0);
    bucket.refund(2, 0);
    expect(bucket.room(0)).toBe(2);
    bucket.take(2, 0);
    // Still in flight 5 s later (a transaction that has not reached DATA): no room.
    expect(bucket.room(5_000)).toBe(0);
    bucket.settle(4, 0);
    // The 1st to 4th in line wait for the window (1 s + its 10 ms guard); the 5th for one more.
    expect(bucket.availableAt(0, 1)).toBeGreaterThan(1_000);
    expect(bucket.availableAt(0, 1)).toBeLessThan(1_020);
    expect(bucket.availableAt(0, 5)).toBeGreaterThan(2_000);
  });
});

describe('warm-up plans', () => {
  const plan = new Warmup({
    start: '2026-12-01',
    steps: [
      [0, '200/d'],
      [3, '1000/d'],
      [7, '5000/d'],
    ],
  });
  test.each([
    ['2026-11-30T12:00:00Z', 0, '200/d'],
    ['2026-12-01T00:00:00Z', 0, '200/d'],
    ['2026-12-03T23:59:59Z', 0, '200/d'],
    ['2026-12-04T00:00:00Z', 3, '1000/d'],
    ['2026-12-08T00:00:00Z', 7, '5000/d'],
    ['2027-06-01T00:00:00Z', 7, '5000/d'],
  ])('at %s: day %d, %s', (when, day, rate) => {
    const now = Date.parse(when);
    expect(plan.stepAt(now)).toMatchObject({ day, rate });
    expect(plan.rateAt(now).text).toBe(rate);
  });

  test('bad plans name the field', () => {
    const build = (warmup: unknown) => () => new ScopeResolver({ bindings: { ip1: { warmup } } } as never);
    expect(build({ start: 'tomorrow', steps: [[0, '1/d']] })).toThrow(/bindings\.ip1\.warmup\.start: must be an ISO date/);
    expect(build({ start: 'Dec 1, 2026', steps: [[0, '1/d']] })).toThrow(/warmup\.start: must be an ISO date/);
    expect(build({ start: '2026-12-01', steps: [[1, '1/d']] })).toThrow(/warmup\.steps\[0\]\[0\]: the first step must start on day 0/);
    expect(
      build({
        start: '2026-12-01',
        steps: [
          [0, '1/d'],
          [0, '2/d'],
        ],
      }),
    ).toThrow(/steps\[1\]\[0\]: must be a whole day offset above/);
    expect(build({ start: '2026-12-01', steps: [[0, 'lots']] })).toThrow(/steps\[0\]\[1\]: must be a rate/);
    expect(() => new ScopeResolver({ bindings: { ip1: { maxMessageRate: '1/s', warmup: { start: '2026-12-01', steps: [[0, '1/d']] } } } })).toThrow(
      /bindings\.ip1\.warmup: .*set one of warmup and maxMessageRate/,
    );
  });
});

describe('reply rules', () => {
  const rule = (r: Partial<ReplyRule>, path = 'replyRules[0]') => compileRule({ match: 'x', action: 'suspend', duration: 1000, ...r } as ReplyRule, path);

  test('a string matches case-insensitively anywhere; a RegExp as written (a g flag does not make it stateful)', () => {
    const byString = rule({ match: 'Temporarily Deferred' });
    expect(byString.test('421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred')).toBe(true);
    const byRegExp = rule({ match: /\[TSS04\]/g });
    expect([1, 2, 3].map(() => byRegExp.test('421 4.7.0 [TSS04] deferred'))).toEqual([true, true, true]);
  });

  test('a trigger acts at the Nth match within its window, then counts again', () => {
    const book = new RuleBook([rule({ match: 'slow down', trigger: '3/10s', name: 'slow' })]);
    const at = (t: number) => book.observe(['421 4.7.0 too many messages, slow down'], t).map((m) => m.rule.name);
    expect([at(0), at(1_000), at(2_000)]).toEqual([[], [], ['slow']]);
    // Two more within 10 s; 11 s later they have left the window, and counting starts again.
    expect([at(3_000), at(4_000), at(15_000), at(15_500)]).toEqual([[], [], [], []]);
    expect(at(16_000)).toEqual(['slow']);
  });

  test('the first matching rule counts a reply; the defaults come after every scope, each named', () => {
    const scopes = new ScopeResolver({
      replyRules: [{ match: 'deferred', action: 'suspend', duration: '1min' }],
      domains: { 'yahoo.test': { replyRules: [{ name: 'mine', match: /TSS04/, action: { set: { maxOutboundConnections: 1 } }, duration: '5min' }] } },
    });
    const rules = scopes.replyRulesFor(scopes.binding('default')!, 'yahoo.test');
    expect(rules.map((r) => r.path)).toEqual([
      'domains["yahoo.test"].replyRules[0]',
      'replyRules[0]',
      ...DEFAULT_REPLY_RULES.map((_, i) => `defaultReplyRules[${i}]`),
    ]);
    const book = new RuleBook(rules.map(({ rule: r, path }) => compileRule(r, path)));
    expect(book.observe(['421 4.7.0 [TSS04] Messages from 127.0.0.2 temporarily deferred'], 0).map((m) => m.rule.name)).toEqual(['mine']);
    expect(new ScopeResolver({ defaultReplyRules: [] }).replyRulesFor(scopes.binding('default')!, 'x.test')).toEqual([]);
  });

  test.each([
    [{ replyRules: {} }, /^replyRules: must be an array/],
    [{ replyRules: [{ action: 'suspend', duration: 1 }] }, /replyRules\[0\]\.match: must be a RegExp or a non-empty string/],
    [{ replyRules: [{ match: 'x', action: 'stop', duration: 1 }] }, /replyRules\[0\]\.action: must be 'suspend' or \{ set/],
    [
      { replyRules: [{ match: 'x', action: { set: { maxMessagesPerHour: 1 } }, duration: 1 }] },
      /replyRules\[0\]\.action\.set\.maxMessagesPerHour: unknown option/,
    ],
    [
      { replyRules: [{ match: 'x', action: { set: { maxOutboundConnections: 0 } }, duration: 1 }] },
      /action\.set\.maxOutboundConnections: must be a whole number ≥ 1/,
    ],
    [{ replyRules: [{ match: 'x', action: { set: { maxMessageRate: 'fast' } }, duration: 1 }] }, /action\.set\.maxMessageRate: must be a rate/],
    [{ replyRules: [{ match: 'x', action: 'suspend', duration: 'a while' }] }, /replyRules\[0\]\.duration: must be milliseconds/],
    [{ replyRules: [{ match: 'x', action: 'suspend', duration: '30d' }] }, /replyRules\[0\]\.duration: must be milliseconds \(1 to 2147483647/],
    [
      { replyRules: [{ match: 'x', action: { set: { maxDeliveriesPerConnection: 0 } }, duration: 1 }] },
      /set\.maxDeliveriesPerConnection: must be ≥ 1: a rule only tightens/,
    ],
    [{ replyRules: [{ match: 'x', action: { set: { maxOutboundConnections: undefined } }, duration: 1 }] }, /action\.set: must set at least one of/],
    [{ replyRules: [{ match: 'x', action: 'suspend', duration: 1, trigger: 'often' }] }, /replyRules\[0\]\.trigger: must be 'N\/period'/],
    [{ replyRules: [{ match: 'x', action: 'suspend', duration: 1, when: 'now' }] }, /replyRules\[0\]\.when: unknown option/],
    [{ domains: { 'a.test': { replyRules: [{ match: 1, action: 'suspend', duration: 1 }] } } }, /domains\["a\.test"\]\.replyRules\[0\]\.match/],
    [{ defaultReplyRules: [{ match: 'x', action: 'suspend' }] }, /defaultReplyRules\[0\]\.duration/],
    [{ maxMessageRate: '20/fortnight' }, /^maxMessageRate: has an unknown period/],
    [{ bindings: { ip1: { domains: { 'a.test': { maxConnectionRate: 3 } } } } }, /bindings\.ip1\.domains\["a\.test"\]\.maxConnectionRate: must be a rate/],
  ])('%j is refused naming the option path', (options, message) => {
    const build = () => new ScopeResolver(options as never);
    expect(build).toThrow(ConfigError);
    expect(build).toThrow(message);
  });
});

describe("a pair's policy", () => {
  const policyFor = (options: object, domain = 'a.test') => {
    const scopes = new ScopeResolver(options);
    const binding = scopes.binding('default')!;
    const events: string[] = [];
    const rules = new RuleBook(scopes.replyRulesFor(binding, domain).map(({ rule, path }) => compileRule(rule, path)));
    const policy = new PairPolicy('default', domain, scopes.resolve(binding, domain), undefined, undefined, rules, (name: string, e: object) =>
      events.push(`${name} ${(e as { rule?: string }).rule}`),
    );
    return { policy, events };
  };

  test('learned per-connection limit: a 421 after k, then one after k on a connection opened since; never above the configured value; relaxed after LEARNED_LIMIT_MS; dropped by a 421 after fewer', () => {
    const { policy } = policyFor({ defaultReplyRules: [] });
    const reply = '421 4.7.0 too many messages in this connection';
    policy.learnFromClose(5, 0, reply, 100);
    // Another connection opened before that 421 (they ran in step): no evidence yet.
    policy.learnFromClose(5, 50, reply, 110);
    expect(policy.limits.maxDeliveries).toBe(0);
    policy.learnFromClose(5, 105, reply, 200);
    expect(policy.limits.maxDeliveries).toBe(5);
    expect(policy.stats(200)?.learned).toEqual({ maxDeliveriesPerConnection: 5, until: 200 + LEARNED_LIMIT_MS, reply });
    policy.refresh(200 + LEARNED_LIMIT_MS);
    expect(policy.limits.maxDeliveries).toBe(0);
    expect(policy.dormant(200 + LEARNED_LIMIT_MS)).toBe(true);

    // Learned, then a 421 after fewer (a rate window's): dropped at once.
    const dropped = policyFor({ defaultReplyRules: [] }).policy;
    dropped.learnFromClose(6, 0, reply, 10);
    dropped.learnFromClose(6, 20, reply, 30);
    expect(dropped.limits.maxDeliveries).toBe(6);
    dropped.learnFromClose(0, 40, reply, 50);
    expect(dropped.limits.maxDeliveries).toBe(0);

    // Different k in a row: nothing learned.
    const varied = policyFor({ defaultReplyRules: [] }).policy;
    for (const [i, k] of [3, 7, 2, 9].entries()) varied.learnFromClose(k, i * 10 + 5, reply, i * 10 + 10);
    expect(varied.limits.maxDeliveries).toBe(0);

    const configured = policyFor({ maxDeliveriesPerConnection: 4, defaultReplyRules: [] }).policy;
    configured.learnFromClose(6, 0, reply, 10);
    configured.learnFromClose(6, 20, reply, 30);
    expect(configured.limits.maxDeliveries).toBe(4);
  });

  test('rules only tighten: the strictest of the configured value and every override; each ends with its duration', () => {
    const { policy, events } = policyFor({
      maxOutboundConnections: 4,
      maxDeliveriesPerConnection: 3,
      replyRules: [
        { name: 'a', match: 'alpha', action: { set: { maxOutboundConnections: 2, maxDeliveriesPerConnection: 10 } }, duration: 1_000 },
        { name: 'b', match: 'beta', action: { set: { maxOutboundConnections: 1 } }, duration: 5_000 },
        { name: 'c', match: 'gamma', action: 'suspend', duration: 2_000 },
      ],
    });
    policy.observe(['451 alpha'], 0);
    expect([policy.maxOutboundConnections, policy.limits.maxDeliveries]).toEqual([2, 3]);
    policy.observe(['451 beta'], 100);
    expect(policy.maxOutboundConnections).toBe(1);
    policy.refresh(1_000);
    expect(policy.maxOutboundConnections).toBe(1);
    policy.refresh(5_100);
    expect(policy.maxOutboundConnections).toBe(4);
    policy.observe(['421 gamma'], 6_000);
    expect(policy.suspendedUntil(6_000)).toBe(8_000);
    expect(policy.suspendedUntil(8_000)).toBeUndefined();
    expect(events).toEqual(['suspended c', 'resumed c']);
    policy.close();
  });
});

describe('scope resolution shared by the pairs no stanza names', () => {
  const build = () =>
    new ScopeResolver({
      maxDeliveriesPerConnection: 50,
      domains: { 'c.test': { maxDeliveriesPerConnection: 7 } },
      bindings: {
        b1: { localAddress: '127.0.0.2', maxOutboundConnections: 3, domains: { 'a.test': { maxOutboundConnections: 1, maxMessageRate: '10/s' } } },
        b2: { localAddress: '127.0.0.3' },
      },
      bindingGroups: { g: { bindings: ['b1', 'b2'], maxMessageRate: '100/s', domains: { 'b.test': { maxOutboundConnections: 2 } } } },
    });

  test("every domain without a stanza gets its binding's one frozen result; a stanza's domain its own", () => {
    const scopes = build();
    const b1 = scopes.binding('b1')!;
    const b2 = scopes.binding('b2')!;
    const plain = scopes.resolve(b1, 'x.test');
    expect(scopes.resolve(b1, 'y.test')).toBe(plain);
    expect(Object.isFrozen(plain)).toBe(true);
    expect(() => {
      (plain as { maxOutboundConnections: number }).maxOutboundConnections = 9;
    }).toThrow(TypeError);
    expect(scopes.resolve(b2, 'x.test')).not.toBe(plain);
    // The shared result is what resolving the pair alone gives.
    expect(plain).toEqual(build().resolve(build().binding('b1')!, 'x.test'));
    const figures = (domain: string, binding = b1) => {
      const { maxOutboundConnections, maxDeliveriesPerConnection } = scopes.resolve(binding, domain);
      return [maxOutboundConnections, maxDeliveriesPerConnection];
    };
    expect([figures('x.test'), figures('a.test'), figures('b.test'), figures('c.test'), figures('x.test', b2), figures('b.test', b2)]).toEqual([
      [3, 50],
      [1, 50],
      [2, 50],
      [3, 7],
      [SCOPED_OPTIONS.maxOutboundConnections.default, 50],
      [2, 50],
    ]);
  });

  test('declarations and reply rules are shared the same way, with the paths of the scopes that set them', () => {
    const scopes = build();
    const b1 = scopes.binding('b1')!;
    const rate = (domain: string) => scopes.declaration(b1, domain, ['maxMessageRate', 'warmup'] as const);
    expect(rate('x.test')).toBe(rate('y.test'));
    expect(rate('x.test')).toEqual({ path: 'bindingGroups.g', name: 'maxMessageRate', value: '100/s' });
    expect(rate('a.test')).toEqual({ path: 'bindings.b1.domains["a.test"]', name: 'maxMessageRate', value: '10/s' });
    expect(scopes.declaration(b1, 'x.test', ['maxConnectionRate'] as const)).toBeUndefined();
    expect(scopes.replyRulesFor(b1, 'x.test')).toBe(scopes.replyRulesFor(b1, 'y.test'));
    expect(scopes.replyRulesFor(b1, 'x.test')).toHaveLength(DEFAULT_REPLY_RULES.length);
  });
});
