/**
 * Smarthost: every domain goes through one relay that requires SMTP AUTH, with a global `route`.
 *
 * The relay (smtp-server on 127.0.0.1) offers STARTTLS with the test certificate in
 * test/fixtures (issued for relay.test). The route sets `requireTLS` and trusts that certificate
 * through `tls: { ca, servername: 'relay.test' }`, so the password only ever crosses an encrypted
 * connection and `allowUnencryptedAuth` is not needed. (Without TLS the route would have to set
 * `allowUnencryptedAuth: true`; the transport refuses to send credentials in clear otherwise.)
 */
import { existsSync, readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import nodemailer from 'nodemailer';
import { SMTPServer } from 'smtp-server';
import { BindingPoolTransport, type ConnectionSummary } from '../lib';
import { runMain } from './run-main';

const USER = 'app';
const PASS = 'app-secret';

/** test/fixtures, from examples/ (ts-node) or build/examples/ (compiled). */
function fixture(name: string): Buffer {
  const dir = [join(__dirname, '..', 'test', 'fixtures'), join(__dirname, '..', '..', 'test', 'fixtures')].find(existsSync)!;
  return readFileSync(join(dir, name));
}

async function main(): Promise<number> {
  const cert = fixture('mx-test.crt');
  const key = fixture('mx-test.key');
  const seen: { user: string; secure: boolean; rcpts: string[] }[] = [];

  const relay = new SMTPServer({
    name: 'relay.test',
    key,
    cert,
    authMethods: ['PLAIN', 'LOGIN'],
    disableReverseLookup: true,
    authOptional: false,
    logger: false,
    onAuth(auth, _session, callback) {
      if (auth.username === USER && auth.password === PASS) return callback(null, { user: auth.username });
      callback(Object.assign(new Error('5.7.8 bad credentials'), { responseCode: 535 }));
    },
    onData(stream, session, callback) {
      stream.resume();
      stream.on('end', () => {
        seen.push({ user: String(session.user), secure: session.secure, rcpts: session.envelope.rcptTo.map((r) => r.address) });
        callback(null, 'Ok: relayed');
      });
    },
  });
  await new Promise<void>((resolve, reject) => {
    relay.once('error', reject);
    relay.listen(0, '127.0.0.1', resolve);
  });
  const port = (relay.server.address() as AddressInfo).port;
  console.log(`relay on 127.0.0.1:${port} (STARTTLS, AUTH required)`);

  const pool = new BindingPoolTransport({
    name: 'app.example.test',
    // Global route: the smarthost for every domain.
    route: { host: '127.0.0.1', port, auth: { user: USER, pass: PASS }, requireTLS: true, tls: { ca: cert, servername: 'relay.test' } },
    maxDeliveriesPerConnection: 2,
  });
  const closed: ConnectionSummary[] = [];
  pool.on('connectionClosed', (c: ConnectionSummary) => closed.push(c));
  const transporter = nodemailer.createTransport(pool);

  let failures = 0;
  try {
    await transporter.verify();
    console.log('verify(): logged in to the relay');
    const recipients = ['ann@one.test', 'bob@two.test', 'cy@one.test', 'di@three.test'];
    for (const to of recipients) {
      const info = await transporter.sendMail({ from: 'app@example.test', to, subject: 'via relay', text: 'Hello through the smarthost.' });
      console.log(`  ${to}: accepted=${info.accepted.length} encrypted=${info.domains[0].connections[0]?.encrypted} ${info.response}`);
      if (info.accepted.length !== 1) failures++;
    }
  } finally {
    await transporter.close();
    await new Promise<void>((resolve) => relay.close(() => resolve()));
  }

  const sessions = closed.filter((c) => c.transactions > 0);
  console.log(`connections: ${sessions.map((c) => `${c.id} ${c.deliveries} deliveries, ${c.reason}, encrypted=${c.encrypted}`).join('; ')}`);
  console.log(`relay saw ${seen.length} messages, all as user "${USER}" over TLS: ${seen.every((s) => s.user === USER && s.secure)}`);
  if (seen.length !== 4 || !seen.every((s) => s.user === USER && s.secure)) failures++;
  return failures ? 1 : 0;
}

runMain(main);
