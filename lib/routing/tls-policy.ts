/**
 * TLS per destination: what a `tls` level (policy/options.ts `TlsPolicy`) asks of a connection, for an
 * MX host or for a route, and which failures send a connection to the same host again in plain
 * text. routing/router.ts builds each hop from `tlsPlan` and opens it through `withPlainTextRetry`.
 *
 * MX hosts follow opportunistic security (RFC 7435) and Postfix's `smtp_tls_security_level`:
 *
 * | level         | STARTTLS     | certificate checked          | handshake fails                | Postfix   |
 * | ------------- | ------------ | ---------------------------- | ------------------------------ | --------- |
 * | `no`          | never        | –                            | –                              | `none`    |
 * | `ifavailable` | when offered | no (unless `tlsOptions` say) | new connection, in plain text  | `may`     |
 * | `required`    | always       | no (unless `tlsOptions` say) | pending, nothing sent in clear | `encrypt` |
 * | `verified`    | always       | yes: chain and MX host name  | pending, nothing sent in clear | `verify`  |
 *
 * A route (a relay, often given credentials) keeps Node's certificate checks at every level unless
 * its own `tls` or the scope's `tlsOptions` turn them off, and is never retried in plain text: a
 * relay whose TLS fails is a configuration to fix, not a receiver to get the mail to anyway.
 * `verified` checks the certificate whatever `rejectUnauthorized` says, for both.
 *
 * No I/O of its own: `withPlainTextRetry` is handed the function that opens a connection.
 */
import type { ConnectionOptions as TlsConnectionOptions } from 'node:tls';
import { describeTarget, type ConnectionTarget } from '../smtp/connection';
import { describeError } from '../errors';
import { connectionLog } from '../log';
import type { TlsPolicy } from '../policy/options';

/** Where a connection goes: a domain's MX host, or the static route the scope names. */
export type TlsDestination = 'mx' | 'route';

/** SMTPConnection's STARTTLS switches. */
export type TlsFlags = Pick<ConnectionTarget, 'requireTLS' | 'ignoreTLS' | 'opportunisticTLS'>;

/** What a destination's TLS level makes of its connections. */
export interface TlsPlan extends TlsFlags {
  /** Node TLS options for the handshake (certificate checks included). */
  tls: TlsConnectionOptions | undefined;
  /** A failed TLS handshake is tried again once, on a new connection to the same host, in plain text. */
  plainTextRetry: boolean;
}

export interface TlsPlanInput {
  level: TlsPolicy;
  destination: TlsDestination;
  /** The scope's `tlsOptions`, with a route's own `tls` merged over them. */
  tlsOptions: TlsConnectionOptions | undefined;
  /** A route's own `requireTLS`: wins over the level. */
  requireTLS?: boolean;
  /** A route's own `ignoreTLS`: wins over the level. */
  ignoreTLS?: boolean;
}

export function tlsPlan({ level, destination, tlsOptions, requireTLS, ignoreTLS }: TlsPlanInput): TlsPlan {
  return {
    requireTLS: requireTLS ?? (level === 'required' || level === 'verified'),
    ignoreTLS: ignoreTLS ?? level === 'no',
    // STARTTLS answered with an error: go on in plain text on the same connection.
    opportunisticTLS: level === 'ifavailable',
    tls: handshakeOptions(level, destination, tlsOptions),
    plainTextRetry: destination === 'mx' && level === 'ifavailable',
  };
}

/** Always a fresh object: SMTPConnection is handed one per connection. */
function handshakeOptions(level: TlsPolicy, destination: TlsDestination, tlsOptions: TlsConnectionOptions | undefined): TlsConnectionOptions | undefined {
  // The level's promise: the options may add a CA or a pinned check, not turn the check off.
  if (level === 'verified') return { ...tlsOptions, rejectUnauthorized: true };
  // Encryption without authentication (RFC 7435): most MX hosts have a self-signed or
  // mismatched certificate, and refusing it would only mean sending in clear (or not at all).
  if (destination === 'mx' && level !== 'no') return { rejectUnauthorized: false, ...tlsOptions };
  return tlsOptions ? { ...tlsOptions } : undefined;
}

/** Node's X.509 verification error codes (tls docs, "X509 certificate error codes"). */
const CERTIFICATE_ERRORS = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
]);

/** Node's message for a peer that closed the socket in the middle of the handshake. */
const HANDSHAKE_CUT_OFF = 'Client network socket disconnected before secure TLS connection was established';

/** The fields of an SMTPConnection error this module reads. */
interface TlsError {
  code?: unknown;
  originalCode?: unknown;
  timeoutType?: unknown;
  library?: unknown;
  message?: unknown;
}

/**
 * Whether a failed connection setup failed in TLS: the handshake was refused (protocol version,
 * ciphers, an alert), was not TLS at all, timed out, was cut off, or the certificate was
 * rejected; or SMTPConnection could not start TLS. Not a refused TCP connect, a 4xx greeting or a
 * reset (RST): a reset reads the same in the handshake and before it, and is left to the backoff.
 */
export function isTlsFailure(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const { code, originalCode, timeoutType, library, message } = err as TlsError;
  // SMTPConnection: TLS could not start, or the socket closed while upgrading.
  if (code === 'ETLS' || timeoutType === 'UPGRADE_TIMEOUT' || library === 'SSL routines') return true;
  // Socket errors keep the TLS socket's own code in originalCode.
  const cause = typeof originalCode === 'string' ? originalCode : code;
  if (typeof cause !== 'string') return false;
  if (cause.startsWith('ERR_SSL_') || cause.startsWith('ERR_TLS_') || CERTIFICATE_ERRORS.has(cause)) return true;
  return cause === 'ECONNRESET' && message === HANDSHAKE_CUT_OFF;
}

/** The same target with STARTTLS off. */
export function inPlainText<T extends TlsFlags>(target: T): T {
  return { ...target, requireTLS: false, ignoreTLS: true, opportunisticTLS: false };
}

/**
 * Opens a connection; when `plainTextRetry` allows it and the setup failed in TLS (the failed
 * handshake ended that session), opens another to the same host without STARTTLS. When that one
 * fails too, its error is thrown, its message naming both failures.
 */
export async function withPlainTextRetry<T extends TlsFlags & Pick<ConnectionTarget, 'host' | 'servername' | 'port'>, C>(
  target: T,
  plainTextRetry: boolean,
  open: (target: T) => Promise<C>,
): Promise<C> {
  try {
    return await open(target);
  } catch (err) {
    if (!plainTextRetry || !isTlsFailure(err)) throw err;
    const why = tlsReason(err);
    connectionLog('%s: TLS failed (%s); trying again in plain text', describeTarget(target), why);
    try {
      return await open(inPlainText(target));
    } catch (plainErr) {
      // The plain-text failure is what the host did last (its fields say how it failed); its
      // message tells both.
      if (plainErr instanceof Error) plainErr.message = `TLS failed (${why}), then in plain text: ${plainErr.message}`;
      throw plainErr;
    }
  }
}

/** OpenSSL's reason ("tlsv1 alert protocol version") rather than its whole error line. */
function tlsReason(err: unknown): string {
  const reason = (err as { library?: unknown; reason?: unknown }).reason;
  return typeof reason === 'string' && (err as { library?: unknown }).library === 'SSL routines' ? reason : describeError(err);
}
