/**
 * The option types users write, and the table of scoped options that drives validation, defaults
 * and the README's reference. Scope resolution itself lives in policy/scopes.ts.
 */
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import type { SendMailOptions } from 'nodemailer';
import type { ReplyRule } from '../shaping/reply-rules';
import type { WarmupPlan } from '../shaping/warmup';
import type { CoordinationOptions } from '../coordination/redis-store';

/** Credentials for a relay route. */
export interface RouteAuth {
  /** User name for SMTP AUTH. */
  user: string;
  /** Password for SMTP AUTH. Never logged. */
  pass: string;
}

/**
 * A static route: where a domain's mail goes instead of its MX hosts (Momentum's `gateway` /
 * `routes`). The field names are Nodemailer's SMTP connection options.
 */
export interface RouteOptions {
  /** Host name or IP address of the relay. */
  host: string;
  /** Default 25 (465 when `secure`). */
  port?: number;
  /** TLS from the first byte (port 465 style). */
  secure?: boolean;
  auth?: RouteAuth;
  /** Fail the connection when the server offers no STARTTLS. */
  requireTLS?: boolean;
  /** Never use STARTTLS, even when offered. */
  ignoreTLS?: boolean;
  /** Node TLS options for this route (certificate checks, servername, minimum version). */
  tls?: TlsConnectionOptions;
  /** Speak LMTP instead of SMTP (per-recipient DATA replies); Momentum `delivery_method = LMTP`. Default false. */
  lmtp?: boolean;
  /** Send `auth` credentials even when the connection is not encrypted. Default false: such a connection is refused. */
  allowUnencryptedAuth?: boolean;
}

/** Options that may be set at every scope: globally, per binding group, per binding, per domain. */
export interface ScopedOptions {
  /** Momentum `max_deliveries_per_connection`: successful deliveries before the connection is retired. 0 = no limit. Default 0. */
  maxDeliveriesPerConnection?: number;
  /** Momentum `max_recipients_per_connection`: RCPT TO commands before the connection is retired. 0 = no limit. Default 0. */
  maxRecipientsPerConnection?: number;
  /** Momentum `max_recipients_per_batch`: RCPT TO commands in one transaction. Default 100. */
  maxRecipientsPerTransaction?: number;
  /** Momentum `max_outbound_connections`: connections per (binding, domain) pool. Default 5. */
  maxOutboundConnections?: number;
  /**
   * The most connections from one binding to one server address (IP and port), across every
   * domain's pool: a relay carrying 1 000 domains, or an MX host serving 150, never sees more.
   * Pools share the host's slots; when the host is full, an idle connection of another pool is taken over (same options) or
   * closed to free one. Default 20 (Postfix's `default_destination_concurrency_limit`).
   */
  maxHostConnections?: number;
  /** Momentum `idle_timeout` (ms here): an idle connection, and then an idle pool, is closed after it. Default 30 000. */
  idleTimeout?: number;
  /** How long a send waits for a free connection before its recipients go pending (ms). Default 30 000. */
  acquireTimeout?: number;
  /** Momentum `connect_timeout` (ms): TCP connect. Default 30 000. */
  connectionTimeout?: number;
  /** Time to wait for the server's greeting (ms). Default 30 000. */
  greetingTimeout?: number;
  /** Momentum `data_timeout`-like inactivity limit on an open connection (ms). Default 300 000. */
  socketTimeout?: number;
  /** Transactions one recipient may be tried in when connections break under it. Default 3. */
  maxAttempts?: number;
  /** First pause after a failed connect before the pool tries that destination again (ms), doubled per failure. Default 1 000. */
  connectBackoff?: number;
  /** Ceiling of that pause (ms). Default 60 000. */
  maxConnectBackoff?: number;
  /** Deliver through this host instead of the domain's MX hosts (Momentum `gateway` / `routes`). Default: none, direct-to-MX delivery. */
  route?: RouteOptions;
  /** Port of the MX hosts (direct delivery). Default 25. */
  port?: number;
  /**
   * STARTTLS and certificate policy (Momentum `tls` / `tls_verify`, Postfix `smtp_tls_security_level`;
   * the table is in routing/tls-policy.ts and the README). `no` never uses STARTTLS (Postfix `none`).
   * `ifavailable` (Postfix `may`, RFC 7435) uses it when offered; for MX hosts without requiring
   * a valid certificate, and when the server answers STARTTLS with an error or the handshake
   * fails, the message goes on in plain text (on a new connection to the same host when the
   * failed handshake ended the session). `required` (Postfix `encrypt`) never sends in clear:
   * recipients stay pending when a host offers no STARTTLS or the handshake fails; an MX host's
   * certificate is not checked. `verified` (Postfix `verify`) is `required` with the certificate
   * checked: a trusted chain for the MX host's name, whatever `rejectUnauthorized` says. `tlsOptions`
   * may turn the check on at `ifavailable` / `required`. A route keeps Node's certificate checks at
   * every level unless its own `tls` (or `tlsOptions`) turns them off, is never retried in plain
   * text, and its own `requireTLS` / `ignoreTLS` win over the level. Default `ifavailable`.
   */
  tls?: TlsPolicy;
  /** Node TLS options for every connection in this scope (merged under a route's own `tls`). Default: none (Node's defaults). */
  tlsOptions?: TlsConnectionOptions;
  /**
   * Momentum `outbound_throttle_messages`, KumoMTA `max_message_rate`: recipients sent (each RCPT
   * TO, whatever its reply) at most this often, `'N/period'` (`'20/s'`, `'100/min'`, `'2000/h'`,
   * `'20/30s'`, `'10000/d'`, optionally `,max_burst=B`; shaping/rate.ts). Never more than N in any
   * window of the period. One bucket per scope it is written in, shared by every pair that scope
   * covers: on a binding, all of its domains (the IP's budget); in a binding's domain stanza, that
   * pair; in a global domain stanza, that domain from every binding; globally, everything. A send
   * over the rate waits (up to `acquireTimeout`), else goes pending with `retryAfter`. Default: none.
   */
  maxMessageRate?: string;
  /** Momentum `outbound_throttle_connections`, KumoMTA `max_connection_rate`: new connections at most this often; written and shared like `maxMessageRate`. Default: none. */
  maxConnectionRate?: string;
  /** A `maxMessageRate` that follows a plan of steps by date (shaping/warmup.ts); written instead of `maxMessageRate` in the same scope. Default: none. */
  warmup?: WarmupPlan;
  /**
   * Momentum Adaptive Delivery, KumoMTA automation: what a pair does when a server's reply
   * matches (shaping/reply-rules.ts). A pair's rules are those of every scope that covers it,
   * most specific first (its domain stanzas, then its binding's, group's and the global ones),
   * then `defaultReplyRules`. Default: none.
   */
  replyRules?: ReplyRule[];
}

/** Per-connection limits as a connection checks them; 0 = no limit. */
export interface ConnectionLimits {
  maxDeliveries: number;
  maxRecipients: number;
  maxRecipientsPerTransaction: number;
}

/** See `ScopedOptions.tls`: `no` < `ifavailable` < `required` < `verified`. */
export type TlsPolicy = 'no' | 'ifavailable' | 'required' | 'verified';

/** A binding's or binding group's per-domain stanza, and a global domain stanza (Momentum `domain`). */
export type DomainOptions = ScopedOptions;

/** A named source identity (Momentum `binding`); its scoped options override the global ones and its binding group's. */
export interface BindingOptions extends ScopedOptions {
  /** Momentum `bind_address`: source IP address of its connections (Nodemailer's `localAddress`). Unset: the OS picks. */
  localAddress?: string;
  /** Momentum `ehlo_hostname`: host name sent with EHLO (Nodemailer's `name`). Unset: the global `name`, else the machine's. */
  name?: string;
  /** Options for single destination domains, most specific of all scopes. */
  domains?: Record<string, DomainOptions>;
}

/** A named set of bindings (Momentum `binding_group`); its scoped options apply to its members, under their own. */
export interface BindingGroupOptions extends ScopedOptions {
  /** Names of the bindings in the group; messages spread round-robin over them. */
  bindings: string[];
  /** Options for single destination domains, for every member of the group (under a member's own domain stanza). */
  domains?: Record<string, DomainOptions>;
}

/** The name of a binding or a binding group, as a message or `selectBinding` names it. */
export interface BindingChoice {
  /** A binding name (a key of `bindings`, or `default`). */
  binding?: string;
  /** A binding group name (a key of `bindingGroups`). */
  bindingGroup?: string;
}

/** The transport's options: the global scope's options, plus the bindings, groups and domains that narrow them. */
export interface BindingPoolOptions extends ScopedOptions {
  /** Named source identities (Momentum `binding` stanzas). Default: only the built-in `default` binding. */
  bindings?: Record<string, BindingOptions>;
  /** Named sets of bindings (Momentum `binding_group` stanzas). Default: none. */
  bindingGroups?: Record<string, BindingGroupOptions>;
  /** Global domain stanzas. Keys are domain names (case-insensitive, IDN allowed). */
  domains?: Record<string, DomainOptions>;
  /** Binding or binding group used when a message names none. Default `default` (built in unless defined). */
  defaultBinding?: string;
  /** Picks a binding for a message that names none: a binding name, or `{ binding }` / `{ bindingGroup }`. */
  selectBinding?: (mail: SendMailOptions) => string | BindingChoice | undefined;
  /** Momentum `ehlo_hostname` at the global scope: EHLO name for bindings without their own `name`. Unset: the machine's host name. */
  name?: string;
  /** DNS servers for MX lookups, e.g. `['127.0.0.1:5353']`. Default: the system's. */
  dnsServers?: string[];
  /** Momentum `min_dns_ttl` (seconds): answers are cached at least this long; also how long NXDOMAIN and null MX answers are cached. Default 30. */
  minDnsTtl?: number;
  /** Momentum `max_dns_ttl` (seconds): answers are cached at most this long. Default 3600. */
  maxDnsTtl?: number;
  /**
   * How long one try of a DNS query may take (ms); after the last try (`dnsRetries`) the domain's
   * recipients go pending. Node's resolver (c-ares) uses it until it has timed the server, then
   * its own estimate from the server's latency. Default 5 000.
   */
  dnsTimeout?: number;
  /** Tries after the first when the DNS server does not answer a query in `dnsTimeout` or refuses it (ETIMEOUT, ECONNREFUSED): one lost UDP packet leaves nothing pending. Default 2. */
  dnsRetries?: number;
  /** Domains kept in the DNS cache at most, and as many MX host names (their addresses, shared by every domain naming them); the least recently added go first. Default 10 000. */
  dnsCacheSize?: number;
  /**
   * The most bytes of messages read (built) and not yet delivered, across the transport. A send
   * over it waits before its message is built, so a queue of large messages holds about this
   * much (a composed message's size is known only once built: reads begun on a low estimate can
   * pass it by a message or two). Each destination also holds at most four messages per
   * connection it may open (eight with `deliveryThread`). A message larger than the whole budget is still sent, alone.
   * Default 268 435 456 (256 MiB).
   */
  maxReadAheadBytes?: number;
  /** Reply rules after every scope's `replyRules`: the built-in table (shaping/reply-rules.ts DEFAULT_REPLY_RULES) unless replaced; `[]` turns it off. */
  defaultReplyRules?: ReplyRule[];
  /**
   * Share connection caps, rates, suspensions and learned limits with every process that uses the
   * same Redis and `keyPrefix` (coordination/redis-store.ts; needs the optional dependency
   * ioredis). Default: none, every limit is this process's.
   */
  coordination?: CoordinationOptions;
  /**
   * Deliver from a worker thread, so composing messages (the application's thread) and speaking
   * SMTP (the worker) run on two cores. The options other than `selectBinding` must then be
   * plain data (no functions). Default false.
   */
  deliveryThread?: boolean;
}

/** How each scoped option is checked, with its default; README's option table mirrors it. */
export type OptionKind = 'count' | 'positive' | 'milliseconds' | 'port' | 'route' | 'tlsPolicy' | 'tlsOptions' | 'rate' | 'warmup' | 'replyRules';

export interface ScopedOptionSpec {
  kind: OptionKind;
  default: number | string | undefined;
  momentum?: string;
}

/** Every scoped option with its check and default. */
export const SCOPED_OPTIONS = {
  maxDeliveriesPerConnection: { kind: 'count', default: 0, momentum: 'max_deliveries_per_connection' },
  maxRecipientsPerConnection: { kind: 'count', default: 0, momentum: 'max_recipients_per_connection' },
  maxRecipientsPerTransaction: { kind: 'positive', default: 100, momentum: 'max_recipients_per_batch' },
  maxOutboundConnections: { kind: 'positive', default: 5, momentum: 'max_outbound_connections' },
  maxHostConnections: { kind: 'positive', default: 20 },
  idleTimeout: { kind: 'milliseconds', default: 30_000, momentum: 'idle_timeout' },
  acquireTimeout: { kind: 'milliseconds', default: 30_000 },
  connectionTimeout: { kind: 'milliseconds', default: 30_000, momentum: 'connect_timeout' },
  greetingTimeout: { kind: 'milliseconds', default: 30_000 },
  socketTimeout: { kind: 'milliseconds', default: 300_000 },
  maxAttempts: { kind: 'positive', default: 3 },
  connectBackoff: { kind: 'milliseconds', default: 1_000 },
  maxConnectBackoff: { kind: 'milliseconds', default: 60_000 },
  route: { kind: 'route', default: undefined },
  port: { kind: 'port', default: 25 },
  tls: { kind: 'tlsPolicy', default: 'ifavailable', momentum: 'tls' },
  tlsOptions: { kind: 'tlsOptions', default: undefined },
  maxMessageRate: { kind: 'rate', default: undefined, momentum: 'outbound_throttle_messages' },
  maxConnectionRate: { kind: 'rate', default: undefined, momentum: 'outbound_throttle_connections' },
  warmup: { kind: 'warmup', default: undefined },
  replyRules: { kind: 'replyRules', default: undefined, momentum: 'adaptive delivery' },
} as const satisfies Record<keyof ScopedOptions, ScopedOptionSpec>;

export type ScopedOptionName = keyof typeof SCOPED_OPTIONS;
export const SCOPED_OPTION_NAMES = Object.keys(SCOPED_OPTIONS) as ScopedOptionName[];

/** Every scoped option with its value after resolution. */
export type ResolvedOptions = Required<Omit<ScopedOptions, OptionalScoped>> & Pick<ScopedOptions, OptionalScoped>;

/** Scoped options without a default. */
type OptionalScoped = 'route' | 'tlsOptions' | 'maxMessageRate' | 'maxConnectionRate' | 'warmup' | 'replyRules';

/** Options that are only global (they concern the DNS cache every pool shares). */
export const DNS_OPTIONS = {
  minDnsTtl: { min: 0, default: 30 },
  maxDnsTtl: { min: 1, default: 3600 },
  dnsTimeout: { min: 1, default: 5_000 },
  dnsRetries: { min: 0, default: 2 },
  dnsCacheSize: { min: 1, default: 10_000 },
} as const;

/** Only global: the read-ahead budget every send shares (message/read-ahead.ts). */
export const READ_AHEAD_OPTIONS = {
  maxReadAheadBytes: { min: 1, default: 256 * 1024 * 1024 },
} as const;

/**
 * Messages a destination may hold read ahead, per connection it may open: the one it carries and
 * a few built ahead, so composing goes on while the connections wait for replies (measured on
 * bench real-mix: 2 per connection 1.16 ×, 4 1.26 ×, 8 1.26 × Nodemailer's pool). With
 * `deliveryThread` the messages crossing between the threads count too, so it holds twice as
 * many (real-mix: 4 per connection 1.37 ×, 8 1.47 ×).
 */
export const READ_AHEAD_PER_CONNECTION = { local: 4, thread: 8 } as const;
