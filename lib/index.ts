export { BindingPoolTransport, VERSION } from './transport';
export type { BindingPoolSentMessageInfo, BindingPoolSendError, TransportStats } from './transport';
export type { ConnectionUse, DomainResult, RecipientOutcome, RecipientStatus } from './delivery/deliver';
export type { ConnectionSummary, DroppedPoolTotals, PoolStats } from './pool/registry';
export type { RetireReason } from './smtp/connection';
export { BindingPoolError, ConfigError } from './errors';
export { DEFAULT_REPLY_RULES } from './shaping/reply-rules';
export type { ReplyRule, ReplyRuleSettings } from './shaping/reply-rules';
export type { WarmupPlan, WarmupStep } from './shaping/warmup';
export type { ShapingStats, SuspensionEvent } from './policy/pair-policy';
export type { RateStats } from './policy/policy-registry';
export type { CoordinationOptions } from './coordination/redis-store';
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
  TlsPolicy,
} from './policy/options';

// A message may name its binding or binding group in sendMail() without a cast. The build copies
// this block into dist/esm/index.d.mts (scripts/build.mjs): Nodemailer has separate declarations
// for `import` and `require`, and each entry point's types must augment the copy they resolve to.
declare module 'nodemailer/lib/mailer' {
  interface SendMailOptions {
    /** Send from this binding. */
    binding?: string;
    /** Send from this binding group (round-robin over its bindings). */
    bindingGroup?: string;
  }
}
