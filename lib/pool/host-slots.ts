/**
 * Connection slots on one server address (IP and port) for one binding, shared by every pool
 * whose connections go there: the per-next-hop view an MTA's connection cache has. A relay that
 * carries 1 000 domains, or an MX host that serves 150, sees at most `maxHostConnections`
 * connections from a binding, however many (binding, domain) pools send there.
 *
 * A host also learns what it accepts (an AIMD-like rule, per binding × address):
 * - decrease: a new connection refused twice in a row (a 4xx/5xx greeting, a refused or reset
 *   connect, with no successful connect between) while others from the binding are open holds
 *   the host at the number open then; one refusal alone (a receiver that refuses at random)
 *   changes nothing;
 * - increase: one more connection each REGROWTH_MS without a refusal, up to the configured cap.
 * A host that cannot be reached (a timeout, a refused connect with nothing open) is backed off
 * on its own, so the next connections try the next MX host at once.
 *
 * Slots count dials in progress and connections until their socket is gone (a QUITting
 * connection still counts, as the receiver still counts it).
 */
import type { ConnectionLimits, CountingConnection } from '../smtp/connection';
import { poolLog } from '../log';

/** Time without a refusal after which a host's learned limit grows by one connection. */
export const REGROWTH_MS = 30_000;

/** A pool that owns connections on hosts: asked for one it holds idle when another pool needs the slot. */
export interface SlotOwner {
  /** Closes the connection if the pool holds it idle; false if it is in use. */
  closeIfIdle(connection: CountingConnection): boolean;
  /**
   * Takes one of its idle connections out of its idle list for another pool: `fits` says which
   * one will do, `use` gets it (now no longer the pool's). False when it holds none idle.
   */
  yieldIdle(fits: (connection: CountingConnection) => boolean, use: (connection: CountingConnection | undefined) => void): boolean;
  /** Lets go of a connection another pool takes over as it is (no QUIT: it stays open). */
  detach(connection: CountingConnection): void;
}

/** What a dial asks of a host. */
export interface SlotRequest {
  cap: number;
  owner: SlotOwner;
  wanted: () => boolean;
  signal: AbortSignal;
  /** Connections with the same key are interchangeable (same binding, address, TLS, auth, timeouts). */
  reuseKey: string;
  /** The asking pool's per-connection limits: a connection taken over must have room under them. */
  limits: ConnectionLimits;
}

/** A slot to dial on, or an open connection of another pool to the same host, taken over as it is. */
export type SlotGrant = { slot: Slot; adopted?: undefined } | { adopted: CountingConnection; slot?: undefined };

/** One held slot; released once, when the dial fails or the connection's socket is gone. */
export interface Slot {
  release(): void;
}

/** A dial that gave up waiting for a slot: the pool closed, or no send wants it any more. */
export class SlotCancelled extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'SlotCancelled';
  }
}

interface SlotWaiter {
  request: SlotRequest;
  grant: (grant: SlotGrant) => void;
  cancel: (err: SlotCancelled) => void;
}

interface AttachedConnection {
  owner: SlotOwner;
  reuseKey: string;
}

/**
 * What a failed dial means for the pool that asked: `crowded`, a host refused it while others
 * from the binding were open (the host holds at what it accepts; the pool's open connections
 * serve its sends); `throttled`, a host greeted with a refusal and nothing open (pause the pair);
 * `unreachable`, no host could be reached (back off, fail fast when nothing is open).
 */
export type DialVerdict = 'crowded' | 'throttled' | 'unreachable';

/** Every host of a dial failed; the message names each host and its error. */
export class DialFailure extends Error {
  constructor(
    message: string,
    readonly verdict: DialVerdict,
    /** Set when no host could be tried for want of a lease across processes: ask again in that many ms. */
    readonly retryInMs?: number,
  ) {
    super(message);
    this.name = 'DialFailure';
  }
}

/** How a dial to a host ended, for what the host learns. */
export type DialOutcome = 'connected' | 'refused' | 'unreachable' | 'other';

export class HostState {
  /** Slots held: dials in progress, open connections, connections still closing. */
  held = 0;
  /** The cap of the last dial that asked (maxHostConnections is scoped: pools may differ). */
  private cap = Infinity;
  private learned = Infinity;
  private learnedAt = 0;
  private lastRefused = false;
  private failures = 0;
  private backoffUntil = 0;
  private readonly connections = new Map<CountingConnection, AttachedConnection>();
  private readonly waiters: SlotWaiter[] = [];
  private wakeTimer: NodeJS.Timeout | undefined;

  constructor(
    readonly key: string,
    /** Called when the host holds nothing any more, so the table can forget it. */
    private readonly onIdle: (host: HostState) => void,
  ) {}

  /** The most connections this binding may have here now: the cap, or what was learned (regrown). */
  limit(cap: number): number {
    if (this.learned === Infinity) return cap;
    const regrown = this.learned + Math.floor((Date.now() - this.learnedAt) / REGROWTH_MS);
    if (regrown >= cap) {
      this.learned = Infinity;
      return cap;
    }
    return regrown;
  }

  /** The number learned from refusals, while one is in force. */
  get learnedLimit(): number | undefined {
    const limit = this.limit(this.cap);
    return this.learned === Infinity ? undefined : limit;
  }

  get open(): number {
    return this.connections.size;
  }

  /** Nothing held, learned or backed off, nobody waiting: the entry can go. */
  idle(now: number): boolean {
    return this.held === 0 && this.waiters.length === 0 && this.learnedLimit === undefined && !this.backingOff(now);
  }

  /** True while the host is backed off after failed connects. */
  backingOff(now = Date.now()): boolean {
    return now < this.backoffUntil;
  }

  get backoffEnds(): number {
    return this.backoffUntil;
  }

  /**
   * A slot for a dial: at once when the host has room. When it is full, an idle connection of
   * another pool that fits is taken over as it is (the way Postfix's connection cache serves a
   * destination by address), else an idle one is closed to free a slot, else the dial waits for
   * a connection here to close. Rejects with SlotCancelled when `signal` aborts or, once a slot
   * is free, `wanted()` says the dial is no longer needed.
   */
  take(request: SlotRequest): Promise<SlotGrant> {
    if (request.signal.aborted) return Promise.reject(new SlotCancelled('the pool is closing'));
    this.cap = request.cap;
    if (this.waiters.length === 0 && this.held < this.limit(request.cap)) return Promise.resolve({ slot: this.hold() });
    return new Promise((resolve, reject) => {
      const waiter: SlotWaiter = { request, grant: resolve, cancel: reject };
      const onAbort = (): void => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new SlotCancelled('the pool is closing'));
      };
      request.signal.addEventListener('abort', onAbort, { once: true });
      waiter.grant = (grant) => {
        request.signal.removeEventListener('abort', onAbort);
        resolve(grant);
      };
      this.waiters.push(waiter);
      this.reclaimIdle(waiter);
      this.wake();
    });
  }

  /** Binds a slot to a connection: the slot is released when its socket is gone. */
  attach(slot: Slot, connection: CountingConnection, owner: SlotOwner, reuseKey: string): void {
    this.connections.set(connection, { owner, reuseKey });
    hostOf.set(connection, this);
    void connection.whenEnded().then(() => {
      this.connections.delete(connection);
      slot.release();
    });
  }

  /** What a dial here taught: refusals while others are open lower the limit; dead hosts back off. */
  record(outcome: DialOutcome, othersHeld: number, backoff: { first: number; max: number }): void {
    if (outcome === 'connected') {
      this.lastRefused = false;
      this.failures = 0;
      this.backoffUntil = 0;
      return;
    }
    if (outcome === 'refused' && othersHeld > 0) {
      if (this.lastRefused && othersHeld < this.limit(Infinity)) {
        this.learned = othersHeld;
        this.learnedAt = Date.now();
        poolLog('host %s refused a connection with %d open: holding at %d', this.key, othersHeld, othersHeld);
      }
      this.lastRefused = true;
      return;
    }
    if (outcome === 'other') return;
    this.failures++;
    this.backoffUntil = Date.now() + Math.min(backoff.first * 2 ** (this.failures - 1), backoff.max);
  }

  private hold(): Slot {
    this.held++;
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        this.held--;
        this.wake();
        if (this.idle(Date.now())) this.onIdle(this);
      },
    };
  }

  /** Hands free slots to waiting dials, oldest first; a dial nobody wants any more is cancelled. */
  private wake(): void {
    clearTimeout(this.wakeTimer);
    this.wakeTimer = undefined;
    while (this.waiters.length > 0) {
      const waiter = this.waiters[0];
      if (!waiter.request.wanted()) {
        this.waiters.shift();
        waiter.cancel(new SlotCancelled('no send waits for this connection any more'));
        continue;
      }
      if (this.held >= this.limit(waiter.request.cap)) break;
      this.waiters.shift();
      waiter.grant({ slot: this.hold() });
    }
    // A learned limit grows with time alone: wake the waiting dials when it does.
    if (this.waiters.length > 0 && this.learned !== Infinity) {
      const next = this.learnedAt + (Math.floor((Date.now() - this.learnedAt) / REGROWTH_MS) + 1) * REGROWTH_MS;
      this.wakeTimer = setTimeout(() => this.wake(), Math.max(0, next - Date.now())).unref();
    }
  }

  /**
   * A connection its pool is about to keep idle, while the host is full and another pool's dial
   * waits here: taken over by that dial when it fits ('adopted'), or to be closed so the dial gets
   * the slot ('close'); else 'keep'.
   */
  offerIdle(connection: CountingConnection, owner: SlotOwner): 'adopted' | 'close' | 'keep' {
    const attached = this.connections.get(connection);
    const others = this.waiters.filter((w) => w.request.owner !== owner);
    if (!attached || others.length === 0 || this.held < this.limit(others[0].request.cap)) return 'keep';
    const taker = others.find((w) => this.fits(connection, attached, w));
    if (!taker) return 'close';
    owner.detach(connection);
    this.handOver(connection, taker);
    return 'adopted';
  }

  private fits(connection: CountingConnection, attached: AttachedConnection, waiter: SlotWaiter): boolean {
    return attached.reuseKey === waiter.request.reuseKey && connection.roomUnder(waiter.request.limits) > 0;
  }

  /** Gives a waiting dial an open connection another pool let go of. */
  private handOver(connection: CountingConnection, waiter: SlotWaiter): void {
    const i = this.waiters.indexOf(waiter);
    if (i >= 0) this.waiters.splice(i, 1);
    this.connections.set(connection, { owner: waiter.request.owner, reuseKey: waiter.request.reuseKey });
    poolLog('host %s full: %s taken over by another pool', this.key, connection.id);
    adoptedConnections.add(connection);
    waiter.grant({ adopted: connection });
  }

  /** For a dial that waits on a full host: another pool's idle connection, taken over if one fits, else closed. */
  private reclaimIdle(waiter: SlotWaiter): void {
    if (this.held < this.limit(waiter.request.cap)) return;
    const requester = waiter.request.owner;
    const donors = new Set<SlotOwner>();
    for (const { owner } of this.connections.values()) if (owner !== requester) donors.add(owner);
    for (const donor of donors) {
      const fits = (connection: CountingConnection): boolean => {
        const attached = this.connections.get(connection);
        return attached !== undefined && this.fits(connection, attached, waiter);
      };
      const yielded = donor.yieldIdle(fits, (connection) => {
        const waiting = this.waiters.includes(waiter);
        if (connection && waiting) this.handOver(connection, waiter);
        else if (connection) void connection.close('evicted');
        else if (waiting) this.evictIdle(requester);
      });
      if (yielded) return;
    }
    this.evictIdle(requester);
  }

  /** Closes an idle connection another pool holds here, to free its slot. */
  private evictIdle(requester: SlotOwner): void {
    if (this.held < this.limit(this.cap)) return;
    for (const [connection, { owner }] of this.connections) {
      if (owner !== requester && owner.closeIfIdle(connection)) {
        poolLog('host %s full: closed idle %s for another pool', this.key, connection.id);
        return;
      }
    }
  }
}

/** The host each attached connection holds a slot on. */
const hostOf = new WeakMap<CountingConnection, HostState>();
/** Connections handed to another pool's dial, until that pool has counted them as taken over. */
const adoptedConnections = new WeakSet<CountingConnection>();

/** True once for a connection a dial got by taking it over from another pool (not a new one). */
export function takenOver(connection: CountingConnection): boolean {
  return adoptedConnections.delete(connection);
}

/** A connection its pool is about to keep idle: see HostState.offerIdle. */
export function offerIdle(connection: CountingConnection, owner: SlotOwner): 'adopted' | 'close' | 'keep' {
  return hostOf.get(connection)?.offerIdle(connection, owner) ?? 'keep';
}

/** One host as stats() shows it. */
export interface HostStats {
  binding: string;
  /** `address:port`. */
  host: string;
  /** Connections open (or closing) from the binding, and slots held (those plus dials under way). */
  open: number;
  held: number;
  /** What the host was learned to accept, while that is below the cap. */
  learnedLimit?: number;
  /** Set while the host is backed off after failed connects (epoch ms). */
  backoffUntil?: number;
}

/** Every host's slots, per binding × server address. */
export class HostSlots {
  private readonly hosts = new Map<string, HostState>();

  /** The host's entry, if it holds or learned anything. */
  peek(binding: string, address: string, port: number): HostState | undefined {
    return this.hosts.get(`${binding}|${address}:${port}`);
  }

  host(binding: string, address: string, port: number): HostState {
    const key = `${binding}|${address}:${port}`;
    let host = this.hosts.get(key);
    if (!host) {
      host = new HostState(key, (idle) => {
        if (this.hosts.get(key) === idle) this.hosts.delete(key);
      });
      this.hosts.set(key, host);
    }
    return host;
  }

  /** Hosts with a connection, a learned limit or a backoff, for stats(); the others are forgotten here. */
  stats(): HostStats[] {
    const now = Date.now();
    const rows: HostStats[] = [];
    for (const [key, host] of this.hosts) {
      if (host.idle(now)) {
        this.hosts.delete(key);
        continue;
      }
      const [binding, address] = key.split('|');
      const row: HostStats = { binding, host: address, open: host.open, held: host.held };
      if (host.learnedLimit !== undefined) row.learnedLimit = host.learnedLimit;
      if (host.backingOff(now)) row.backoffUntil = host.backoffEnds;
      rows.push(row);
    }
    return rows;
  }
}
