/**
 * The Nodemailer glue: a Transport that builds each message once, checks and groups its
 * recipients by destination domain, names the message's binding, and hands it to the delivery
 * engine (engine.ts). It turns the per-domain outcomes into Nodemailer's info (or error) shape.
 */
import { EventEmitter } from 'node:events';
import type { MailMessage, SentMessageInfo, Transport } from 'nodemailer';
import { ScopeResolver } from './config';
import { emptyDomainResult, type DomainResult, type RecipientOutcome } from './delivery';
import { LocalEngine, type Engine, type EngineStats } from './engine';
import { ThreadEngine } from './engine-thread';
import { ConcurrencyLimit } from './concurrency';
import { BindingPoolError, describeError } from './errors';
import { transportLog } from './log';
import { rawBytes, rawMessageId, readMessage } from './message-bytes';
import { SCOPED_OPTIONS, type BindingChoice, type BindingPoolOptions } from './options';
import type { ConnectionSummary } from './pool-registry';
import { assertNoInjection, groupByDomain } from './recipients';

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
}

type SendCallback = (err: Error | null, info?: BindingPoolSentMessageInfo) => void;

/** Messages read (built) at once; see ConcurrencyLimit. */
const MAX_CONCURRENT_READS = 16;

/** The domain key under which recipients with an unparseable address are reported. */
const INVALID_ADDRESSES = '';

export class BindingPoolTransport extends EventEmitter implements Transport<BindingPoolSentMessageInfo> {
  readonly name = 'BindingPool';
  readonly version = VERSION;
  private readonly scopes: ScopeResolver;
  private readonly engine: Engine;
  private readonly inFlight = new Set<Promise<unknown>>();
  private readonly reads = new ConcurrencyLimit(MAX_CONCURRENT_READS);
  private closed = false;
  private closing: Promise<void> | undefined;

  constructor(options: BindingPoolOptions = {}) {
    super();
    // Checks the options (throws ConfigError) and names bindings for messages.
    this.scopes = new ScopeResolver(options);
    this.engine = options.deliveryThread ? new ThreadEngine(options) : new LocalEngine(options);
    this.engine.on('connectionClosed', (summary: ConnectionSummary) => this.emit('connectionClosed', summary));
  }

  /** Nodemailer's entry point. */
  send(mail: MailMessage<BindingPoolSentMessageInfo>, callback: SendCallback): void {
    if (this.closed) {
      callback(new BindingPoolError('ECLOSED', 'the transport is closed; nothing of this message was sent'));
      return;
    }
    const sending = this.deliver(mail).then(
      (info) => callback(null, info),
      (err: Error) => callback(err),
    );
    this.inFlight.add(sending);
    sending.finally(() => {
      this.inFlight.delete(sending);
      if (this.isIdle()) this.emit('idle');
    });
  }

  /** True while fewer sends are in progress than one pool has connections. */
  isIdle(): boolean {
    return !this.closed && this.inFlight.size < (this.scopes.options.maxOutboundConnections ?? SCOPED_OPTIONS.maxOutboundConnections.default);
  }

  stats(): TransportStats {
    return { ...this.engine.stats(), sending: this.inFlight.size };
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
    const sender = this.scopes.senderFor(data);
    const envelope = mail.message.getEnvelope();
    const from = envelope.from || '';
    assertNoInjection(from, 'sender');
    const { byDomain, invalid } = groupByDomain(envelope.to);
    if (byDomain.size === 0 && invalid.length === 0) throw new BindingPoolError('ENORECIPIENTS', 'the message has no recipients');

    let message: Buffer;
    try {
      // Raw bytes that need no stream are taken at once; the rest is read a few at a time.
      message = rawBytes(mail.message) ?? (await this.reads.run(() => readMessage(mail.message)));
    } catch (err) {
      throw new BindingPoolError('EMESSAGE', `the message could not be built: ${describeError(err)}; nothing was sent`, { cause: err });
    }
    // A raw message's own Message-ID; Nodemailer's (generated, or the composed message's header) otherwise.
    const messageId = (mail.data.raw !== undefined ? rawMessageId(message) : undefined) ?? mail.message.messageId();
    if (transportLog.enabled) transportLog('%s: %d recipient(s), %d domain(s)', messageId, envelope.to.length, byDomain.size);

    const domains = await this.engine.deliver({
      sender,
      envelope: { from, size: message.length, dsn: data.dsn },
      message,
      domains: [...byDomain],
    });
    if (invalid.length > 0) {
      const unparsed = emptyDomainResult(INVALID_ADDRESSES, 'binding' in sender ? sender.binding : sender.group);
      unparsed.rejected = invalid.map(({ address, reason }) => ({ recipient: address, status: 'rejected', response: `invalid address: ${reason}` }));
      domains.push(unparsed);
    }
    return summarize(domains, { from: envelope.from, to: envelope.to }, messageId);
  }
}

function summarize(domains: DomainResult[], envelope: { from: string | false; to: string[] }, messageId: string): BindingPoolSentMessageInfo {
  const accepted: string[] = [];
  const rejected: string[] = [];
  const pending: string[] = [];
  let lastAccepted: RecipientOutcome | undefined;
  let lastPending: RecipientOutcome | undefined;
  let lastRejected: RecipientOutcome | undefined;
  for (const domain of domains) {
    for (const outcome of domain.accepted) accepted.push(outcome.recipient);
    for (const outcome of domain.rejected) rejected.push(outcome.recipient);
    for (const outcome of domain.pending) pending.push(outcome.recipient);
    lastAccepted = domain.accepted.at(-1) ?? lastAccepted;
    lastPending = domain.pending.at(-1) ?? lastPending;
    lastRejected = domain.rejected.at(-1) ?? lastRejected;
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
