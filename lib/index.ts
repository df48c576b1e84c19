export { BindingPoolTransport, VERSION } from './transport';
export type { BindingPoolSentMessageInfo, BindingPoolSendError, TransportStats } from './transport';
export type { DomainResult, RecipientOutcome, RecipientStatus } from './delivery';
export type { ConnectionSummary, PoolStats } from './pool-registry';
export type { RetireReason } from './connection';
export { BindingPoolError, ConfigError } from './errors';
export type { BindingPoolErrorCode } from './errors';
export type {
  BindingPoolOptions,
  BindingOptions,
  BindingGroupOptions,
  BindingChoice,
  DomainOptions,
  RouteOptions,
  RouteAuth,
  ScopedOptions,
} from './options';

// A message may name its binding or binding group in sendMail() without a cast.
declare module 'nodemailer/lib/mailer' {
  interface SendMailOptions {
    /** Send from this binding. */
    binding?: string;
    /** Send from this binding group (round-robin over its bindings). */
    bindingGroup?: string;
  }
}
