/**
 * Option checking at construction, domain-key normalisation, and scope resolution: every level
 * of the fallback order is shown end-to-end by what a real SMTP server on loopback saw.
 */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, ConfigError, type BindingPoolOptions } from '../lib';
import { RecordingServer, type SeenConnection } from './support/recording-server';
import { NO_DNS, makeTransport, messages, routeTo } from './support/send';

/** The ConfigError the constructor throws; fails the test when it throws nothing. */
function configError(options: unknown): ConfigError {
  try {
    new BindingPoolTransport(options as BindingPoolOptions);
  } catch (err) {
    return err as ConfigError;
  }
  throw new Error(`no error thrown for ${JSON.stringify(options)}`);
}

function source(connection: SeenConnection): string {
  return connection.remoteAddress.replace(/^::ffff:/, '');
}

function domainsOf(connection: SeenConnection): Set<string> {
  return new Set(connection.transactions.flatMap((t) => t.rcptAttempts).map((r) => r.slice(r.lastIndexOf('@') + 1)));
}

/** Deliveries per connection the server saw from one source address for one domain, in connect order. */
function profile(server: RecordingServer, from: string, domain: string): number[] {
  return server.connections.filter((c) => source(c) === from && domainsOf(c).has(domain)).map((c) => c.transactions.filter((t) => t.delivered).length);
}

const MTA1 = { localAddress: '127.0.0.2', name: 'mta1.test' };
const MTA2 = { localAddress: '127.0.0.3', name: 'mta2.test' };
const MTA3 = { localAddress: '127.0.0.4', name: 'mta3.test' };

describe('option checking at construction', () => {
  const bindings = { mta1: { ...MTA1 }, mta2: { ...MTA2 } };

  test.each<[string, unknown, string, string]>([
    ['wrong type', { maxDeliveriesPerConnection: '5' }, 'maxDeliveriesPerConnection', 'must be a whole number ≥ 0 (0 = no limit), got "5"'],
    ['negative limit', { maxRecipientsPerConnection: -1 }, 'maxRecipientsPerConnection', 'got -1'],
    ['non-integer limit', { maxDeliveriesPerConnection: 2.5 }, 'maxDeliveriesPerConnection', 'got 2.5'],
    ['NaN', { maxOutboundConnections: NaN }, 'maxOutboundConnections', 'got NaN'],
    ['0 where at least 1 is needed', { maxRecipientsPerTransaction: 0 }, 'maxRecipientsPerTransaction', 'must be a whole number ≥ 1, got 0'],
    ['non-integer milliseconds', { idleTimeout: 1.5 }, 'idleTimeout', 'milliseconds'],
    ['port out of range', { port: 65536 }, 'port', 'must be a port number 1–65535, got 65536'],
    ['tls policy typo', { tls: 'requried' }, 'tls', 'did you mean "required"'],
    [
      'unknown option, with a suggestion',
      { maxDeliveriesPerConection: 5 },
      'maxDeliveriesPerConection',
      'unknown option (did you mean "maxDeliveriesPerConnection"?)',
    ],
    ['selectBinding not a function', { selectBinding: 'mta1' }, 'selectBinding', 'must be a function'],
    ['options not an object', null, 'options', 'must be an object'],
    [
      "wrong value in a binding's domain stanza",
      { bindings: { mta1: { ...MTA1, domains: { 'example.org': { maxDeliveriesPerConnection: -3 } } } } },
      'bindings.mta1.domains["example.org"].maxDeliveriesPerConnection',
      'got -3',
    ],
    [
      "unknown option in a binding group's domain stanza",
      { bindings, bindingGroups: { bulk: { bindings: ['mta1'], domains: { 'example.org': { maxDeliveriesPerConection: 2 } } } } },
      'bindingGroups.bulk.domains["example.org"].maxDeliveriesPerConection',
      'did you mean "maxDeliveriesPerConnection"',
    ],
    [
      'wrong value in a global domain stanza',
      { domains: { 'example.org': { maxRecipientsPerTransaction: 0 } } },
      'domains["example.org"].maxRecipientsPerTransaction',
      'got 0',
    ],
    [
      'binding-only option in a domain stanza',
      { domains: { 'example.org': { localAddress: '127.0.0.2' } } },
      'domains["example.org"].localAddress',
      'unknown option',
    ],
    ['unknown binding option', { bindings: { mta1: { localAdress: '127.0.0.2' } } }, 'bindings.mta1.localAdress', 'did you mean "localAddress"'],
    [
      'wrong value on a binding group',
      { bindings, bindingGroups: { bulk: { bindings: ['mta1'], maxOutboundConnections: -1 } } },
      'bindingGroups.bulk.maxOutboundConnections',
      'got -1',
    ],
    [
      'group member naming a missing binding',
      { bindings, bindingGroups: { bulk: { bindings: ['mta1', 'mta-2'] } } },
      'bindingGroups.bulk.bindings[1]',
      'names no binding (did you mean "mta2"?)',
    ],
    [
      'group member that is not a string',
      { bindings, bindingGroups: { bulk: { bindings: ['mta1', 2] } } },
      'bindingGroups.bulk.bindings[1]',
      'names no binding',
    ],
    ['empty group', { bindings, bindingGroups: { bulk: { bindings: [] } } }, 'bindingGroups.bulk.bindings', 'non-empty array'],
    [
      'a binding in two groups',
      { bindings, bindingGroups: { bulk: { bindings: ['mta1', 'mta2'] }, news: { bindings: ['mta2'] } } },
      'bindingGroups.news.bindings[0]',
      'binding "mta2" already belongs to group "bulk"',
    ],
    ['group named like a binding', { bindings, bindingGroups: { mta1: { bindings: ['mta2'] } } }, 'bindingGroups.mta1', 'names must be unique'],
    [
      'localAddress that is a host name',
      { bindings: { mta1: { localAddress: 'localhost' } } },
      'bindings.mta1.localAddress',
      'must be an IPv4 or IPv6 address, got "localhost"',
    ],
    ['localAddress out of range', { bindings: { mta1: { localAddress: '127.0.0.300' } } }, 'bindings.mta1.localAddress', 'got "127.0.0.300"'],
    ['localAddress not a string', { bindings: { mta1: { localAddress: 2130706434 } } }, 'bindings.mta1.localAddress', 'must be an IPv4 or IPv6 address'],
    ['EHLO name with a space', { bindings: { mta1: { name: 'mta 1' } } }, 'bindings.mta1.name', 'must be a host name for EHLO'],
    ['route that is not an object', { route: '127.0.0.1:25' }, 'route', 'must be an object, got "127.0.0.1:25"'],
    ['route without host', { route: { port: 25 } }, 'route.host', 'must be a host name or IP address, got undefined'],
    ['route with an empty host', { route: { host: ' ' } }, 'route.host', 'must be a host name or IP address'],
    ['route port 0', { route: { host: '127.0.0.1', port: 0 } }, 'route.port', 'must be a port number 1–65535, got 0'],
    ['route port as a string', { route: { host: '127.0.0.1', port: '25' } }, 'route.port', 'got "25"'],
    ['unknown route key', { route: { host: '127.0.0.1', hots: 'x' } }, 'route.hots', 'unknown option (did you mean "host"?)'],
    ['route flag not a boolean', { route: { host: '127.0.0.1', secure: 'yes' } }, 'route.secure', 'must be true or false'],
    [
      "bad route port in a binding's domain stanza",
      { bindings: { mta1: { domains: { 'example.org': { route: { host: '127.0.0.1', port: 70000 } } } } } },
      'bindings.mta1.domains["example.org"].route.port',
      'got 70000',
    ],
    ['defaultBinding naming nothing', { bindings, defaultBinding: 'mta3' }, 'defaultBinding', 'names no binding or binding group'],
    [
      'defaultBinding with a typo',
      { bindings, bindingGroups: { bulk: { bindings: ['mta1'] } }, defaultBinding: 'blk' },
      'defaultBinding',
      'did you mean "bulk"',
    ],
    ['domain key that is no domain', { domains: { 'not a domain': {} } }, 'domains["not a domain"]', 'is not a valid domain name'],
    ['domain keys equal after lower-casing', { domains: { 'Example.ORG': {}, 'example.org': {} } }, 'domains["example.org"]', 'repeats domain "example.org"'],
    [
      'IDN key and its punycode form',
      { domains: { 'bücher.example': {}, 'xn--bcher-kva.example': {} } },
      'domains["xn--bcher-kva.example"]',
      'repeats domain "xn--bcher-kva.example"',
    ],
    ['domain stanza that is not an object', { domains: { 'example.org': 5 } }, 'domains["example.org"]', 'must be an object, got 5'],
    ['DNS option below its minimum', { maxDnsTtl: 0 }, 'maxDnsTtl', 'must be a whole number ≥ 1, got 0'],
  ])('%s', (_what, options, path, fragment) => {
    const err = configError(options);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.code).toBe('ECONFIG');
    expect(err.path).toBe(path);
    expect(err.message.startsWith(`${path}: `)).toBe(true);
    expect(err.message).toContain(fragment);
  });

  test('an unknown option far from every name gets no suggestion', () => {
    const err = configError({ frobnicate: 1 });
    expect(err.path).toBe('frobnicate');
    expect(err.message).toBe('frobnicate: unknown option');
  });

  test('a complete valid configuration is accepted, 0 = no limit included', () => {
    const options: BindingPoolOptions = {
      dnsServers: NO_DNS,
      name: 'global.test',
      maxDeliveriesPerConnection: 0,
      maxRecipientsPerConnection: 0,
      route: { host: '127.0.0.1', port: 2525, auth: { user: 'u', pass: 'p' } },
      bindings: {
        mta1: { ...MTA1, domains: { 'EXAMPLE.org': { maxDeliveriesPerConnection: 1 } } },
        mta2: { ...MTA2, maxOutboundConnections: 2 },
        mta3: { localAddress: '::1' },
      },
      bindingGroups: { bulk: { bindings: ['mta1', 'mta2'], domains: { 'bücher.example': { tls: 'no' } } } },
      domains: { 'example.net': { route: { host: 'relay.test', secure: true } } },
      defaultBinding: 'bulk',
      selectBinding: () => undefined,
    };
    expect(() => new BindingPoolTransport(options)).not.toThrow();
  });

  // Names that are properties of every object (toString, constructor…) are not bindings.
  test('a group member named like an Object.prototype property is a missing binding', () => {
    const err = configError({ bindings, bindingGroups: { bulk: { bindings: ['mta1', 'constructor'] } } });
    expect(err.path).toBe('bindingGroups.bulk.bindings[1]');
  });

  test('defaultBinding named like an Object.prototype property names nothing', () => {
    const err = configError({ bindings, defaultBinding: 'toString' });
    expect(err.path).toBe('defaultBinding');
  });

  test('a binding group may be named like an Object.prototype property', () => {
    expect(() => new BindingPoolTransport({ bindings, bindingGroups: { toString: { bindings: ['mta1'] } } })).not.toThrow();
  });
});

describe('domain keys are normalised', () => {
  let server: RecordingServer;
  beforeEach(async () => {
    server = await RecordingServer.start();
  });
  afterEach(() => server.stop());

  test('an upper-case stanza key applies to recipients in any case', async () => {
    // No global route: only the stanza's route reaches the server.
    const { transporter } = makeTransport({ maxOutboundConnections: 1, domains: { 'EXAMPLE.ORG': { route: routeTo(server), maxDeliveriesPerConnection: 2 } } });
    const infos = await Promise.all(
      ['a@Example.Org', 'b@example.ORG', 'c@EXAMPLE.ORG', 'd@example.org'].map((to, i) =>
        transporter.sendMail({ from: 's@example.com', to, subject: `m${i}`, text: 'x' }),
      ),
    );
    await transporter.close();
    expect(infos.map((i) => i.accepted.length)).toEqual([1, 1, 1, 1]);
    expect(server.deliveredRecipients().sort()).toEqual(['a@example.org', 'b@example.org', 'c@example.org', 'd@example.org']);
    // The stanza's limit applies too: the four went over two connections.
    expect(server.connections.map((c) => c.transactions.filter((t) => t.delivered).length)).toEqual([2, 2]);
  });

  test('an IDN stanza key applies to recipients at its upper-case form; other domains do not use it', async () => {
    const { transporter } = makeTransport({
      maxOutboundConnections: 1,
      domains: { 'bücher.example': { route: routeTo(server), maxDeliveriesPerConnection: 1 } },
    });
    const info = await transporter.sendMail({
      from: 's@example.com',
      to: ['kunde@BÜCHER.example', 'leser@bücher.example', 'x@other.example'],
      subject: 'idn',
      text: 'x',
    });
    await transporter.close();
    // Nodemailer hands the envelope over with the domains in punycode already.
    expect(info.accepted.sort()).toEqual(['kunde@xn--bcher-kva.example', 'leser@xn--bcher-kva.example']);
    // other.example has no route and its MX lookup fails: it never reaches this server.
    expect(info.pending).toEqual(['x@other.example']);
    // smtp-server reports a punycode domain in its Unicode form.
    expect(server.connections.flatMap((c) => c.transactions.flatMap((t) => t.rcptAttempts)).sort()).toEqual(['kunde@bücher.example', 'leser@bücher.example']);
    // maxDeliveriesPerConnection 1 from the stanza: one connection per recipient.
    expect(server.connections.map((c) => c.transactions.filter((t) => t.delivered).length)).toEqual([1, 1]);
  });
});

/**
 * Scope resolution. Each case sets maxDeliveriesPerConnection at two adjacent levels (2 at the
 * more specific, 3 at the next), sends N = 6 single-recipient messages per probe with one
 * connection per pool, and reads the server: 2 per connection is [2, 2, 2], 3 is [3, 3],
 * no limit is [6]. A second probe shows the less specific level where the specific one does not
 * apply, so a case cannot pass by the value coming from elsewhere.
 */
describe('scope resolution, seen on the server', () => {
  const N = 6;
  const PER = { 2: [2, 2, 2], 3: [3, 3], 0: [6] } as const;

  interface Probe {
    binding: string;
    source: string;
    domain: string;
    limit: keyof typeof PER;
  }

  let server: RecordingServer;
  beforeEach(async () => {
    server = await RecordingServer.start();
  });
  afterEach(() => server.stop());

  async function run(options: BindingPoolOptions, probes: Probe[]): Promise<void> {
    const { transporter } = makeTransport({ route: routeTo(server), maxOutboundConnections: 1, ...options });
    const sends = probes.flatMap((p) => messages(N, p.domain, { binding: p.binding }).map((m) => transporter.sendMail(m)));
    const infos = await Promise.all(sends);
    await transporter.close();
    expect(infos.every((i) => i.accepted.length === 1)).toBe(true);
    // Every connection carried one domain only, from the source address of its binding.
    for (const c of server.connections) expect(domainsOf(c).size).toBe(1);
    for (const p of probes)
      expect({ probe: `${p.binding}/${p.domain}`, perConnection: profile(server, p.source, p.domain) }).toEqual({
        probe: `${p.binding}/${p.domain}`,
        perConnection: PER[p.limit],
      });
    expect(server.connections).toHaveLength(probes.reduce((n, p) => n + PER[p.limit].length, 0));
    expect(server.totalDelivered()).toBe(N * probes.length);
  }

  test("binding's domain stanza beats binding group's domain stanza", async () => {
    await run(
      {
        bindings: { mta1: { ...MTA1, domains: { 'example.org': { maxDeliveriesPerConnection: 2 } } }, mta2: MTA2 },
        bindingGroups: { bulk: { bindings: ['mta1', 'mta2'], domains: { 'example.org': { maxDeliveriesPerConnection: 3 } } } },
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 },
        { binding: 'mta2', source: '127.0.0.3', domain: 'example.org', limit: 3 },
      ],
    );
  });

  test("binding group's domain stanza beats the binding", async () => {
    await run(
      {
        bindings: { mta1: { ...MTA1, maxDeliveriesPerConnection: 3 } },
        bindingGroups: { bulk: { bindings: ['mta1'], domains: { 'example.org': { maxDeliveriesPerConnection: 2 } } } },
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 },
        { binding: 'mta1', source: '127.0.0.2', domain: 'other.example', limit: 3 },
      ],
    );
  });

  test('the binding beats its binding group', async () => {
    await run(
      {
        bindings: { mta1: { ...MTA1, maxDeliveriesPerConnection: 2 }, mta2: MTA2 },
        bindingGroups: { bulk: { bindings: ['mta1', 'mta2'], maxDeliveriesPerConnection: 3 } },
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 },
        { binding: 'mta2', source: '127.0.0.3', domain: 'example.org', limit: 3 },
      ],
    );
  });

  test('the binding group beats the global domain stanza', async () => {
    await run(
      {
        bindings: { mta1: MTA1, mta3: MTA3 },
        bindingGroups: { bulk: { bindings: ['mta1'], maxDeliveriesPerConnection: 2 } },
        domains: { 'example.org': { maxDeliveriesPerConnection: 3 } },
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 },
        // mta3 is in no group: the global domain stanza is what it gets.
        { binding: 'mta3', source: '127.0.0.4', domain: 'example.org', limit: 3 },
      ],
    );
  });

  test('the global domain stanza beats the global value', async () => {
    await run(
      {
        bindings: { mta1: MTA1 },
        domains: { 'example.org': { maxDeliveriesPerConnection: 2 } },
        maxDeliveriesPerConnection: 3,
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 },
        { binding: 'mta1', source: '127.0.0.2', domain: 'other.example', limit: 3 },
      ],
    );
  });

  test('the global value beats the built-in default (0 = no limit)', async () => {
    await run({ bindings: { mta1: MTA1 }, maxDeliveriesPerConnection: 2 }, [{ binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 2 }]);
  });

  test('with nothing set the built-in default 0 applies: no limit, one connection', async () => {
    await run({ bindings: { mta1: MTA1 } }, [{ binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 0 }]);
  });

  test('an explicit 0 at a more specific level lifts a limit set below it', async () => {
    await run(
      {
        bindings: { mta1: { ...MTA1, domains: { 'example.org': { maxDeliveriesPerConnection: 0 } } } },
        maxDeliveriesPerConnection: 2,
      },
      [
        { binding: 'mta1', source: '127.0.0.2', domain: 'example.org', limit: 0 },
        { binding: 'mta1', source: '127.0.0.2', domain: 'other.example', limit: 2 },
      ],
    );
  });

  test("all six levels at once: each (binding, domain) pair gets its most specific level's value", async () => {
    // Values 1…6 per level; each probe is a pair where a different level is the most specific set.
    const options: BindingPoolOptions = {
      bindings: {
        mta1: { ...MTA1, maxDeliveriesPerConnection: 3, domains: { 'a.example': { maxDeliveriesPerConnection: 1 } } },
        mta2: { ...MTA2 },
        mta3: { ...MTA3 },
      },
      bindingGroups: { bulk: { bindings: ['mta1', 'mta2'], maxDeliveriesPerConnection: 4, domains: { 'b.example': { maxDeliveriesPerConnection: 2 } } } },
      domains: { 'c.example': { maxDeliveriesPerConnection: 5 } },
      maxDeliveriesPerConnection: 6,
    };
    const probes: [string, string, string, number][] = [
      ['mta1', '127.0.0.2', 'a.example', 1], // binding's domain stanza
      ['mta1', '127.0.0.2', 'b.example', 2], // group's domain stanza
      ['mta1', '127.0.0.2', 'c.example', 3], // binding
      ['mta2', '127.0.0.3', 'c.example', 4], // group
      ['mta3', '127.0.0.4', 'c.example', 5], // global domain stanza
      ['mta3', '127.0.0.4', 'd.example', 6], // global
    ];
    const { transporter } = makeTransport({ route: routeTo(server), maxOutboundConnections: 1, ...options });
    const infos = await Promise.all(probes.flatMap(([binding, , domain]) => messages(6, domain, { binding }).map((m) => transporter.sendMail(m))));
    await transporter.close();
    expect(infos.every((i) => i.accepted.length === 1)).toBe(true);
    for (const [binding, from, domain, limit] of probes) {
      const expected = Array.from({ length: Math.ceil(6 / limit) }, (_, i) => Math.min(limit, 6 - i * limit));
      expect({ pair: `${binding}/${domain}`, perConnection: profile(server, from, domain) }).toEqual({ pair: `${binding}/${domain}`, perConnection: expected });
    }
  });
});

describe('route resolves per scope', () => {
  let a: RecordingServer;
  let b: RecordingServer;
  beforeEach(async () => {
    [a, b] = await Promise.all([RecordingServer.start(), RecordingServer.start()]);
  });
  afterEach(() => Promise.all([a.stop(), b.stop()]));

  const rcpts = (server: RecordingServer) => server.connections.flatMap((c) => c.transactions.flatMap((t) => t.rcptAttempts)).sort();

  test('a domain stanza route wins over the global route; a binding route wins over the domain stanza', async () => {
    const { transporter } = makeTransport({
      route: routeTo(a),
      domains: { 'example.org': { route: routeTo(b) } },
      bindings: { mta2: { ...MTA2, route: routeTo(a) } },
    });
    const [viaGlobal, viaStanza, viaBinding] = await Promise.all([
      transporter.sendMail({ from: 's@example.com', to: 'g@other.example', subject: 'global', text: 'x' }),
      transporter.sendMail({ from: 's@example.com', to: 's@example.org', subject: 'stanza', text: 'x' }),
      transporter.sendMail({ from: 's@example.com', to: 'b@example.org', subject: 'binding', text: 'x', binding: 'mta2' }),
    ]);
    await transporter.close();
    expect([viaGlobal.accepted, viaStanza.accepted, viaBinding.accepted]).toEqual([['g@other.example'], ['s@example.org'], ['b@example.org']]);
    expect(rcpts(a)).toEqual(['b@example.org', 'g@other.example']);
    expect(rcpts(b)).toEqual(['s@example.org']);
    expect(a.connections.filter((c) => domainsOf(c).has('example.org')).map(source)).toEqual(['127.0.0.3']);
  });

  test("a binding group's domain stanza route wins over the global domain stanza route", async () => {
    const { transporter } = makeTransport({
      bindings: { mta1: MTA1, mta3: MTA3 },
      bindingGroups: { bulk: { bindings: ['mta1'], domains: { 'example.org': { route: routeTo(b) } } } },
      domains: { 'example.org': { route: routeTo(a) } },
    });
    await Promise.all([
      transporter.sendMail({ from: 's@example.com', to: 'grouped@example.org', subject: 'g', text: 'x', bindingGroup: 'bulk' }),
      transporter.sendMail({ from: 's@example.com', to: 'single@example.org', subject: 's', text: 'x', binding: 'mta3' }),
    ]);
    await transporter.close();
    expect(rcpts(b)).toEqual(['grouped@example.org']);
    expect(b.connections.map(source)).toEqual(['127.0.0.2']);
    expect(rcpts(a)).toEqual(['single@example.org']);
    expect(a.connections.map(source)).toEqual(['127.0.0.4']);
  });
});

describe('built-in defaults outside the pools', () => {
  // Nodemailer asks the transport whether it is idle; maxOutboundConnections defaults to 5.
  test('a fresh transport without maxOutboundConnections set is idle', async () => {
    const pool = new BindingPoolTransport({ dnsServers: NO_DNS });
    const transporter = nodemailer.createTransport(pool);
    try {
      expect(pool.isIdle()).toBe(true);
      expect(transporter.isIdle()).toBe(true);
    } finally {
      await transporter.close();
    }
  });

  test('a fresh transport with maxOutboundConnections set is idle', async () => {
    const pool = new BindingPoolTransport({ dnsServers: NO_DNS, maxOutboundConnections: 5 });
    const transporter = nodemailer.createTransport(pool);
    expect(transporter.isIdle()).toBe(true);
    await transporter.close();
    // A closed transport is not idle.
    expect(pool.isIdle()).toBe(false);
  });
});
