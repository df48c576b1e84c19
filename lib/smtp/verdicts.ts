/**
 * The rule that turns what happened in one SMTP or LMTP transaction into one verdict per
 * recipient. Pure: it reads plain facts (replies, where the transaction ended, how far the
 * message got) and knows nothing of sockets or pools; test/verdict-table.test.ts walks its cases.
 *
 * The one question that matters for duplicates: could the server have the message? Only when
 * the final dot left this process and no reply to it came. Before that point a broken or timed
 * out connection means the server has nothing, and the recipient is safe to send again.
 */

/**
 * What happened to one recipient in one transaction:
 * - delivered: accepted at RCPT and the server accepted the message (LMTP: its own reply);
 * - rejected: a 5xx for it (at RCPT, or for the whole transaction), or refused locally;
 * - deferred: a 4xx for it; the server's verdict, not a broken connection;
 * - retry: the connection broke, timed out or got a 421 before the server took the message:
 *   safe to send again on another connection;
 * - unknown: the final dot went out but the connection ended before the reply; the server
 *   may have it, so it must not be sent again.
 */
export type RecipientVerdict = 'delivered' | 'rejected' | 'deferred' | 'retry' | 'unknown';

export interface RecipientReply {
  rcpt: string;
  verdict: RecipientVerdict;
  /** The server's reply, or what ended the transaction. */
  response: string;
  responseCode?: number;
}

/** A reply from the server: its code and full text. */
export interface ServerReply {
  code: number;
  response: string;
}

/** How far the message itself got. */
export type MessageProgress =
  /** DATA was not answered with 354 (or not sent): no byte of the message went out. */
  | 'none'
  /** Some of the message was handed to the socket, but not the final dot. */
  | 'partial'
  /** The final dot left this process. */
  | 'sent';

/** What ended a transaction that did not complete. */
export type TransactionFailure =
  /** The server answered a command with an error: MAIL FROM, RCPT TO (every one refused), DATA, or the final dot. */
  | { kind: 'reply'; command: 'MAIL FROM' | 'RCPT TO' | 'DATA' | 'MESSAGE'; reply: ServerReply }
  /**
   * The connection broke, timed out, or closed (a 421 the server sent as it went counts as a
   * reply here). `peerReset`: the peer reset it (ECONNRESET). A TCP stack resets a connection it
   * closes with received bytes still unread; nothing follows the final dot until its reply, so a
   * reset means the dot was never read and the server cannot have taken the message.
   */
  | { kind: 'broken'; message: string; reply?: ServerReply; peerReset?: boolean }
  /** Refused here before anything was sent for it (SIZE, SMTPUTF8, REQUIRETLS): a final local verdict. */
  | { kind: 'refused'; response: string; code: number };

export interface TransactionFacts {
  rcpts: readonly string[];
  lmtp: boolean;
  /** Recipients the server accepted at RCPT TO. */
  rcptAccepted: readonly string[];
  /** RCPT TO replies that refused a recipient. */
  rcptRefused: ReadonlyMap<string, ServerReply>;
  /** LMTP: the per-recipient replies to the final dot that arrived, by recipient. */
  lmtpReplies: ReadonlyMap<string, ServerReply>;
  /** SMTP: the reply to the final dot, when the transaction completed. */
  finalReply?: ServerReply;
  /** Set when the transaction did not complete. */
  failure?: TransactionFailure;
  message: MessageProgress;
}

/** 421: the server is closing the connection; it says nothing about the message or recipient. */
const CLOSING = 421;

/** One verdict per recipient, in the order of `facts.rcpts`. */
export function decideVerdicts(facts: TransactionFacts): RecipientReply[] {
  const { failure } = facts;
  if (failure?.kind === 'refused') return facts.rcpts.map((rcpt) => ({ rcpt, verdict: 'rejected', response: failure.response, responseCode: failure.code }));
  // A refused MAIL FROM decides everyone: with PIPELINING the RCPT replies behind it (503 "need
  // MAIL command") say nothing about the recipients.
  if (failure?.kind === 'reply' && failure.command === 'MAIL FROM') return facts.rcpts.map((rcpt) => fromReply(rcpt, failure.reply));
  // The common case: the message accepted, no recipient refused.
  if (!failure && !facts.lmtp && facts.rcptRefused.size === 0 && facts.finalReply && facts.finalReply.code < 300) {
    const reply = facts.finalReply;
    if (facts.rcptAccepted.length === facts.rcpts.length) return facts.rcpts.map((rcpt) => delivered(rcpt, reply));
  }
  const accepted = new Set(facts.rcptAccepted);
  return facts.rcpts.map((rcpt) => {
    const refused = facts.rcptRefused.get(rcpt);
    if (refused) return fromReply(rcpt, refused);
    if (!accepted.has(rcpt)) return missingReply(rcpt, failure);
    return afterRcpt(rcpt, facts);
  });
}

/** A recipient the server accepted at RCPT: what the message's fate means for it. */
function afterRcpt(rcpt: string, facts: TransactionFacts): RecipientReply {
  const { failure } = facts;
  if (facts.lmtp) {
    const own = facts.lmtpReplies.get(rcpt);
    if (own) return own.code < 300 ? delivered(rcpt, own) : fromReply(rcpt, own);
  } else if (!failure && facts.finalReply) {
    return facts.finalReply.code < 300 ? delivered(rcpt, facts.finalReply) : fromReply(rcpt, facts.finalReply);
  }
  if (failure?.kind === 'reply') return fromReply(rcpt, failure.reply);
  if (failure?.kind === 'broken' && failure.reply) return fromReply(rcpt, failure.reply);
  const why = failure?.kind === 'broken' ? failure.message : 'the transaction ended without a reply';
  // Any LMTP reply to the dot proves the server read it: a reset after that proves nothing.
  if (facts.message === 'sent' && failure?.kind === 'broken' && failure.peerReset && facts.lmtpReplies.size === 0) {
    return { rcpt, verdict: 'retry', response: `${why} (the server reset the connection with the end of the message unread)` };
  }
  if (facts.message === 'sent') {
    return { rcpt, verdict: 'unknown', response: `outcome unknown: the message was sent but the connection ended before the server's reply (${why})` };
  }
  return { rcpt, verdict: 'retry', response: `${why} (${facts.message === 'none' ? 'before the message was sent' : 'before the end of the message'})` };
}

/** A recipient with no RCPT reply of its own: it was not sent, or the reply never came. */
function missingReply(rcpt: string, failure: TransactionFailure | undefined): RecipientReply {
  if (failure?.kind === 'reply' && failure.reply.code !== CLOSING && failure.command !== 'MESSAGE') return fromReply(rcpt, failure.reply);
  const reply = failure?.kind === 'reply' || failure?.kind === 'broken' ? failure.reply : undefined;
  if (reply) return fromReply(rcpt, reply);
  const why = failure?.kind === 'broken' ? failure.message : 'no reply to RCPT TO';
  return { rcpt, verdict: 'retry', response: why };
}

function delivered(rcpt: string, reply: ServerReply): RecipientReply {
  return { rcpt, verdict: 'delivered', response: reply.response, responseCode: reply.code };
}

/** A server reply as a verdict: 421 only closes the connection, 4xx defers, 5xx rejects. */
function fromReply(rcpt: string, reply: ServerReply): RecipientReply {
  const verdict = reply.code === CLOSING ? 'retry' : reply.code >= 500 ? 'rejected' : reply.code >= 400 ? 'deferred' : 'delivered';
  return { rcpt, verdict, response: reply.response, responseCode: reply.code };
}

/**
 * The server's 4xx/5xx replies in a transaction, each text once, in the order they came: what
 * reply rules read (shaping/reply-rules.ts). A refusal made here (SIZE, SMTPUTF8) and a
 * connection that broke without a reply are not the server's and are not in it.
 */
export function serverRefusals(facts: TransactionFacts): string[] {
  const found = new Set<string>();
  const add = (reply: ServerReply | undefined): void => {
    if (reply && reply.code >= 400) found.add(reply.response);
  };
  for (const reply of facts.rcptRefused.values()) add(reply);
  for (const reply of facts.lmtpReplies.values()) add(reply);
  add(facts.finalReply);
  const { failure } = facts;
  if (failure?.kind === 'reply' || failure?.kind === 'broken') add(failure.reply);
  return [...found];
}
