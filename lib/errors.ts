/**
 * Error types the transport throws or rejects with. Every error carries a `code` so callers can
 * branch without parsing messages; configuration errors also name the exact option path.
 */

export type BindingPoolErrorCode =
  /** An option has a wrong type, value or name (thrown by the constructor). */
  | 'ECONFIG'
  /** The message names a binding or binding group that does not exist. */
  | 'EBINDING'
  /** An envelope address is malformed or carries characters that could inject SMTP commands. */
  | 'EADDRESS'
  /** The message has no recipients. */
  | 'ENORECIPIENTS'
  /** No connection became free within `acquireTimeout`. */
  | 'EACQUIRE'
  /** Opening a connection failed (or failed recently and the pool is backing off). */
  | 'ECONNECT'
  /** The destination is throttling the binding (a 421 greeting, or a 421 at a new connection's first transaction): its sends are paused. */
  | 'ETHROTTLED'
  /** A reply rule suspended the (binding, domain) pair: it sends nothing until `retryAfter`. */
  | 'ESUSPENDED'
  /** A `maxMessageRate` has no room for the send before its `acquireTimeout` ends. */
  | 'ERATE'
  /** With `coordination`: the coordination store (Redis) failed and the send could not go in time. */
  | 'ECOORDINATION'
  /** Every recipient was rejected permanently. */
  | 'EREJECTED'
  /** No recipient was accepted and at least one is pending. */
  | 'EPENDING'
  /** The transport is closing or closed. */
  | 'ECLOSED'
  /** Reading the composed message failed. */
  | 'EMESSAGE'
  /** Queue: the message is larger than the queue's `maxMessageSize`; nothing was queued. */
  | 'ESIZE';

export class BindingPoolError extends Error {
  readonly code: BindingPoolErrorCode;
  /** When the destination could be tried again, when known: the end of a backoff or pause. */
  readonly retryAfter?: Date;

  constructor(code: BindingPoolErrorCode, message: string, options?: { cause?: unknown; retryAfter?: number | Date }) {
    super(message, options);
    this.name = 'BindingPoolError';
    this.code = code;
    if (options?.retryAfter !== undefined) this.retryAfter = new Date(options.retryAfter);
  }
}

/** A configuration error; `path` is the option path, e.g. `bindings.mta1.domains["example.org"].route`. */
export class ConfigError extends BindingPoolError {
  readonly path: string;

  constructor(path: string, problem: string) {
    super('ECONFIG', `${path}: ${problem}`);
    this.name = 'ConfigError';
    this.path = path;
  }
}

/** The message or reason of anything thrown, for reports. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
