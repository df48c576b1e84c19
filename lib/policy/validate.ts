/**
 * Checks the options a transport is built with, and normalises domain keys. Every problem throws
 * a ConfigError naming the exact option path, so a typo is found at startup and not at the first
 * send to the domain it concerns.
 */
import { isIP } from 'node:net';
import { ConfigError } from '../errors';
import { normalizeDomain } from '../message/recipients';
import {
  DNS_OPTIONS,
  READ_AHEAD_OPTIONS,
  SCOPED_OPTIONS,
  SCOPED_OPTION_NAMES,
  type BindingGroupOptions,
  type BindingOptions,
  type BindingPoolOptions,
  type DomainOptions,
  type ScopedOptions,
} from './options';
import { RULE_SETTING_NAMES } from '../shaping/reply-rules';
import { parseDuration, parseRate } from '../shaping/rate';
import { warmupProblem } from '../shaping/warmup';

const TOP_LEVEL_KEYS = [
  ...SCOPED_OPTION_NAMES,
  ...Object.keys(DNS_OPTIONS),
  ...Object.keys(READ_AHEAD_OPTIONS),
  'bindings',
  'bindingGroups',
  'domains',
  'defaultBinding',
  'selectBinding',
  'name',
  'dnsServers',
  'deliveryThread',
  'defaultReplyRules',
  'coordination',
];
const TLS_POLICIES = ['no', 'ifavailable', 'required', 'verified'];
const BINDING_KEYS = [...SCOPED_OPTION_NAMES, 'localAddress', 'name', 'domains'];
const GROUP_KEYS = [...SCOPED_OPTION_NAMES, 'bindings', 'domains'];
const ROUTE_KEYS = ['host', 'port', 'secure', 'auth', 'requireTLS', 'ignoreTLS', 'tls', 'lmtp', 'allowUnencryptedAuth'];

/** The name of the binding that exists when the options define none of that name. */
export const BUILT_IN_BINDING = 'default';

/** Options after checking: the same shape, with domain keys in their lower-case ASCII form. */
export type CheckedOptions = BindingPoolOptions & {
  bindings: Record<string, BindingOptions>;
  bindingGroups: Record<string, BindingGroupOptions>;
  domains: Record<string, DomainOptions>;
  defaultBinding: string;
};

/** `a.b["x.y"]`: dots for identifier-like keys, brackets for the rest. */
export function childPath(parent: string, key: string): string {
  const part = /^[A-Za-z_$][\w$-]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
  return parent ? parent + part : part.replace(/^\./, '');
}

export function checkOptions(input: unknown): CheckedOptions {
  const options = checkObject(input, 'options');
  checkKeys(options, TOP_LEVEL_KEYS, '');
  checkScoped(options, '');
  if (options.name !== undefined) checkHostName(options.name, 'name');
  if (options.selectBinding !== undefined && typeof options.selectBinding !== 'function') {
    throw new ConfigError('selectBinding', 'must be a function');
  }
  if (options.defaultReplyRules !== undefined) checkReplyRules(options.defaultReplyRules, 'defaultReplyRules');
  if (options.coordination !== undefined) checkCoordination(options.coordination, options.deliveryThread === true);
  if (options.deliveryThread !== undefined && typeof options.deliveryThread !== 'boolean') {
    throw new ConfigError('deliveryThread', `must be true or false, got ${show(options.deliveryThread)}`);
  }
  for (const [name, { min }] of Object.entries({ ...DNS_OPTIONS, ...READ_AHEAD_OPTIONS })) {
    const value = options[name];
    if (value !== undefined && (!Number.isInteger(value) || (value as number) < min))
      throw new ConfigError(name, `must be a whole number ≥ ${min}, got ${show(value)}`);
  }
  const { minDnsTtl, maxDnsTtl } = options as { minDnsTtl?: number; maxDnsTtl?: number };
  if (minDnsTtl !== undefined && maxDnsTtl !== undefined && minDnsTtl > maxDnsTtl) throw new ConfigError('minDnsTtl', 'must not be larger than maxDnsTtl');
  if (options.dnsServers !== undefined) {
    const servers = options.dnsServers;
    if (!Array.isArray(servers) || servers.length === 0)
      throw new ConfigError('dnsServers', 'must be a non-empty array of "address" or "address:port" strings');
    servers.forEach((server: unknown, i: number) => {
      if (typeof server !== 'string' || !isDnsServer(server))
        throw new ConfigError(`dnsServers[${i}]`, `must be an IP address with an optional port, got ${show(server)}`);
    });
  }

  // Null-prototype records, so `name in bindings` never finds toString, constructor…
  const bindings: Record<string, BindingOptions> = Object.create(null);
  for (const [name, value] of entries(options.bindings, 'bindings')) {
    const path = childPath('bindings', name);
    const raw = checkObject(value, path);
    checkKeys(raw, BINDING_KEYS, path);
    checkScoped(raw, path);
    const binding = raw as BindingOptions;
    if (binding.localAddress !== undefined && (typeof binding.localAddress !== 'string' || !isIP(binding.localAddress))) {
      throw new ConfigError(childPath(path, 'localAddress'), `must be an IPv4 or IPv6 address, got ${show(binding.localAddress)}`);
    }
    if (binding.name !== undefined) checkHostName(binding.name, childPath(path, 'name'));
    bindings[name] = { ...binding, domains: checkDomains(binding.domains, childPath(path, 'domains')) };
  }

  const groupOf = new Map<string, string>();
  const bindingGroups: Record<string, BindingGroupOptions> = Object.create(null);
  for (const [name, value] of entries(options.bindingGroups, 'bindingGroups')) {
    const path = childPath('bindingGroups', name);
    const raw = checkObject(value, path);
    checkKeys(raw, GROUP_KEYS, path);
    checkScoped(raw, path);
    const group = raw as unknown as BindingGroupOptions;
    if (name in bindings) throw new ConfigError(path, `the name ${JSON.stringify(name)} is already a binding's; names must be unique`);
    const members = group.bindings as unknown;
    const membersPath = childPath(path, 'bindings');
    if (!Array.isArray(members) || members.length === 0) throw new ConfigError(membersPath, 'must be a non-empty array of binding names');
    members.forEach((member: unknown, i: number) => {
      const memberPath = `${membersPath}[${i}]`;
      if (typeof member !== 'string' || !(member in bindings)) {
        throw new ConfigError(memberPath, `names no binding${typeof member === 'string' ? suggestion(member, Object.keys(bindings)) : ''}`);
      }
      const other = groupOf.get(member);
      if (other !== undefined) {
        throw new ConfigError(
          memberPath,
          `binding ${JSON.stringify(member)} already belongs to group ${JSON.stringify(other)}; a binding belongs to at most one group`,
        );
      }
      groupOf.set(member, name);
    });
    bindingGroups[name] = { ...group, domains: checkDomains(group.domains, childPath(path, 'domains')) };
  }

  const defaultBinding = options.defaultBinding ?? BUILT_IN_BINDING;
  if (typeof defaultBinding !== 'string') throw new ConfigError('defaultBinding', 'must be a binding or binding group name');
  if (defaultBinding !== BUILT_IN_BINDING && !(defaultBinding in bindings) && !(defaultBinding in bindingGroups)) {
    throw new ConfigError(
      'defaultBinding',
      `names no binding or binding group${suggestion(defaultBinding, [...Object.keys(bindings), ...Object.keys(bindingGroups)])}`,
    );
  }

  return {
    ...(options as BindingPoolOptions),
    bindings,
    bindingGroups,
    domains: checkDomains(options.domains, 'domains'),
    defaultBinding,
  };
}

function checkDomains(value: unknown, path: string): Record<string, DomainOptions> {
  const result: Record<string, DomainOptions> = Object.create(null);
  for (const [key, stanza] of entries(value, path)) {
    const stanzaPath = childPath(path, key);
    const domain = normalizeDomain(key);
    if (!domain) throw new ConfigError(stanzaPath, 'is not a valid domain name');
    if (domain in result) throw new ConfigError(stanzaPath, `repeats domain ${JSON.stringify(domain)}`);
    const options = checkObject(stanza, stanzaPath);
    checkKeys(options, SCOPED_OPTION_NAMES, stanzaPath);
    checkScoped(options, stanzaPath);
    result[domain] = options as DomainOptions;
  }
  return result;
}

function checkScoped(scope: Record<string, unknown>, path: string): void {
  for (const name of SCOPED_OPTION_NAMES) {
    const value = scope[name as keyof ScopedOptions];
    if (value === undefined) continue;
    const optionPath = childPath(path, name);
    switch (SCOPED_OPTIONS[name].kind) {
      case 'count':
        if (!Number.isInteger(value) || (value as number) < 0)
          throw new ConfigError(optionPath, `must be a whole number ≥ 0 (0 = no limit), got ${show(value)}`);
        break;
      case 'positive':
        if (!Number.isInteger(value) || (value as number) < 1) throw new ConfigError(optionPath, `must be a whole number ≥ 1, got ${show(value)}`);
        break;
      case 'milliseconds':
        if (!Number.isInteger(value) || (value as number) < 1)
          throw new ConfigError(optionPath, `must be a whole number of milliseconds ≥ 1, got ${show(value)}`);
        break;
      case 'port':
        if (!Number.isInteger(value) || (value as number) < 1 || (value as number) > 65535)
          throw new ConfigError(optionPath, `must be a port number 1–65535, got ${show(value)}`);
        break;
      case 'route':
        checkRoute(value, optionPath);
        break;
      case 'tlsPolicy':
        if (!TLS_POLICIES.includes(value as string))
          throw new ConfigError(
            optionPath,
            `must be one of ${TLS_POLICIES.map((p) => JSON.stringify(p)).join(', ')}, got ${show(value)}${typeof value === 'string' ? suggestion(value, TLS_POLICIES) : ''}`,
          );
        break;
      case 'tlsOptions':
        checkObject(value, optionPath);
        break;
      default:
        checkShaping(SCOPED_OPTIONS[name].kind, value, optionPath);
    }
  }
  if (scope.maxMessageRate !== undefined && scope.warmup !== undefined) {
    throw new ConfigError(childPath(path, 'warmup'), 'is a maxMessageRate that changes by date: set one of warmup and maxMessageRate in a scope, not both');
  }
}

/** The shaping options' checks: rates, warm-up plans, reply rules. */
function checkShaping(kind: string, value: unknown, path: string): void {
  if (kind === 'rate') {
    const rate = parseRate(value);
    if (typeof rate === 'string') throw new ConfigError(path, rate);
  } else if (kind === 'warmup') {
    const problem = warmupProblem(value);
    if (problem) throw new ConfigError(problem.path ? `${path}.${problem.path}` : path, problem.problem);
  } else if (kind === 'replyRules') {
    checkReplyRules(value, path);
  }
}

/** `coordination` (coordination/redis-store.ts). */
function checkCoordination(value: unknown, thread: boolean): void {
  const options = checkObject(value, 'coordination');
  checkKeys(options, ['redis', 'keyPrefix', 'leaseTtl', 'commandTimeout', 'onFailure'], 'coordination');
  const { redis, keyPrefix, leaseTtl, commandTimeout, onFailure } = options;
  const isClient = typeof redis === 'object' && redis !== null && typeof (redis as { defineCommand?: unknown }).defineCommand === 'function';
  if (typeof redis === 'string' ? !/^rediss?:\/\//.test(redis) : !isClient)
    throw new ConfigError('coordination.redis', `must be a redis:// or rediss:// URL or an ioredis client, got ${show(redis)}`);
  if (thread && typeof redis !== 'string')
    throw new ConfigError('coordination.redis', 'must be a URL with deliveryThread (a client cannot cross to the delivery thread)');
  if (keyPrefix !== undefined && typeof keyPrefix !== 'string') throw new ConfigError('coordination.keyPrefix', `must be a string, got ${show(keyPrefix)}`);
  if (leaseTtl !== undefined && (!Number.isInteger(leaseTtl) || (leaseTtl as number) < 1_000 || (leaseTtl as number) > MAX_TIMER_MS))
    throw new ConfigError('coordination.leaseTtl', `must be a whole number of milliseconds from 1000 to ${MAX_TIMER_MS}, got ${show(leaseTtl)}`);
  if (commandTimeout !== undefined && (!Number.isInteger(commandTimeout) || (commandTimeout as number) < 1))
    throw new ConfigError('coordination.commandTimeout', `must be a whole number of milliseconds ≥ 1, got ${show(commandTimeout)}`);
  if (typeof onFailure === 'object' && onFailure !== null) checkKeys(onFailure as Record<string, unknown>, ['processes'], 'coordination.onFailure');
  const processes = (onFailure as { processes?: unknown } | undefined)?.processes;
  if (onFailure !== undefined && onFailure !== 'wait' && !(Number.isInteger(processes) && (processes as number) >= 1))
    throw new ConfigError('coordination.onFailure', `must be 'wait' or { processes: N } (N ≥ 1), got ${show(onFailure)}`);
}

const RULE_KEYS = ['name', 'match', 'action', 'duration', 'trigger'];

/** The longest a timer can wait in Node (2^31 - 1 ms). */
const MAX_TIMER_MS = 2_147_483_647;

/** Reply rules (shaping/reply-rules.ts): each field, so that a typo fails at startup. */
function checkReplyRules(value: unknown, path: string): void {
  if (!Array.isArray(value)) throw new ConfigError(path, 'must be an array of rules { match, action, duration, trigger? }');
  value.forEach((item: unknown, i: number) => {
    const rulePath = `${path}[${i}]`;
    const rule = checkObject(item, rulePath);
    checkKeys(rule, RULE_KEYS, rulePath);
    if (rule.name !== undefined && (typeof rule.name !== 'string' || rule.name === ''))
      throw new ConfigError(childPath(rulePath, 'name'), 'must be a non-empty string');
    if (!(rule.match instanceof RegExp) && (typeof rule.match !== 'string' || rule.match === ''))
      throw new ConfigError(childPath(rulePath, 'match'), `must be a RegExp or a non-empty string, got ${show(rule.match)}`);
    checkRuleAction(rule.action, childPath(rulePath, 'action'));
    const duration = rule.duration;
    const ms = typeof duration === 'number' ? duration : typeof duration === 'string' ? parseDuration(duration) : undefined;
    if (ms === undefined || !Number.isInteger(ms) || ms < 1 || ms > MAX_TIMER_MS)
      throw new ConfigError(
        childPath(rulePath, 'duration'),
        `must be milliseconds (1 to ${MAX_TIMER_MS}, about 24 days) or a duration such as '30s', '10min', '2h', got ${show(duration)}`,
      );
    if (rule.trigger !== undefined) {
      const trigger = parseRate(rule.trigger);
      if (typeof trigger === 'string' || trigger.burst !== trigger.count)
        throw new ConfigError(
          childPath(rulePath, 'trigger'),
          `must be 'N/period', e.g. '3/10min' (act at the third match within 10 minutes), got ${show(rule.trigger)}`,
        );
    }
  });
}

function checkRuleAction(action: unknown, path: string): void {
  if (action === 'suspend') return;
  const object = typeof action === 'object' && action !== null ? (action as Record<string, unknown>) : undefined;
  if (!object || typeof object.set !== 'object' || object.set === null)
    throw new ConfigError(path, `must be 'suspend' or { set: { …options… } }, got ${show(action)}`);
  checkKeys(object, ['set'], path);
  const setPath = childPath(path, 'set');
  const set = checkObject(object.set, setPath);
  checkKeys(set, RULE_SETTING_NAMES, setPath);
  if (!Object.values(set).some((v) => v !== undefined)) throw new ConfigError(setPath, `must set at least one of ${RULE_SETTING_NAMES.join(', ')}`);
  checkScoped(set, setPath);
  // A rule only tightens: 0 ("no limit") would do nothing, and is most likely a mistake.
  for (const [name, value] of Object.entries(set)) {
    if (value === 0) throw new ConfigError(childPath(setPath, name), 'must be ≥ 1: a rule only tightens, and 0 (no limit) would change nothing');
  }
}

function checkRoute(value: unknown, path: string): void {
  const route = checkObject(value, path);
  checkKeys(route, ROUTE_KEYS, path);
  if (typeof route.host !== 'string' || route.host.trim() === '' || /[\s\0]/.test(route.host)) {
    throw new ConfigError(childPath(path, 'host'), `must be a host name or IP address, got ${show(route.host)}`);
  }
  if (route.port !== undefined && (!Number.isInteger(route.port) || (route.port as number) < 1 || (route.port as number) > 65535)) {
    throw new ConfigError(childPath(path, 'port'), `must be a port number 1–65535, got ${show(route.port)}`);
  }
  for (const flag of ['secure', 'requireTLS', 'ignoreTLS', 'lmtp', 'allowUnencryptedAuth']) {
    if (route[flag] !== undefined && typeof route[flag] !== 'boolean')
      throw new ConfigError(childPath(path, flag), `must be true or false, got ${show(route[flag])}`);
  }
  if (route.tls !== undefined) checkObject(route.tls, childPath(path, 'tls'));
  if (route.auth !== undefined) {
    const authPath = childPath(path, 'auth');
    const auth = checkObject(route.auth, authPath);
    checkKeys(auth, ['user', 'pass'], authPath);
    // The values are never echoed: they are credentials.
    if (typeof auth.user !== 'string') throw new ConfigError(childPath(authPath, 'user'), 'must be a string');
    if (typeof auth.pass !== 'string') throw new ConfigError(childPath(authPath, 'pass'), 'must be a string');
  }
}

/** `1.2.3.4`, `1.2.3.4:53`, `::1`, `[::1]:53`. */
function isDnsServer(server: string): boolean {
  const bracketed = /^\[(.+)\](?::(\d+))?$/.exec(server);
  if (bracketed) return isIP(bracketed[1]) === 6 && (bracketed[2] === undefined || Number(bracketed[2]) <= 65535);
  if (isIP(server)) return true;
  const withPort = /^(.+):(\d+)$/.exec(server);
  return withPort !== null && isIP(withPort[1]) === 4 && Number(withPort[2]) <= 65535;
}

function checkHostName(value: unknown, path: string): void {
  if (typeof value !== 'string' || !/^[A-Za-z0-9.\-[\]:]+$/.test(value)) {
    throw new ConfigError(path, `must be a host name for EHLO, got ${show(value)}`);
  }
}

function checkObject(value: unknown, path: string): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new ConfigError(path || 'options', `must be an object, got ${show(value)}`);
  return value as Record<string, unknown>;
}

function entries(value: unknown, path: string): [string, unknown][] {
  if (value === undefined) return [];
  return Object.entries(checkObject(value, path));
}

export function checkKeys(value: Record<string, unknown>, allowed: readonly string[], path: string): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) throw new ConfigError(childPath(path, key), `unknown option${suggestion(key, allowed)}`);
  }
}

/** ` (did you mean "x"?)` for the nearest allowed name, when one is near enough to be a typo. */
export function suggestion(name: string, allowed: readonly string[]): string {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of allowed) {
    const distance = editDistance(name.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best !== undefined && bestDistance <= Math.max(2, Math.floor(name.length / 3)) ? ` (did you mean ${JSON.stringify(best)}?)` : '';
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

function show(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (value === null || typeof value !== 'object') return String(value);
  return Array.isArray(value) ? 'an array' : 'an object';
}
