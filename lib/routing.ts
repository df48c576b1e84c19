/**
 * Routing: which hosts a (binding, domain) pair's connections go to, and how to open one. A
 * domain goes through the static `route` its scopes resolve to, else straight to its MX hosts.
 * Hosts are tried in order until one takes the connection, so a pool keeps its key while its
 * connections may land on different hosts.
 */
import { isIP } from 'node:net';
import { describeError } from './errors';
import { CountingConnection, type ConnectionTarget } from './connection';
import type { Binding } from './config';
import type { MxAnswer, MxResolver } from './mx-resolver';
import type { ResolvedOptions, TlsPolicy } from './options';
import type { Connector } from './pool-registry';

/** Everything a connection needs that depends on the host it goes to. */
type Hop = Pick<
  ConnectionTarget,
  'host' | 'servername' | 'port' | 'secure' | 'requireTLS' | 'ignoreTLS' | 'opportunisticTLS' | 'lmtp' | 'tls' | 'auth' | 'allowUnencryptedAuth'
>;

/**
 * Where a domain's recipients go: hosts to try, or a verdict reached without connecting (with
 * the SMTP-style reply reported for each recipient).
 */
export type RouteDecision =
  { kind: 'hops'; hops: Hop[] } | { kind: 'reject'; responseCode: number; response: string } | { kind: 'defer'; responseCode: number; response: string };

export class Router {
  constructor(private readonly mx: MxResolver) {}

  async decide(binding: Binding, domain: string, options: ResolvedOptions): Promise<RouteDecision> {
    if (options.route) return { kind: 'hops', hops: [routeHop(options)] };
    return mxDecision(await this.mx.lookup(domain), binding, domain, options);
  }

  /** Opens a connection for the pair: each host in turn until one takes it. */
  connectorFor(binding: Binding, domain: string, options: ResolvedOptions): Connector {
    const limits = {
      maxDeliveries: options.maxDeliveriesPerConnection,
      maxRecipients: options.maxRecipientsPerConnection,
      maxRecipientsPerTransaction: options.maxRecipientsPerTransaction,
    };
    const label = `${binding.name}/${domain}`;
    return async () => {
      const decision = await this.decide(binding, domain, options);
      if (decision.kind !== 'hops') throw new Error(decision.response);
      const failures: string[] = [];
      for (const hop of decision.hops) {
        const target: ConnectionTarget = {
          ...hop,
          localAddress: binding.localAddress,
          ehloName: binding.ehloName,
          connectionTimeout: options.connectionTimeout,
          greetingTimeout: options.greetingTimeout,
          socketTimeout: options.socketTimeout,
        };
        try {
          return await CountingConnection.open(label, target, limits);
        } catch (err) {
          // Refused, timed out, greeted with 4xx/421, or no TLS where it is required: next host.
          failures.push(`${hop.servername ?? hop.host}[${hop.host}]:${hop.port}: ${describeError(err)}`);
        }
      }
      throw new Error(failures.join('; '));
    };
  }
}

function routeHop(options: ResolvedOptions): Hop {
  const route = options.route!;
  return {
    host: route.host,
    servername: undefined,
    port: route.port ?? (route.secure ? 465 : 25),
    secure: route.secure ?? false,
    ...tlsFlags(options.tls, route.requireTLS, route.ignoreTLS),
    lmtp: route.lmtp ?? false,
    // A route's own TLS options win over the scope's.
    tls: options.tlsOptions || route.tls ? { ...options.tlsOptions, ...route.tls } : undefined,
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
        host: address,
        // SNI and the certificate check use the MX host's name, not the address.
        servername: host.exchange,
        port: options.port,
        secure: false,
        ...tlsFlags(options.tls),
        lmtp: false,
        tls: options.tlsOptions ? { ...options.tlsOptions } : undefined,
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

function tlsFlags(policy: TlsPolicy, requireTLS?: boolean, ignoreTLS?: boolean): Pick<Hop, 'requireTLS' | 'ignoreTLS' | 'opportunisticTLS'> {
  return {
    requireTLS: requireTLS ?? policy === 'required',
    ignoreTLS: ignoreTLS ?? policy === 'no',
    opportunisticTLS: policy === 'ifavailable',
  };
}
