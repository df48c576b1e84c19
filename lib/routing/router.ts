/**
 * Routing: which hosts a (binding, domain) pair's connections go to, and how to open one. A
 * domain goes through the static `route` its scopes resolve to, else straight to its MX hosts.
 * Hosts are tried in order until one takes the connection, so a pool keeps its key while its
 * connections may land on different hosts.
 */
import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import { describeError } from '../errors';
import { CountingConnection, type ConnectionTarget } from '../smtp/connection';
import type { Binding } from '../policy/scopes';
import type { MxAnswer, MxResolver } from './mx-resolver';
import type { ConnectionLimits, ResolvedOptions } from '../policy/options';
import type { Connector, DialRequest } from '../pool/registry';
import { tlsPlan, withPlainTextRetry, type TlsPlan } from './tls-policy';
import { DialFailure, type DialOutcome, type DialVerdict, type HostSlots, type SlotRequest } from '../pool/host-slots';
import type { ClusterLeases } from '../pool/cluster-leases';

/** Everything a connection needs that depends on the host it goes to. */
type Hop = Pick<
  ConnectionTarget,
  'host' | 'servername' | 'port' | 'secure' | 'requireTLS' | 'ignoreTLS' | 'opportunisticTLS' | 'lmtp' | 'tls' | 'auth' | 'allowUnencryptedAuth'
> &
  Pick<TlsPlan, 'plainTextRetry'> & {
    /** MX preference (0 for a route): lower first. */
    priority: number;
  };

/** What a pair's dials share: its binding, options and limits, and what each host's dials share. */
interface PairDial {
  binding: Binding;
  domain: string;
  options: ResolvedOptions;
  limits: ConnectionLimits;
  label: string;
  backoff: { first: number; max: number };
  /**
   * The pair's MX decisions, kept per answer (a new answer comes when the resolver's cache entry
   * expires); a route's decision never changes and is kept by its options (Router.routeDecisions).
   * Dials reuse them: a pair's dial cost adds to its messages' with many domains on a host.
   */
  mxDecisions: WeakMap<MxAnswer, RouteDecision>;
  /** Per hop of a decision: the target and the slot request, which depend on nothing else. */
  hopDials: WeakMap<Hop, HopDial>;
}

/** What every dial of a pair to one hop asks with (a pair's connector serves one pool, with one DialRequest). */
interface HopDial {
  target: ConnectionTarget;
  slotRequest: SlotRequest;
}

/** Why one host of a dial gave no connection; `waitMs` when only a lease across processes or room in the connection rates was missing. */
interface HopFailure {
  failure: string;
  verdict: DialVerdict;
  waitMs?: number;
  /** The connection rates had no room: no other host is tried either. */
  rateBound?: boolean;
}

/**
 * Where a domain's recipients go: hosts to try, or a verdict reached without connecting (with
 * the SMTP-style reply reported for each recipient).
 */
export type RouteDecision =
  { kind: 'hops'; hops: Hop[] } | { kind: 'reject'; responseCode: number; response: string } | { kind: 'defer'; responseCode: number; response: string };

export class Router {
  /** Each pool's dials, by its limits (the pair policy's own object): what decide() shares with them. */
  private readonly pairs = new WeakMap<ConnectionLimits, PairDial>();
  /**
   * What dials to a hop from a binding connect with, by hop: the same for every pair whose hop it
   * is (pairs that share resolved options share their route's hop, scopes.ts unconfiguredPairs).
   */
  private readonly hopTargets = new WeakMap<Hop, Map<string, { target: ConnectionTarget; reuseKey: string }>>();
  /** A route's decision, by resolved options: pairs that share their options share it, and so its hop's targets. */
  private readonly routeDecisions = new WeakMap<ResolvedOptions, RouteDecision>();

  constructor(
    private readonly mx: MxResolver,
    private readonly slots: HostSlots,
    /** With `coordination`: each connection also needs a lease on its host across processes. */
    private readonly leases?: ClusterLeases,
  ) {}

  /** Where the pair's recipients go: the decision its pool's dials use (kept per MX answer), when it has a pool. */
  async decide(binding: Binding, domain: string, options: ResolvedOptions, limits: ConnectionLimits): Promise<RouteDecision> {
    // Keyed by the policy's own limits object: a pair found is this pair.
    const pair = this.pairs.get(limits);
    if (pair) return this.pairDecision(pair);
    if (options.route) return this.routeDecision(options);
    return mxDecision(await this.mx.lookup(domain), binding, domain, options);
  }

  /** The pair's route decision for a dial: from a cache (see PairDial.mxDecisions), else built. */
  private async pairDecision(pair: PairDial): Promise<RouteDecision> {
    const { binding, domain, options } = pair;
    if (options.route) return this.routeDecision(options);
    const answer = await this.mx.lookup(domain);
    let decision = pair.mxDecisions.get(answer);
    if (!decision) pair.mxDecisions.set(answer, (decision = mxDecision(answer, binding, domain, options)));
    return decision;
  }

  private routeDecision(options: ResolvedOptions): RouteDecision {
    let decision = this.routeDecisions.get(options);
    if (!decision) this.routeDecisions.set(options, (decision = { kind: 'hops', hops: [routeHop(options)] }));
    return decision;
  }

  /**
   * Opens a connection for the pair. Hosts go in preference order; of equal preference, the one
   * with the fewest connections from the binding first (spread per connection, RFC 5321 5.1);
   * a host backing off after failed connects only when every host is. Each dial holds a slot on
   * its host (maxHostConnections, shared with other pools), waiting for one when the host is full.
   * `limits` is the pair's policy's object: connections read it as it changes (pair-policy.ts).
   */
  connectorFor(binding: Binding, domain: string, options: ResolvedOptions, limits: ConnectionLimits): Connector {
    const pair: PairDial = {
      binding,
      domain,
      options,
      limits,
      label: `${binding.name}/${domain}`,
      backoff: { first: options.connectBackoff, max: options.maxConnectBackoff },
      mxDecisions: new WeakMap(),
      hopDials: new WeakMap(),
    };
    this.pairs.set(limits, pair);
    return async (request) => {
      const decision = await this.pairDecision(pair);
      if (decision.kind !== 'hops') throw new DialFailure(decision.response, 'unreachable');
      const failures: string[] = [];
      let waits = 0;
      let waitMs = Infinity;
      let verdict: DialVerdict = 'unreachable';
      for (const hop of this.dialOrder(binding, decision.hops)) {
        const result = await this.tryHop(pair, hop, request);
        if (result instanceof CountingConnection) return result;
        failures.push(result.failure);
        if (result.waitMs !== undefined) {
          waits++;
          waitMs = Math.min(waitMs, result.waitMs);
          // No room in the connection rates: no other host may be tried now either.
          if (result.rateBound) break;
        } else {
          verdict = worse(verdict, result.verdict);
        }
      }
      // Only leases held elsewhere or the connection rates stopped it: the pool asks again then, no backoff.
      const onlyWaits = waits > 0 && waits === failures.length;
      throw new DialFailure(failures.join('; '), onlyWaits ? 'crowded' : verdict, onlyWaits ? waitMs : undefined);
    };
  }

  /** One host of a dial: a slot on it (or another pool's idle connection there), a lease with coordination, the connect. */
  private async tryHop(pair: PairDial, hop: Hop, request: DialRequest): Promise<CountingConnection | HopFailure> {
    const { binding, options, limits } = pair;
    const host = this.slots.host(binding.name, hop.host, hop.port);
    const { target, slotRequest } = this.hopDial(pair, hop, request);
    const { reuseKey } = slotRequest;
    const { slot, adopted } = await host.take(slotRequest);
    if (adopted) {
      // Another pool's open connection to this host, with this pool's limits from now on.
      adopted.limits = limits;
      return adopted;
    }
    const hostLease = await this.leases?.take(`host:${binding.name}:${hop.host}:${hop.port}`, options.maxHostConnections, host.held);
    if (hostLease && !hostLease.granted) {
      slot.release();
      return {
        failure: `${hop.host}:${hop.port}: no lease free across processes (maxHostConnections ${options.maxHostConnections})`,
        verdict: 'crowded',
        waitMs: hostLease.retryInMs,
      };
    }
    if (!request.mayConnect()) {
      slot.release();
      hostLease?.release();
      return { failure: 'maxConnectionRate has no room for a connect now', verdict: 'crowded', waitMs: request.connectRoomIn(), rateBound: true };
    }
    try {
      // routing/tls-policy.ts: a failed handshake with an MX host at 'ifavailable' goes again in plain text.
      let tries = 0;
      const connection = await withPlainTextRetry(target, hop.plainTextRetry, (t) => {
        if (tries++ > 0 && !request.mayConnect()) throw new Error('maxConnectionRate has no room for a plain-text retry now');
        return CountingConnection.open(pair.label, t, limits);
      });
      host.record('connected', 0, pair.backoff);
      host.attach(slot, connection, request.owner, reuseKey);
      hostLease?.holdFor(connection);
      return connection;
    } catch (err) {
      hostLease?.release();
      // Recorded before the slot goes, so that a backoff keeps the host's entry.
      const others = host.held - 1;
      const outcome = dialOutcome(err);
      host.record(outcome, others, pair.backoff);
      slot.release();
      const said = serverReply(err);
      if (said !== undefined) request.refused(said);
      // Refused, timed out, greeted with 4xx/421, or no TLS where it is required: next host.
      return { failure: `${hop.servername ?? hop.host}[${hop.host}]:${hop.port}: ${describeError(err)}`, verdict: dialVerdict(outcome, others, err) };
    }
  }

  /** What the pair's dials to `hop` ask with, built on the first (see PairDial.hopDials). */
  private hopDial(pair: PairDial, hop: Hop, request: DialRequest): HopDial {
    const cached = pair.hopDials.get(hop);
    if (cached) return cached;
    const { domain, options, limits } = pair;
    const { target, reuseKey: sharedKey } = this.hopTarget(pair, hop);
    // With coordination a connection's pair lease is its pool's: no other pool takes it over.
    const reuseKey = sharedKey + (this.leases ? `\0${domain}` : '');
    const slotRequest: SlotRequest = { ...request, cap: options.maxHostConnections, reuseKey, limits };
    const dial = { target, slotRequest };
    pair.hopDials.set(hop, dial);
    return dial;
  }

  /** The target of a dial to `hop` from the pair's binding, and its reuse key: shared by every pair with that hop (see hopTargets). */
  private hopTarget(pair: PairDial, hop: Hop): { target: ConnectionTarget; reuseKey: string } {
    const { binding, options } = pair;
    let byBinding = this.hopTargets.get(hop);
    if (!byBinding) this.hopTargets.set(hop, (byBinding = new Map()));
    let found = byBinding.get(binding.name);
    if (!found) {
      const target: ConnectionTarget = {
        ...hop,
        localAddress: binding.localAddress,
        ehloName: binding.ehloName,
        connectionTimeout: options.connectionTimeout,
        greetingTimeout: options.greetingTimeout,
        socketTimeout: options.socketTimeout,
      };
      byBinding.set(binding.name, (found = { target, reuseKey: reuseKeyOf(target, hop.plainTextRetry) }));
    }
    return found;
  }

  private dialOrder(binding: Binding, hops: Hop[]): Hop[] {
    // One host (a route, a single MX address): nothing to order.
    if (hops.length === 1) return hops;
    const now = Date.now();
    const candidates = hops.map((hop, order) => {
      const known = this.slots.peek(binding.name, hop.host, hop.port);
      return { hop, order, backingOff: known?.backingOff(now) ?? false, load: known?.held ?? 0, tieBreak: Math.random() };
    });
    const live = candidates.filter((c) => !c.backingOff);
    const usable = live.length > 0 ? live : candidates;
    return usable.sort((a, b) => a.hop.priority - b.hop.priority || a.load - b.load || a.tieBreak - b.tieBreak || a.order - b.order).map(({ hop }) => hop);
  }
}

/**
 * Connections to one host with the same key can carry one another's mail: everything that was
 * decided when the connection was opened (source, EHLO name, TLS and auth, timeouts) is in it.
 */
function reuseKeyOf(target: ConnectionTarget, plainTextRetry: boolean): string {
  const { tls, auth, ...plain } = target;
  return JSON.stringify([plain, auth?.user, auth?.pass !== undefined, plainTextRetry, tls ? describeTls(tls) : null]);
}

/** TLS options as a short stable string: keys in order, large values (certificates) by hash. */
function describeTls(tls: TlsConnectionOptions): string {
  return JSON.stringify(
    Object.keys(tls)
      .sort()
      .map((key) => {
        const value = (tls as Record<string, unknown>)[key];
        const text = typeof value === 'function' ? String(value) : (JSON.stringify(value) ?? 'undefined');
        return [key, text.length > 64 ? createHash('sha256').update(text).digest('base64') : text];
      }),
  );
}

/** The server's own refusal in a failed dial (greeting, EHLO, STARTTLS, AUTH), if it made one. */
function serverReply(err: unknown): string | undefined {
  const e = err as { responseCode?: number; response?: string };
  return e.responseCode !== undefined && e.responseCode >= 400 && typeof e.response === 'string' ? e.response : undefined;
}

/** What the server's answer to a connect says about it. */
function dialOutcome(err: unknown): DialOutcome {
  const e = err as { code?: string; originalCode?: string; responseCode?: number; command?: string; message?: string };
  // A greeting or EHLO answered 4xx/5xx: the server is there and says no.
  if (e.responseCode !== undefined && (e.command === 'CONN' || e.command === 'EHLO')) return 'refused';
  const code = e.originalCode ?? e.code;
  if (code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'EPIPE') return 'refused';
  if (e.code === 'ECONNECTION' && /closed/i.test(e.message ?? '')) return 'refused';
  if (e.code === 'ETIMEDOUT' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH' || code === 'ETIMEDOUT') return 'unreachable';
  return 'other';
}

/**
 * A refusal while others are open is the host's connection cap (it learned); a greeting that
 * says no with nothing open is the receiver throttling the binding; anything else, a dead host.
 */
function dialVerdict(outcome: DialOutcome, others: number, err: unknown): DialVerdict {
  if (outcome !== 'refused') return 'unreachable';
  if (others > 0) return 'crowded';
  return (err as { responseCode?: number }).responseCode !== undefined ? 'throttled' : 'unreachable';
}

/** Of the hosts' answers, the one that decides what the pool does (see DialVerdict). */
function worse(a: DialVerdict, b: DialVerdict): DialVerdict {
  return VERDICT_RANK[b] > VERDICT_RANK[a] ? b : a;
}

const VERDICT_RANK: Record<DialVerdict, number> = { unreachable: 0, throttled: 1, crowded: 2 };

function routeHop(options: ResolvedOptions): Hop {
  const route = options.route!;
  return {
    priority: 0,
    host: route.host,
    servername: undefined,
    port: route.port ?? (route.secure ? 465 : 25),
    secure: route.secure ?? false,
    ...tlsPlan({
      level: options.tls,
      destination: 'route',
      // A route's own TLS options win over the scope's, its own requireTLS / ignoreTLS over the level.
      tlsOptions: options.tlsOptions || route.tls ? { ...options.tlsOptions, ...route.tls } : undefined,
      requireTLS: route.requireTLS,
      ignoreTLS: route.ignoreTLS,
    }),
    lmtp: route.lmtp ?? false,
    auth: route.auth,
    allowUnencryptedAuth: route.allowUnencryptedAuth ?? false,
  };
}

function mxDecision(answer: MxAnswer, binding: Binding, domain: string, options: ResolvedOptions): RouteDecision {
  switch (answer.kind) {
    case 'nullMx':
      return { kind: 'reject', responseCode: 556, response: `556 5.1.10 domain ${domain} accepts no mail (null MX)` };
    case 'noSuchDomain':
      return { kind: 'reject', responseCode: 550, response: `550 5.1.2 ${answer.reason}` };
    case 'temporary':
      return { kind: 'defer', responseCode: 451, response: `451 4.4.3 ${answer.reason}` };
  }
  // A binding with a source address can only reach hosts of its address family.
  const family = binding.localAddress ? isIP(binding.localAddress) : 0;
  const hops: Hop[] = [];
  for (const host of answer.hosts) {
    for (const { address, family: addressFamily } of host.addresses) {
      if (family !== 0 && addressFamily !== family) continue;
      hops.push({
        priority: host.priority,
        host: address,
        // SNI and the certificate check use the MX host's name, not the address.
        servername: host.exchange,
        port: options.port,
        secure: false,
        ...tlsPlan({ level: options.tls, destination: 'mx', tlsOptions: options.tlsOptions }),
        lmtp: false,
        auth: undefined,
        allowUnencryptedAuth: false,
      });
    }
  }
  if (hops.length === 0) {
    return { kind: 'defer', responseCode: 451, response: `451 4.4.4 no MX host of ${domain} has an IPv${family} address for binding ${binding.name}` };
  }
  return { kind: 'hops', hops };
}
