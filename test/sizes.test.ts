/**
 * Real mail, end to end, checked on the server: what it stored must be what was sent.
 *
 * 1. Size matrix. Raw messages (a string, a Buffer, a stream) and messages composed by
 *    Nodemailer (text + HTML, an inline image by cid, attachments from a path, a stream and a
 *    Buffer) from 1 byte to 22 MiB, plus one 50 MiB raw message, over plain SMTP, STARTTLS,
 *    implicit TLS and LMTP, in the application's thread and with `deliveryThread`. For raw
 *    messages the server's bytes (smtp-server hands them over dot-unstuffed) must equal the bytes
 *    sent, byte for byte; for composed ones every attachment, decoded from the server's copy, must
 *    equal its source, and the SIZE= the transport announced must be the byte count the server
 *    got. The generated bodies put dot-led lines and CRLFs across the transport's 64 KiB write
 *    chunks, and the sizes straddle the 16 KiB socket high-water mark the handover corks below
 *    and the 64 KiB write chunk. A batch of mixed sizes and shapes also goes all at once in each
 *    engine. A matrix (size × shape × channel) is printed once at the end.
 * 2. SIZE (RFC 1870): a message larger than the server's announced SIZE is refused locally (552,
 *    the reply says SIZE) and the server never sees its MAIL FROM; one of exactly SIZE bytes goes.
 *    A raw message with bare LF line endings is counted as it is transmitted (CRLF).
 * 3. Envelope parameters next to Nodemailer's own SMTP transport: MAIL FROM and RCPT TO as the
 *    server read them, for SIZE=, BODY=8BITMIME, DSN (RET, ENVID, NOTIFY, ORCPT) and REQUIRETLS.
 * 4. SMTPUTF8 (RFC 6531): a UTF-8 local part to a server without SMTPUTF8 is refused locally
 *    (553) while the ASCII recipients of the same message go (an internationalised domain goes as
 *    punycode); a server with SMTPUTF8 takes them all.
 *
 * The servers are smtp-server on 127.0.0.1 (support/byte-server.ts); each describe reuses its
 * servers and transports across its cases.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import nodemailer, { type Transporter } from 'nodemailer';
import type { BindingPoolOptions, BindingPoolSendError, BindingPoolSentMessageInfo, RecipientOutcome } from '../lib';
import { ByteServer, sha256, type StoredMessage } from './support/byte-server';
import { mulberry32 } from './support/fault-server';
import { makeTransport } from './support/send';

const fixtures = join(__dirname, 'fixtures');
const tlsFiles = { key: readFileSync(join(fixtures, 'mx-test.key')), cert: readFileSync(join(fixtures, 'mx-test.crt')) };
/** Trust for the fixture certificate; a string, so it also crosses to the delivery thread as it is. */
const trust = { ca: tlsFiles.cert.toString(), servername: 'relay.test' };

const KiB = 1024;
const MiB = 1024 * KiB;
/** Large enough for every message here; makes the servers announce SIZE, so SIZE= shows what the transport counted. */
const SERVER_SIZE = 64 * MiB;
const RCPTS = ['ann@sizes.test', 'bob@sizes.test'];

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'sizes-test-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// ---------------------------------------------------------------------------------------------
// Message bodies

/** 1 MiB of line content to copy lines from: printable ASCII and tab, and for 8-bit bodies also 0x80–0xFF. */
function table(eightBit: boolean, seed: number): Buffer {
  const alphabet: number[] = [0x09];
  for (let b = 0x20; b <= 0x7e; b++) alphabet.push(b);
  if (eightBit) for (let b = 0x80; b <= 0xff; b++) alphabet.push(b);
  const random = mulberry32(seed);
  const bytes = Buffer.alloc(MiB + 1_000);
  for (let i = 0; i < bytes.length; i++) bytes[i] = alphabet[Math.floor(random() * alphabet.length)];
  return bytes;
}
const TABLES = { ascii: table(false, 1), eightBit: table(true, 2) };

/** The transport writes a message in chunks of this size (lib/smtp/connection.ts WRITE_CHUNK). */
const WRITE_CHUNK = 64 * KiB;

/**
 * A message of exactly `size` bytes: `header`, then CRLF-terminated lines of 0–998 octets
 * ending with CRLF. No bare CR or LF (SMTPConnection would turn them into CRLF). At every 64 KiB
 * boundary of the message (where one write chunk ends and the next begins) a line starts, or a
 * CRLF is split across it, in turn.
 * `dots`: one line in eight starts with a dot and one in 64 is a lone dot, and the lines at the
 * boundaries start with a dot: the message needs dot-stuffing (it goes through SMTPConnection's
 * DataStream). Without: no line starts with a dot, so the message is "wire-ready" and the
 * transport writes it to the socket directly.
 * `utf8`: some lines end with "é" (C3 A9), so the bytes are valid UTF-8 with non-ASCII in them.
 */
function messageBytes(size: number, header: string, options: { eightBit: boolean; utf8: boolean; dots: boolean; seed: number }): Buffer {
  const out = Buffer.alloc(size);
  let pos = out.write(header, 'latin1');
  if (pos + 2 > size) throw new Error(`a header of ${pos} bytes does not fit in ${size}`);
  const source = options.eightBit ? TABLES.eightBit : TABLES.ascii;
  const random = mulberry32(options.seed);
  // Where a line must end: just before a boundary (dot trap), one byte after it (CR | LF split), and the end.
  const stops: { at: number; dotNext: boolean }[] = [];
  for (let k = 1; k * WRITE_CHUNK + 1 < size - 2; k++)
    stops.push(k % 2 === 1 ? { at: k * WRITE_CHUNK, dotNext: true } : { at: k * WRITE_CHUNK + 1, dotNext: false });
  stops.push({ at: size, dotNext: false });
  let stop = 0;
  let dotNext = false;
  let line = 0;
  while (pos < size) {
    while (stops[stop].at <= pos) stop++;
    const distance = stops[stop].at - pos;
    const roll = random();
    // Mostly lines of any length up to 998 octets; some empty, some a lone dot.
    let length = roll < 1 / 64 ? 1 : roll < 0.05 ? 0 : Math.floor(random() * 999);
    if (distance <= 1_000) length = distance - 2;
    else if (distance - (length + 2) === 1) length--;
    if (dotNext && length === 0) length = 1;
    const offset = Math.floor(random() * MiB);
    out.set(source.subarray(offset, offset + length), pos);
    if (!options.dots) {
      if (out[pos] === 0x2e && length > 0) out[pos] = 0x78;
    } else if (length > 0 && (dotNext || roll < 1 / 64 || random() < 1 / 8)) out[pos] = 0x2e;
    if (options.utf8 && line % 13 === 5 && length >= 3) {
      out[pos + length - 2] = 0xc3;
      out[pos + length - 1] = 0xa9;
    }
    out[pos + length] = 0x0d;
    out[pos + length + 1] = 0x0a;
    pos += length + 2;
    dotNext = pos === stops[stop].at && stops[stop].dotNext;
    line++;
  }
  return out;
}

/**
 * True when SMTP would carry the bytes unchanged: CRLF line ends only, ending in CRLF, no line
 * that starts with a dot (lib/message/bytes.ts toWireForm then has nothing to change).
 */
function wireReady(bytes: Buffer): boolean {
  const text = bytes.toString('latin1');
  return text.endsWith('\r\n') && !/\r(?!\n)|(?<!\r)\n|(^|\n)\./.test(text);
}

/** Index of the first byte where the two differ (a length difference counts), -1 when equal. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** A readable stream of these bytes in odd-sized chunks (so chunk edges fall anywhere). */
function oddChunks(bytes: Buffer, chunk = 7_919): Readable {
  let offset = 0;
  return new Readable({
    read() {
      if (offset >= bytes.length) return void this.push(null);
      this.push(bytes.subarray(offset, offset + chunk));
      offset += chunk;
    },
  });
}

// ---------------------------------------------------------------------------------------------
// The cases

type Shape = 'raw string' | 'raw Buffer' | 'raw stream' | 'composed';
const SHAPES: Shape[] = ['raw string', 'raw Buffer', 'raw stream', 'composed'];
/**
 * Which shapes need dot-stuffing: raw strings (UTF-8) and streams (8-bit) carry dot-led lines
 * and go through SMTPConnection's DataStream; raw Buffers (8-bit) and composed messages have
 * none and go to the socket directly. Each size is sent both ways.
 */
const STUFFED: Record<Shape, boolean> = { 'raw string': true, 'raw Buffer': false, 'raw stream': true, composed: false };

interface Size {
  label: string;
  bytes: number;
}
const SIZES: Size[] = [
  { label: '1 B', bytes: 1 },
  { label: '15 KiB', bytes: 15 * KiB },
  { label: '16 KiB - 1', bytes: 16 * KiB - 1 },
  { label: '16 KiB', bytes: 16 * KiB },
  { label: '17 KiB', bytes: 17 * KiB },
  { label: '64 KiB', bytes: 64 * KiB },
  { label: '64 KiB + 1', bytes: 64 * KiB + 1 },
  { label: '1 MiB', bytes: MiB },
  { label: '22 MiB', bytes: 22 * MiB },
];
const size = (label: string): Size => SIZES.find((s) => s.label === label)!;
const BIG: Size = { label: '50 MiB', bytes: 50 * MiB };

/** What a case sends, and how to tell from the server's copy that it arrived intact. */
interface Prepared {
  mail: Record<string, unknown>;
  /** The Message-ID the result should report, when the message has one of its own. */
  messageId?: string;
  /** Undefined when intact; otherwise what differs. */
  check(stored: StoredMessage): string | undefined;
}

let nextSeed = 100;

/** A raw message of exactly `bytes` bytes (1 byte: no header at all). */
function prepareRaw(shape: Exclude<Shape, 'composed'>, bytes: number, id: string, from: string): Prepared {
  const messageId = `<${id}@sizes.test>`;
  const header = `From: ${from}\r\nTo: ${RCPTS.join(', ')}\r\nSubject: ${id}\r\nMessage-ID: ${messageId}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n`;
  const tiny = bytes === 1;
  const sent = tiny
    ? Buffer.from('x')
    : messageBytes(bytes, header, { eightBit: shape !== 'raw string', utf8: shape === 'raw string', dots: STUFFED[shape], seed: nextSeed++ });
  // A raw message that does not end in a line break gets CRLF, as Nodemailer's own stream adds it.
  const expected = tiny ? Buffer.from('x\r\n') : sent;
  const raw = shape === 'raw string' ? sent.toString('utf8') : shape === 'raw Buffer' ? sent : oddChunks(sent);
  if (shape === 'raw string' && Buffer.byteLength(raw as string) !== sent.length) throw new Error('the raw string is not the bytes');
  const expectedHash = sha256(expected);
  return {
    mail: { envelope: { from, to: RCPTS }, raw },
    messageId: tiny ? undefined : messageId,
    check(stored) {
      // The application's Buffer (or string) is left as it was.
      if (!tiny && sha256(sent) !== expectedHash) return "the application's message bytes changed";
      if (stored.sha256 === expectedHash && stored.bytes.length === expected.length) return undefined;
      return `stored ${stored.bytes.length} B, sent ${expected.length} B, first difference at byte ${firstDifference(stored.bytes, expected)}`;
    },
  };
}

/** The parts of a MIME message: each part's headers (unfolded) and body, split at every boundary line. */
function mimeParts(message: Buffer): { headers: string; body: string }[] {
  const text = message.toString('latin1');
  return text
    .split(/\r\n--[^\r\n]*\r\n/)
    .slice(1)
    .map((part) => {
      const split = part.indexOf('\r\n\r\n');
      return split < 0 ? { headers: part, body: '' } : { headers: part.slice(0, split).replace(/\r\n[ \t]+/g, ' '), body: part.slice(split + 4) };
    });
}

/** A text part's content, decoded from its Content-Transfer-Encoding (7bit, quoted-printable or base64). */
function decodeText({ headers, body }: { headers: string; body: string }): string {
  const encoding = /Content-Transfer-Encoding: *([\w-]+)/i.exec(headers)?.[1].toLowerCase() ?? '7bit';
  const bytes =
    encoding === 'base64'
      ? Buffer.from(body, 'base64')
      : encoding === 'quoted-printable'
        ? Buffer.from(
            body.replace(/=\r\n/g, '').replace(/=([0-9A-F]{2})/gi, (_, hex: string) => String.fromCharCode(parseInt(hex, 16))),
            'latin1',
          )
        : Buffer.from(body, 'latin1');
  return bytes.toString('utf8');
}

/** Bytes a part of n bytes takes in base64 as Nodemailer writes it: 76-character lines, each with CRLF. */
const base64Bytes = (n: number): number => {
  const chars = 4 * Math.ceil(n / 3);
  return chars + 2 * Math.ceil(chars / 76);
};

interface Part {
  filename: string;
  bytes: Buffer;
  cid?: string;
}

/**
 * A composed message of about `bytes` bytes: text and HTML, an inline PNG by cid, attachments
 * from a file path, a stream and a Buffer, the payload split evenly between the four. The
 * overhead (headers, text, HTML, MIME structure) is measured by composing the same message with
 * 1-byte parts through Nodemailer's stream transport.
 */
async function prepareComposed(bytes: number, id: string, from: string): Promise<Prepared> {
  const messageId = `<${id}@sizes.test>`;
  // No dot in the cid: a quoted-printable line break before one would start a line with a dot (and so need stuffing).
  const cid = `pixel-${id}`;
  const text = `Plain text part of ${id}.\r\nSecond line, ending with a dot.\r\n`;
  const html = `<p>HTML part of <b>${id}</b></p><p><img src="cid:${cid}" alt="pixel"></p>`;
  const build = (parts: Part[], path: string) => ({
    messageId,
    from,
    to: RCPTS,
    subject: id,
    text,
    html,
    attachments: [
      { filename: parts[0].filename, content: parts[0].bytes, cid, contentType: 'image/png' },
      { filename: parts[1].filename, path },
      { filename: parts[2].filename, content: oddChunks(parts[2].bytes) },
      { filename: parts[3].filename, content: parts[3].bytes },
    ],
  });
  const names = ['pixel.png', 'from-path.bin', 'from-stream.bin', 'from-buffer.bin'];
  const composer = nodemailer.createTransport({ streamTransport: true, buffer: true });
  const probePath = join(tmp, `${id}.probe`);
  writeFileSync(probePath, 'p');
  const probe = await composer.sendMail(
    build(
      names.map((filename) => ({ filename, bytes: Buffer.from('p') })),
      probePath,
    ),
  );
  const overhead = (probe.message as Buffer).length - 4 * base64Bytes(1);
  // Four parts of n bytes each, the last one adjusted to come as close to the size as base64 allows.
  const budget = Math.max(4 * base64Bytes(1), bytes - overhead);
  let n = Math.max(1, Math.floor((((budget / 4) * 3) / 4) * (76 / 78)));
  while (n > 1 && 4 * base64Bytes(n) > budget) n--;
  while (4 * base64Bytes(n + 1) <= budget) n++;
  let last = n;
  while (3 * base64Bytes(n) + base64Bytes(last + 1) <= budget) last++;
  const sizes = [n, n, n, last];
  const parts: Part[] = names.map((filename, i) => ({ filename, bytes: randomPayload(sizes[i], i === 0) }));
  parts[0].cid = cid;
  const path = join(tmp, `${id}.bin`);
  writeFileSync(path, parts[1].bytes);
  return {
    mail: build(parts, path),
    messageId,
    check(stored) {
      const found = mimeParts(stored.bytes);
      const problems: string[] = [];
      for (const part of parts) {
        const match = found.find((p) => p.headers.includes(`filename=${part.filename}`));
        if (!match) {
          problems.push(`${part.filename} missing`);
          continue;
        }
        if (!/Content-Transfer-Encoding: base64/i.test(match.headers)) problems.push(`${part.filename} not base64`);
        if (part.cid && !match.headers.includes(`Content-ID: <${part.cid}>`)) problems.push(`${part.filename} without its Content-ID`);
        const decoded = Buffer.from(match.body, 'base64');
        if (sha256(decoded) !== sha256(part.bytes)) problems.push(`${part.filename}: ${decoded.length} B decoded, ${part.bytes.length} B sent`);
      }
      for (const [type, sent] of [
        ['text/plain', text],
        ['text/html', html],
      ]) {
        const match = found.find((p) => p.headers.includes(`Content-Type: ${type}`));
        if (!match) problems.push(`${type} part missing`);
        else if (decodeText(match) !== sent) problems.push(`${type} part altered`);
      }
      return problems.length ? problems.join('; ') : undefined;
    },
  };
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** n random bytes (a PNG signature first for the image). */
function randomPayload(n: number, png: boolean): Buffer {
  const bytes = randomBytes(n);
  if (png) PNG_SIGNATURE.copy(bytes, 0, 0, Math.min(n, PNG_SIGNATURE.length));
  return bytes;
}

/** A send's result, or the error it rejected with (which carries the same fields). */
type Result = BindingPoolSentMessageInfo | BindingPoolSendError;
const settle = (sending: Promise<BindingPoolSentMessageInfo>): Promise<Result> => sending.catch((err: BindingPoolSendError) => err);
const outcomes = (result: Result): RecipientOutcome[] => result.domains.flatMap((d) => [...d.accepted, ...d.rejected, ...d.pending]);
const outcomeOf = (result: Result, recipient: string): RecipientOutcome | undefined => outcomes(result).find((o) => o.recipient === recipient);

// ---------------------------------------------------------------------------------------------
// 1. The size matrix

type ChannelName = 'plain' | 'STARTTLS' | 'TLS' | 'LMTP' | 'thread' | 'thread+TLS' | 'thread+LMTP';
const CHANNELS: ChannelName[] = ['plain', 'STARTTLS', 'TLS', 'LMTP', 'thread', 'thread+TLS', 'thread+LMTP'];
/** The matrix's columns: each channel, and a batch sent all at once over plain in each engine. */
const COLUMNS = [...CHANNELS, 'plain batch', 'thread batch'];

interface Channel {
  name: ChannelName;
  server: ByteServer;
  transporter: ReturnType<typeof makeTransport>['transporter'];
  secure: boolean;
  lmtp: boolean;
}

async function openChannel(name: ChannelName): Promise<Channel> {
  const tls = name.endsWith('TLS');
  const lmtp = name.endsWith('LMTP');
  const implicit = name === 'TLS' || name === 'thread+TLS';
  const server = await ByteServer.start({ size: SERVER_SIZE, tls: tls ? tlsFiles : undefined, secure: implicit, lmtp });
  const route: NonNullable<BindingPoolOptions['route']> = { ...server.route, lmtp, secure: implicit };
  // STARTTLS is required, so a plain-text fallback would fail the case rather than pass unseen.
  if (tls) Object.assign(route, { tls: trust, requireTLS: !implicit });
  const { transporter } = makeTransport({ route, deliveryThread: name.startsWith('thread'), socketTimeout: 20_000, maxOutboundConnections: 2 });
  return { name, server, transporter, secure: tls, lmtp };
}

/** size|shape → column → cell text; rows in the order first seen. */
const matrix = new Map<string, Map<string, { ok: boolean; text: string }>>();
afterAll(() => {
  if (matrix.size === 0) return;
  const table = [['size', 'shape', ...COLUMNS]];
  for (const [key, cells] of matrix) table.push([...key.split('|'), ...COLUMNS.map((c) => cells.get(c)?.text ?? '-')]);
  const widths = table[0].map((_, i) => Math.max(...table.map((row) => row[i].length)));
  const line = (row: string[]): string =>
    row
      .map((cell, i) => cell.padEnd(widths[i]))
      .join(' | ')
      .trimEnd();
  const all = [...matrix.values()].flatMap((cells) => [...cells.values()]);
  console.log(
    [
      'size matrix (cell: recipients accepted/offered, "=" intact or "X" not (raw: every byte; composed: every part decoded), bytes the server stored, send time;',
      ' raw string and raw stream need dot-stuffing, raw Buffer and composed are written to the socket directly)',
      line(table[0]),
      widths.map((w) => '-'.repeat(w)).join('-|-'),
      ...table.slice(1).map(line),
      `${all.filter((c) => c.ok).length} of ${all.length} sends accepted for every recipient and intact`,
    ].join('\n'),
  );
});

/** Bytes exactly below 1 MiB; from 1 MiB on, MiB and the bytes off a whole MiB. */
const human = (n: number): string => {
  if (n < MiB) return `${n}B`;
  const whole = Math.round(n / MiB);
  const off = n - whole * MiB;
  return `${whole}M${off === 0 ? '' : off > 0 ? `+${off}` : off}`;
};

interface Case {
  size: Size;
  shape: Shape;
  from: string;
  prepared: Prepared;
}

async function prepareCase(column: string, size: Size, shape: Shape): Promise<Case> {
  const id = `${shape.replace(' ', '-')}-${size.bytes}-${column.replace(/[+ ]/g, '-')}`.toLowerCase();
  const from = `${id}@sizes.test`;
  const prepared = shape === 'composed' ? await prepareComposed(size.bytes, id, from) : prepareRaw(shape, size.bytes, id, from);
  return { size, shape, from, prepared };
}

async function send(channel: Channel, { prepared }: Case): Promise<{ result: Result; ms: number }> {
  const started = Date.now();
  const result = await settle(channel.transporter.sendMail(prepared.mail));
  return { result, ms: Date.now() - started };
}

/** Records the case in the matrix, then asserts on what the client reported and the server stored. */
function verify(channel: Channel, column: string, { size, shape, from, prepared }: Case, { result, ms }: { result: Result; ms: number }): void {
  const stored = channel.server.take(from);
  const problem = stored.length === 1 ? prepared.check(stored[0]) : `the server stored ${stored.length} copies`;
  const accepted = result.accepted.length;
  const key = `${size.label}|${shape}`;
  if (!matrix.has(key)) matrix.set(key, new Map());
  matrix.get(key)!.set(column, {
    ok: accepted === RCPTS.length && problem === undefined,
    text: `${accepted}/${RCPTS.length} ${problem === undefined ? '=' : 'X'} ${stored[0] ? human(stored[0].bytes.length) : '-'} ${ms}ms`,
  });

  expect(result instanceof Error ? `${result.message}` : undefined).toBeUndefined();
  expect(result.accepted).toEqual(RCPTS);
  expect(result.rejected).toEqual([]);
  expect(result.pending).toEqual([]);
  if (prepared.messageId) expect(result.messageId).toBe(prepared.messageId);
  expect(result.domains[0].connections.every((c) => c.encrypted === channel.secure)).toBe(true);
  // LMTP: each recipient's outcome is its own reply to the final dot.
  if (channel.lmtp) for (const rcpt of RCPTS) expect(outcomeOf(result, rcpt)?.response).toMatch(`delivered to ${rcpt}`);
  expect(stored).toHaveLength(1);
  const [message] = stored;
  expect(message.rcpts.map((r) => r.address)).toEqual(RCPTS);
  expect(message.secure).toBe(channel.secure);
  // The SIZE= the transport announced is the byte count the server received (RFC 1870: CRLF
  // pairs counted, the doubled dots of dot-stuffing not).
  expect(message.mailArgs.SIZE).toBe(String(message.bytes.length));
  expect(problem).toBeUndefined();
  // The case covers what it is meant to: content that needed dot-stuffing, or none.
  if (size.bytes > 1) expect(wireReady(message.bytes)).toBe(!STUFFED[shape]);
  if (shape === 'composed') expect(Math.abs(message.bytes.length - size.bytes) / size.bytes).toBeLessThan(0.01);
}

async function sendAndCheck(channel: Channel, size: Size, shape: Shape): Promise<void> {
  const one = await prepareCase(channel.name, size, shape);
  verify(channel, channel.name, one, await send(channel, one));
}

/** The representative subset for every channel but plain in the application's thread. */
const SUBSET: [string, Shape][] = [
  ['17 KiB', 'raw Buffer'],
  ['17 KiB', 'composed'],
  ['1 MiB', 'raw stream'],
  ['1 MiB', 'composed'],
  ['22 MiB', 'raw string'],
  ['22 MiB', 'raw Buffer'],
  ['22 MiB', 'composed'],
];

/** Sent all at once: the raw ones reach the engine in one event-loop turn (with deliveryThread, in one transferred buffer). */
const BATCH: [string, Shape][] = [
  ['1 B', 'raw Buffer'],
  ['16 KiB', 'raw string'],
  ['17 KiB', 'composed'],
  ['64 KiB + 1', 'raw stream'],
  ['1 MiB', 'composed'],
  ['22 MiB', 'raw Buffer'],
  ['22 MiB', 'composed'],
  ['22 MiB', 'raw stream'],
  ['15 KiB', 'raw Buffer'],
];

describe('the test messages', () => {
  test('hold what the matrix relies on: exact size, CRLF lines of at most 998 octets, dot-led and lone-dot lines or none, a dot and a split CRLF at 64 KiB boundaries', () => {
    const bytes = messageBytes(3 * WRITE_CHUNK + 5, 'Subject: t\r\n\r\n', { eightBit: true, utf8: false, dots: true, seed: 7 });
    expect(bytes.length).toBe(3 * WRITE_CHUNK + 5);
    const text = bytes.toString('latin1');
    expect(text.endsWith('\r\n')).toBe(true);
    expect(/\r(?!\n)|(?<!\r)\n/.test(text)).toBe(false);
    const lines = text.slice(0, -2).split('\r\n');
    expect(Math.max(...lines.map((l) => l.length))).toBeLessThanOrEqual(998);
    expect(lines.filter((l) => l === '.').length).toBeGreaterThan(0);
    expect(lines.filter((l) => l.startsWith('.') && l.length > 1).length).toBeGreaterThan(10);
    expect(lines.some((l) => /[\x80-\xff]/.test(l))).toBe(true);
    // A line starting with a dot at the first boundary, CR | LF across the second.
    expect([bytes[WRITE_CHUNK - 2], bytes[WRITE_CHUNK - 1], bytes[WRITE_CHUNK]]).toEqual([0x0d, 0x0a, 0x2e]);
    expect([bytes[2 * WRITE_CHUNK - 1], bytes[2 * WRITE_CHUNK]]).toEqual([0x0d, 0x0a]);
    expect(wireReady(bytes)).toBe(false);
    const utf8 = messageBytes(40 * KiB, 'Subject: t\r\n\r\n', { eightBit: false, utf8: true, dots: true, seed: 8 });
    expect(Buffer.from(utf8.toString('utf8')).equals(utf8)).toBe(true);
    expect(utf8.toString('utf8')).toContain('\u00e9');
    const clean = messageBytes(3 * WRITE_CHUNK + 5, 'Subject: t\r\n\r\n', { eightBit: true, utf8: false, dots: false, seed: 9 });
    expect(clean.length).toBe(3 * WRITE_CHUNK + 5);
    expect(wireReady(clean)).toBe(true);
    expect([clean[2 * WRITE_CHUNK - 1], clean[2 * WRITE_CHUNK]]).toEqual([0x0d, 0x0a]);
  });
});

describe('size matrix: what the server stored is what was sent', () => {
  describe.each(CHANNELS)('%s', (name) => {
    let channel: Channel;
    beforeAll(async () => {
      channel = await openChannel(name);
    });
    afterAll(async () => {
      await channel?.transporter.close();
      await channel?.server.stop();
    });

    const cases: [string, Shape][] =
      name === 'plain'
        ? SIZES.flatMap((s) => SHAPES.filter((shape) => s.bytes > 1 || shape !== 'composed').map((shape): [string, Shape] => [s.label, shape]))
        : name.startsWith('thread+')
          ? SUBSET.filter(([label]) => label !== '22 MiB')
          : SUBSET;
    test.each(cases)('%s, %s', (label, shape) => sendAndCheck(channel, size(label), shape), 60_000);

    if (name === 'plain') test('50 MiB, raw Buffer (once)', () => sendAndCheck(channel, BIG, 'raw Buffer'), 60_000);

    if (name === 'plain' || name === 'thread') {
      test(`a batch of ${BATCH.length} sizes and shapes sent at once`, async () => {
        const column = `${name} batch`;
        const batch = await Promise.all(BATCH.map(([label, shape]) => prepareCase(column, size(label), shape)));
        const results = await Promise.all(batch.map((one) => send(channel, one)));
        batch.forEach((one, i) => verify(channel, column, one, results[i]));
      }, 60_000);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Shared by 2–4

/** A raw message of exactly `bytes` bytes with its own headers. */
function rawOf(bytes: number, id: string, from: string, to: string[]): { envelope: { from: string; to: string[] }; raw: Buffer } {
  const header = `From: ${from}\r\nTo: ${to.join(', ')}\r\nSubject: ${id}\r\nMessage-ID: <${id}@sizes.test>\r\n\r\n`;
  return { envelope: { from, to }, raw: messageBytes(bytes, header, { eightBit: false, utf8: false, dots: true, seed: nextSeed++ }) };
}

const ENGINES: [string, boolean][] = [
  ['application thread', false],
  ['deliveryThread', true],
];

// ---------------------------------------------------------------------------------------------
// 2. SIZE

describe.each(ENGINES)("SIZE (RFC 1870), %s: a message over the server's announced limit", (_engine, deliveryThread) => {
  const LIMIT = 20_000;
  let small: ByteServer;
  let large: ByteServer;
  let transporter: Channel['transporter'];
  beforeAll(async () => {
    small = await ByteServer.start({ size: LIMIT });
    large = await ByteServer.start({ size: SERVER_SIZE });
    ({ transporter } = makeTransport({ deliveryThread, domains: { 'small.test': { route: small.route }, 'large.test': { route: large.route } } }));
  });
  afterAll(async () => {
    await transporter?.close();
    await small?.stop();
    await large?.stop();
  });

  test('is refused with 552 for that server only, and it never sees MAIL FROM for it', async () => {
    const over = rawOf(LIMIT + 1, 'over', 'over@sizes.test', ['a@small.test', 'b@large.test', 'c@small.test']);
    const info = await transporter.sendMail(over);
    expect(info.accepted).toEqual(['b@large.test']);
    expect(info.rejected).toEqual(['a@small.test', 'c@small.test']);
    for (const rcpt of ['a@small.test', 'c@small.test'])
      expect(outcomeOf(info, rcpt)).toMatchObject({ status: 'rejected', responseCode: 552, response: expect.stringMatching(/SIZE/) });
    expect(small.mailCommands().filter((line) => line.includes('over@'))).toEqual([]);
    expect(small.rcptCommands()).toEqual([]);
    // The other domain has it, intact.
    const [stored] = large.take('over@sizes.test');
    expect(stored.sha256).toBe(sha256(over.raw));
    expect(stored.rcpts.map((r) => r.address)).toEqual(['b@large.test']);
  });

  test('a composed message over the limit to that server only: EREJECTED, 552, nothing sent', async () => {
    const prepared = await prepareComposed(40 * KiB, `size-composed-${deliveryThread}`, 'composed-over@sizes.test');
    const err = (await settle(transporter.sendMail({ ...prepared.mail, to: ['d@small.test'] }))) as BindingPoolSendError;
    expect(err).toMatchObject({ code: 'EREJECTED', accepted: [], rejected: ['d@small.test'] });
    expect(outcomeOf(err, 'd@small.test')).toMatchObject({ responseCode: 552, response: expect.stringMatching(/SIZE/) });
    expect(small.mailCommands().filter((line) => line.includes('composed-over@'))).toEqual([]);
  });

  // RFC 1870 6: the size counts CRLF pairs but not the doubled dots of dot-stuffing; this message
  // has dot-led lines, so a count of its stuffed wire form would exceed the limit and refuse a
  // message the server takes (smtp-server counts the unstuffed bytes, as the RFC does).
  // LIB DEFECT at 1d38edb (fails there; keep it): since 18f1dbb CountingConnection.send()
  // (smtp/connection.ts) passes `message.length`, the length of the dot-stuffed wire form, to
  // refuseLocally instead of `envelope.size`, the RFC 1870 count it announces as SIZE=: this
  // 20 000-byte message is refused locally, "552 5.3.4 message of 20005 bytes is larger than the
  // server's limit of 20000 bytes (SIZE); not sent", although SIZE=20000 would be accepted.
  test('a message of exactly the limit, with dot-led lines, goes through, SIZE= announcing it', async () => {
    const exact = rawOf(LIMIT, 'exact', 'exact@sizes.test', ['e@small.test']);
    const info = await transporter.sendMail(exact);
    expect(info.accepted).toEqual(['e@small.test']);
    const [stored] = small.take('exact@sizes.test');
    expect(stored.bytes.length).toBe(LIMIT);
    expect(stored.sha256).toBe(sha256(exact.raw));
    expect(stored.mailArgs.SIZE).toBe(String(LIMIT));
    // The only MAIL FROM the small server ever read.
    expect(small.mailCommands()).toEqual([`MAIL FROM:<exact@sizes.test> SIZE=${LIMIT}`]);
  });
});

describe('SIZE= and bare LF line endings (a raw message, or a text part as applications write it)', () => {
  // Regression (these three failed at 844b2e5, fixed by 18f1dbb): SIZE= and the local SIZE check
  // used the length of the message buffer, while SMTPConnection's DataStream turned every bare LF
  // (and bare CR) into CRLF on the way out, so a raw message with Unix line endings (an .eml file
  // read from disk) went out longer than announced: 10 306 bytes after "SIZE=10052", one more
  // per line. A composed message whose text has "\n" line ends (the usual way to write it) was
  // hit the same way, Nodemailer keeping the text part's bare LFs (7bit): 3 435 bytes after
  // "SIZE=3135" for 300 lines. RFC 1870 counts the octets transmitted, CRLF pairs included (but
  // not the doubled dots: see "exactly the limit" above). A server whose limit lies in between
  // then accepts MAIL FROM and reads the whole message before it refuses it (552 after the dot),
  // where the transport's own check (refuseLocally) must refuse it before MAIL FROM.
  const LINES = 250;
  const raw = `From: lf@sizes.test\nTo: a@lf.test\nSubject: bare LF\n\n${'a line of text, forty characters long..\n'.repeat(LINES)}`;
  const transmitted = Buffer.from(raw.replace(/\n/g, '\r\n'));

  test('the server gets it with CRLF line endings, and SIZE= announces the bytes as transmitted', async () => {
    const server = await ByteServer.start({ size: SERVER_SIZE });
    const { transporter } = makeTransport({ route: server.route });
    try {
      const info = await transporter.sendMail({ envelope: { from: 'lf@sizes.test', to: ['a@lf.test'] }, raw });
      expect(info.accepted).toEqual(['a@lf.test']);
      const [stored] = server.take('lf@sizes.test');
      expect(stored.sha256).toBe(sha256(transmitted));
      expect(stored.mailArgs.SIZE).toBe(String(transmitted.length));
    } finally {
      await transporter.close();
      await server.stop();
    }
  });

  test('a composed message with LF line ends in its text: SIZE= announces the bytes as transmitted', async () => {
    const server = await ByteServer.start({ size: SERVER_SIZE });
    const { transporter } = makeTransport({ route: server.route });
    try {
      const text = 'line one\nline two\nline three\n'.repeat(100);
      const info = await transporter.sendMail({ from: 'lf-text@sizes.test', to: 'a@lf.test', subject: 'LF text', text });
      expect(info.accepted).toEqual(['a@lf.test']);
      const [stored] = server.take('lf-text@sizes.test');
      expect(stored.bytes.toString('latin1')).toContain(text.replace(/\n/g, '\r\n'));
      expect(stored.mailArgs.SIZE).toBe(String(stored.bytes.length));
    } finally {
      await transporter.close();
      await server.stop();
    }
  });

  test('to a server whose limit it exceeds only with CRLF: refused locally with 552 before MAIL FROM', async () => {
    const server = await ByteServer.start({ size: transmitted.length - 10 });
    const { transporter } = makeTransport({ route: server.route });
    try {
      const result = await settle(transporter.sendMail({ envelope: { from: 'lf@sizes.test', to: ['a@lf.test'] }, raw }));
      expect(result.accepted).toEqual([]);
      expect(outcomeOf(result, 'a@lf.test')).toMatchObject({ status: 'rejected', responseCode: 552 });
      // Whoever refused it, the server must not have had to read it.
      expect(server.mailCommands()).toEqual([]);
      expect(outcomeOf(result, 'a@lf.test')?.response).toMatch(/SIZE/);
    } finally {
      await transporter.close();
      await server.stop();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 3. Envelope parameters, next to Nodemailer's own SMTP transport

/** The parameters of a MAIL FROM or RCPT TO line, in order. */
const paramsOf = (line: string | undefined): string[] =>
  (line ?? '')
    .replace(/^[A-Z ]+:<[^>]*>/i, '')
    .trim()
    .split(/ +/)
    .filter(Boolean);

describe.each(ENGINES)('envelope parameters, %s: as Nodemailer sends them', (_engine, deliveryThread) => {
  let plain: ByteServer;
  let secure: ByteServer;
  let secureWithout: ByteServer;
  const transports: { close(): void | Promise<void> }[] = [];
  /** Ours and Nodemailer's SMTP transport, to the plain and to the implicit-TLS server. */
  type Over = 'plain' | 'secure' | 'secureWithout';
  let ours: Record<Over, Channel['transporter']>;
  let theirs: Record<Over, Transporter>;
  beforeAll(async () => {
    plain = await ByteServer.start({ size: SERVER_SIZE, offer: ['DSN', 'REQUIRETLS'] });
    secure = await ByteServer.start({ size: SERVER_SIZE, tls: tlsFiles, secure: true, offer: ['DSN', 'REQUIRETLS'] });
    secureWithout = await ByteServer.start({ size: SERVER_SIZE, tls: tlsFiles, secure: true });
    ours = {
      plain: makeTransport({ deliveryThread, route: plain.route }).transporter,
      secure: makeTransport({ deliveryThread, route: { ...secure.route, secure: true, tls: trust } }).transporter,
      secureWithout: makeTransport({ deliveryThread, route: { ...secureWithout.route, secure: true, tls: trust } }).transporter,
    };
    theirs = {
      plain: nodemailer.createTransport({ ...plain.route, secure: false, ignoreTLS: true }),
      secure: nodemailer.createTransport({ ...secure.route, secure: true, tls: trust }),
      secureWithout: nodemailer.createTransport({ ...secureWithout.route, secure: true, tls: trust }),
    };
    transports.push(...Object.values(ours), ...Object.values(theirs));
  });
  afterAll(async () => {
    for (const t of transports) await t.close();
    await plain?.stop();
    await secure?.stop();
    await secureWithout?.stop();
  });

  /**
   * Sends `mail` through Nodemailer's transport and ours (senders nm-<id> and bp-<id>) and
   * returns what the server read of each: MAIL FROM and RCPT TO parameters, and the outcome.
   */
  async function both(id: string, over: Over, mail: (from: string) => Record<string, unknown>) {
    const server = { plain, secure, secureWithout }[over];
    const run = async (who: 'nm' | 'bp') => {
      const from = `${who}-${id}-${deliveryThread ? 't' : 'l'}@env.test`;
      const transporter = who === 'nm' ? theirs[over] : ours[over];
      const result = await (transporter.sendMail(mail(from)) as Promise<BindingPoolSentMessageInfo>).catch((err: BindingPoolSendError) => err);
      const commands = server.commands.map((c) => c.replace(/^[^:]*: /, ''));
      const mailLine = commands.find((line) => line.startsWith(`MAIL FROM:<${from}>`));
      const session = server.commands.find((c) => c.includes(`MAIL FROM:<${from}>`))?.split(':')[0];
      const rcptLines = server.commands
        .filter((c) => c.startsWith(`${session}: RCPT TO:`))
        .map((c) => c.replace(/^[^:]*: /, ''))
        .slice(-1);
      const [stored] = server.take(from);
      return { result, mail: mailLine === undefined ? undefined : paramsOf(mailLine), rcpt: paramsOf(rcptLines[0]), stored };
    };
    return { nm: await run('nm'), bp: await run('bp') };
  }
  const withoutSize = (params: string[] | undefined): string[] | undefined => params?.filter((p) => !p.startsWith('SIZE='));
  const base = (from: string) => ({ from, to: 'rcpt@env.test', subject: 'envelope', text: 'envelope parameters' });

  test('no parameters asked for: Nodemailer sends none; ours adds SIZE= with the exact byte count', async () => {
    const { nm, bp } = await both('none', 'plain', base);
    expect(nm.mail).toEqual([]);
    expect(bp.mail).toEqual([`SIZE=${bp.stored.bytes.length}`]);
    expect(nm.rcpt).toEqual([]);
    expect(bp.rcpt).toEqual([]);
  });

  test("envelope.size from the application: Nodemailer sends the application's figure, ours the exact one", async () => {
    const { nm, bp } = await both('size', 'plain', (from) => ({ ...base(from), envelope: { from, to: ['rcpt@env.test'], size: 12_345 } }));
    expect(nm.mail).toEqual(['SIZE=12345']);
    expect(bp.mail).toEqual([`SIZE=${bp.stored.bytes.length}`]);
  });

  test('envelope.use8BitMime: BODY=8BITMIME, as Nodemailer sends it', async () => {
    const { nm, bp } = await both('8bit', 'plain', (from) => ({
      ...base(from),
      text: 'd\u00e9j\u00e0 vu, 8-bit body',
      envelope: { from, to: ['rcpt@env.test'], use8BitMime: true },
    }));
    expect(nm.mail).toEqual(['BODY=8BITMIME']);
    expect(withoutSize(bp.mail)).toEqual(nm.mail);
  });

  test('dsn: RET and ENVID on MAIL FROM, NOTIFY and ORCPT on RCPT TO, exactly as Nodemailer sends them', async () => {
    const dsn = { id: 'env-42', return: 'headers', notify: ['failure', 'delay'], recipient: 'orig@env.test' };
    const { nm, bp } = await both('dsn', 'plain', (from) => ({ ...base(from), dsn }));
    expect(nm.mail).toEqual(['RET=HDRS', 'ENVID=env-42']);
    expect(nm.rcpt).toEqual(['NOTIFY=FAILURE,DELAY', 'ORCPT=rfc822;orig@env.test']);
    expect(withoutSize(bp.mail)).toEqual(nm.mail);
    expect(bp.mail).toContain(`SIZE=${bp.stored.bytes.length}`);
    expect(bp.rcpt).toEqual(nm.rcpt);
    expect(bp.stored.mailArgs).toMatchObject({ RET: 'HDRS', ENVID: 'env-42' });
    expect(bp.stored.rcpts[0].args).toMatchObject({ NOTIFY: 'FAILURE,DELAY', ORCPT: 'rfc822;orig@env.test' });
  });

  test('requireTLSExtensionEnabled over TLS to a server offering REQUIRETLS: MAIL FROM carries REQUIRETLS', async () => {
    const { nm, bp } = await both('requiretls', 'secure', (from) => ({ ...base(from), requireTLSExtensionEnabled: true }));
    expect(nm.mail).toEqual(['REQUIRETLS']);
    expect(nm.stored.secure).toBe(true);
    expect(withoutSize(bp.mail)).toEqual(nm.mail);
  });

  test('requireTLSExtensionEnabled over TLS to a server that does not offer REQUIRETLS: refused locally (550), no MAIL FROM, as Nodemailer refuses it', async () => {
    const { nm, bp } = await both('requiretls-unoffered', 'secureWithout', (from) => ({ ...base(from), requireTLSExtensionEnabled: true }));
    expect(nm.result).toMatchObject({ code: 'EREQUIRETLS' });
    expect(nm.mail).toBeUndefined();
    expect(bp.mail).toBeUndefined();
    expect(bp.result).toMatchObject({ code: 'EREJECTED', rejected: ['rcpt@env.test'] });
    expect(outcomeOf(bp.result, 'rcpt@env.test')).toMatchObject({ responseCode: 550, response: expect.stringMatching(/REQUIRETLS/) });
  });

  // RFC 8689 4.1: without TLS the message must not go; Nodemailer refuses it before MAIL FROM.
  test('requireTLSExtensionEnabled over plain SMTP: refused locally (550, REQUIRETLS), no MAIL FROM, as Nodemailer refuses it', async () => {
    const { nm, bp } = await both('requiretls-plain', 'plain', (from) => ({ ...base(from), requireTLSExtensionEnabled: true }));
    expect(nm.result).toMatchObject({ code: 'EREQUIRETLS' });
    expect(nm.mail).toBeUndefined();
    expect(bp.mail).toBeUndefined();
    expect(bp.stored).toBeUndefined();
    expect(bp.result).toMatchObject({ code: 'EREJECTED', rejected: ['rcpt@env.test'] });
    expect(outcomeOf(bp.result, 'rcpt@env.test')).toMatchObject({ responseCode: 550, response: expect.stringMatching(/REQUIRETLS/) });
  });
});

// ---------------------------------------------------------------------------------------------
// 4. SMTPUTF8

describe.each(ENGINES)('SMTPUTF8 (RFC 6531), %s', (_engine, deliveryThread) => {
  const UTF8 = ['jos\u00e9@sizes.test', '\u7528\u6237@sizes.test'];
  const ASCII = ['ann@sizes.test', 'bob@sizes.test'];
  let without: ByteServer;
  let offering: ByteServer;
  let to: { without: Channel['transporter']; offering: Channel['transporter'] };
  beforeAll(async () => {
    without = await ByteServer.start({ size: SERVER_SIZE, hideSMTPUTF8: true });
    offering = await ByteServer.start({ size: SERVER_SIZE });
    to = {
      without: makeTransport({ deliveryThread, route: without.route }).transporter,
      offering: makeTransport({ deliveryThread, route: offering.route }).transporter,
    };
  });
  afterAll(async () => {
    await to?.without.close();
    await to?.offering.close();
    await without?.stop();
    await offering?.stop();
  });
  /**
   * An ASCII local part at an internationalised domain needs no SMTPUTF8: Nodemailer's envelope
   * (and so the result) has the domain as punycode, RCPT TO too; smtp-server reports it decoded.
   */
  const IDN = ['carl@b\u00fccher.test', 'carl@xn--bcher-kva.test'];
  const mail = (from: string) => ({ from, to: [ASCII[0], UTF8[0], ASCII[1], UTF8[1], IDN[0]], subject: 'utf8', text: 'SMTPUTF8' });

  test('to a server without SMTPUTF8: UTF-8 local parts refused locally with 553, the ASCII ones delivered; the server never sees them', async () => {
    const from = `plain-${deliveryThread}@sizes.test`;
    const info = await to.without.sendMail(mail(from));
    expect(info.accepted).toEqual([...ASCII, IDN[1]]);
    expect(info.rejected).toEqual(UTF8);
    for (const rcpt of UTF8)
      expect(outcomeOf(info, rcpt)).toMatchObject({ status: 'rejected', responseCode: 553, response: expect.stringMatching(/SMTPUTF8/) });
    const stored = without.take(from);
    expect(stored.flatMap((m) => m.rcpts.map((r) => r.address)).sort()).toEqual([...ASCII, IDN[0]].sort());
    expect(without.rcptCommands()).toContain(`RCPT TO:<${IDN[1]}>`);
    for (const message of stored) expect(message.mailArgs).not.toHaveProperty('SMTPUTF8');
    expect(without.rcptCommands().filter((line) => /[\u0080-\uffff]/.test(line))).toEqual([]);
  });

  test('a UTF-8 sender to a server without SMTPUTF8: every recipient refused locally with 553, no MAIL FROM', async () => {
    const from = `ren\u00e9-${deliveryThread}@sizes.test`;
    const err = (await settle(to.without.sendMail({ from, to: ASCII, subject: 'utf8 sender', text: 'x' }))) as BindingPoolSendError;
    expect(err).toMatchObject({ code: 'EREJECTED', rejected: ASCII });
    for (const rcpt of ASCII) expect(outcomeOf(err, rcpt)).toMatchObject({ responseCode: 553, response: expect.stringMatching(/SMTPUTF8/) });
    expect(without.mailCommands().filter((line) => line.includes(from))).toEqual([]);
  });

  test('to a server offering SMTPUTF8: every recipient delivered, MAIL FROM with SMTPUTF8', async () => {
    const from = `utf8-${deliveryThread}@sizes.test`;
    const info = await to.offering.sendMail(mail(from));
    expect(info.accepted).toEqual([ASCII[0], UTF8[0], ASCII[1], UTF8[1], IDN[1]]);
    const stored = offering.take(from);
    const utf8 = stored.find((m) => m.rcpts.some((r) => r.address === UTF8[0]))!;
    expect(utf8.rcpts.map((r) => r.address)).toEqual([ASCII[0], UTF8[0], ASCII[1], UTF8[1]]);
    expect(utf8.mailArgs).toMatchObject({ SMTPUTF8: true });
    expect(stored.flatMap((m) => m.rcpts.map((r) => r.address))).toContain(IDN[0]);
  });
});
