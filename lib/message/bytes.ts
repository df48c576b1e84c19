/**
 * The message a transport receives from Nodemailer, as one Buffer: read once, sent to every
 * domain and on every retry.
 *
 * Reading Nodemailer's message stream costs about 90 µs per message (a pipeline of streams, with
 * an AbortSignal and a trailing-newline transform), more than the rest of sendMail and most of
 * what a fast transport spends. For a `raw` message given as a string or Buffer, with nothing
 * that would change its bytes on the way (no DKIM or other process function, no stream
 * transform from a plugin, no `newline` conversion), the stream would yield the raw bytes
 * themselves, with CRLF appended when they do not end in a line break. Those bytes are taken
 * directly; anything else is read from the stream.
 */
import type { Readable } from 'node:stream';

/** The parts of Nodemailer's MimeNode (nodemailer/lib/mime-node) the shortcut relies on. */
interface RootNode {
  createReadStream(): Readable;
  _raw?: unknown;
  _transforms?: unknown;
  _processFuncs?: unknown;
  newline?: unknown;
}

/** The message's bytes without reading its stream, or undefined when the stream must be read. */
export function rawBytes(message: RootNode): Buffer | undefined {
  const raw = passThroughRaw(message);
  return raw === undefined ? undefined : withFinalLineBreak(raw);
}

/** The message's bytes from its stream, as the chunks it gave (toWireForm copies them once). */
export function readMessage(message: RootNode): Promise<Buffer[]> {
  return readStream(message.createReadStream());
}

/** The raw content when the stream would pass it through unchanged; undefined otherwise (or when Nodemailer's internals look different). */
function passThroughRaw(message: RootNode): Buffer | undefined {
  const { _raw: raw, _transforms: transforms, _processFuncs: processFuncs, newline } = message;
  if (!Array.isArray(transforms) || transforms.length > 0) return undefined;
  if (!Array.isArray(processFuncs) || processFuncs.length > 0) return undefined;
  if (newline) return undefined;
  if (Buffer.isBuffer(raw)) return raw;
  if (typeof raw === 'string' && raw.length > 0) return Buffer.from(raw);
  return undefined;
}

/**
 * The Message-ID header of a raw message, unfolded, or undefined when it has none. Nodemailer's
 * own `messageId()` does not look into raw content: it makes up an id that is not in the message
 * (and making one up costs five calls into crypto.randomBytes).
 */
export function rawMessageId(bytes: Buffer): string | undefined {
  const head = bytes.toString('latin1', 0, headerEnd(bytes));
  const match = /^message-id:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)/im.exec(head);
  const id = match?.[1].replace(/\r?\n[ \t]/g, ' ').trim();
  return id ? id : undefined;
}

/** Headers are looked for this far into a message at most, so a large body is never scanned. */
const MAX_HEADER_BYTES = 256 * 1024;

/** Where the header section ends: the first empty line (CRLF or bare LF), or the scan limit. */
function headerEnd(bytes: Buffer): number {
  let head = bytes.subarray(0, MAX_HEADER_BYTES);
  const crlf = head.indexOf('\r\n\r\n');
  // A bare-LF blank line can only come first if it lies before the CRLF one: search only there.
  if (crlf >= 0) head = head.subarray(0, crlf);
  const lf = head.indexOf('\n\n');
  return lf >= 0 ? lf : head.length;
}

/** What Nodemailer's LastNewline transform does: a message ends with a line break. */
function withFinalLineBreak(bytes: Buffer): Buffer {
  const last = bytes.length > 0 ? bytes[bytes.length - 1] : undefined;
  if (last === 0x0a) return bytes;
  return Buffer.concat([bytes, last === 0x0d ? LF : CRLF]);
}

const LF = Buffer.from('\n');
const CRLF = Buffer.from('\r\n');

function readStream(stream: Readable): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer | string) => chunks.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk));
    stream.once('error', reject);
    stream.once('end', () => resolve(chunks));
  });
}

const CR_BYTE = 0x0d;
const LF_BYTE = 0x0a;
const DOT_BYTE = 0x2e;
const INSERT_CR = Buffer.from('\r');
const INSERT_LF = Buffer.from('\n');
const INSERT_DOT = Buffer.from('.');
const INSERT_LF_DOT = Buffer.from('\n.');

/**
 * A message that needs no change for the wire: lines that each end in CRLF, hold no other CR or
 * LF, and do not start with a dot. One linear pass (the first character of a line decides its
 * branch), faster than looking for each thing that would need a change.
 */
const IN_WIRE_FORM = /^(?:[^.\r\n][^\r\n]*\r\n|\r\n)*$/;
/** Up to this size a message is checked for being in wire form already with one regular expression. */
const QUICK_CHECK_BYTES = 64 * 1024;

/**
 * True for a small message that needs no change (CRLF line ends, no line starting with a dot,
 * a final CRLF): most raw mail. One pass of a regular expression instead of a call per line.
 */
function inWireFormAlready(bytes: Buffer): boolean {
  const n = bytes.length;
  if (n < 2 || n > QUICK_CHECK_BYTES || bytes[n - 2] !== CR_BYTE || bytes[n - 1] !== LF_BYTE) return false;
  return IN_WIRE_FORM.test(bytes.toString('latin1'));
}

/** A message's wire form, and its size as RFC 1870 counts it for SIZE= (CRLF line ends, no doubled dots). */
export interface WireForm {
  wire: Buffer;
  size: number;
}

/**
 * The message as it goes on the wire after DATA, without the final dot: what Nodemailer's
 * DataStream would write (bare CR and bare LF become CRLF, a dot that starts a line is doubled),
 * ending in CRLF. Made once per message, where it is built, so that every domain and retry sends
 * it without the DataStream's byte-by-byte scan (smtp/internals.ts MessageHandover). Takes the
 * message as the chunks it was read in and copies them once; a single chunk that needs no change
 * comes back as it is. A small single chunk is checked with one regular expression
 * (inWireFormAlready); otherwise only line ends are visited (Buffer#indexOf), not every byte.
 */
export function toWireForm(chunks: readonly Buffer[]): WireForm {
  if (chunks.length === 1 && inWireFormAlready(chunks[0])) return { wire: chunks[0], size: chunks[0].length };
  const parts: Buffer[] = [];
  let doubledDots = 0;
  // The byte before the chunk being read; undefined at the start of the message.
  let prev: number | undefined;
  for (const chunk of chunks) {
    if (chunk.length === 0) continue;
    let from = 0;
    const insert = (at: number, what: Buffer): void => {
      if (at > from) parts.push(chunk.subarray(from, at));
      parts.push(what);
      from = at;
      if (what === INSERT_DOT || what === INSERT_LF_DOT) doubledDots++;
    };
    const before = (at: number): number | undefined => (at > 0 ? chunk[at - 1] : prev);
    // A line may start at the chunk's first byte: after the start, a CR or an LF.
    if (prev === CR_BYTE && chunk[0] !== LF_BYTE) insert(0, chunk[0] === DOT_BYTE ? INSERT_LF_DOT : INSERT_LF);
    else if (chunk[0] === DOT_BYTE && (prev === undefined || prev === LF_BYTE)) insert(0, INSERT_DOT);
    let cr = chunk.indexOf(CR_BYTE);
    let lf = chunk.indexOf(LF_BYTE);
    while (cr !== -1 || lf !== -1) {
      if (lf === -1 || (cr !== -1 && cr < lf)) {
        // A CR not followed by LF gets one, and a dot after it then starts a line; a CR that ends
        // the chunk is settled at the next chunk's start.
        const next = cr + 1;
        if (next < chunk.length && chunk[next] !== LF_BYTE) insert(next, chunk[next] === DOT_BYTE ? INSERT_LF_DOT : INSERT_LF);
        cr = chunk.indexOf(CR_BYTE, next);
      } else {
        if (before(lf) !== CR_BYTE) insert(lf, INSERT_CR);
        if (chunk[lf + 1] === DOT_BYTE) insert(lf + 1, INSERT_DOT);
        lf = chunk.indexOf(LF_BYTE, lf + 1);
      }
    }
    parts.push(from === 0 ? chunk : chunk.subarray(from));
    prev = chunk[chunk.length - 1];
  }
  // The end the DataStream gives before its final dot: a line break.
  if (prev !== LF_BYTE) parts.push(prev === CR_BYTE ? INSERT_LF : CRLF);
  const wire = parts.length === 1 ? parts[0] : Buffer.concat(parts);
  return { wire, size: wire.length - doubledDots };
}
