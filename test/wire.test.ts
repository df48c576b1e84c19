/**
 * The wire form (lib/message-bytes.ts): each message is dot-stuffed and given CRLF line ends once,
 * where it is built, and then written to the socket without the DataStream's scan
 * (lib/smtp-internals.ts). Checked against the DataStream itself on random messages made of the
 * bytes that matter (CR, LF, dot) and ordinary ones.
 */
import fc from 'fast-check';
import DataStream from 'nodemailer/lib/smtp-connection/data-stream';
import { isWireForm, toWireForm } from '../lib/message-bytes';

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

test('isWireForm(bytes) holds exactly when the DataStream would send the bytes unchanged, ending in CRLF (3 000 runs)', async () => {
  const byte = fc.constantFrom(0x0d, 0x0a, 0x2e, 0x41, 0x20);
  await fc.assert(
    fc.asyncProperty(fc.array(byte, { maxLength: 40 }), async (values) => {
      const bytes = Buffer.from(values);
      const unchanged = (await dataStreamOutput(bytes)).equals(Buffer.concat([bytes, DOT_LINE]));
      const endsInCrlf = bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a;
      expect(isWireForm(bytes)).toBe(unchanged && endsInCrlf);
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
  expect(isWireForm(Buffer.from(text))).toBe(expected);
});

describe('toWireForm: the message as the DataStream would send it, built once', () => {
  test('toWireForm(bytes) + ".\\r\\n" equals the DataStream output (3 000 runs)', async () => {
    const byte = fc.constantFrom(0x0d, 0x0a, 0x2e, 0x41, 0x20);
    await fc.assert(
      fc.asyncProperty(fc.array(byte, { maxLength: 40 }), async (values) => {
        const bytes = Buffer.from(values);
        const { wire, size } = toWireForm(bytes);
        expect(Buffer.concat([wire, DOT_LINE]).toString('latin1')).toBe((await dataStreamOutput(bytes)).toString('latin1'));
        // RFC 1870: SIZE counts CRLF line ends but not the doubled dots.
        expect(size).toBe(wire.toString('latin1').replace(/(^|\n)\.\./g, '$1.').length);
      }),
      { numRuns: 3_000, seed: 7_322 },
    );
  });

  test('a wire-ready message comes back as it is, not copied', () => {
    const bytes = Buffer.from('Subject: x\r\n\r\nbody\r\n');
    expect(toWireForm(bytes)).toEqual({ wire: bytes, size: bytes.length });
    expect(toWireForm(bytes).wire).toBe(bytes);
  });
});
