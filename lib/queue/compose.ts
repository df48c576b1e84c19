/**
 * Turns the mail an application hands to `add()` into what the queue stores: the message's
 * bytes (composed once, by Nodemailer's own stream transport, so every attempt sends the same
 * bytes with the same Message-ID), its envelope and its binding choice.
 */
import { randomUUID } from 'node:crypto';
import nodemailer, { type SendMailOptions, type SentMessageInfo, type Transport } from 'nodemailer';
import type MailMessage from 'nodemailer/lib/mailer/mail-message';
import { BindingPoolError, describeError } from '../errors';
import { rawBytes, rawMessageId, readMessage } from '../message/bytes';
import { ConcurrencyLimit, MAX_CONCURRENT_READS } from '../message/concurrency';
import { assertCleanAddressFields, assertNoInjection, domainGroups } from '../message/recipients';
import type { BindingChoice } from '../policy/options';
import type { MailRecord } from './record';

export interface ComposedMail {
  bytes: Buffer;
  record: MailRecord;
}

interface Built {
  envelope: { from: string | false; to: string[] };
  messageId: string;
  bytes: Buffer;
}

/** Messages built at once: an addBulk() of many with attachments reads a few at a time, as the transport does. */
const reads = new ConcurrencyLimit(MAX_CONCURRENT_READS);

/**
 * A Nodemailer transport that only builds: what sendMail() would put on the wire through this
 * package's transport (Bcc left out of the headers, Nodemailer's plugins applied), read into one
 * Buffer. A raw message without a Message-ID gets one here, so that every attempt, and every
 * report, carries the same.
 */
const builder: Transport<SentMessageInfo> = {
  name: 'BindingPoolQueueBuilder',
  version: '1',
  send(mail: MailMessage<SentMessageInfo>, callback: (err: Error | null, info: Built) => void): void {
    const envelope = mail.message.getEnvelope() as Built['envelope'];
    const raw = rawBytes(mail.message);
    const reading = raw ? Promise.resolve([raw]) : reads.run(() => readMessage(mail.message));
    reading.then(
      (chunks) => {
        let bytes = Buffer.concat(chunks);
        let messageId = mail.data.raw !== undefined ? rawMessageId(bytes) : mail.message.messageId();
        if (messageId === undefined) {
          messageId = mail.message.messageId();
          bytes = Buffer.concat([Buffer.from(`Message-ID: ${messageId}\r\n`), bytes]);
        }
        callback(null, { envelope, messageId, bytes });
      },
      (err: Error) => callback(err, undefined as never),
    );
  },
};
const composer = nodemailer.createTransport(builder);

/** When a message is added, when it is first due (later with a delay), and when its undelivered recipients expire. */
export interface QueueTimes {
  addedAt: number;
  dueAt: number;
  expiresAt: number;
}

export async function compose(mail: SendMailOptions & BindingChoice, times: QueueTimes, maxMessageSize: number): Promise<ComposedMail> {
  if (typeof mail !== 'object' || mail === null)
    throw new BindingPoolError('EMESSAGE', 'add() takes a message object (Nodemailer’s sendMail() fields); nothing was queued');
  // The checks the transport makes before a byte goes out, made before anything is stored.
  assertCleanAddressFields(mail);
  let info: Built;
  try {
    info = (await composer.sendMail(mail)) as unknown as Built;
  } catch (err) {
    throw new BindingPoolError('EMESSAGE', `the message could not be built: ${describeError(err)}; nothing was queued`, { cause: err });
  }
  const from = info.envelope.from;
  if (typeof from === 'string') assertNoInjection(from, 'sender');
  const addresses = domainGroups(info.envelope.to).flat();
  if (addresses.length === 0) throw new BindingPoolError('ENORECIPIENTS', 'the message has no recipients; nothing was queued');
  const { bytes } = info;
  if (bytes.length > maxMessageSize)
    throw new BindingPoolError('ESIZE', `the message is ${bytes.length} bytes, over the queue's maxMessageSize of ${maxMessageSize}; nothing was queued`);
  const record: MailRecord = {
    version: 1,
    messageId: info.messageId,
    from,
    size: bytes.length,
    // Each add's bytes have a key of their own: a job id used again later, or twice at once,
    // never meets another add's bytes.
    bytesKey: randomUUID(),
    addedAt: times.addedAt,
    expiresAt: times.expiresAt,
    recipients: addresses.map((address) => ({ address, status: 'queued', attempts: 0, nextAttemptAt: times.dueAt })),
  };
  if (mail.binding !== undefined) record.binding = mail.binding;
  if (mail.bindingGroup !== undefined) record.bindingGroup = mail.bindingGroup;
  if (mail.dsn) record.dsn = mail.dsn;
  return { bytes, record };
}
