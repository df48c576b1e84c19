/**
 * Scope resolution. An option's value for a (binding, domain) pair is the first one set along
 * Momentum's fallback order:
 *
 *   binding's domain stanza → binding group's domain stanza → binding → binding group
 *   → global domain stanza → global value → built-in default
 */
import { BindingPoolError } from '../errors';
import {
  SCOPED_OPTIONS,
  SCOPED_OPTION_NAMES,
  type BindingChoice,
  type BindingPoolOptions,
  type ResolvedOptions,
  type RouteOptions,
  type ScopedOptionName,
  type ScopedOptions,
} from './options';
import { DEFAULT_REPLY_RULES, type ReplyRule } from '../shaping/reply-rules';
import { BUILT_IN_BINDING, checkOptions, childPath, suggestion, type CheckedOptions } from './validate';
import type { SendMailOptions } from 'nodemailer';

/** A binding as connections use it. */
export interface Binding {
  readonly name: string;
  /** Source address; undefined lets the OS pick. */
  readonly localAddress: string | undefined;
  /** EHLO name; undefined lets Nodemailer use the machine's name. */
  readonly ehloName: string | undefined;
  readonly group: string | undefined;
}

/**
 * A message's source by name (plain data, so it can cross to a delivery thread): one binding, or
 * a group whose member is picked per destination domain.
 */
export type SenderName = { binding: string } | { group: string };

/** A route found in the options, with where it was set (for verify()). */
export interface ConfiguredRoute {
  readonly path: string;
  readonly route: RouteOptions;
  /** A binding the route applies to, to connect from. */
  readonly binding: string;
  /** The domain whose stanza set it; undefined for a binding's, group's or the global route. */
  readonly domain: string | undefined;
}

export class ScopeResolver {
  readonly options: CheckedOptions;
  private readonly bindings = new Map<string, Binding>();
  /** Next member index per group, for round-robin. */
  private readonly groupCursor = new Map<string, number>();
  /**
   * Results for pairs whose domain has a stanza in none of their scopes, per binding: the same
   * for every such domain (every MX domain nobody configured), so each is worked out once per
   * binding instead of at every pool's start. Frozen, since pairs share them.
   */
  private readonly unconfiguredPairs = new Map<string, unknown>();

  constructor(input: BindingPoolOptions) {
    this.options = checkOptions(input);
    const groupOf = new Map<string, string>();
    for (const [group, options] of Object.entries(this.options.bindingGroups)) {
      for (const member of options.bindings) groupOf.set(member, group);
    }
    for (const [name, binding] of Object.entries(this.options.bindings)) {
      this.bindings.set(name, {
        name,
        localAddress: binding.localAddress,
        ehloName: binding.name ?? this.options.name,
        group: groupOf.get(name),
      });
    }
    if (!this.bindings.has(BUILT_IN_BINDING)) {
      this.bindings.set(BUILT_IN_BINDING, { name: BUILT_IN_BINDING, localAddress: undefined, ehloName: this.options.name, group: undefined });
    }
  }

  /**
   * What a message goes out from: its own `binding` or `bindingGroup`, else what
   * `selectBinding` says, else `defaultBinding`. Throws EBINDING for a name that does not exist.
   */
  senderFor(mail: SendMailOptions & BindingChoice): SenderName {
    let choice: BindingChoice | undefined;
    if (mail.binding !== undefined || mail.bindingGroup !== undefined) {
      choice = { binding: mail.binding, bindingGroup: mail.bindingGroup };
    } else if (this.options.selectBinding) {
      const selected = this.options.selectBinding(mail);
      if (typeof selected === 'string') choice = this.choiceForName(selected);
      // An empty choice means "no opinion", like undefined: the default applies.
      else if (selected?.binding !== undefined || selected?.bindingGroup !== undefined) choice = selected;
    }
    choice ??= this.choiceForName(this.options.defaultBinding);
    if (choice.binding !== undefined && choice.bindingGroup !== undefined) {
      throw new BindingPoolError('EBINDING', 'a message names both a binding and a binding group; name one');
    }
    if (choice.bindingGroup !== undefined) {
      const group = this.options.bindingGroups[choice.bindingGroup];
      if (!group) {
        throw new BindingPoolError(
          'EBINDING',
          `unknown binding group ${nameOf(choice.bindingGroup)}${typeof choice.bindingGroup === 'string' ? suggestion(choice.bindingGroup, Object.keys(this.options.bindingGroups)) : ''}; nothing of this message was sent`,
        );
      }
      return { group: choice.bindingGroup };
    }
    const name = choice.binding ?? BUILT_IN_BINDING;
    const binding = this.bindings.get(name);
    if (!binding) {
      throw new BindingPoolError(
        'EBINDING',
        `unknown binding ${nameOf(name)}${typeof name === 'string' ? suggestion(name, [...this.bindings.keys()]) : ''}; nothing of this message was sent`,
      );
    }
    return { binding: binding.name };
  }

  /**
   * The binding for one destination domain of a message: a fixed binding as it is; for a group,
   * the next member in round-robin order, skipping members whose pool for the domain is backing
   * off after failed connects (all unhealthy: round-robin as usual).
   */
  bindingFor(sender: SenderName, healthy: (binding: Binding) => boolean): Binding {
    if ('binding' in sender) return this.bindings.get(sender.binding)!;
    const members = this.options.bindingGroups[sender.group].bindings;
    const start = this.groupCursor.get(sender.group) ?? 0;
    let chosen = start;
    for (let step = 0; step < members.length; step++) {
      const index = (start + step) % members.length;
      if (healthy(this.bindings.get(members[index])!)) {
        chosen = index;
        break;
      }
    }
    this.groupCursor.set(sender.group, (chosen + 1) % members.length);
    return this.bindings.get(members[chosen])!;
  }

  /** The value of every scoped option for a (binding, domain) pair; without a domain, no domain stanza applies. */
  resolve(binding: Binding, domain: string | undefined): ResolvedOptions {
    return this.perBinding(binding, domain, 'options', () => {
      const chain = this.chain(binding, domain);
      const resolved: Record<string, unknown> = {};
      for (const name of SCOPED_OPTION_NAMES) {
        const scope = chain.find((s) => s?.[name] !== undefined);
        resolved[name] = scope ? scope[name] : SCOPED_OPTIONS[name].default;
      }
      return Object.freeze(resolved as ResolvedOptions);
    });
  }

  /** How many connections a message's sender may open to a domain: a binding's pool, or its group's pools together. */
  connectionsTo(sender: SenderName, domain: string): number {
    const members = 'binding' in sender ? [sender.binding] : this.options.bindingGroups[sender.group].bindings;
    let sum = 0;
    for (const member of members) sum += this.resolve(this.bindings.get(member)!, domain).maxOutboundConnections;
    return sum;
  }

  /** Every route the options set, where it was set, and a binding to try it from. */
  configuredRoutes(): ConfiguredRoute[] {
    const found: ConfiguredRoute[] = [];
    const add = (scope: ScopedOptions | undefined, path: string, binding: string, domain?: string): void => {
      if (scope?.route) found.push({ path: childPath(path, 'route'), route: scope.route, binding, domain });
    };
    const stanzas = (domains: Record<string, ScopedOptions> | undefined, path: string, binding: string): void => {
      for (const [domain, stanza] of Object.entries(domains ?? {})) add(stanza, childPath(childPath(path, 'domains'), domain), binding, domain);
    };
    const { options } = this;
    const fallback = this.choiceForName(options.defaultBinding);
    const defaultBinding = fallback.binding ?? options.bindingGroups[fallback.bindingGroup!].bindings[0];
    add(options, '', defaultBinding);
    stanzas(options.domains, '', defaultBinding);
    for (const [name, binding] of Object.entries(options.bindings)) {
      add(binding, childPath('bindings', name), name);
      stanzas(binding.domains, childPath('bindings', name), name);
    }
    for (const [name, group] of Object.entries(options.bindingGroups)) {
      add(group, childPath('bindingGroups', name), group.bindings[0]);
      stanzas(group.domains, childPath('bindingGroups', name), group.bindings[0]);
    }
    return found;
  }

  binding(name: string): Binding | undefined {
    return this.bindings.get(name);
  }

  /** The scopes that apply to a (binding, domain) pair, most specific first. */
  private chain(binding: Binding, domain: string | undefined): (ScopedOptions | undefined)[] {
    return this.scopesOf(binding, domain).map(([scope]) => scope);
  }

  /**
   * The most specific scope of a pair that sets one of `names`, with its option path: a rate's
   * bucket is that scope's, shared by every pair the scope covers (Momentum's throttles).
   */
  declaration<N extends ScopedOptionName>(
    binding: Binding,
    domain: string,
    names: readonly N[],
  ): { path: string; name: N; value: NonNullable<ScopedOptions[N]> } | undefined {
    return this.perBinding(binding, domain, `declaration\0${names.join()}`, () => {
      for (const [scope, path] of this.scopesOf(binding, domain)) {
        for (const name of names) if (scope?.[name] !== undefined) return Object.freeze({ path, name, value: scope[name] as NonNullable<ScopedOptions[N]> });
      }
      return undefined;
    });
  }

  /** A pair's reply rules: every scope's `replyRules`, most specific first, then `defaultReplyRules`; each with its path. */
  replyRulesFor(binding: Binding, domain: string): readonly { rule: ReplyRule; path: string }[] {
    return this.perBinding(binding, domain, 'replyRules', () => {
      const found: { rule: ReplyRule; path: string }[] = [];
      for (const [scope, path] of this.scopesOf(binding, domain)) {
        scope?.replyRules?.forEach((rule, i) => found.push({ rule, path: `${childPath(path, 'replyRules') || 'replyRules'}[${i}]` }));
      }
      const defaults = this.options.defaultReplyRules ?? DEFAULT_REPLY_RULES;
      defaults.forEach((rule, i) => found.push({ rule, path: `defaultReplyRules[${i}]` }));
      return Object.freeze(found);
    });
  }

  /** `make()` for the pair, or for a domain no scope has a stanza for, the binding's shared result (see unconfiguredPairs). */
  private perBinding<T>(binding: Binding, domain: string | undefined, what: string, make: () => T): T {
    if (domain === undefined || this.hasStanza(binding, domain)) return make();
    const key = `${binding.name}\0${what}`;
    if (this.unconfiguredPairs.has(key)) return this.unconfiguredPairs.get(key) as T;
    const made = make();
    this.unconfiguredPairs.set(key, made);
    return made;
  }

  private hasStanza(binding: Binding, domain: string): boolean {
    const group = binding.group !== undefined ? this.options.bindingGroups[binding.group] : undefined;
    return (
      this.options.bindings[binding.name]?.domains?.[domain] !== undefined ||
      group?.domains?.[domain] !== undefined ||
      this.options.domains[domain] !== undefined
    );
  }

  /** The scopes of a pair with their option paths ('' for the global scope), most specific first. */
  private scopesOf(binding: Binding, domain: string | undefined): [ScopedOptions | undefined, string][] {
    const own = this.options.bindings[binding.name];
    const ownPath = childPath('bindings', binding.name);
    const group = binding.group !== undefined ? this.options.bindingGroups[binding.group] : undefined;
    const groupPath = binding.group !== undefined ? childPath('bindingGroups', binding.group) : '';
    if (domain === undefined)
      return [
        [own, ownPath],
        [group, groupPath],
        [this.options, ''],
      ];
    const stanza = (path: string): string => childPath(childPath(path, 'domains'), domain);
    return [
      [own?.domains?.[domain], stanza(ownPath)],
      [group?.domains?.[domain], stanza(groupPath)],
      [own, ownPath],
      [group, groupPath],
      [this.options.domains[domain], stanza('')],
      [this.options, ''],
    ];
  }

  private choiceForName(name: string): BindingChoice {
    return name in this.options.bindingGroups ? { bindingGroup: name } : { binding: name };
  }
}

/** A binding name for an error message; a message may name anything, not only a string. */
function nameOf(name: unknown): string {
  return typeof name === 'string' ? JSON.stringify(name) : `of type ${typeof name}`;
}
