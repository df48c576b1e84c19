/**
 * The Nodemailer glue: a Transport that builds each message once, checks and groups its
 * recipients by destination domain, names the message's binding, and hands it to the delivery
 * engine (engine/local.ts). It turns the per-domain outcomes into Nodemailer's info (or error) shape.
 */
import { EventEmitter } from 'node:events';
import type { MailMessage, SentMessageInfo, Transport } from 'nodemailer';
import { ScopeResolver } from './policy/scopes';
import { emptyDomainResult, type DomainResult, type RecipientOutcome } from './delivery/deliver';
import { LocalEngine, type Engine, type EngineStats } from './engine/local';
import { ThreadEngine } from './engine/thread';
import { ConcurrencyLimit, MAX_CONCURRENT_READS } from './message/concurrency';
import { BindingPoolError, describeError } from './errors';
import { transportLog } from './log';
import { rawBytes, rawMessageId, readMessage, toWireForm } from './message/bytes';
import { READ_AHEAD_OPTIONS, READ_AHEAD_PER_CONNECTION, SCOPED_OPTIONS, type BindingChoice, type BindingPoolOptions } from './policy/options';
import type { ConnectionSummary } from './pool/registry';
import type { SuspensionEvent } from './policy/pair-policy';
import { ReadAheadBudget, type ReadAheadKey } from './message/read-ahead';
import { assertCleanAddressFields, assertNoInjection, groupByDomain, type Recipient } from './message/recipients';
import type { SenderName } from './policy/scopes';

export const VERSION = '0.1.0';

export interface BindingPoolSentMessageInfo extends SentMessageInfo {
  envelope: { from: string | false; to: string[] };
  messageId: string;
  accepted: string[];
  rejected: string[];
  pending: string[];
  /** The last accepting server reply, or the last reply of any kind when none accepted. */
  response: string;
  /** Per destination domain: binding, hosts, and every recipient's outcome with its reply. */
  domains: DomainResult[];
}

/** The error a send rejects with when no recipient was accepted; carries the same breakdown. */
export interface BindingPoolSendError extends BindingPoolError {
  envelope: { from: string | false; to: string[] };
  messageId: string;
  accepted: string[];
  rejected: string[];
  pending: string[];
  response: string;
  domains: DomainResult[];
}

export interface TransportStats extends EngineStats {
  /** Sends in progress. */
  sending: number;
  /** Messages read ahead of delivery and their bytes (maxReadAheadBytes), and sends waiting to be read. */
  readAhead: { messages: number; bytes: number; waiting: number };
}

type SendCallback = (err: Error | null, info?: BindingPoolSentMessageInfo) => void;

/** The domain key under which recipients with an unparseable address are reported. */
const INVALID_ADDRESSES = '';

/** Read-ahead keys cached, one per (sender, domain), at most; the cache starts over past it. */
const MAX_CACHED_KEYS = 10_000;

export class BindingPoolTransport extends EventEmitter implements Transport<BindingPoolSentMessageInfo> {
  readonly name = 'BindingPool';
  readonly version = VERSION;
  private readonly scopes: ScopeResolver;
  private readonly engine: Engine;
  private readonly inFlight = new Set<Promise<unknown>>();
  private readonly reads = new ConcurrencyLimit(MAX_CONCURRENT_READS);
  private readonly readAhead: ReadAheadBudget;
  /** Each destination's read-ahead key, by binding or group name, then domain (the same object every send). */
  private readonly readAheadKeyCache = { binding: new Map<string, Map<string, ReadAheadKey>>(), group: new Map<string, Map<string, ReadAheadKey>>() };
  private cachedReadAheadKeys = 0;
  private readonly readAheadPerConnection: number;
  private closed = false;
  private closing: Promise<void> | undefined;

  constructor(options: BindingPoolOptions = {}) {
    super();
    // Checks the options (throws ConfigError) and names bindings for messages.
    this.scopes = new ScopeResolver(options);
    this.readAhead = new ReadAheadBudget(this.scopes.options.maxReadAheadBytes ?? READ_AHEAD_OPTIONS.maxReadAheadBytes.default);
    this.readAheadPerConnection = options.deliveryThread ? READ_AHEAD_PER_CONNECTION.thread : READ_AHEAD_PER_CONNECTION.local;
    this.engine = options.deliveryThread ? new ThreadEngine(options) : new LocalEngine(options);
    this.engine.on('connectionClosed', (summary: ConnectionSummary) => this.emit('connectionClosed', summary));
    // A reply rule suspended a (binding, domain) pair, or its suspension ended (SuspensionEvent).
    for (const name of ['suspended', 'resumed'] as const) this.engine.on(name, (event: SuspensionEvent) => this.emit(name, event));
  }

  /** Nodemailer's entry point. */
  send(mail: MailMessage<BindingPoolSentMessageInfo>, callback: SendCallback): void {
    if (this.closed) {
      callback(new BindingPoolError('ECLOSED', 'the transport is closed; nothing of this message was sent'));
      return;
    }
    // One promise per send for the bookkeeping (not a then and a finally: each send pays for them).
    const sending: Promise<void> = this.deliver(mail).then(
      (info) => this.sent(sending, callback, null, info),
      (err: Error) => this.sent(sending, callback, err),
    );
    this.inFlight.add(sending);
  }

  /** A send ended: it is no longer in flight, then the application hears of it. */
  private sent(sending: Promise<void>, callback: SendCallback, err: Error | null, info?: BindingPoolSentMessageInfo): void {
    this.inFlight.delete(sending);
    callSafely(callback, err, info);
    if (this.isIdle()) this.emit('idle');
  }

  /** True while fewer sends are in progress than one pool has connections. */
  isIdle(): boolean {
    return !this.closed && this.inFlight.size < (this.scopes.options.maxOutboundConnections ?? SCOPED_OPTIONS.maxOutboundConnections.default);
  }

  stats(): TransportStats {
    return { ...this.engine.stats(), sending: this.inFlight.size, readAhead: this.readAhead.held };
  }

  /**
   * Checks that every configured route accepts a connection (the options were checked when the
   * transport was built). Resolves true, or rejects naming the route that failed.
   */
  verify(callback?: (err: Error | null, success?: true) => void): Promise<true> {
    const checking = this.engine.verify();
    if (callback)
      checking.then(
        (ok) => callback(null, ok),
        (err: Error) => callback(err),
      );
    return checking;
  }

  /** Stops taking sends, lets sends in flight finish, QUITs every connection; resolves when no socket is left. */
  close(callback?: () => void): Promise<void> {
    this.closed = true;
    this.closing ??= (async () => {
      while (this.inFlight.size > 0) await Promise.allSettled([...this.inFlight]);
      await this.engine.close();
      transportLog('closed');
    })();
    if (callback) this.closing.then(callback, callback);
    return this.closing;
  }

  private async deliver(mail: MailMessage<BindingPoolSentMessageInfo>): Promise<BindingPoolSentMessageInfo> {
    const data = mail.data as typeof mail.data & BindingChoice;
    // Everything that can refuse the message as a whole is checked before a byte goes out.
    assertCleanAddressFields(data);
    const sender = this.scopes.senderFor(data);
    const envelope = mail.message.getEnvelope() as ReturnType<typeof mail.message.getEnvelope> & { use8BitMime?: boolean };
    const from = envelope.from || '';
    assertNoInjection(from, 'sender');
    const { groups, invalid } = groupByDomain(envelope.to);
    if (groups.length === 0 && invalid.length === 0) throw new BindingPoolError('ENORECIPIENTS', 'the message has no recipients');

    // Raw bytes that need no stream are taken at once; the rest is read a few at a time, and
    // either waits for room in the read-ahead budget first.
    const raw = rawBytes(mail.message);
    const admitted = this.readAhead.admit(this.readAheadKeys(sender, groups), raw?.length);
    // Most sends are admitted at once: no promise turn for them.
    const ticket = admitted instanceof Promise ? await admitted : admitted;
    try {
      // In wire form once, for every domain and retry (see toWireForm).
      const { wire: message, size } = toWireForm(raw ? [raw] : await this.build(mail));
      this.readAhead.settle(ticket, message.length);
      // A raw message's own Message-ID; Nodemailer's (generated, or the composed message's header) otherwise.
      const messageId = (mail.data.raw !== undefined ? rawMessageId(message) : undefined) ?? mail.message.messageId();
      if (transportLog.enabled) transportLog('%s: %d recipient(s), %d domain(s)', messageId, envelope.to.length, groups.length);
      const domains = await this.engine.deliver({
        sender,
        // The envelope parameters Nodemailer's SMTP transport passes, and the exact SIZE.
        envelope: { from, size, dsn: data.dsn, use8BitMime: envelope.use8BitMime, requireTLSExtensionEnabled: data.requireTLSExtensionEnabled },
        message,
        domains: groups,
      });
      if (invalid.length > 0) {
        const unparsed = emptyDomainResult(INVALID_ADDRESSES, 'binding' in sender ? sender.binding : sender.group);
        unparsed.rejected = invalid.map(({ address, reason }) => ({ recipient: address, status: 'rejected', response: `invalid address: ${reason}` }));
        domains.push(unparsed);
      }
      return summarize(domains, { from: envelope.from, to: envelope.to }, messageId);
    } finally {
      this.readAhead.release(ticket);
    }
  }

  private async build(mail: MailMessage<BindingPoolSentMessageInfo>): Promise<Buffer[]> {
    try {
      return await this.reads.run(() => readMessage(mail.message));
    } catch (err) {
      throw new BindingPoolError('EMESSAGE', `the message could not be built: ${describeError(err)}; nothing was sent`, { cause: err });
    }
  }

  /** The destinations a message holds read-ahead room at: each (sender, domain), as many as its connections carry now and next. */
  private readAheadKeys(sender: SenderName, groups: readonly [string, Recipient[]][]): ReadAheadKey[] {
    const keys: ReadAheadKey[] = [];
    for (let i = 0; i < groups.length; i++) keys.push(this.readAheadKey(sender, groups[i][0]));
    return keys;
  }

  /** One destination's key, the same object for every send there (no key string built per message). */
  private readAheadKey(sender: SenderName, domain: string): ReadAheadKey {
    const kind = 'binding' in sender ? 'binding' : 'group';
    const name = 'binding' in sender ? sender.binding : sender.group;
    const cached = this.readAheadKeyCache[kind].get(name)?.get(domain);
    if (cached) return cached;
    if (this.cachedReadAheadKeys >= MAX_CACHED_KEYS) {
      this.readAheadKeyCache.binding.clear();
      this.readAheadKeyCache.group.clear();
      this.cachedReadAheadKeys = 0;
    }
    const key = { key: `${kind[0]}\0${name}\0${domain}`, limit: this.readAheadPerConnection * this.scopes.connectionsTo(sender, domain) };
    let byName = this.readAheadKeyCache[kind].get(name);
    if (!byName) this.readAheadKeyCache[kind].set(name, (byName = new Map()));
    byName.set(domain, key);
    this.cachedReadAheadKeys++;
    return key;
  }
}

/** A callback that throws must not become an unhandled rejection (Nodemailer's transports isolate it too). */
function callSafely(callback: SendCallback, err: Error | null, info?: BindingPoolSentMessageInfo): void {
  try {
    callback(err, info);
  } catch (thrown) {
    transportLog('the sendMail callback threw: %s', describeError(thrown));
  }
}

/** Adds the outcomes' recipients to `into`; returns the last outcome, if any. */
function recipientsInto(into: string[], outcomes: RecipientOutcome[]): RecipientOutcome | undefined {
  for (let i = 0; i < outcomes.length; i++) into.push(outcomes[i].recipient);
  return outcomes.length > 0 ? outcomes[outcomes.length - 1] : undefined;
}

function summarize(domains: DomainResult[], envelope: { from: string | false; to: string[] }, messageId: string): BindingPoolSentMessageInfo {
  const accepted: string[] = [];
  const rejected: string[] = [];
  const pending: string[] = [];
  let lastAccepted: RecipientOutcome | undefined;
  let lastPending: RecipientOutcome | undefined;
  let lastRejected: RecipientOutcome | undefined;
  // Indexed loops: every send runs this, mostly before V8 optimizes it.
  for (let i = 0; i < domains.length; i++) {
    const domain = domains[i];
    lastAccepted = recipientsInto(accepted, domain.accepted) ?? lastAccepted;
    lastRejected = recipientsInto(rejected, domain.rejected) ?? lastRejected;
    lastPending = recipientsInto(pending, domain.pending) ?? lastPending;
  }
  const last = lastAccepted ?? lastPending ?? lastRejected;
  const info: BindingPoolSentMessageInfo = { envelope, messageId, accepted, rejected, pending, response: last?.response ?? '', domains };
  if (accepted.length > 0) return info;
  const code = pending.length > 0 ? 'EPENDING' : 'EREJECTED';
  const what = pending.length > 0 ? `${pending.length} pending, ${rejected.length} rejected` : `all ${rejected.length} rejected`;
  const err = new BindingPoolError(code, `no recipient was accepted (${what}): ${info.response}`) as BindingPoolSendError;
  Object.assign(err, { accepted, rejected, pending, response: info.response, domains, envelope, messageId });
  throw err;
}
