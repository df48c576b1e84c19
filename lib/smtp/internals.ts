/**
 * The one place that relies on Nodemailer's SMTPConnection beyond its documented interface.
 * Everything here is read or hooked on one connection instance; nothing is patched globally.
 *
 * What is relied on (checked against nodemailer 10.6):
 * - `_socket`: the socket, to see whether the peer closed or half-closed it (once the session
 *   is set up it stays the same socket: PeerWatch listens to it), and to learn when
 *   the final dot has left the process (a write queued behind it completes);
 * - `_supportedExtensions`: the EHLO keywords, for SMTPUTF8 (RFC 6531) and REQUIRETLS;
 * - `_maxAllowedSize`: the server's SIZE (RFC 1870), to refuse a larger message before MAIL FROM;
 * - `_actionLMTPStream(recipient, final, reply, callback)`: called once per recipient reply
 *   after an LMTP final dot; wrapped to record each reply as it comes, so that a connection
 *   lost after some replies settles those recipients;
 * - the envelope object handed to `send()` becomes the connection's `_envelope`, on which it
 *   records `accepted`, `rejectedErrors` (RCPT replies) and `rcptQueue` (RCPTs not yet sent);
 * - the message: `send()` pipes a stream into its dot-stuffing DataStream only after DATA was
 *   answered 354, and that DataStream is piped into `_socket` with `end: false`; its `_flush`
 *   writes `.\r\n` after a chunk that ended in LF. A message already in wire form is written
 *   to the socket directly, and only its final CRLF through the DataStream (see MessageHandover).
 * When a field is missing (another Nodemailer version), each helper falls back to the cautious
 * answer: a connection is not reused, no extension is assumed, no reply is recorded.
 */
import type { Socket } from 'node:net';
import type SMTPConnection from 'nodemailer/lib/smtp-connection';
import type { MessageProgress } from './verdicts';

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
  return !!socket && !socket.destroyed && socket.writable && !socket.readableEnded;
}

/**
 * peerOpen for a session that is set up (its socket is final: STARTTLS replaced it before),
 * asked several times per message: what the peer did is learnt from the socket's own events,
 * which come as `readableEnded` and `destroyed` turn true (prepended, so they are known before
 * SMTPConnection reacts), and only `writable` is read (false too once this side ended or
 * destroyed it), instead of three stream getters on every check.
 */
export class PeerWatch {
  private gone = false;

  constructor(readonly socket: Socket) {
    const markGone = (): void => {
      this.gone = true;
    };
    socket.prependOnceListener('end', markGone);
    socket.prependOnceListener('close', markGone);
  }

  get open(): boolean {
    return !this.gone && this.socket.writable;
  }
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
 * flight. Returns a setter (pass the current transaction's array, or undefined between them), or
 * undefined when this Nodemailer has no such hook: then no reply is known.
 */
export function recordLmtpReplies(smtp: SMTPConnection): ((sink: LmtpReply[] | undefined) => void) | undefined {
  const target = internals(smtp);
  const original = target._actionLMTPStream;
  if (typeof original !== 'function') return undefined;
  let sink: LmtpReply[] | undefined;
  target._actionLMTPStream = function (this: unknown, recipient, final, reply, callback) {
    sink?.push({ rcpt: recipient, response: reply });
    return original.call(this, recipient, final, reply, callback);
  };
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

/** Chunks the message is written in, so that a large one is never copied whole by the dot-stuffing stream. */
const WRITE_CHUNK = 64 * 1024;

/** How long a failed transaction waits for the socket to say whether the final dot left. */
const FLUSH_VERDICT_MS = 1_000;

/**
 * The message for one transaction, in the shape SMTPConnection reads a stream: it pipes it only
 * after the server answered DATA with 354. The bytes go out in chunks as the socket takes them
 * (back-pressure end to end), and `progress()` tells how far they got: a write queued behind the
 * final dot completes only once the dot has left the process.
 *
 * The bytes are the message's wire form (message/bytes.ts toWireForm: dot-stuffed, CRLF line
 * ends), made once per message. They skip the DataStream's byte-by-byte scan, which costs about
 * 2 ns a byte, more than anything else per message for real-sized mail: they go to the socket
 * directly, all but their final CRLF, which goes through the DataStream so that it adds the
 * final dot after it (and passes it unchanged). Bytes that do not end in CRLF all go through
 * the DataStream, as SMTPConnection would send them.
 */
export class MessageHandover {
  /** When SMTPConnection began the message (after DATA's 354: the server had every RCPT by then). */
  startedAt: number | undefined;
  private aborted = false;
  private dotFlushed: Promise<boolean> | undefined;

  constructor(
    private readonly bytes: Buffer,
    private readonly socket: Socket | undefined,
  ) {}

  pipe<T extends NodeJS.WritableStream>(destination: T): T {
    this.startedAt = Date.now();
    const socket = this.socket;
    // A small message and its final dot leave in one write: corked only while they are handed
    // over, and only when all of it fits under the socket's high-water mark, so no write meets
    // back-pressure (which a corked socket would never relieve).
    const corked = socket !== undefined && !socket.writableCorked && socket.writableLength + this.bytes.length + FINAL_DOT_BYTES < socket.writableHighWaterMark;
    let stillCorked = corked;
    if (corked) socket.cork();
    const uncork = (): void => {
      if (!stillCorked) return;
      stillCorked = false;
      process.nextTick(() => socket?.uncork());
    };
    destination.once('error', uncork);
    // 'end' comes once the stream handed its last bytes, the final dot, to the socket.
    destination.once('end', () => {
      uncork();
      this.dotFlushed = new Promise((resolve) => {
        if (!socket || socket.destroyed || !socket.writable) resolve(false);
        else socket.write(EMPTY, (err) => resolve(!err));
      });
    });
    const aborted = (): boolean => this.aborted;
    if (socket && endsWithCrlf(this.bytes)) {
      writeInChunks(socket, this.bytes.subarray(0, this.bytes.length - 2), aborted, () => {
        destination.write(CRLF);
        destination.end();
      });
    } else {
      writeInChunks(destination, this.bytes, aborted, () => destination.end());
    }
    return destination;
  }

  /**
   * The transaction ended before its final reply (a reply in the middle of DATA, a broken
   * connection): write nothing more, so no rest of the message follows whatever comes next.
   */
  abort(): void {
    this.aborted = true;
  }

  /** How far the message got; asked once the transaction ended without a reply to the dot. */
  async progress(): Promise<MessageProgress> {
    if (this.startedAt === undefined) return 'none';
    if (!this.dotFlushed) return 'partial';
    // A socket that says nothing in time: the dot may have left, so the cautious answer.
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), FLUSH_VERDICT_MS)));
    const flushed = await Promise.race([this.dotFlushed, timeout]);
    clearTimeout(timer);
    return flushed ? 'sent' : 'partial';
  }

  // SMTPConnection listens for a stream error and destroys the stream on teardown: nothing to do here.
  on(): this {
    return this;
  }

  removeListener(): this {
    return this;
  }

  destroy(): void {}
}

const EMPTY = Buffer.alloc(0);

/** Writes bytes in chunks, each after the destination took the last, then calls `done`. */
function endsWithCrlf(bytes: Buffer): boolean {
  return bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a;
}

function writeInChunks(destination: NodeJS.WritableStream, bytes: Buffer, aborted: () => boolean, done: () => void): void {
  let offset = 0;
  const next = (): void => {
    if (aborted()) return;
    while (offset < bytes.length) {
      const end = Math.min(offset + WRITE_CHUNK, bytes.length);
      const more = destination.write(bytes.subarray(offset, end));
      offset = end;
      if (!more) {
        destination.once('drain', next);
        return;
      }
    }
    done();
  };
  next();
}

const CRLF = Buffer.from('\r\n');

/** What the DataStream adds at most after the message: its last line break and the final dot. */
const FINAL_DOT_BYTES = 5;
