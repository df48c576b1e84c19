/**
 * MX lookup with a bounded cache, the way an MTA resolves a destination (RFC 5321 5.1, RFC 7505):
 * MX hosts in preference order (equal preferences shuffled), each with its A/AAAA addresses; a
 * domain without MX records is its own mail host (implicit MX); a null MX (`MX 0 .`) or NXDOMAIN
 * is permanent; SERVFAIL, timeouts and refusals are temporary.
 *
 * Answers are cached per domain for the smallest address TTL (Node reports no TTL for MX
 * records), clamped to [minDnsTtl, maxDnsTtl]; permanent negative answers for minDnsTtl;
 * temporary failures not at all. Concurrent lookups of one domain share one query.
 */
import { promises as dns } from 'node:dns';
import { describeError } from './errors';
import { deliveryLog } from './log';

export interface MxAddress {
  address: string;
  family: 4 | 6;
}

export interface MxHost {
  exchange: string;
  priority: number;
  addresses: MxAddress[];
}

export type MxAnswer =
  | { kind: 'hosts'; hosts: MxHost[]; implicit: boolean }
  /** RFC 7505: the domain accepts no mail. */
  | { kind: 'nullMx' }
  /** The domain does not exist, or has neither MX nor address records. */
  | { kind: 'noSuchDomain'; reason: string }
  | { kind: 'temporary'; reason: string };

export interface MxResolverOptions {
  servers: string[] | undefined;
  /** Seconds. */
  minTtl: number;
  /** Seconds. */
  maxTtl: number;
  /** Milliseconds per query. */
  timeout: number;
  maxEntries: number;
}

interface CacheEntry {
  expires: number;
  answer: Promise<MxAnswer>;
}

interface Resolved<T> {
  value: T;
  /** Seconds; undefined when the answer carried none. */
  ttl: number | undefined;
}

/** DNS error codes that say the name or record does not exist, as opposed to a failed lookup. */
const NO_SUCH_NAME = new Set(['ENOTFOUND']);
const NO_DATA = new Set(['ENODATA']);

export class MxResolver {
  private readonly resolver: dns.Resolver;
  private readonly cache = new Map<string, CacheEntry>();
  /** DNS queries sent, for stats and tests. */
  queries = 0;

  constructor(private readonly options: MxResolverOptions) {
    this.resolver = new dns.Resolver({ timeout: options.timeout, tries: 1 });
    if (options.servers) this.resolver.setServers(options.servers);
  }

  lookup(domain: string): Promise<MxAnswer> {
    const cached = this.cache.get(domain);
    if (cached && cached.expires > Date.now()) return cached.answer;
    // In flight, the entry never expires: every concurrent lookup shares the one query.
    const entry = { expires: Infinity } as CacheEntry;
    entry.answer = this.query(domain).then(({ value, ttl }) => {
      entry.expires = Date.now() + ttl * 1000;
      return value;
    });
    this.cache.delete(domain);
    this.cache.set(domain, entry);
    // Map iteration order is insertion order: the first key is the oldest entry.
    while (this.cache.size > this.options.maxEntries) this.cache.delete(this.cache.keys().next().value!);
    return entry.answer;
  }

  get cachedDomains(): number {
    return this.cache.size;
  }

  private async query(domain: string): Promise<{ value: MxAnswer; ttl: number }> {
    const { minTtl } = this.options;
    let records: { exchange: string; priority: number }[];
    try {
      this.queries++;
      records = await this.resolver.resolveMx(domain);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (NO_SUCH_NAME.has(code)) return { value: { kind: 'noSuchDomain', reason: `domain ${domain} does not exist (NXDOMAIN)` }, ttl: minTtl };
      if (!NO_DATA.has(code)) return { value: { kind: 'temporary', reason: `MX lookup for ${domain} failed: ${code || describeError(err)}` }, ttl: 0 };
      records = [];
    }
    if (records.some((r) => r.exchange === '' || r.exchange === '.')) {
      return { value: { kind: 'nullMx' }, ttl: minTtl };
    }
    const implicit = records.length === 0;
    const ordered = implicit ? [{ exchange: domain, priority: 0 }] : preferenceOrder(records);
    const resolved = await Promise.all(ordered.map((record) => this.addresses(record.exchange)));
    const hosts: MxHost[] = [];
    let ttl = Infinity;
    let failure: string | undefined;
    ordered.forEach((record, i) => {
      const { value, ttl: addressTtl, error } = resolved[i];
      if (error) failure ??= error;
      if (addressTtl !== undefined) ttl = Math.min(ttl, addressTtl);
      if (value.length > 0) hosts.push({ ...record, addresses: value });
    });
    if (hosts.length === 0) {
      if (failure) return { value: { kind: 'temporary', reason: failure }, ttl: 0 };
      const reason = implicit ? `domain ${domain} has no MX and no address records` : `no MX host of ${domain} has an address`;
      return { value: implicit ? { kind: 'noSuchDomain', reason } : { kind: 'temporary', reason }, ttl: implicit ? minTtl : 0 };
    }
    deliveryLog('MX %s: %s', domain, hosts.map((h) => `${h.priority} ${h.exchange}`).join(', '));
    return { value: { kind: 'hosts', hosts, implicit }, ttl: this.clampTtl(ttl) };
  }

  /** A and AAAA records of a host; a temporary failure is reported only when neither answered. */
  private async addresses(host: string): Promise<Resolved<MxAddress[]> & { error?: string }> {
    this.queries += 2;
    const [v4, v6] = await Promise.allSettled([this.resolver.resolve4(host, { ttl: true }), this.resolver.resolve6(host, { ttl: true })]);
    const value: MxAddress[] = [];
    let ttl: number | undefined;
    let error: string | undefined;
    for (const [result, family] of [
      [v4, 4],
      [v6, 6],
    ] as const) {
      if (result.status === 'fulfilled') {
        for (const record of result.value) {
          value.push({ address: record.address, family });
          ttl = Math.min(ttl ?? Infinity, record.ttl);
        }
      } else {
        const code = (result.reason as NodeJS.ErrnoException).code ?? '';
        if (!NO_SUCH_NAME.has(code) && !NO_DATA.has(code)) error ??= `address lookup for ${host} failed: ${code || describeError(result.reason)}`;
      }
    }
    return { value, ttl, error: value.length === 0 ? error : undefined };
  }

  private clampTtl(ttl: number): number {
    const { minTtl, maxTtl } = this.options;
    return Math.min(maxTtl, Math.max(minTtl, Number.isFinite(ttl) ? ttl : minTtl));
  }
}

/** By preference; hosts of equal preference in random order, so they share the load (RFC 5321 5.1). */
function preferenceOrder<T extends { priority: number }>(records: T[]): T[] {
  return records
    .map((record) => ({ record, tieBreak: Math.random() }))
    .sort((a, b) => a.record.priority - b.record.priority || a.tieBreak - b.tieBreak)
    .map(({ record }) => record);
}
