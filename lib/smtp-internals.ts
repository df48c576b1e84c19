/**
 * The one place that relies on Nodemailer's SMTPConnection beyond its documented interface.
 * Everything here is read or hooked on one connection instance; nothing is patched globally.
 *
 * What is relied on (checked against nodemailer 10.6):
 * - `_socket`: the socket, to see whether the peer closed or half-closed it, and to learn when
 *   the final dot has left the process (a write queued behind it completes);
 * - `_supportedExtensions`: the EHLO keywords, for SMTPUTF8 (RFC 6531) and REQUIRETLS;
 * - `_maxAllowedSize`: the server's SIZE (RFC 1870), to refuse a larger message before MAIL FROM;
 * - `_actionLMTPStream(recipient, final, reply, callback)`: called once per recipient reply
 *   after an LMTP final dot; wrapped to record each reply as it comes, so that a connection
 *   lost after some replies settles those recipients;
 * - the envelope object handed to `send()` becomes the connection's `_envelope`, on which it
 *   records `accepted`, `rejectedErrors` (RCPT replies) and `rcptQueue` (RCPTs not yet sent).
 * When a field is missing (another Nodemailer version), each helper falls back to the cautious
 * answer: a connection is not reused, no extension is assumed, no reply is recorded.
 */
import type { Socket } from 'node:net';
import type SMTPConnection from 'nodemailer/lib/smtp-connection';

interface Internals {
  _socket?: Socket | false | null;
  _supportedExtensions?: unknown;
  _maxAllowedSize?: unknown;
  _actionLMTPStream?: (recipient: string, final: boolean, reply: string, callback: unknown) => unknown;
}

const internals = (smtp: SMTPConnection): Internals => smtp as unknown as Internals;

/** The connection's socket, when it has one. */
export function socketOf(smtp: SMTPConnection): Socket | undefined {
  return internals(smtp)._socket || undefined;
}

/** True while both directions of the socket are open: a peer that closed or half-closed it gets no transaction. */
export function peerOpen(smtp: SMTPConnection): boolean {
  const socket = socketOf(smtp);
  return socket !== undefined && !socket.destroyed && socket.writable && !socket.readableEnded;
}

/** Whether the server announced an EHLO keyword (upper case, e.g. `SMTPUTF8`). */
export function offers(smtp: SMTPConnection, keyword: string): boolean {
  const extensions = internals(smtp)._supportedExtensions;
  return Array.isArray(extensions) && extensions.includes(keyword);
}

/** The server's announced SIZE limit in bytes; 0 when it announced none. */
export function serverSizeLimit(smtp: SMTPConnection): number {
  const size = Number(internals(smtp)._maxAllowedSize);
  return Number.isFinite(size) && size > 0 ? size : 0;
}

/** A recipient's reply to an LMTP final dot, as it arrived. */
export interface LmtpReply {
  rcpt: string;
  response: string;
}

/**
 * Records every per-recipient LMTP reply into the sink the caller sets for the transaction in
 * flight. Returns a setter: pass the current transaction's array, or undefined between them.
 */
export function recordLmtpReplies(smtp: SMTPConnection): (sink: LmtpReply[] | undefined) => void {
  const target = internals(smtp);
  const original = target._actionLMTPStream;
  let sink: LmtpReply[] | undefined;
  if (typeof original === 'function') {
    target._actionLMTPStream = function (this: unknown, recipient, final, reply, callback) {
      sink?.push({ rcpt: recipient, response: reply });
      return original.call(this, recipient, final, reply, callback);
    };
  }
  return (next) => {
    sink = next;
  };
}

/** What the connection recorded on the envelope object of a transaction. */
export interface EnvelopeRecord {
  accepted?: string[];
  rejectedErrors?: { recipient?: string; responseCode?: number; response?: string; message: string }[];
  /** RCPTs not sent yet (without PIPELINING they go one at a time). */
  rcptQueue?: string[];
}

/** How many of a transaction's RCPT TO commands went out. */
export function rcptsSent(record: EnvelopeRecord, offered: number): number {
  // Before MAIL FROM is queued there is no rcptQueue: nothing went out.
  return record.rcptQueue === undefined ? 0 : offered - record.rcptQueue.length;
}
