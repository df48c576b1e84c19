/**
 * The queue's record rules (lib/queue/record.ts) as a table: a recipient's state and one
 * attempt's outcome in, its next state out. Pure: the clock is a number the cases set.
 */
import {
  applyAttempt,
  dueRecipients,
  DUE_WITHIN_MS,
  endQueued,
  nextAttemptAt,
  type AttemptOutcome,
  type MailRecord,
  type RecipientRecord,
} from '../lib/queue/record';

const MIN = 60_000;
const T0 = 1_000_000_000_000;
const POLICY = { schedule: [1 * MIN, 5 * MIN, 15 * MIN, 60 * MIN, 240 * MIN], retryUnknown: false };

function record(recipients: Partial<RecipientRecord>[], expiresAt = T0 + 5 * 24 * 60 * MIN): MailRecord {
  return {
    version: 1,
    messageId: '<m@test>',
    bytesKey: 'k',
    from: 'from@test',
    size: 100,
    addedAt: T0,
    expiresAt,
    recipients: recipients.map((r, i) => ({ address: `r${i}@test`, status: 'queued', attempts: 0, nextAttemptAt: T0, ...r })),
  };
}

const accepted: AttemptOutcome = { status: 'accepted', response: '250 2.0.0 Ok: queued', responseCode: 250 };
const rejected: AttemptOutcome = { status: 'rejected', response: '550 5.1.1 no such user', responseCode: 550 };
const greylisted: AttemptOutcome = { status: 'pending', response: '451 4.7.1 greylisted, try again later', responseCode: 451 };
const unknown: AttemptOutcome = { status: 'pending', response: 'outcome unknown: the connection ended', outcomeUnknown: true };

type Case = [
  name: string,
  before: Partial<RecipientRecord>,
  outcome: AttemptOutcome,
  now: number,
  expected: Partial<RecipientRecord>,
  policy?: Partial<typeof POLICY>,
];

const cases: Case[] = [
  [
    'accepted is final at once',
    {},
    accepted,
    T0,
    { status: 'accepted', attempts: 1, response: accepted.response, responseCode: 250, nextAttemptAt: undefined },
  ],
  ['a 5xx is final at once', {}, rejected, T0, { status: 'rejected', attempts: 1, responseCode: 550 }],
  ['a first 4xx waits the first step', {}, greylisted, T0, { status: 'queued', attempts: 1, nextAttemptAt: T0 + MIN, responseCode: 451 }],
  ['the third 4xx waits the third step', { attempts: 2 }, greylisted, T0, { status: 'queued', attempts: 3, nextAttemptAt: T0 + 15 * MIN }],
  ['past the schedule the last step repeats', { attempts: 9 }, greylisted, T0, { status: 'queued', attempts: 10, nextAttemptAt: T0 + 240 * MIN }],
  ['a later retryAfter wins over the schedule', {}, { ...greylisted, retryAfter: T0 + 30 * MIN }, T0, { nextAttemptAt: T0 + 30 * MIN }],
  ['an earlier retryAfter does not shorten the schedule', {}, { ...greylisted, retryAfter: T0 + 1000 }, T0, { nextAttemptAt: T0 + MIN }],
  [
    'the last attempt is made at expiry',
    {},
    greylisted,
    T0 + 5 * 24 * 60 * MIN - 10 * MIN,
    { status: 'queued', nextAttemptAt: T0 + 5 * 24 * 60 * MIN },
    { schedule: [60 * MIN] },
  ],
  [
    'a 4xx at or past expiry is final as expired',
    { attempts: 40 },
    greylisted,
    T0 + 5 * 24 * 60 * MIN,
    { status: 'expired', attempts: 41, response: greylisted.response },
  ],
  ['outcome unknown is final as unknown', {}, unknown, T0, { status: 'unknown', attempts: 1, response: unknown.response }],
  ['outcome unknown goes again with retryUnknown', {}, unknown, T0, { status: 'queued', attempts: 1, nextAttemptAt: T0 + MIN }, { retryUnknown: true }],
  ['a 5xx after 4xxs is final', { attempts: 3 }, rejected, T0, { status: 'rejected', attempts: 4 }],
];

describe('applyAttempt: one recipient, one outcome', () => {
  // A rest parameter: jest takes a callback with more parameters than the row has for one wanting `done`.
  test.each(cases)('%s', (...row: Case) => {
    const [, before, outcome, now, expected, policy] = row;
    const given = record([before]);
    const address = given.recipients[0].address;
    const { record: after, settled } = applyAttempt(given, new Map([[address, outcome]]), now, { ...POLICY, ...policy });
    const defined = Object.fromEntries(Object.entries(expected).filter(([, value]) => value !== undefined));
    expect(after.recipients[0]).toMatchObject({ ...defined, lastAttemptAt: now });
    for (const [key, value] of Object.entries(expected)) if (value === undefined) expect(after.recipients[0]).not.toHaveProperty(key);
    expect(settled.map((r) => r.address)).toEqual(after.recipients[0].status === 'queued' ? [] : [address]);
    // The given record is never changed.
    expect(given.recipients[0]).toMatchObject({ status: 'queued', attempts: before.attempts ?? 0 });
  });
});

describe('a message with several recipients', () => {
  test('only the recipients in the attempt change; the final ones stay as they were', () => {
    const given = record([{ status: 'accepted', attempts: 1, response: '250 ok' }, {}, {}]);
    const outcomes = new Map([
      ['r1@test', rejected],
      ['r2@test', greylisted],
    ]);
    const { record: after, settled } = applyAttempt(given, outcomes, T0, POLICY);
    expect(after.recipients.map((r) => r.status)).toEqual(['accepted', 'rejected', 'queued']);
    expect(after.recipients[0]).toBe(given.recipients[0]);
    expect(settled.map((r) => r.address)).toEqual(['r1@test']);
    expect(nextAttemptAt(after)).toBe(T0 + MIN);
  });

  test('an outcome for a final recipient is ignored (a report naming it twice records nothing twice)', () => {
    const given = record([{ status: 'accepted', attempts: 1 }]);
    const { record: after, settled } = applyAttempt(given, new Map([['r0@test', rejected]]), T0, POLICY);
    expect(after.recipients[0]).toMatchObject({ status: 'accepted', attempts: 1 });
    expect(settled).toEqual([]);
  });

  test('due: queued recipients whose time has come (or comes within DUE_WITHIN_MS), never final ones', () => {
    const given = record([{ nextAttemptAt: T0 }, { nextAttemptAt: T0 + DUE_WITHIN_MS }, { nextAttemptAt: T0 + DUE_WITHIN_MS + 1 }, { status: 'accepted' }]);
    expect(dueRecipients(given, T0)).toEqual(['r0@test', 'r1@test']);
    expect(nextAttemptAt(given)).toBe(T0);
  });

  test('a message whose every recipient is final has no next attempt', () => {
    expect(nextAttemptAt(record([{ status: 'accepted' }, { status: 'unknown' }]))).toBeUndefined();
  });

  test('endQueued ends every queued recipient with one reason and keeps the final ones', () => {
    const given = record([{ status: 'accepted', attempts: 1 }, { attempts: 2 }]);
    const { record: after, settled } = endQueued(given, 'expired', 'bytes gone', T0);
    expect(after.recipients.map((r) => r.status)).toEqual(['accepted', 'expired']);
    expect(settled).toEqual([{ address: 'r1@test', status: 'expired', attempts: 2, response: 'bytes gone', lastAttemptAt: T0 }]);
  });
});
