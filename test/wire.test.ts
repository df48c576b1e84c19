/**
 * The direct write path (lib/smtp-internals.ts): a message goes to the socket without the
 * DataStream's scan only when that scan would change nothing. Checked against the DataStream
 * itself on random messages made of the bytes that matter (CR, LF, dot) and ordinary ones.
 */
import fc from 'fast-check';
import DataStream from 'nodemailer/lib/smtp-connection/data-stream';
import { wireReady } from '../lib/smtp-internals';

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

test('wireReady(bytes) holds exactly when the DataStream would send the bytes unchanged, ending in CRLF (3 000 runs)', async () => {
  const byte = fc.constantFrom(0x0d, 0x0a, 0x2e, 0x41, 0x20);
  await fc.assert(
    fc.asyncProperty(fc.array(byte, { maxLength: 40 }), async (values) => {
      const bytes = Buffer.from(values);
      const unchanged = (await dataStreamOutput(bytes)).equals(Buffer.concat([bytes, DOT_LINE]));
      const endsInCrlf = bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a;
      expect(wireReady(bytes)).toBe(unchanged && endsInCrlf);
    }),
    { numRuns: 3_000, seed: 7_321 },
  );
});

test.each([
  ['a composed-style message', 'From: a@b\r\nSubject: x\r\n\r\nhello\r\n', true],
  ['a line that starts with a dot', 'Subject: x\r\n\r\n.hidden\r\n', false],
  ['a dot as the very first byte', '.\r\n', false],
  ['a bare LF', 'Subject: x\n\r\nbody\r\n', false],
  ['a bare CR', 'Subject: x\r\rbody\r\n', false],
  ['no final line break', 'Subject: x\r\n\r\nbody', false],
])('%s', (_what, text, expected) => {
  expect(wireReady(Buffer.from(text))).toBe(expected);
});
