/**
 * Turns the mail an application hands to `add()` into what the queue stores: the message's
 * bytes (composed once, by Nodemailer's own stream transport, so every attempt sends the same
 * bytes with the same Message-ID), its envelope and its binding choice.
 */
import nodemailer, { type SendMailOptions } from 'nodemailer';
import { BindingPoolError, describeError } from '../errors';
import { assertCleanAddressFields, assertNoInjection, groupByDomain } from '../message/recipients';
import type { BindingChoice } from '../policy/options';
import type { MailRecord } from './record';

export interface ComposedMail {
  bytes: Buffer;
  record: MailRecord;
}

type StreamInfo = { envelope: { from: string | false; to: string[] }; messageId: string; message: Buffer };

/** Composes into one Buffer with CRLF line ends (the form SMTP sends). */
const composer = nodemailer.createTransport({ streamTransport: true, buffer: true, newline: 'windows' });

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
  let info: StreamInfo;
  try {
    info = (await composer.sendMail(mail)) as unknown as StreamInfo;
  } catch (err) {
    throw new BindingPoolError('EMESSAGE', `the message could not be built: ${describeError(err)}; nothing was queued`, { cause: err });
  }
  const from = info.envelope.from;
  if (typeof from === 'string') assertNoInjection(from, 'sender');
  const { byDomain, invalid } = groupByDomain(info.envelope.to);
  const addresses = [...[...byDomain.values()].flat().map((r) => r.address), ...invalid.map((r) => r.address)];
  if (addresses.length === 0) throw new BindingPoolError('ENORECIPIENTS', 'the message has no recipients; nothing was queued');
  const bytes = info.message;
  if (bytes.length > maxMessageSize)
    throw new BindingPoolError('ESIZE', `the message is ${bytes.length} bytes, over the queue's maxMessageSize of ${maxMessageSize}; nothing was queued`);
  const record: MailRecord = {
    version: 1,
    messageId: info.messageId,
    from,
    size: bytes.length,
    addedAt: times.addedAt,
    expiresAt: times.expiresAt,
    recipients: addresses.map((address) => ({ address, status: 'queued', attempts: 0, nextAttemptAt: times.dueAt })),
  };
  if (mail.binding !== undefined) record.binding = mail.binding;
  if (mail.bindingGroup !== undefined) record.bindingGroup = mail.bindingGroup;
  if (mail.dsn) record.dsn = mail.dsn;
  return { bytes, record };
}
