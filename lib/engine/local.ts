/**
 * The delivery engine: everything below the Nodemailer glue. It takes a built message with its
 * recipients grouped by domain, picks each domain's binding, routes it (static route or MX), and
 * delivers it over the pool for the (binding, domain) pair. It runs in the transport's thread, or
 * in a worker thread behind engine/thread.ts: its jobs and results are plain data for that reason.
 */
import { EventEmitter } from 'node:events';
import { ScopeResolver, type Binding, type SenderName } from '../policy/scopes';
import type { TransactionEnvelope } from '../smtp/connection';
import { deliverToDomain, emptyDomainResult, type DomainResult } from '../delivery/deliver';
import { BindingPoolError, describeError } from '../errors';
import { HostSlots, type HostStats } from '../pool/host-slots';
import { MxResolver } from '../routing/mx-resolver';
import { DNS_OPTIONS, type BindingPoolOptions, type ResolvedOptions } from '../policy/options';
import { PoolRegistry, type ConnectionSummary, type DestinationPool, type DialRequest, type DroppedPoolTotals, type PoolStats } from '../pool/registry';
import type { Recipient } from '../message/recipients';
import { Router } from '../routing/router';
import { PolicyRegistry, type RateStats } from '../policy/policy-registry';
import type { LearnedEvent, ShapingStats, SuspensionEvent } from '../policy/pair-policy';
import { RedisStore, type SharedEvent } from '../coordination/redis-store';
import { ClusterLeases } from '../pool/cluster-leases';

/** One message for the engine: what the transport hands over per sendMail. */
export interface MessageJob {
  sender: SenderName;
  envelope: TransactionEnvelope;
  /** The message in wire form (message/bytes.ts toWireForm): dot-stuffed, CRLF line ends. */
  message: Buffer;
  /** Recipients by destination domain (already checked and de-duplicated). */
  domains: [domain: string, recipients: Recipient[]][];
}

export interface EngineStats {
  /** Live pools, one per (binding, domain) pair. */
  pools: PoolStats[];
  /** Totals of pools already dropped for idleness. */
  droppedPools: DroppedPoolTotals;
  /** Server addresses with connections from a binding, a learned limit or a backoff. */
  hosts: HostStats[];
  /** Every rate bucket: one per scope a maxMessageRate, warmup or maxConnectionRate is declared in, with its fill and the warm-up step in force. */
  rates: RateStats[];
  /** Pairs with something in force: a suspension, a rule's stricter options, a learned per-connection limit. */
  shaping: ShapingStats[];
  /** DNS queries sent for MX delivery (each try counts), and domains and MX host names in the cache. */
  dns: { queries: number; cachedDomains: number; cachedHosts: number };
}

/** What the transport needs of an engine, in this thread or another. Emits 'connectionClosed', 'suspended' and 'resumed'. */
export interface Engine extends EventEmitter {
  deliver(job: MessageJob): Promise<DomainResult[]>;
  stats(): EngineStats;
  verify(): Promise<true>;
  close(): Promise<void>;
}

/**
 * A verify() dial: it owns nothing the host could ask back and is always wanted; its own signal,
 * so that a host it waited on is not kept for the process's life.
 */
function verifyDial(): DialRequest {
  return {
    owner: {
      holdsIdle: () => false,
      closeIfIdle: () => false,
      yieldIdle: () => false,
      detach: () => undefined,
      borrow: () => false,
      takeBack: () => undefined,
      wantsBack: () => false,
    },
    park: () => () => undefined,
    wanted: () => true,
    signal: new AbortController().signal,
    mayConnect: () => true,
    connectRoomIn: () => 0,
    refused: () => undefined,
  };
}

export class LocalEngine extends EventEmitter implements Engine {
  private readonly scopes: ScopeResolver;
  private readonly registry: PoolRegistry;
  private readonly mx: MxResolver;
  private readonly router: Router;
  private readonly hosts = new HostSlots();
  private readonly policies: PolicyRegistry;
  /** With `coordination`: the Redis store every process shares, and its subscription to the others' events. */
  private readonly store: RedisStore | undefined;

  constructor(options: BindingPoolOptions) {
    super();
    this.scopes = new ScopeResolver(options);
    const checked = this.scopes.options;
    this.mx = new MxResolver({
      servers: checked.dnsServers,
      minTtl: checked.minDnsTtl ?? DNS_OPTIONS.minDnsTtl.default,
      maxTtl: checked.maxDnsTtl ?? DNS_OPTIONS.maxDnsTtl.default,
      timeout: checked.dnsTimeout ?? DNS_OPTIONS.dnsTimeout.default,
      retries: checked.dnsRetries ?? DNS_OPTIONS.dnsRetries.default,
      maxEntries: checked.dnsCacheSize ?? DNS_OPTIONS.dnsCacheSize.default,
    });
    const coordination = checked.coordination;
    this.store = coordination ? new RedisStore(coordination) : undefined;
    const onFailure = coordination?.onFailure ?? 'wait';
    const leases = this.store ? new ClusterLeases(this.store, onFailure) : undefined;
    this.router = new Router(this.mx, this.hosts, leases);
    this.policies = new PolicyRegistry(
      this.scopes,
      (name: string, event: unknown) => this.policyEvent(name, event),
      this.store,
      onFailure === 'wait' ? undefined : onFailure.processes,
    );
    void this.store?.onEvent((event) => this.sharedEvent(event)).catch(() => undefined);
    this.registry = new PoolRegistry(
      (bindingName, domain) => {
        const binding = this.scopes.binding(bindingName)!;
        const policy = this.policies.get(binding, domain);
        return { policy, connect: this.router.connectorFor(binding, domain, policy.options, policy.limits), leases };
      },
      (summary: ConnectionSummary) => this.emit('connectionClosed', summary),
      (pool) => this.policies.release(pool.binding, pool.domain),
    );
    this.policies.onRoom = () => this.registry.wakeWaiting();
  }

  deliver(job: MessageJob): Promise<DomainResult[]> {
    const deliveries: Promise<DomainResult>[] = [];
    for (let i = 0; i < job.domains.length; i++) {
      // Not `for (const [domain, recipients] of …)`: before V8 optimizes it, that runs the iterator protocol twice per domain.
      const group = job.domains[i];
      const domain = group[0];
      const recipients = group[1];
      const binding = this.scopes.bindingFor(job.sender, (member) => this.registry.healthy(member.name, domain));
      deliveries.push(this.deliverDomain(binding, domain, recipients, job.envelope, job.message));
    }
    return deliveries.length === 1 ? deliveries[0].then((result) => [result]) : Promise.all(deliveries);
  }

  stats(): EngineStats {
    const now = Date.now();
    return {
      ...this.registry.stats(),
      hosts: this.hosts.stats(),
      rates: this.policies.rateStats(now),
      shaping: this.policies.shapingStats(now),
      dns: { queries: this.mx.queries, cachedDomains: this.mx.cachedDomains, cachedHosts: this.mx.cachedHosts },
    };
  }

  /** Checks that every configured route accepts a connection; rejects naming the one that did not. */
  async verify(): Promise<true> {
    for (const { path, route, binding: bindingName, domain } of this.scopes.configuredRoutes()) {
      const binding = this.scopes.binding(bindingName)!;
      // The options of the scope the route was set in: a domain stanza's (its tls, say), or none.
      const options: ResolvedOptions = { ...this.scopes.resolve(binding, domain), route };
      const limits = { maxDeliveries: 0, maxRecipients: 0, maxRecipientsPerTransaction: options.maxRecipientsPerTransaction };
      try {
        const connection = await this.router.connectorFor(binding, domain ?? route.host, options, limits)(verifyDial());
        await connection.close('shutdown');
      } catch (err) {
        throw new BindingPoolError(
          'ECONNECT',
          `${path} (${route.host}:${route.port ?? (route.secure ? 465 : 25)}) did not accept a connection: ${describeError(err)}`,
          { cause: err },
        );
      }
    }
    return true;
  }

  async close(): Promise<void> {
    await this.registry.close();
    this.policies.close();
    // Not waiting for the subscription: one still waiting for a Redis that is down never ends.
    await this.store?.close();
  }

  /** A pair's policy changed: the application hears of suspensions; with coordination, the other processes of local ones. */
  private policyEvent(name: string, event: unknown): void {
    if (name === 'learned') {
      const e = event as LearnedEvent;
      this.store?.publish({ type: 'learned', binding: e.binding, domain: e.domain, k: e.maxDeliveriesPerConnection, reply: e.reply, until: e.until });
      return;
    }
    const e = event as SuspensionEvent;
    if (name === 'suspended' && !e.fromCluster)
      this.store?.publish({ type: 'suspended', binding: e.binding, domain: e.domain, rule: e.rule, reply: e.reply, until: e.until.getTime() });
    this.emit(name, event);
  }

  /** Another process suspended a pair or learned a limit: in force here too. */
  private sharedEvent(event: SharedEvent): void {
    const binding = this.scopes.binding(event.binding);
    if (!binding) return;
    const policy = this.policies.forEvent(binding, event.domain);
    if (event.type === 'suspended') policy.applySuspension(event.rule ?? 'another process', event.reply, event.until);
    else if (event.k !== undefined) policy.applyLearned(event.k, event.reply, event.until);
  }

  private deliverDomain(binding: Binding, domain: string, recipients: Recipient[], envelope: TransactionEnvelope, message: Buffer): Promise<DomainResult> {
    // The pool holds the pair's resolved options, so they are resolved once per pool, not per message.
    const pool = this.registry.get(binding.name, domain);
    // A route needs no lookup: straight to the pool, without an async function's turns.
    return pool.policy.options.route
      ? deliverToDomain({ domain, binding: binding.name, pool, envelope, message, recipients })
      : this.deliverByMx(binding, domain, pool, recipients, envelope, message);
  }

  private async deliverByMx(
    binding: Binding,
    domain: string,
    pool: DestinationPool,
    recipients: Recipient[],
    envelope: TransactionEnvelope,
    message: Buffer,
  ): Promise<DomainResult> {
    const { options, limits } = pool.policy;
    // Held during the MX lookup too, so the pool is not dropped as idle under it (deliverToDomain
    // enters it again before this leaves).
    pool.enter();
    try {
      const decision = await this.router.decide(binding, domain, options, limits);
      if (decision.kind === 'hops') return deliverToDomain({ domain, binding: binding.name, pool, envelope, message, recipients });
      // Null MX, NXDOMAIN (reject) or a failed lookup (defer): decided without connecting.
      const result = emptyDomainResult(domain, binding.name);
      const status = decision.kind === 'reject' ? 'rejected' : 'pending';
      result[status] = recipients.map((r) => ({ recipient: r.address, status, response: decision.response, responseCode: decision.responseCode }));
      return result;
    } finally {
      pool.leave();
    }
  }
}
