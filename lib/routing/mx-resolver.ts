/**
 * MX lookup with a bounded cache, the way an MTA resolves a destination (RFC 5321 5.1, RFC 7505):
 * MX hosts in preference order (equal preferences shuffled), each with its A/AAAA addresses; a
 * domain without MX records is its own mail host (implicit MX); a null MX (`MX 0 .`) or NXDOMAIN
 * is permanent; SERVFAIL, timeouts and refusals are temporary.
 *
 * Two caches, each bounded by `dnsCacheSize` (the least recently added entry goes first): domains
 * (their MX answer) and MX host names (their addresses). A host's addresses are cached once for
 * every domain that names it, for their smallest TTL clamped to [minDnsTtl, maxDnsTtl]; a domain's
 * answer expires with the first of its hosts' addresses (Node reports no TTL for MX records), so
 * it never outlives them. Permanent negative answers (NXDOMAIN, null MX, a host without
 * addresses) are cached for minDnsTtl; temporary failures not at all. Concurrent lookups of one
 * domain, or of one host, share one query. A question the server does not answer (timeout,
 * refusal) is asked again up to `dnsRetries` times before the lookup fails.
 */
import { promises as dns } from 'node:dns';
import { describeError } from '../errors';
import { deliveryLog } from '../log';

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
  /** Milliseconds per try of a query. */
  timeout: number;
  /** Tries after the first when the server does not answer or refuses. */
  retries: number;
  /** Domains kept at most, and as many host names. */
  maxEntries: number;
}

interface CacheEntry<T> {
  /** Epoch ms; Infinity while the query is in flight. */
  expires: number;
  answer: Promise<T>;
}

/** What a query settles to: the value and when its cache entry expires (epoch ms; 0: not cached). */
interface Fresh<T> {
  value: T;
  expires: number;
}

/** A host's addresses, with their own expiry so a domain that reuses them later expires with them. */
interface HostAnswer {
  addresses: MxAddress[];
  /** Epoch ms; meaningful only when there are addresses. */
  expires: number;
  /** Why no address is known, when the lookup failed rather than found none. */
  error?: string;
}

/** DNS error codes that say the name or record does not exist, as opposed to a failed lookup. */
const NO_SUCH_NAME = new Set(['ENOTFOUND']);
const NO_DATA = new Set(['ENODATA']);
/** The server did not answer (a lost UDP packet) or refused: worth asking again. */
const NO_ANSWER = new Set(['ETIMEOUT', 'ECONNREFUSED']);

export class MxResolver {
  private readonly resolver: dns.Resolver;
  private readonly domains = new Map<string, CacheEntry<MxAnswer>>();
  private readonly hosts = new Map<string, CacheEntry<HostAnswer>>();
  /** DNS queries sent (each try counts), for stats and tests. */
  queries = 0;

  constructor(private readonly options: MxResolverOptions) {
    // tries: 1, and ask() retries instead: c-ares' own tries would not show in `queries` (nor be
    // told apart in a test), and buy nothing here: a late answer to an earlier try is dropped
    // either way (measured). c-ares 1.34 (Node 20) derives a try's timeout from the server's
    // recent latency once it has timed a few answers; `timeout` applies until then.
    this.resolver = new dns.Resolver({ timeout: options.timeout, tries: 1 });
    if (options.servers) this.resolver.setServers(options.servers);
  }

  lookup(domain: string): Promise<MxAnswer> {
    return this.cached(this.domains, domain, () => this.queryDomain(domain));
  }

  get cachedDomains(): number {
    return this.domains.size;
  }

  get cachedHosts(): number {
    return this.hosts.size;
  }

  /** The cached answer for `key`, else a new query that every concurrent caller shares. */
  private cached<T>(cache: Map<string, CacheEntry<T>>, key: string, query: () => Promise<Fresh<T>>): Promise<T> {
    const hit = cache.get(key);
    if (hit && hit.expires > Date.now()) return hit.answer;
    // In flight, the entry never expires: every concurrent lookup shares the one query.
    const entry = { expires: Infinity } as CacheEntry<T>;
    entry.answer = query().then(
      ({ value, expires }) => {
        entry.expires = expires;
        return value;
      },
      (err: unknown) => {
        // Not expected (failures are answers), but a rejected entry must not stay forever.
        entry.expires = 0;
        throw err;
      },
    );
    cache.delete(key);
    cache.set(key, entry);
    // Map iteration order is insertion order: the first key is the oldest entry.
    while (cache.size > this.options.maxEntries) cache.delete(cache.keys().next().value!);
    return entry.answer;
  }

  /** One DNS question, asked again (up to `retries` times) while the server gives no answer. */
  private async ask<T>(name: string, question: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      this.queries++;
      try {
        return await question();
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? '';
        if (attempt >= this.options.retries || !NO_ANSWER.has(code)) throw err;
        deliveryLog('DNS %s for %s, asking again (%d of %d)', code, name, attempt + 1, this.options.retries);
      }
    }
  }

  private async queryDomain(domain: string): Promise<Fresh<MxAnswer>> {
    let records: { exchange: string; priority: number }[];
    try {
      records = await this.ask(domain, () => this.resolver.resolveMx(domain));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (NO_SUCH_NAME.has(code)) return { value: { kind: 'noSuchDomain', reason: `domain ${domain} does not exist (NXDOMAIN)` }, expires: this.negative() };
      if (!NO_DATA.has(code)) return { value: { kind: 'temporary', reason: `MX lookup for ${domain} failed: ${code || describeError(err)}` }, expires: 0 };
      records = [];
    }
    if (records.some((r) => r.exchange === '' || r.exchange === '.')) {
      return { value: { kind: 'nullMx' }, expires: this.negative() };
    }
    const implicit = records.length === 0;
    const ordered = implicit ? [{ exchange: domain, priority: 0 }] : preferenceOrder(records);
    const answers = await Promise.all(ordered.map((record) => this.cached(this.hosts, record.exchange.toLowerCase(), () => this.queryHost(record.exchange))));
    const hosts: MxHost[] = [];
    let expires = Infinity;
    let failure: string | undefined;
    ordered.forEach((record, i) => {
      const answer = answers[i];
      failure ??= answer.error;
      if (answer.addresses.length === 0) return;
      // A copy: the host's cached list is shared by every domain that names it.
      hosts.push({ ...record, addresses: [...answer.addresses] });
      expires = Math.min(expires, answer.expires);
    });
    if (hosts.length === 0) {
      if (failure) return { value: { kind: 'temporary', reason: failure }, expires: 0 };
      const reason = implicit ? `domain ${domain} has no MX and no address records` : `no MX host of ${domain} has an address`;
      return { value: implicit ? { kind: 'noSuchDomain', reason } : { kind: 'temporary', reason }, expires: implicit ? this.negative() : 0 };
    }
    deliveryLog('MX %s: %s', domain, hosts.map((h) => `${h.priority} ${h.exchange}`).join(', '));
    return { value: { kind: 'hosts', hosts, implicit }, expires };
  }

  /** A and AAAA records of a host; a temporary failure is reported only when neither answered. */
  private async queryHost(host: string): Promise<Fresh<HostAnswer>> {
    const [v4, v6] = await Promise.allSettled([
      this.ask(host, () => this.resolver.resolve4(host, { ttl: true })),
      this.ask(host, () => this.resolver.resolve6(host, { ttl: true })),
    ]);
    const addresses: MxAddress[] = [];
    let ttl = Infinity;
    let error: string | undefined;
    for (const [result, family] of [
      [v4, 4],
      [v6, 6],
    ] as const) {
      if (result.status === 'fulfilled') {
        for (const record of result.value) {
          addresses.push({ address: record.address, family });
          ttl = Math.min(ttl, record.ttl);
        }
      } else {
        const code = (result.reason as NodeJS.ErrnoException).code ?? '';
        if (!NO_SUCH_NAME.has(code) && !NO_DATA.has(code)) error ??= `address lookup for ${host} failed: ${code || describeError(result.reason)}`;
      }
    }
    if (addresses.length > 0) {
      const expires = Date.now() + this.clampTtl(ttl) * 1000;
      return { value: { addresses, expires }, expires };
    }
    // No address: negative-cached like NXDOMAIN when the server said so, not cached when it failed.
    return error ? { value: { addresses, expires: 0, error }, expires: 0 } : { value: { addresses, expires: 0 }, expires: this.negative() };
  }

  /** Expiry of a permanent negative answer. */
  private negative(): number {
    return Date.now() + this.options.minTtl * 1000;
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
