/**
 * `nodemailer-binding-pool/queue`: a durable delivery queue on BullMQ (optional peers bullmq and
 * ioredis). MailQueue stores messages, MailWorker delivers them through a BindingPoolTransport
 * and retries what is left, MailQueueEvents reports final outcomes across processes.
 */
export { MailQueue } from './mail-queue';
export type { AddOptions, QueuedMail } from './mail-queue';
export { MailWorker } from './mail-worker';
export { MailQueueEvents } from './events';
export type { MailQueueEventsOptions } from './events';
export { DEFAULT_RETRY_SCHEDULE, DEFAULT_MAX_AGE, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_KEEP_FINISHED, DEFAULT_CONCURRENCY } from './options';
export type { Duration, MailQueueOptions, MailWorkerOptions } from './options';
export type { FinalEvent, FinalFailure, MailOutcome, QueuedRecipientState } from './outcome';
export type { FinalStatus, QueuedStatus } from './record';
export type { QueueConnection } from './redis';
