/** Small helpers shared by the tests. */
import nodemailer from 'nodemailer';
import { BindingPoolTransport, type BindingPoolOptions } from '../../lib';
import type { RecordingServer } from './recording-server';

export function routeTo(server: RecordingServer): { host: string; port: number } {
  return { host: server.host, port: server.port };
}

/**
 * A DNS server address on loopback where nothing listens: a domain without a route then fails
 * its MX lookup at once (ECONNREFUSED, pending) instead of asking the system's resolver.
 * Tests never let a lookup leave the machine.
 */
export const NO_DNS = ['127.0.0.1:1'];

export function makeTransport(options: BindingPoolOptions) {
  const pool = new BindingPoolTransport({ dnsServers: NO_DNS, ...options });
  const transporter = nodemailer.createTransport(pool);
  return { pool, transporter };
}

/** n single-recipient messages, subjects `m0`…, to `user<i>@domain`. */
export function messages(n: number, domain: string, extra: Record<string, unknown> = {}) {
  return Array.from({ length: n }, (_, i) => ({ from: 'sender@example.com', to: `user${i}@${domain}`, subject: `m${i}`, text: `message ${i}`, ...extra }));
}

/** Retries an assertion until it holds or `ms` pass: for what the server learns a moment after the client. */
export async function eventually(assertion: () => void, ms = 2_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      assertion();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
