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
  type ScopedOptions,
} from './options';
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
    const chain = this.chain(binding, domain);
    const resolved: Record<string, unknown> = {};
    for (const name of SCOPED_OPTION_NAMES) {
      const scope = chain.find((s) => s?.[name] !== undefined);
      resolved[name] = scope ? scope[name] : SCOPED_OPTIONS[name].default;
    }
    return resolved as ResolvedOptions;
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
    const own = this.options.bindings[binding.name];
    const group = binding.group !== undefined ? this.options.bindingGroups[binding.group] : undefined;
    if (domain === undefined) return [own, group, this.options];
    return [own?.domains?.[domain], group?.domains?.[domain], own, group, this.options.domains[domain], this.options];
  }

  private choiceForName(name: string): BindingChoice {
    return name in this.options.bindingGroups ? { bindingGroup: name } : { binding: name };
  }
}

/** A binding name for an error message; a message may name anything, not only a string. */
function nameOf(name: unknown): string {
  return typeof name === 'string' ? JSON.stringify(name) : `of type ${typeof name}`;
}
