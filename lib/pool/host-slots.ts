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
 *
 * When the host is full, a pool's dial waits here ("parks") and stands for its pool: a connection
 * another pool is done with is lent to it for as long as its sends keep coming (and goes back to
 * its own pool after), so that 200 domains on one relay through 40 connections cost no dial, no
 * handover between generic-pools, per message. A connection changes pools for good ("adopted")
 * only when the waiting pool cannot send at once (a rate, a pause) or takes an idle one.
 */
import type { ConnectionLimits, CountingConnection } from '../smtp/connection';
import { poolLog } from '../log';

/** Time without a refusal after which a host's learned limit grows by one connection. */
export const REGROWTH_MS = 30_000;

/** A pool that owns connections on hosts: asked for one it holds idle when another pool needs the slot. */
export interface SlotOwner {
  /** True while the pool holds the connection idle. */
  holdsIdle(connection: CountingConnection): boolean;
  /** Closes the connection if the pool holds it idle; false if it is in use. */
  closeIfIdle(connection: CountingConnection): boolean;
  /**
   * Takes `connection` out of its idle list for another pool and offers it to `take`: 'adopted',
   * the connection is no longer the pool's (the pool detaches it then); 'lent', it is the pool's
   * but runs the other pool's sends (it comes back through takeBack); false, it stays the pool's
   * (the dial it was for was served meanwhile). Returns false when the pool does not hold it idle.
   */
  yieldIdle(connection: CountingConnection, take: (connection: CountingConnection) => 'adopted' | 'lent' | false): boolean;
  /** Lets go of a connection another pool takes over as it is (no QUIT: it stays open). */
  detach(connection: CountingConnection): void;
  /**
   * Runs one of its waiting sends on `connection`, which `lender` keeps owning: true when a send
   * took it (the pool gives it back to `lender.takeBack` when it has no more use for it).
   */
  borrow(connection: CountingConnection, lender: SlotOwner): boolean;
  /** A connection this pool lent comes back, with what the borrower did on it. */
  takeBack(connection: CountingConnection, done: ConnectionWork): void;
  /** True when the pool has sends waiting and nothing idle: a borrower gives its connection back now. */
  wantsBack(): boolean;
}

/** What a connection did for one pool: its transactions, deliveries and recipients. */
export interface ConnectionWork {
  transactions: number;
  deliveries: number;
  recipients: number;
}

/** What a dial asks of a host. */
export interface SlotRequest {
  cap: number;
  owner: SlotOwner;
  wanted: () => boolean;
  signal: AbortSignal;
  /**
   * Told when the dial starts to wait here (parks) and given `poke`, which looks for another
   * pool's idle connection for it (its pool calls it when a new send comes); returns what to
   * call when the dial stops waiting. A parked dial stands for its pool at the host: connections
   * are lent to its pool's sends through it for as long as it waits.
   */
  park: (poke: () => void) => () => void;
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
    // Never shown to anyone (the pool turns it into "no connection"): no stack to capture.
    const { stackTraceLimit } = Error;
    Error.stackTraceLimit = 0;
    super(reason);
    Error.stackTraceLimit = stackTraceLimit;
    this.name = 'SlotCancelled';
  }
}

interface SlotWaiter {
  request: SlotRequest;
  grant: (grant: SlotGrant) => void;
  cancel: (err: SlotCancelled) => void;
  unpark: () => void;
  /** In the queue still (not granted, handed a connection or cancelled). */
  queued: boolean;
  /** It had an idle connection of another kind closed for its slot: once per dial, however often it is poked. */
  freedOne?: boolean;
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
  /** Those its pool holds idle (see IdleConnections): what a waiting dial may be lent or take over. */
  private readonly idleHere = new Set<CountingConnection>();
  private readonly waiters: SlotWaiter[] = [];
  /**
   * Of the waiting dials, those whose pool had a send ready when last heard of (a dial parks for
   * a send; its pool pokes it when more come), in turn order: what a connection is lent to.
   */
  private readonly ready = new Set<SlotWaiter>();
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
      const waiter: SlotWaiter = { request, grant: resolve, cancel: reject, unpark: NOTHING, queued: true };
      cancelOnAbort(request.signal, this);
      this.waiters.push(waiter);
      this.ready.add(waiter);
      waiter.unpark = request.park(() => {
        if (!waiter.queued) return;
        this.ready.add(waiter);
        this.reclaimIdle(waiter);
      });
      this.reclaimIdle(waiter);
      this.wake();
    });
  }

  /** Takes a dial out of the queue (it got a slot or a connection, or gave up). */
  private unqueue(waiter: SlotWaiter, i = this.waiters.indexOf(waiter)): void {
    if (i < 0) return;
    this.waiters.splice(i, 1);
    this.ready.delete(waiter);
    waiter.queued = false;
    waiter.unpark();
  }

  /** The pool whose signal this is closes: its dials waiting here give up. */
  cancelWaiting(signal: AbortSignal): void {
    for (let i = this.waiters.length - 1; i >= 0; i--) {
      const waiter = this.waiters[i];
      if (waiter.request.signal !== signal) continue;
      this.unqueue(waiter, i);
      waiter.cancel(new SlotCancelled('the pool is closing'));
    }
  }

  /** Binds a slot to a connection: the slot is released when its socket is gone. */
  attach(slot: Slot, connection: CountingConnection, owner: SlotOwner, reuseKey: string): void {
    this.connections.set(connection, { owner, reuseKey });
    hostOf.set(connection, this);
    void connection.whenEnded().then(() => {
      this.connections.delete(connection);
      this.idleHere.delete(connection);
      slot.release();
    });
  }

  /** Its pool put the connection in, or took it out of, its idle list. */
  markIdle(connection: CountingConnection, idle: boolean): void {
    if (!idle) this.idleHere.delete(connection);
    else if (this.connections.has(connection)) this.idleHere.add(connection);
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

  /**
   * Hands free slots to waiting dials, oldest first; a dial nobody wants any more is cancelled
   * when a slot comes free for it (until then it stands for its pool here: see SlotRequest.park).
   */
  private wake(): void {
    clearTimeout(this.wakeTimer);
    this.wakeTimer = undefined;
    while (this.waiters.length > 0) {
      const waiter = this.waiters[0];
      if (this.held >= this.limit(waiter.request.cap)) break;
      // Asked while the dial is still parked: its pool counts it as a connection only once it leaves.
      const wanted = waiter.request.wanted();
      this.unqueue(waiter, 0);
      if (wanted) waiter.grant({ slot: this.hold() });
      else waiter.cancel(new SlotCancelled('no send waits for this connection any more'));
    }
    // A learned limit grows with time alone: wake the waiting dials when it does.
    if (this.waiters.length > 0 && this.learned !== Infinity) {
      const next = this.learnedAt + (Math.floor((Date.now() - this.learnedAt) / REGROWTH_MS) + 1) * REGROWTH_MS;
      this.wakeTimer = setTimeout(() => this.wake(), Math.max(0, next - Date.now())).unref();
    }
  }

  /**
   * A connection its pool is about to keep idle, while the host is full and another pool's dial
   * waits here. In order of preference:
   * - 'lent': a waiting pool with a send ready runs it on the connection, which stays its
   *   owner's (no dial completes, no pool changes hands: the cheap path, taken for every message
   *   when many domains share a host through fewer connections than they have pools);
   * - 'adopted': the first waiting dial it fits takes it over (its pool's sends cannot go yet);
   * - 'close': it fits no dial that is wanted, and is closed so that one gets the slot;
   * - 'keep'.
   * A pool that borrowed goes behind the other ready pools, so pools take turns.
   */
  offerIdle(connection: CountingConnection, owner: SlotOwner): 'lent' | 'adopted' | 'close' | 'keep' {
    const attached = this.connections.get(connection);
    // A free slot goes to the waiting dials (wake): nothing to lend, take over or close for.
    if (!attached || this.waiters.length === 0 || this.held < this.limit(this.waiters[0].request.cap)) return 'keep';
    let fitting: SlotWaiter | undefined;
    let blocked = false;
    // Called for every connection a pool would keep idle: only the ready dials, no allocation.
    for (const waiter of this.ready) {
      if (waiter.request.owner === owner) continue;
      // Its pool has no send now: the dial only stands for it until it pokes the dial again.
      if (!waiter.request.wanted()) {
        this.ready.delete(waiter);
        continue;
      }
      const fits = this.fits(connection, attached, waiter);
      if (fits && waiter.request.owner.borrow(connection, owner)) {
        // Its turn is over: behind the others, if its pool has more sends.
        this.ready.delete(waiter);
        if (waiter.request.wanted()) this.ready.add(waiter);
        return 'lent';
      }
      // Its pool has sends but cannot run one now (a rate, a pause): it may take the connection over.
      if (fits) fitting ??= waiter;
      else blocked = true;
    }
    if (!fitting) return blocked ? 'close' : 'keep';
    owner.detach(connection);
    this.handOver(connection, fitting);
    return 'adopted';
  }

  private fits(connection: CountingConnection, attached: AttachedConnection, waiter: SlotWaiter): boolean {
    return attached.reuseKey === waiter.request.reuseKey && connection.roomUnder(waiter.request.limits) > 0;
  }

  /** Gives a waiting dial an open connection another pool let go of. */
  private handOver(connection: CountingConnection, waiter: SlotWaiter): void {
    this.unqueue(waiter);
    this.connections.set(connection, { owner: waiter.request.owner, reuseKey: waiter.request.reuseKey });
    poolLog('host %s full: %s taken over by another pool', this.key, connection.id);
    adoptedConnections.add(connection);
    waiter.grant({ adopted: connection });
  }

  /**
   * For a dial that waits on a full host: another pool's idle connection, taken over if one fits,
   * else one that does not fit closed to free its slot.
   */
  private reclaimIdle(waiter: SlotWaiter): void {
    // Poked for every send its pool gets while it waits: nothing idle here is the common case.
    // (limit() first: it also ends a learned limit that has grown back to the cap.)
    if (this.held < this.limit(waiter.request.cap) || this.idleHere.size === 0 || !waiter.request.wanted()) return;
    const requester = waiter.request.owner;
    let spare: { connection: CountingConnection; owner: SlotOwner } | undefined;
    for (const connection of this.idleHere) {
      const attached = this.connections.get(connection);
      if (!attached) continue;
      const { owner } = attached;
      if (owner === requester || !owner.holdsIdle(connection)) continue;
      if (!this.fits(connection, attached, waiter)) {
        spare ??= { connection, owner };
        continue;
      }
      // The owner hands it over when it has it out of its idle list; by then the dial may have
      // been served another way, and the owner keeps it.
      const taken = owner.yieldIdle(connection, (yielded) => {
        if (!waiter.queued) return false;
        if (requester.borrow(yielded, owner)) return 'lent';
        if (!waiter.request.wanted()) return false;
        this.handOver(yielded, waiter);
        return 'adopted';
      });
      if (taken) return;
    }
    if (!spare || waiter.freedOne || !spare.owner.closeIfIdle(spare.connection)) return;
    waiter.freedOne = true;
    poolLog('host %s full: closed idle %s for another pool', this.key, spare.connection.id);
  }
}

/**
 * The hosts each pool's signal has dials waiting on, so that one listener per pool cancels them
 * when it closes: a listener per dial would cost each message (with many domains on a shared
 * host, every message's connection comes through a dial that waits here).
 */
const waitingOn = new WeakMap<AbortSignal, Set<HostState>>();

function cancelOnAbort(signal: AbortSignal, host: HostState): void {
  let hosts = waitingOn.get(signal);
  if (!hosts) {
    const watched = new Set<HostState>();
    waitingOn.set(signal, (hosts = watched));
    signal.addEventListener(
      'abort',
      () => {
        for (const watchedHost of watched) watchedHost.cancelWaiting(signal);
      },
      { once: true },
    );
  }
  hosts.add(host);
}

const NOTHING = (): void => undefined;

/**
 * A pool's idle connections, each also known to its host as idle there: a dial waiting at a
 * full host looks only at those, not at every connection the host has.
 */
export class IdleConnections {
  private readonly set = new Set<CountingConnection>();

  add(connection: CountingConnection): void {
    this.set.add(connection);
    hostOf.get(connection)?.markIdle(connection, true);
  }

  delete(connection: CountingConnection): boolean {
    if (!this.set.delete(connection)) return false;
    hostOf.get(connection)?.markIdle(connection, false);
    return true;
  }

  has(connection: CountingConnection): boolean {
    return this.set.has(connection);
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
export function offerIdle(connection: CountingConnection, owner: SlotOwner): 'lent' | 'adopted' | 'close' | 'keep' {
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
