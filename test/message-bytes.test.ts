/**
 * The raw-message shortcut (lib/message/bytes.ts): the bytes taken without reading Nodemailer's
 * stream are the bytes the stream yields, and anything that would change them on the way (DKIM,
 * a plugin's stream transform, a newline conversion) makes the transport read the stream.
 */
import { generateKeyPairSync } from 'node:crypto';
import { Readable, Transform } from 'node:stream';
import fc from 'fast-check';
import nodemailer from 'nodemailer';
import type { MailMessage, SendMailOptions, Transport, Transporter } from 'nodemailer';
import { rawBytes, rawMessageId, readMessage } from '../lib/message/bytes';
import { closedAfterEach } from './support/harness';
import { routeTo } from './support/send';

const FUZZ_SEED = Number(process.env.FUZZ_SEED ?? 5_321);

interface Taken {
  shortcut: Buffer | undefined;
  streamed: Buffer;
}

/** A transport that sends nothing and reports both ways of getting the message's bytes. */
class CapturingTransport implements Transport<Taken> {
  readonly name = 'capture';
  readonly version = '1';
  send(mail: MailMessage<Taken>, callback: (err: Error | null, info?: Taken) => void): void {
    const shortcut = rawBytes(mail.message);
    readMessage(mail.message).then(
      (chunks) => callback(null, { shortcut, streamed: Buffer.concat(chunks) }),
      (err: Error) => callback(err),
    );
  }
}

function take(mail: SendMailOptions, setup?: (transporter: Transporter<Taken>) => void): Promise<Taken> {
  const transporter = nodemailer.createTransport(new CapturingTransport());
  setup?.(transporter);
  return transporter.sendMail({ envelope: { from: 'a@example.com', to: ['b@example.org'] }, ...mail });
}

const lineBreaky = (unit: 'binary' | 'grapheme') =>
  fc
    .array(fc.oneof(fc.string({ unit, maxLength: 20 }), fc.constantFrom('\r', '\n', '\r\n', '\n.', '\r\n.\r\n', '\u00e9', '\ud83d\ude00')), { maxLength: 30 })
    .map((parts) => parts.join(''));

describe('raw bytes without the stream', () => {
  test('equal the streamed bytes for any raw string or Buffer (fuzzed)', async () => {
    let shortcuts = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          lineBreaky('binary'),
          lineBreaky('grapheme'),
          fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)),
        ),
        async (raw) => {
          const { shortcut, streamed } = await take({ raw });
          if (shortcut === undefined) {
            // Only an empty string is not raw to Nodemailer (it composes a message instead).
            expect(raw).toBe('');
            return;
          }
          shortcuts++;
          expect(shortcut.equals(streamed)).toBe(true);
        },
      ),
      { numRuns: 1_500, seed: FUZZ_SEED },
    );
    expect(shortcuts).toBeGreaterThan(1_200);
  });

  test('a message that ends without a line break gets CRLF, one ending in CR gets LF, as from the stream', async () => {
    for (const [raw, ending] of [
      ['Subject: x\r\n\r\nbody', 'body\r\n'],
      ['Subject: x\r\n\r\nbody\r', 'body\r\n'],
      ['Subject: x\r\n\r\nbody\n', 'body\n'],
    ]) {
      const { shortcut, streamed } = await take({ raw });
      expect(shortcut?.toString().endsWith(ending)).toBe(true);
      expect(streamed.toString().endsWith(ending)).toBe(true);
    }
  });

  test('is not used when something would change the bytes: DKIM, a stream plugin, a newline option; or when raw is not bytes', async () => {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 1024 });
    const dkim = { domainName: 'example.com', keySelector: 'test', privateKey: privateKey.export({ type: 'pkcs1', format: 'pem' }).toString() };
    const raw = 'Subject: hello\r\nFrom: a@example.com\r\n\r\nbody\r\n';

    const signed = await take({ raw, dkim });
    expect(signed.shortcut).toBeUndefined();
    expect(signed.streamed.toString()).toMatch(/^DKIM-Signature: /);

    const transformed = await take({ raw }, (transporter) =>
      transporter.use('stream', (mail, done) => {
        mail.message.transform(() => new Transform({ transform: (chunk: Buffer, _enc, next) => next(null, Buffer.from(chunk.toString().toUpperCase())) }));
        done();
      }),
    );
    expect(transformed.shortcut).toBeUndefined();
    expect(transformed.streamed.toString()).toContain('SUBJECT: HELLO');

    const unix = await take({ raw, newline: 'unix' });
    expect(unix.shortcut).toBeUndefined();
    expect(unix.streamed.toString()).not.toContain('\r');

    const fromStream = await take({ raw: Readable.from([Buffer.from(raw)]) });
    expect(fromStream.shortcut).toBeUndefined();
    expect(fromStream.streamed.toString()).toBe(raw);
    expect((await take({ from: 'a@example.com', to: 'b@example.org', text: 'composed' })).shortcut).toBeUndefined();
  });
});

describe('through the transport, checked on the server', () => {
  const { startServer, transport } = closedAfterEach();

  test.each([false, true])('a DKIM-signed raw message arrives signed, a plain one byte for byte (deliveryThread: %s)', async (deliveryThread) => {
    const server = await startServer();
    const { transporter } = transport({ route: routeTo(server), deliveryThread });
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 1024 });
    const dkim = { domainName: 'example.com', keySelector: 'test', privateKey: privateKey.export({ type: 'pkcs1', format: 'pem' }).toString() };
    const raw = 'Subject: raw\r\nFrom: a@example.com\r\n\r\n.leading dot\r\nlast line without break';
    const envelope = { from: 'a@example.com', to: ['b@x.test'] };
    await transporter.sendMail({ envelope, raw });
    await transporter.sendMail({ envelope, raw, dkim });
    await transporter.close();
    await server.stop();

    const [plain, signed] = server.connections.flatMap((c) => c.transactions);
    expect(plain.text).toBe(raw + '\r\n');
    expect(signed.text).toMatch(/^DKIM-Signature: v=1; a=rsa-sha256;[^]*d=example\.com;[^]*\r\nSubject: raw\r\n/);
  });
});

describe('info.messageId of a raw message', () => {
  const { startServer, transport } = closedAfterEach();

  test('comes from the header section only, wherever its blank line is, and within the first 256 KiB', () => {
    const id = (text: string) => rawMessageId(Buffer.from(text));
    expect(id('Subject: a\nMessage-ID: <lf@example.com>\n\nbody\r\n\r\nMessage-ID: <body@example.com>\r\n')).toBe('<lf@example.com>');
    expect(id('Subject: a\r\n\r\nbody\n\nMessage-ID: <body@example.com>\n')).toBeUndefined();
    expect(id('Subject: a\r\nMessage-ID: <only-headers@example.com>')).toBe('<only-headers@example.com>');
    expect(id(`X-Long: ${'x'.repeat(300 * 1024)}\r\nMessage-ID: <too-far@example.com>\r\n\r\nbody`)).toBeUndefined();
  });

  test("is the message's own Message-ID header (folded or not); without one, Nodemailer's generated id", async () => {
    const server = await startServer();
    const { transporter } = transport({ route: routeTo(server) });
    const envelope = { from: 'a@example.com', to: ['b@x.test'] };
    const own = await transporter.sendMail({ envelope, raw: 'Subject: one\r\nmessage-id:  <one@example.com>\r\n\r\nMessage-ID: <in-body@example.com>\r\n' });
    const folded = await transporter.sendMail({ envelope, raw: 'Subject: two\r\nMessage-ID:\r\n <two@example.com>\r\n\r\nbody\r\n' });
    const unixLines = await transporter.sendMail({ envelope, raw: Buffer.from('Subject: three\nMessage-ID: <three@example.com>\n\nbody\n') });
    const none = await transporter.sendMail({ envelope, raw: 'Subject: four\r\n\r\nMessage-ID: <in-body@example.com>\r\n' });
    const composed = await transporter.sendMail({ from: 'a@example.com', to: 'b@x.test', subject: 'five', text: 'composed' });
    await transporter.close();
    await server.stop();

    expect([own.messageId, folded.messageId, unixLines.messageId]).toEqual(['<one@example.com>', '<two@example.com>', '<three@example.com>']);
    expect(none.messageId).toMatch(/^<[0-9a-f-]+@[^>]+>$/);
    expect(none.messageId).not.toBe('<in-body@example.com>');
    const texts = server.connections.flatMap((c) => c.transactions).map((t) => t.text ?? '');
    expect(texts[4]).toContain(`Message-ID: ${composed.messageId}`);
  });
});
