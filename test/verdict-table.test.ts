/**
 * decideVerdicts (lib/smtp/verdicts.ts) walked through a table: one row per way an SMTP or LMTP
 * transaction can end, with the verdict every recipient must get (and the reply code, where the
 * server gave one). The facts are written as smtp/connection.ts builds them from Nodemailer's
 * SMTPConnection: RCPT replies, the final reply or per-recipient LMTP replies, the failure
 * (failureOf) and how far the message got (MessageHandover.progress).
 */
import {
  decideVerdicts,
  type MessageProgress,
  type RecipientVerdict,
  type ServerReply,
  type TransactionFacts,
  type TransactionFailure,
} from '../lib/smtp/verdicts';

const TEXT: Record<number, string> = {
  250: '2.0.0 Ok: queued',
  354: 'End data with <CR><LF>.<CR><LF>',
  421: '4.4.2 closing connection',
  450: '4.2.1 mailbox busy',
  451: '4.7.1 greylisted, try again later',
  452: '4.5.3 too many recipients',
  503: '5.5.1 Error: need MAIL command',
  550: '5.1.1 no such user',
  552: '5.3.4 message of 9000 bytes is larger than the server limit of 1000 bytes (SIZE); not sent',
  554: '5.7.1 message refused',
};

const reply = (code: number): ServerReply => ({ code, response: `${code} ${TEXT[code] ?? 'reply'}` });
/** `{ b: 550 }`: the replies by recipient. */
const replies = (codes: Record<string, number>): Map<string, ServerReply> => new Map(Object.entries(codes).map(([rcpt, code]) => [rcpt, reply(code)]));

const failed = {
  reply: (command: 'MAIL FROM' | 'RCPT TO' | 'DATA' | 'MESSAGE', code: number): TransactionFailure => ({ kind: 'reply', command, reply: reply(code) }),
  /** Nodemailer's "Connection closed unexpectedly" (a FIN), or its socket timeout. */
  closed: (extra: { peerReset?: boolean; remainder?: number; message?: string } = {}): TransactionFailure => ({
    kind: 'broken',
    message: extra.message ?? 'Connection closed unexpectedly',
    ...(extra.remainder !== undefined ? { reply: reply(extra.remainder) } : {}),
    ...(extra.peerReset ? { peerReset: true } : {}),
  }),
  refused: (code: number, response: string): TransactionFailure => ({ kind: 'refused', code, response }),
};

interface Row {
  name: string;
  facts: TransactionFacts;
  /** Per recipient, in order: `'delivered 250'`, `'retry'` (no code), `'unknown'`… */
  expected: Record<string, string>;
}

/** Facts with defaults: SMTP, recipients a b c all accepted at RCPT, nothing refused, dot sent. */
function facts(over: Partial<TransactionFacts> & { rcpts?: readonly string[] } = {}): TransactionFacts {
  const rcpts = over.rcpts ?? ['a', 'b', 'c'];
  const rcptRefused = over.rcptRefused ?? new Map();
  return {
    rcpts,
    lmtp: false,
    rcptAccepted: rcpts.filter((r) => !rcptRefused.has(r)),
    rcptRefused,
    lmtpReplies: new Map(),
    message: 'sent' as MessageProgress,
    ...over,
  };
}
const lmtp = (over: Partial<TransactionFacts> & { rcpts?: readonly string[] } = {}): TransactionFacts => facts({ lmtp: true, ...over });
/** LMTP: the RCPT-accepted recipients plus those answered after the dot (smtp/connection.ts adds them back). */
const lmtpAnswered = (codes: Record<string, number>) => ({ lmtpReplies: replies(codes) });

const SIZE = '552 5.3.4 message of 9000 bytes is larger than the server limit of 1000 bytes (SIZE); not sent';
const REQUIRETLS = '550 5.7.30 REQUIRETLS: Server does not support REQUIRETLS extension (RFC 8689); not sent';

const rows: Row[] = [
  // ---- SMTP: the server answered everything
  { name: 'SMTP: all accepted, dot 250', facts: facts({ finalReply: reply(250) }), expected: { a: 'delivered 250', b: 'delivered 250', c: 'delivered 250' } },
  {
    name: 'SMTP: RCPT 550 for b among accepted, dot 250',
    facts: facts({ rcptRefused: replies({ b: 550 }), finalReply: reply(250) }),
    expected: { a: 'delivered 250', b: 'rejected 550', c: 'delivered 250' },
  },
  {
    name: 'SMTP: RCPT 450 for b among accepted, dot 250',
    facts: facts({ rcptRefused: replies({ b: 450 }), finalReply: reply(250) }),
    expected: { a: 'delivered 250', b: 'deferred 450', c: 'delivered 250' },
  },
  {
    name: 'SMTP: RCPT 452 (too many recipients) for c, dot 250',
    facts: facts({ rcptRefused: replies({ c: 452 }), finalReply: reply(250) }),
    expected: { a: 'delivered 250', b: 'delivered 250', c: 'deferred 452' },
  },
  {
    name: 'SMTP: RCPT 550 / 450 / 452 and one accepted, dot 250',
    facts: facts({ rcpts: ['a', 'b', 'c', 'd'], rcptRefused: replies({ a: 550, b: 450, c: 452 }), finalReply: reply(250) }),
    expected: { a: 'rejected 550', b: 'deferred 450', c: 'deferred 452', d: 'delivered 250' },
  },
  {
    name: 'SMTP: every RCPT refused 550 (Nodemailer fails the envelope at RCPT TO)',
    facts: facts({ rcptRefused: replies({ a: 550, b: 550, c: 550 }), failure: failed.reply('RCPT TO', 550), message: 'none' }),
    expected: { a: 'rejected 550', b: 'rejected 550', c: 'rejected 550' },
  },
  {
    name: 'SMTP: every RCPT refused, 550 / 450 / 452: each keeps its own reply',
    facts: facts({ rcptRefused: replies({ a: 550, b: 450, c: 452 }), failure: failed.reply('RCPT TO', 450), message: 'none' }),
    expected: { a: 'rejected 550', b: 'deferred 450', c: 'deferred 452' },
  },
  // ---- SMTP: MAIL FROM refused, with PIPELINING the RCPTs behind it answered 503
  {
    name: 'SMTP: MAIL FROM 451, pipelined RCPTs 503: MAIL FROM decides (deferred)',
    facts: facts({ rcptRefused: replies({ a: 503, b: 503, c: 503 }), failure: failed.reply('MAIL FROM', 451), message: 'none' }),
    expected: { a: 'deferred 451', b: 'deferred 451', c: 'deferred 451' },
  },
  {
    name: 'SMTP: MAIL FROM 550, pipelined RCPTs 503: MAIL FROM decides (rejected)',
    facts: facts({ rcptRefused: replies({ a: 503, b: 503, c: 503 }), failure: failed.reply('MAIL FROM', 550), message: 'none' }),
    expected: { a: 'rejected 550', b: 'rejected 550', c: 'rejected 550' },
  },
  {
    name: 'SMTP: MAIL FROM 421 (server closing): retry elsewhere',
    facts: facts({ rcptAccepted: [], failure: failed.reply('MAIL FROM', 421), message: 'none' }),
    expected: { a: 'retry 421', b: 'retry 421', c: 'retry 421' },
  },
  // ---- SMTP: DATA command refused (no byte of the message went out)
  {
    name: 'SMTP: DATA command 554, b refused 550 at RCPT',
    facts: facts({ rcptRefused: replies({ b: 550 }), failure: failed.reply('DATA', 554), message: 'none' }),
    expected: { a: 'rejected 554', b: 'rejected 550', c: 'rejected 554' },
  },
  {
    name: 'SMTP: DATA command 421: retry elsewhere',
    facts: facts({ failure: failed.reply('DATA', 421), message: 'none' }),
    expected: { a: 'retry 421', b: 'retry 421', c: 'retry 421' },
  },
  // ---- SMTP: the reply to the final dot
  {
    name: 'SMTP: dot 451: deferred',
    facts: facts({ failure: failed.reply('MESSAGE', 451) }),
    expected: { a: 'deferred 451', b: 'deferred 451', c: 'deferred 451' },
  },
  {
    name: 'SMTP: dot 554, b refused 550 at RCPT',
    facts: facts({ rcptRefused: replies({ b: 550 }), failure: failed.reply('MESSAGE', 554) }),
    expected: { a: 'rejected 554', b: 'rejected 550', c: 'rejected 554' },
  },
  {
    name: 'SMTP: dot 421 is a reply (not taken): retry elsewhere',
    facts: facts({ failure: failed.reply('MESSAGE', 421) }),
    expected: { a: 'retry 421', b: 'retry 421', c: 'retry 421' },
  },
  // ---- SMTP: the connection broke
  {
    name: 'SMTP: broken before any RCPT reply (message none)',
    facts: facts({ rcptAccepted: [], failure: failed.closed(), message: 'none' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: broken during RCPT: a accepted, b 550, c unanswered (message none)',
    facts: facts({ rcptAccepted: ['a'], rcptRefused: replies({ b: 550 }), failure: failed.closed(), message: 'none' }),
    expected: { a: 'retry', b: 'rejected 550', c: 'retry' },
  },
  {
    name: 'SMTP: broken after RCPT, before the 354 (message none)',
    facts: facts({ failure: failed.closed(), message: 'none' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: reset before the 354 (message none, peerReset)',
    facts: facts({ failure: failed.closed({ peerReset: true }), message: 'none' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: broken in the middle of the message (partial)',
    facts: facts({ failure: failed.closed(), message: 'partial' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: reset in the middle of the message (partial, peerReset)',
    facts: facts({ failure: failed.closed({ peerReset: true }), message: 'partial' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: closed after the dot left, no reply (sent): outcome unknown',
    facts: facts({ failure: failed.closed(), message: 'sent' }),
    expected: { a: 'unknown', b: 'unknown', c: 'unknown' },
  },
  {
    name: 'SMTP: socket timeout waiting for the dot reply (sent): outcome unknown',
    facts: facts({ failure: failed.closed({ message: 'Timeout' }), message: 'sent' }),
    expected: { a: 'unknown', b: 'unknown', c: 'unknown' },
  },
  {
    name: 'SMTP: reset after the dot (sent, peerReset): the dot was unread, retry',
    facts: facts({ failure: failed.closed({ peerReset: true }), message: 'sent' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'SMTP: closed before the 354 with a 421 remainder (message none)',
    facts: facts({ rcptAccepted: ['a', 'b'], failure: failed.closed({ remainder: 421 }), message: 'none' }),
    expected: { a: 'retry 421', b: 'retry 421', c: 'retry 421' },
  },
  {
    name: 'SMTP: closed mid-message with a 421 remainder (partial)',
    facts: facts({ failure: failed.closed({ remainder: 421 }), message: 'partial' }),
    expected: { a: 'retry 421', b: 'retry 421', c: 'retry 421' },
  },
  {
    name: 'SMTP: closed after the dot with a 421 remainder (sent), b refused 550 at RCPT',
    facts: facts({ rcptRefused: replies({ b: 550 }), failure: failed.closed({ remainder: 421 }), message: 'sent' }),
    expected: { a: 'retry 421', b: 'rejected 550', c: 'retry 421' },
  },
  // ---- Refused here, before anything was sent
  {
    name: 'local refusal: larger than the server SIZE',
    facts: facts({ rcptAccepted: [], failure: failed.refused(552, SIZE), message: 'none' }),
    expected: { a: 'rejected 552', b: 'rejected 552', c: 'rejected 552' },
  },
  {
    name: 'local refusal: REQUIRETLS not offered',
    facts: facts({ rcptAccepted: [], failure: failed.refused(550, REQUIRETLS), message: 'none' }),
    expected: { a: 'rejected 550', b: 'rejected 550', c: 'rejected 550' },
  },
  // ---- LMTP: one reply per recipient after the dot
  {
    name: 'LMTP: per-recipient replies all 250',
    facts: lmtp({ ...lmtpAnswered({ a: 250, b: 250, c: 250 }), finalReply: reply(250) }),
    expected: { a: 'delivered 250', b: 'delivered 250', c: 'delivered 250' },
  },
  {
    name: 'LMTP: per-recipient replies 250 / 550 / 452',
    facts: lmtp({ ...lmtpAnswered({ a: 250, b: 550, c: 452 }), finalReply: reply(452) }),
    expected: { a: 'delivered 250', b: 'rejected 550', c: 'deferred 452' },
  },
  {
    name: 'LMTP: b refused 550 at RCPT, a and c answered 250 / 451 after the dot',
    facts: lmtp({ rcptRefused: replies({ b: 550 }), ...lmtpAnswered({ a: 250, c: 451 }), finalReply: reply(451) }),
    expected: { a: 'delivered 250', b: 'rejected 550', c: 'deferred 451' },
  },
  {
    name: 'LMTP: MAIL FROM 451, pipelined RCPTs 503: MAIL FROM decides',
    facts: lmtp({ rcptRefused: replies({ a: 503, b: 503, c: 503 }), failure: failed.reply('MAIL FROM', 451), message: 'none' }),
    expected: { a: 'deferred 451', b: 'deferred 451', c: 'deferred 451' },
  },
  {
    name: 'LMTP: dropped after 2 of 4 replies (sent): answered settled, the rest unknown',
    facts: lmtp({ rcpts: ['a', 'b', 'c', 'd'], ...lmtpAnswered({ a: 250, b: 250 }), failure: failed.closed(), message: 'sent' }),
    expected: { a: 'delivered 250', b: 'delivered 250', c: 'unknown', d: 'unknown' },
  },
  {
    name: 'LMTP: dropped after 1 of 3 replies, that one 550 (sent)',
    facts: lmtp({ ...lmtpAnswered({ a: 550 }), failure: failed.closed(), message: 'sent' }),
    expected: { a: 'rejected 550', b: 'unknown', c: 'unknown' },
  },
  {
    name: 'LMTP: dropped after the dot before any reply (sent): all unknown',
    facts: lmtp({ failure: failed.closed(), message: 'sent' }),
    expected: { a: 'unknown', b: 'unknown', c: 'unknown' },
  },
  {
    name: 'LMTP: dropped after 2 of 4 replies (partial): answered settled, the rest retry',
    // Theoretical: replies mean the server read the dot, progress() would say 'sent'.
    facts: lmtp({ rcpts: ['a', 'b', 'c', 'd'], ...lmtpAnswered({ a: 250, b: 452 }), failure: failed.closed(), message: 'partial' }),
    expected: { a: 'delivered 250', b: 'deferred 452', c: 'retry', d: 'retry' },
  },
  {
    name: 'LMTP: dropped in the middle of the message (partial): all retry',
    facts: lmtp({ failure: failed.closed({ peerReset: true }), message: 'partial' }),
    expected: { a: 'retry', b: 'retry', c: 'retry' },
  },
  {
    name: 'LMTP: third reply 421 (server closing), fourth never came',
    facts: lmtp({ rcpts: ['a', 'b', 'c', 'd'], ...lmtpAnswered({ a: 250, b: 250, c: 421 }), failure: failed.closed({ remainder: 421 }), message: 'sent' }),
    expected: { a: 'delivered 250', b: 'delivered 250', c: 'retry 421', d: 'retry 421' },
  },
];

/** `'delivered 250'` → verdict and code. */
function parse(expected: string): { verdict: RecipientVerdict; code: number | undefined } {
  const [verdict, code] = expected.split(' ');
  return { verdict: verdict as RecipientVerdict, code: code === undefined ? undefined : Number(code) };
}

describe('decideVerdicts: one verdict per recipient', () => {
  test.each(rows)('$name', ({ facts: given, expected }) => {
    const verdicts = decideVerdicts(given);
    // One verdict per recipient, in the order of rcpts.
    expect(verdicts.map((v) => v.rcpt)).toEqual([...given.rcpts]);
    expect(Object.keys(expected)).toEqual([...given.rcpts]);
    expect(Object.fromEntries(verdicts.map((v) => [v.rcpt, v.responseCode === undefined ? v.verdict : `${v.verdict} ${v.responseCode}`]))).toEqual(expected);
    for (const v of verdicts) {
      const { verdict, code } = parse(expected[v.rcpt]);
      // A coded verdict carries the server's (or the local) reply text, starting with its code.
      if (code !== undefined) expect(v.response).toMatch(new RegExp(`^${code} `));
      // 'unknown' says so, for the application that reads it.
      if (verdict === 'unknown') expect(v.response).toMatch(/^outcome unknown/);
      expect(v.response.length).toBeGreaterThan(0);
    }
  });
});

/*
 * Found by review and fixed in lib/smtp/verdicts.ts: with LMTP, a per-recipient reply proves the
 * server read the final dot, so a reset after k of n replies leaves the rest unknown, not retry.
 * End-to-end: test/outcomes.test.ts, "LMTP: reset after 2 of 4 replies".
 */
test('LMTP: reset after 2 of 4 replies (sent, peerReset): the server read the dot, the rest are unknown', () => {
  const verdicts = decideVerdicts(
    lmtp({ rcpts: ['a', 'b', 'c', 'd'], ...lmtpAnswered({ a: 250, b: 250 }), failure: failed.closed({ peerReset: true }), message: 'sent' }),
  );
  expect(verdicts.map((v) => `${v.rcpt} ${v.verdict}`)).toEqual(['a delivered', 'b delivered', 'c unknown', 'd unknown']);
});
