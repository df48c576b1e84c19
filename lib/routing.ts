/**
 * Routing: which hosts a (binding, domain) pair's connections go to, and how to open one. A
 * domain is delivered through the `route` its scopes resolve to; hosts are tried in order, so a
 * pool keeps its key while its connections may land on different hosts.
 */
import { BindingPoolError, describeError } from './errors';
import { CountingConnection, type ConnectionTarget } from './connection';
import type { Binding } from './config';
import type { ResolvedOptions } from './options';
import type { Connector } from './pool-registry';

/** Everything a connection needs from the options, minus the host it goes to. */
type Hop = Omit<ConnectionTarget, 'localAddress' | 'ehloName' | 'connectionTimeout' | 'greetingTimeout' | 'socketTimeout'>;

/** The hosts for a domain, in the order to try them; throws ENOROUTE when there are none. */
export function hopsFor(domain: string, options: ResolvedOptions): Hop[] {
  const route = options.route;
  if (!route) {
    throw new BindingPoolError('ENOROUTE', `no route for domain ${JSON.stringify(domain)}: set "route" for it in one of its scopes`);
  }
  return [
    {
      host: route.host,
      port: route.port ?? (route.secure ? 465 : 25),
      secure: route.secure ?? false,
      requireTLS: route.requireTLS ?? false,
      ignoreTLS: route.ignoreTLS ?? false,
      lmtp: route.lmtp ?? false,
      // A route's own TLS options win over the scope's.
      tls: options.tlsOptions || route.tls ? { ...options.tlsOptions, ...route.tls } : undefined,
      auth: route.auth,
    },
  ];
}

/** Opens a connection for the pair: each host in turn until one takes it. */
export function connectorFor(binding: Binding, domain: string, options: ResolvedOptions): Connector {
  const limits = {
    maxDeliveries: options.maxDeliveriesPerConnection,
    maxRecipients: options.maxRecipientsPerConnection,
    maxRecipientsPerTransaction: options.maxRecipientsPerTransaction,
  };
  const label = `${binding.name}/${domain}`;
  return async () => {
    const failures: string[] = [];
    for (const hop of hopsFor(domain, options)) {
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
        failures.push(`${hop.host}:${hop.port}: ${describeError(err)}`);
      }
    }
    throw new Error(failures.join('; '));
  };
}
