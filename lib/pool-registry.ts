/**
 * Pools of connections, one per (binding, destination domain), created on first use and dropped
 * when idle. Each pool is a generic-pool with the guards generic-pool lacks:
 *
 * - A factory create() that rejects is retried by generic-pool in a tight loop while sends wait.
 *   Here create() never rejects: a failed connect resolves to a ConnectFailure entry that the
 *   waiting acquire turns into an ECONNECT error, and for a backoff period after a failure
 *   create() hands out such entries without dialing. A dead destination costs one connect
 *   attempt per backoff period, not a busy loop.
 * - Every acquire is bounded by `acquireTimeout`, counted from the last time the pool handed a
 *   connection to any send: a stuck destination fails its waiting sends, while a long queue
 *   that keeps moving (a batch of 100 000 messages) is not cut short (generic-pool's own
 *   acquireTimeoutMillis would time out every send queued longer than that).
 * - drain() destroys nothing: close() drains and then clears, and waits for every socket.
 */
import { createPool, type Pool } from 'generic-pool';
import { BindingPoolError, describeError } from './errors';
import { describeTarget, type CountingConnection, type RetireReason } from './connection';
import type { ResolvedOptions } from './options';
import { poolLog } from './log';

export interface PoolSettings {
  maxConnections: number;
  acquireTimeout: number;
  idleTimeout: number;
  connectBackoff: number;
  maxConnectBackoff: number;
}

/** Opens a connection for a pool; rejects with the connect error. */
export type Connector = () => Promise<CountingConnection>;

export interface PoolSpec {
  /** The pair's options, resolved once for the pool's life. */
  options: ResolvedOptions;
  settings: PoolSettings;
  connect: Connector;
}

/** A connection's life, reported when it closes. */
export interface ConnectionSummary {
  id: string;
  binding: string;
  domain: string;
  host: string;
  localAddress: string | undefined;
  encrypted: boolean;
  transactions: number;
  deliveries: number;
  recipients: number;
  reason: RetireReason;
}

export interface PoolStats {
  binding: string;
  domain: string;
  /** Connections open now, and of those, in use. */
  open: number;
  busy: number;
  /** Sends waiting for a connection. */
  waiting: number;
  /** Open connections that are TLS-encrypted. */
  encrypted: number;
  opened: number;
  connectFailures: number;
  transactions: number;
  deliveries: number;
  recipients: number;
  retired: Partial<Record<RetireReason, number>>;
}

/** Stands in a pool for a connect that failed, so create() never rejects (see above). */
class ConnectFailure {
  constructor(
    readonly error: BindingPoolError,
    /** The end of the backoff it stands for: borrowed later, it is stale. */
    readonly validUntil: number,
  ) {}
}

type PoolEntry = CountingConnection | ConnectFailure;

/** A send waiting for generic-pool to hand it an entry. */
interface EntryWaiter {
  since: number;
  reject(err: BindingPoolError): void;
}

export class DestinationPool {
  readonly binding: string;
  readonly domain: string;
  readonly options: ResolvedOptions;
  private readonly settings: PoolSettings;
  private readonly connect: Connector;
  private readonly pool: Pool<PoolEntry>;
  private readonly live = new Set<CountingConnection>();
  private readonly totals = { opened: 0, connectFailures: 0, transactions: 0, deliveries: 0, recipients: 0 };
  private readonly retired: Partial<Record<RetireReason, number>> = {};
  private consecutiveFailures = 0;
  private backoffUntil = 0;
  private lastConnectError: unknown;
  /** Set once close() is called: why the pool's remaining connections are closed. */
  private closing: 'idle' | 'shutdown' | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  /** Connects in progress, and create() calls waiting for a closing connection to free its slot. */
  private dialing = 0;
  private readonly slotWaiters: (() => void)[] = [];
  /** Sends waiting for an entry, oldest first; one left out was given up (acquireTimeout). */
  private readonly entryWaiters = new Set<EntryWaiter>();
  private lastHandout = 0;
  private stallTimer: NodeJS.Timeout | undefined;
  /** Deliveries under way for this pool, also between acquires (an MX lookup, a retry): it is not idle then. */
  private deliveries = 0;

  constructor(
    binding: string,
    domain: string,
    spec: PoolSpec,
    private readonly onConnectionClosed: (summary: ConnectionSummary) => void,
    private readonly onIdle: (pool: DestinationPool) => void,
  ) {
    this.binding = binding;
    this.domain = domain;
    this.options = spec.options;
    this.settings = spec.settings;
    this.connect = spec.connect;
    const { maxConnections, idleTimeout } = this.settings;
    this.pool = createPool<PoolEntry>(
      {
        create: () => this.create(),
        destroy: (entry) => this.destroy(entry),
      },
      {
        max: maxConnections,
        min: 0,
        // No acquireTimeoutMillis: nextEntry() bounds waits without progress (see above).
        // Checked in acquire() instead: generic-pool's validation is asynchronous and would add
        // promise turns to every acquire.
        testOnBorrow: false,
        // Most recently used first, so a trickle keeps one connection warm and the rest idle out.
        fifo: false,
        idleTimeoutMillis: idleTimeout,
        // Without an eviction run idleTimeoutMillis does nothing.
        evictionRunIntervalMillis: Math.max(1_000, Math.floor(idleTimeout / 2)),
        numTestsPerEvictionRun: maxConnections,
      },
    );
    // A pool that is created but never used (its domain turned out to have a null MX) goes too.
    this.armIdleTimer();
  }

  /** A connection for one transaction; rejects with ECONNECT or EACQUIRE. */
  async acquire(): Promise<CountingConnection> {
    if (this.closing) throw new BindingPoolError('ECLOSED', 'the transport is closing');
    clearTimeout(this.idleTimer);
    for (;;) {
      let entry: PoolEntry;
      try {
        entry = await this.nextEntry();
      } catch (err) {
        this.armIdleTimer();
        // generic-pool itself refuses only while it drains, i.e. when the transport closes.
        throw err instanceof BindingPoolError ? err : new BindingPoolError('ECLOSED', `the transport is closing (${describeError(err)})`, { cause: err });
      }
      if (entry instanceof ConnectFailure) {
        await this.pool.destroy(entry);
        // Left idle by a send that gave up waiting (acquireTimeout) before the connect failed:
        // once its backoff is over it must not fail this send; take another (create() dials).
        if (Date.now() >= entry.validUntil) continue;
        this.armIdleTimer();
        throw entry.error;
      }
      if (entry.usable) return entry;
      // The server closed it while it sat idle (an idle timeout, a 421): close it, take another.
      void this.pool.destroy(entry);
    }
  }

  /**
   * The next entry generic-pool hands out, or EACQUIRE once the pool has handed nothing to any
   * send for acquireTimeout while this one waited. A given-up request stays in generic-pool's
   * queue (it has no cancel); what it is handed later goes straight back.
   */
  private nextEntry(): Promise<PoolEntry> {
    return new Promise((resolve, reject) => {
      const waiter: EntryWaiter = { since: Date.now(), reject };
      this.entryWaiters.add(waiter);
      this.watchForStall();
      this.pool.acquire().then(
        (entry) => {
          this.lastHandout = Date.now();
          if (this.entryWaiters.delete(waiter)) resolve(entry);
          else this.giveBack(entry);
          this.stopStallWatchIfNoneWait();
        },
        (err: unknown) => {
          if (this.entryWaiters.delete(waiter)) reject(err);
          this.stopStallWatchIfNoneWait();
        },
      );
    });
  }

  /** One timer for all waiting sends, due when the oldest would have waited acquireTimeout without progress. */
  private watchForStall(): void {
    if (this.stallTimer !== undefined) return;
    const oldest = this.entryWaiters.values().next().value;
    if (!oldest) return;
    const timeout = this.settings.acquireTimeout;
    const due = Math.max(oldest.since, this.lastHandout) + timeout;
    this.stallTimer = setTimeout(
      () => {
        this.stallTimer = undefined;
        const now = Date.now();
        for (const waiter of this.entryWaiters) {
          if (Math.max(waiter.since, this.lastHandout) + timeout > now) break;
          this.entryWaiters.delete(waiter);
          waiter.reject(
            new BindingPoolError(
              'EACQUIRE',
              `no connection to ${this.domain} became free within ${timeout} ms (the pool handed none to any send in that time)`,
            ),
          );
        }
        this.watchForStall();
      },
      Math.max(0, due - Date.now()),
    );
  }

  /** Without waiters the timer would only hold the pool (and the process) for acquireTimeout. */
  private stopStallWatchIfNoneWait(): void {
    if (this.entryWaiters.size > 0 || this.stallTimer === undefined) return;
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
  }

  /** An entry handed to a send that had given up: a connection goes back to the pool, a failure is dropped. */
  private giveBack(entry: PoolEntry): void {
    if (entry instanceof ConnectFailure) this.afterReturn(this.pool.destroy(entry));
    else this.release(entry);
  }

  /** Takes a connection back after a transaction; a retired or broken one is closed. */
  release(connection: CountingConnection): void {
    this.afterReturn(connection.usable ? this.pool.release(connection) : this.pool.destroy(connection));
  }

  private afterReturn(done: Promise<void>): void {
    done.then(
      () => this.armIdleTimer(),
      () => this.armIdleTimer(),
    );
  }

  /** False while the pool is backing off after failed connects. */
  get healthy(): boolean {
    return Date.now() >= this.backoffUntil;
  }

  /** No delivery under way, no connection lent out, no send waiting. */
  get idle(): boolean {
    return this.deliveries === 0 && this.pool.borrowed === 0 && this.pool.pending === 0;
  }

  /** A delivery starts: the pool is not dropped as idle until it ends (`leave`). */
  enter(): void {
    this.deliveries++;
    clearTimeout(this.idleTimer);
  }

  leave(): void {
    this.deliveries--;
    this.armIdleTimer();
  }

  stats(): PoolStats {
    const sum = { ...this.totals };
    let encrypted = 0;
    for (const connection of this.live) {
      sum.transactions += connection.transactions;
      sum.deliveries += connection.deliveries;
      sum.recipients += connection.recipients;
      if (connection.encrypted) encrypted++;
    }
    return {
      binding: this.binding,
      domain: this.domain,
      open: this.live.size,
      busy: this.pool.borrowed,
      waiting: this.pool.pending,
      encrypted,
      ...sum,
      retired: { ...this.retired },
    };
  }

  /** Lets lent connections come back, then QUITs every connection; resolves when all sockets are gone. */
  async close(reason: 'idle' | 'shutdown'): Promise<void> {
    this.closing = reason;
    clearTimeout(this.idleTimer);
    await this.pool.drain();
    await this.pool.clear();
  }

  private armIdleTimer(): void {
    if (this.closing || !this.idle) return;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      if (this.idle) this.onIdle(this);
    }, this.settings.idleTimeout).unref();
  }

  private async create(): Promise<PoolEntry> {
    // generic-pool frees a connection's slot as soon as it starts destroying it, while the
    // connection is still QUITting: wait for it, so that the destination never sees more than
    // maxConnections sockets from this pool (`live` holds connections until they are closed).
    while (this.live.size + this.dialing >= this.settings.maxConnections) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    const now = Date.now();
    if (now < this.backoffUntil) {
      return new ConnectFailure(
        new BindingPoolError(
          'ECONNECT',
          `connecting to ${this.domain} failed ${this.consecutiveFailures} time(s) in a row; next attempt in ${this.backoffUntil - now} ms (last error: ${describeError(this.lastConnectError)})`,
          { cause: this.lastConnectError },
        ),
        this.backoffUntil,
      );
    }
    this.dialing++;
    try {
      const connection = await this.connect();
      this.consecutiveFailures = 0;
      this.backoffUntil = 0;
      this.totals.opened++;
      this.live.add(connection);
      return connection;
    } catch (err) {
      this.totals.connectFailures++;
      this.consecutiveFailures++;
      this.lastConnectError = err;
      const pause = Math.min(this.settings.connectBackoff * 2 ** (this.consecutiveFailures - 1), this.settings.maxConnectBackoff);
      this.backoffUntil = Date.now() + pause;
      poolLog('%s/%s connect failed (%d in a row), backing off %d ms: %s', this.binding, this.domain, this.consecutiveFailures, pause, describeError(err));
      return new ConnectFailure(
        new BindingPoolError('ECONNECT', `connecting to ${this.domain} failed: ${describeError(err)}`, { cause: err }),
        this.backoffUntil,
      );
    } finally {
      this.dialing--;
      this.wakeSlotWaiters();
    }
  }

  private wakeSlotWaiters(): void {
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  private async destroy(entry: PoolEntry): Promise<void> {
    if (entry instanceof ConnectFailure) return;
    const reason: RetireReason = entry.usable ? (this.closing ?? 'idle') : 'serverClosed';
    await entry.close(reason);
    this.live.delete(entry);
    this.wakeSlotWaiters();
    const finalReason = entry.retireReason ?? reason;
    this.retired[finalReason] = (this.retired[finalReason] ?? 0) + 1;
    this.totals.transactions += entry.transactions;
    this.totals.deliveries += entry.deliveries;
    this.totals.recipients += entry.recipients;
    this.onConnectionClosed({
      id: entry.id,
      binding: this.binding,
      domain: this.domain,
      host: describeTarget(entry.target),
      localAddress: entry.target.localAddress,
      encrypted: entry.encrypted,
      transactions: entry.transactions,
      deliveries: entry.deliveries,
      recipients: entry.recipients,
      reason: finalReason,
    });
  }
}

/** Figures of pools already dropped, so stats() covers the transport's whole life. */
export interface DroppedPoolTotals {
  pools: number;
  opened: number;
  connectFailures: number;
  transactions: number;
  deliveries: number;
  recipients: number;
}

export class PoolRegistry {
  private readonly pools = new Map<string, DestinationPool>();
  private readonly dropped: DroppedPoolTotals = { pools: 0, opened: 0, connectFailures: 0, transactions: 0, deliveries: 0, recipients: 0 };
  private readonly closingPools = new Set<Promise<void>>();

  constructor(
    private readonly specFor: (binding: string, domain: string) => PoolSpec,
    private readonly onConnectionClosed: (summary: ConnectionSummary) => void,
  ) {}

  /** The pool for a (binding, domain) pair, created on first use. */
  get(binding: string, domain: string): DestinationPool {
    const key = `${binding}\0${domain}`;
    let pool = this.pools.get(key);
    if (!pool) {
      pool = new DestinationPool(binding, domain, this.specFor(binding, domain), this.onConnectionClosed, (idle) => this.drop(key, idle, 'idle'));
      this.pools.set(key, pool);
      poolLog('pool %s/%s created (%d pools)', binding, domain, this.pools.size);
    }
    return pool;
  }

  get size(): number {
    return this.pools.size;
  }

  /** False while the pair's pool is backing off after failed connects; a pair without a pool is healthy. */
  healthy(binding: string, domain: string): boolean {
    return this.pools.get(`${binding}\0${domain}`)?.healthy ?? true;
  }

  stats(): { pools: PoolStats[]; droppedPools: DroppedPoolTotals } {
    return { pools: [...this.pools.values()].map((pool) => pool.stats()), droppedPools: { ...this.dropped } };
  }

  /** Closes every pool; resolves when every connection is closed. */
  async close(): Promise<void> {
    for (const [key, pool] of this.pools) this.drop(key, pool, 'shutdown');
    await Promise.all(this.closingPools);
  }

  /** Closes a pool and moves its figures into the dropped totals. */
  private drop(key: string, pool: DestinationPool, reason: 'idle' | 'shutdown'): void {
    if (this.pools.get(key) !== pool) return;
    this.pools.delete(key);
    poolLog('pool %s/%s dropped: %s (%d pools left)', pool.binding, pool.domain, reason, this.pools.size);
    const closing = pool.close(reason).then(() => {
      const figures = pool.stats();
      this.dropped.pools++;
      for (const field of ['opened', 'connectFailures', 'transactions', 'deliveries', 'recipients'] as const) this.dropped[field] += figures[field];
      this.closingPools.delete(closing);
    });
    this.closingPools.add(closing);
  }
}
