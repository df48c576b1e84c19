/**
 * Where limits shared across processes live: Redis, through ioredis (an optional peer
 * dependency, loaded only when `coordination` is configured). Every decision is one Lua script
 * that reads Redis's own clock (TIME), so the processes' clocks never matter:
 *
 * - leases (`lease`): a sorted set per limit (a pair's maxOutboundConnections, a host's
 *   maxHostConnections) whose members are the connections holding it, scored by when their lease
 *   runs out. A lease is taken before a dial when fewer than the cap are live, renewed every
 *   third of `leaseTtl` while its connection lives, removed when it closes. A process that dies
 *   stops renewing: its leases run out within `leaseTtl`.
 * - rate windows (`takeRate`): a sorted set per rate bucket of the takes in its window. A take is
 *   scored in flight (it counts, far in the future) until `settleRate` moves it to when the
 *   server had the RCPTs, from which it ages; unused ones are removed (`refundRate`). A take
 *   never settled (its process died) ages out IN_FLIGHT_MS later.
 * - events (`publish` / `onEvent`): suspensions and learned limits, on a pub/sub channel and in a
 *   hash for processes that start later.
 *
 * Keys, all under `keyPrefix` (default `nbp:`): `lease:pair:<binding>:<domain>`,
 * `lease:host:<binding>:<host>:<port>` (expire 2 × leaseTtl after the last change),
 * `rate:<kind>:<scope>` (expires a window after the last take), `shaping` (hash) and the channel
 * `events`.
 */
import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';
import { ConfigError } from '../errors';
import { coordinationLog } from '../log';

/** A take counts as in flight, at most this long, until it is settled (a process that died holds its takes that long). */
export const IN_FLIGHT_MS = 30_000;

/** The part of an ioredis client used here (a client the application passes must be ioredis). */
export interface RedisClient {
  defineCommand(name: string, definition: { numberOfKeys?: number; lua: string }): void;
  duplicate(override?: object): RedisClient;
  quit(): Promise<unknown>;
  disconnect(): void;
  on(event: string, listener: (...args: unknown[]) => void): unknown;
  publish(channel: string, message: string): Promise<unknown>;
  subscribe(channel: string): Promise<unknown>;
  hset(key: string, field: string, value: string): Promise<unknown>;
  hgetall(key: string): Promise<Record<string, string>>;
  zrem(key: string, ...members: string[]): Promise<unknown>;
  [command: string]: unknown;
}

export interface CoordinationOptions {
  /** A Redis URL (`redis://127.0.0.1:6379/0`) or an ioredis client. */
  redis: string | RedisClient;
  /** Prefix of every key and channel. Default `nbp:`. */
  keyPrefix?: string;
  /** ms a lease lives without renewal: how soon a dead process's connections are free again. Default 10 000. */
  leaseTtl?: number;
  /** ms a Redis command may take before it counts as failed (then the failure policy applies). Default 1 000. */
  commandTimeout?: number;
  /**
   * When Redis fails (down, slow, restarting): `'wait'` (default) dials nothing and takes no rate
   * room until it answers, so sends wait and, past `acquireTimeout`, go pending (ECOORDINATION);
   * `{ processes: N }` goes on with this process's share of each connection cap (cap / N, rounded up).
   */
  onFailure?: 'wait' | { processes: number };
}

const NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)";

const LEASE_TAKE = `${NOW}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
  return 1
end
return 0`;

/**
 * ARGV: ttl, then id and cap per key. A lease that is gone (Redis restarted, renewals failed
 * past the TTL) is taken again when the cap has room; the ids that could not be are returned.
 */
const LEASE_RENEW = `${NOW}
local ttl = tonumber(ARGV[1])
local lost = {}
for i, key in ipairs(KEYS) do
  local id, cap = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  if redis.call('ZSCORE', key, id) then
    redis.call('ZADD', key, now + ttl, id)
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < cap then redis.call('ZADD', key, now + ttl, id) else lost[#lost + 1] = id end
  end
  redis.call('PEXPIRE', key, 2 * ttl)
end
return lost`;

/** Returns { now, granted, retry-at (0 when all were granted) }. */
const RATE_TAKE = `${NOW}
local count, window, wanted, inflight = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local granted = math.min(wanted, count - redis.call('ZCARD', KEYS[1]))
if granted < 0 then granted = 0 end
for i = 1, granted do redis.call('ZADD', KEYS[1], now + inflight, ARGV[5] .. i) end
redis.call('PEXPIRE', KEYS[1], window + inflight)
local retry = 0
if granted < wanted then
  -- The oldest settled take ages out first; when all are in flight, they settle soon: ask again shortly.
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
  if oldest[2] then retry = tonumber(oldest[2]) + window else retry = now + 50 end
end
return { now, granted, retry }`;

/** Scores are Redis times: ARGV[1] is the offset to add to the local times that follow (ARGV[2k], ARGV[2k+1] = member, local time). */
const RATE_SETTLE = `
local offset = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[i + 1]) + offset, ARGV[i]) end
return 1`;

type Script = (...args: (string | number)[]) => Promise<unknown>;

/** A held lease: released when its connection ends. */
export interface Lease {
  readonly key: string;
  readonly id: string;
  readonly cap: number;
  /** Called when the lease was lost (gone from Redis and the cap full again): its connection must close. */
  onLost?: () => void;
}

/** A shaping event other processes apply (pair-policy.ts). */
export interface SharedEvent {
  type: 'suspended' | 'learned';
  binding: string;
  domain: string;
  rule?: string;
  reply: string;
  until: number;
  k?: number;
  /** The process that sent it (its own are ignored). */
  origin: string;
}

export class RedisStore {
  readonly keyPrefix: string;
  readonly leaseTtl: number;
  /** This process's id in lease and take members. */
  readonly origin = `${process.pid}-${randomBytes(4).toString('hex')}`;
  private readonly client: RedisClient;
  private subscriber: RedisClient | undefined;
  private readonly ownsClient: boolean;
  private readonly held = new Map<string, Lease>();
  private readonly renewTimer: NodeJS.Timeout;
  private nextId = 1;
  /** Settles waiting to be sent, per bucket: member, local time, member, local time… */
  private readonly settling = new Map<string, string[]>();
  private settleScheduled = false;
  /** Redis time minus local time, from the last script that returned Redis's clock. */
  private offset = 0;
  private closed = false;
  /** The last failure, while Redis fails (cleared by a command that succeeds). */
  failure: Error | undefined;

  constructor(options: CoordinationOptions) {
    this.keyPrefix = options.keyPrefix ?? 'nbp:';
    this.leaseTtl = options.leaseTtl ?? 10_000;
    const commandTimeout = options.commandTimeout ?? 1_000;
    if (typeof options.redis === 'string') {
      const Redis = loadIoredis();
      // Commands wait for a connection at most commandTimeout while Redis is away (then the failure
      // policy decides); the client reconnects on its own.
      this.client = new Redis(options.redis, { commandTimeout, maxRetriesPerRequest: 1 }) as RedisClient;
      this.ownsClient = true;
    } else {
      this.client = options.redis;
      this.ownsClient = false;
    }
    this.client.on('error', (err) => this.failed(err as Error));
    for (const [name, lua, keys] of [
      ['nbpLeaseTake', LEASE_TAKE, 1],
      ['nbpRateTake', RATE_TAKE, 1],
      ['nbpRateSettle', RATE_SETTLE, 1],
    ] as const) {
      this.client.defineCommand(name, { numberOfKeys: keys, lua });
    }
    this.client.defineCommand('nbpLeaseRenew', { lua: LEASE_RENEW });
    this.renewTimer = setInterval(() => void this.renew(), Math.max(100, Math.floor(this.leaseTtl / 3))).unref();
  }

  /** A lease on `name` if fewer than `cap` are held across the processes; undefined when all are. Rejects when Redis fails. */
  async lease(name: string, cap: number): Promise<Lease | undefined> {
    const key = `${this.keyPrefix}lease:${name}`;
    const id = `${this.origin}:${this.nextId++}`;
    const granted = await this.run(() => this.script('nbpLeaseTake')(key, cap, this.leaseTtl, id));
    if (granted !== 1) return undefined;
    const lease: Lease = { key, id, cap };
    this.held.set(id, lease);
    return lease;
  }

  release(lease: Lease): void {
    if (!this.held.delete(lease.id)) return;
    this.client.zrem(lease.key, lease.id).catch((err: unknown) => this.failed(err as Error));
  }

  /**
   * Up to `wanted` takes from a cluster-wide window of `count` per `windowMs`: their members (in
   * flight until settled), and when the window has room again if it had not for all.
   */
  async takeRate(name: string, count: number, windowMs: number, wanted: number): Promise<{ members: string[]; retryAt: number | undefined }> {
    const key = `${this.keyPrefix}rate:${name}`;
    const prefix = `${this.origin}:${this.nextId++}:`;
    const sentAt = Date.now();
    const [now, granted, retry] = (await this.run(() => this.script('nbpRateTake')(key, count, windowMs, wanted, IN_FLIGHT_MS, prefix))) as number[];
    this.offset = now - Math.round((sentAt + Date.now()) / 2);
    return { members: Array.from({ length: granted }, (_, i) => `${prefix}${i + 1}`), retryAt: retry > 0 ? retry - this.offset : undefined };
  }

  /**
   * Takes that reached the server by `at` (local time): they age from then. Sent together, one
   * script per bucket per event-loop turn, not one per transaction.
   */
  settleRate(name: string, members: readonly string[], at: number): void {
    if (members.length === 0) return;
    let pending = this.settling.get(name);
    if (!pending) this.settling.set(name, (pending = []));
    for (const member of members) pending.push(member, String(at));
    if (!this.settleScheduled) {
      this.settleScheduled = true;
      setImmediate(() => this.flushSettles());
    }
  }

  private flushSettles(): void {
    this.settleScheduled = false;
    const script = this.script('nbpRateSettle');
    for (const [name, args] of this.settling) {
      script(`${this.keyPrefix}rate:${name}`, this.offset, ...args).catch((err: unknown) => this.failed(err as Error));
    }
    this.settling.clear();
  }

  refundRate(name: string, members: readonly string[]): void {
    if (members.length === 0) return;
    this.client.zrem(`${this.keyPrefix}rate:${name}`, ...members).catch((err: unknown) => this.failed(err as Error));
  }

  /** Tells the other processes (and those that start before `until`). */
  publish(event: Omit<SharedEvent, 'origin'>): void {
    const message = JSON.stringify({ ...event, origin: this.origin });
    const field = `${event.type}:${event.binding}:${event.domain}`;
    Promise.all([this.client.publish(`${this.keyPrefix}events`, message), this.client.hset(`${this.keyPrefix}shaping`, field, message)]).catch((err: unknown) =>
      this.failed(err as Error),
    );
  }

  /** Calls `handler` with every other process's events, those still in force first. */
  async onEvent(handler: (event: SharedEvent) => void): Promise<void> {
    const deliver = (message: string): boolean => {
      const event = parseEvent(message);
      if (!event) coordinationLog('ignored a malformed event: %s', message.slice(0, 200));
      else if (event.origin !== this.origin && event.until > Date.now()) handler(event);
      return event !== undefined && event.until > Date.now();
    };
    // A connection of its own (a subscribed one can do nothing else), resubscribed by ioredis after a reconnect.
    this.subscriber = this.client.duplicate({ commandTimeout: undefined, maxRetriesPerRequest: null });
    this.subscriber.on('error', (err) => this.failed(err as Error));
    this.subscriber.on('message', (_channel, message) => deliver(message as string));
    if (this.closed) return;
    await this.run(() => this.subscriber!.subscribe(`${this.keyPrefix}events`));
    const stored = await this.run(() => this.client.hgetall(`${this.keyPrefix}shaping`));
    // Those no longer in force go (the hash holds one field per pair that ever had one).
    const ended = Object.entries(stored)
      .filter(([, message]) => !deliver(message))
      .map(([field]) => field);
    if (ended.length > 0)
      (this.client.hdel as (key: string, ...fields: string[]) => Promise<unknown>)(`${this.keyPrefix}shaping`, ...ended).catch(() => undefined);
  }

  /** Lets go of every lease this process holds and of its connections to Redis. */
  async close(): Promise<void> {
    this.closed = true;
    // First: a subscription still waiting for Redis gives up, so that nothing waits on it.
    this.subscriber?.disconnect();
    clearInterval(this.renewTimer);
    const leases = [...this.held.values()];
    this.held.clear();
    await Promise.all(leases.map((l) => this.client.zrem(l.key, l.id).catch(() => undefined)));
    if (this.ownsClient) this.client.disconnect();
  }

  private async renew(): Promise<void> {
    if (this.held.size === 0) return;
    const leases = [...this.held.values()];
    const script = this.script('nbpLeaseRenew');
    const lost = (await this.run(() => script(leases.length, ...leases.map((l) => l.key), this.leaseTtl, ...leases.flatMap((l) => [l.id, l.cap]))).catch(
      () => [],
    )) as string[];
    for (const id of lost) {
      const lease = this.held.get(id);
      coordinationLog('lease %s lost (gone from Redis, the cap is full again): its connection closes', id);
      lease?.onLost?.();
    }
  }

  private script(name: string): Script {
    return (this.client[name] as Script).bind(this.client);
  }

  /** Runs a command, recording whether Redis answers. */
  private async run<T>(command: () => Promise<T>): Promise<T> {
    try {
      const result = await command();
      if (this.failure) coordinationLog('Redis answers again');
      this.failure = undefined;
      return result;
    } catch (err) {
      this.failed(err as Error);
      throw err;
    }
  }

  private failed(err: Error): void {
    if (!this.failure) coordinationLog('Redis failed: %s', err.message);
    this.failure = err;
  }
}

/** A shaping event from the channel or the hash, checked field by field; undefined when it is not one. */
function parseEvent(message: string): SharedEvent | undefined {
  let value: unknown;
  try {
    value = JSON.parse(message);
  } catch {
    return undefined;
  }
  const e = value as Partial<SharedEvent> | null;
  if (!e || (e.type !== 'suspended' && e.type !== 'learned')) return undefined;
  if (typeof e.binding !== 'string' || typeof e.domain !== 'string' || typeof e.reply !== 'string' || typeof e.origin !== 'string') return undefined;
  if (typeof e.until !== 'number' || !Number.isFinite(e.until)) return undefined;
  if (e.type === 'learned' && !(Number.isInteger(e.k) && (e.k as number) >= 1)) return undefined;
  return e as SharedEvent;
}

/** ioredis, loaded only when coordination is configured; a clear error when it is not installed. */
export function loadIoredis(path = 'coordination.redis'): new (url: string, options: object) => unknown {
  try {
    const required = createRequire(__filename)('ioredis') as { default?: unknown };
    return (required.default ?? required) as new (url: string, options: object) => unknown;
  } catch (err) {
    throw new ConfigError(path, `needs the optional dependency ioredis (npm install ioredis): ${(err as Error).message}`);
  }
}
