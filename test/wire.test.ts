/**
 * The wire form (lib/message/bytes.ts): each message is dot-stuffed and given CRLF line ends once,
 * where it is built, from the chunks it was read in, and then written to the socket without the
 * DataStream's scan (lib/smtp/internals.ts). Checked against SMTPConnection's DataStream itself
 * on random messages made of the bytes that matter (CR, LF, dot) and ordinary ones, cut into
 * chunks at random places.
 */
import fc from 'fast-check';
import DataStream from 'nodemailer/lib/smtp-connection/data-stream';
import { toWireForm } from '../lib/message/bytes';

/** What SMTPConnection's DataStream puts on the wire for these bytes, final dot included. */
function dataStreamOutput(bytes: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const stream = new DataStream();
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.on('end', () => resolve(Buffer.concat(chunks)));
    stream.end(bytes);
  });
}

const DOT_LINE = Buffer.from('.\r\n');
const byte = fc.constantFrom(0x0d, 0x0a, 0x2e, 0x41, 0x20);

/** The bytes cut at the given places (empty chunks included). */
function cut(bytes: Buffer, places: number[]): Buffer[] {
  const at = [...new Set(places.map((p) => p % (bytes.length + 1)))].sort((a, b) => a - b);
  return [0, ...at].map((start, i) => bytes.subarray(start, i < at.length ? at[i] : bytes.length));
}

test('toWireForm(chunks) + ".\\r\\n" is what the DataStream sends, however the message is cut; SIZE counts no doubled dot (5 000 runs)', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(byte, { maxLength: 40 }), fc.array(fc.nat(), { maxLength: 5 }), async (values, places) => {
      const bytes = Buffer.from(values);
      const { wire, size } = toWireForm(cut(bytes, places));
      expect(Buffer.concat([wire, DOT_LINE]).toString('latin1')).toBe((await dataStreamOutput(bytes)).toString('latin1'));
      // RFC 1870: SIZE counts CRLF line ends but not the doubled dots.
      expect(size).toBe(wire.toString('latin1').replace(/(^|\n)\.\./g, '$1.').length);
    }),
    { numRuns: 5_000, seed: 7_322 },
  );
});

test('one chunk that needs no change comes back as it is, not copied (3 000 runs)', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(byte, { maxLength: 40 }), async (values) => {
      const bytes = Buffer.from(values);
      const unchanged = (await dataStreamOutput(bytes)).equals(Buffer.concat([bytes, DOT_LINE]));
      const endsInCrlf = bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a;
      expect(toWireForm([bytes]).wire === bytes).toBe(unchanged && endsInCrlf);
    }),
    { numRuns: 3_000, seed: 7_321 },
  );
});

test.each([
  ['a composed-style message', 'From: a@b\r\nSubject: x\r\n\r\nhello\r\n', 'From: a@b\r\nSubject: x\r\n\r\nhello\r\n'],
  ['a line that starts with a dot', 'Subject: x\r\n\r\n.hidden\r\n', 'Subject: x\r\n\r\n..hidden\r\n'],
  ['a dot as the very first byte', '.\r\n', '..\r\n'],
  ['bare LFs, as composed text parts keep them', 'Subject: x\n\nline\n.dot\n', 'Subject: x\r\n\r\nline\r\n..dot\r\n'],
  ['a bare CR', 'Subject: x\r\rbody\r\n', 'Subject: x\r\n\r\nbody\r\n'],
  ['no final line break', 'Subject: x\r\n\r\nbody', 'Subject: x\r\n\r\nbody\r\n'],
])('%s', (_what, text, wire) => {
  expect(toWireForm([Buffer.from(text)]).wire.toString('latin1')).toBe(wire);
});
