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

/** The message's bytes from its stream. */
export function readMessage(message: RootNode): Promise<Buffer> {
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

function readStream(stream: Readable): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let length = 0;
    stream.on('data', (chunk: Buffer | string) => {
      const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      chunks.push(bytes);
      length += bytes.length;
    });
    stream.once('error', reject);
    stream.once('end', () => resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, length)));
  });
}
