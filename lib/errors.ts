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
  /** Every recipient was rejected permanently. */
  | 'EREJECTED'
  /** No recipient was accepted and at least one is pending. */
  | 'EPENDING'
  /** The transport is closing or closed. */
  | 'ECLOSED'
  /** Reading the composed message failed. */
  | 'EMESSAGE';

export class BindingPoolError extends Error {
  readonly code: BindingPoolErrorCode;

  constructor(code: BindingPoolErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BindingPoolError';
    this.code = code;
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
