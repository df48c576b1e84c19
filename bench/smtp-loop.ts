/**
 * The SMTP-side ceiling: `SMTPConnection.send` in a loop on persistent connections with prebuilt
 * bytes, no sendMail. Used by the `smtp-connection` candidate (child.ts) and, in a worker thread,
 * by the `two-thread-ceiling` candidate (ceiling-worker.ts).
 */
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import { CONNECTIONS, SENDER, buildRawMessage, byDomain, sendFor, type RunSpec } from './common';

const RAW = buildRawMessage();

export interface LoopOutcome {
  accepted: number;
  failed: number;
  firstError?: string;
}

/**
 * Ceiling: 5 connections, each sending its share of transactions back to back with the prebuilt
 * raw bytes (also for composed scenarios), one transaction per (message, domain). With a limit a
 * connection QUITs after that many deliveries and the worker opens a new one.
 */
export function smtpConnectionLoop(spec: RunSpec): { runAll(n: number): Promise<LoopOutcome>; close(): Promise<void> } {
  const open = async (): Promise<SMTPConnection> => {
    const connection = new SMTPConnection({ host: spec.host, port: spec.port, secure: false, ignoreTLS: true, logger: false });
    connection.on('error', () => {});
    await new Promise<void>((resolve, reject) => connection.connect((err?: Error | null) => (err ? reject(err) : resolve())));
    return connection;
  };
  const transact = (connection: SMTPConnection, to: string[]) =>
    new Promise<number>((resolve, reject) => connection.send({ from: SENDER, to }, RAW, (err, info) => (err ? reject(err) : resolve(info!.accepted.length))));
  const live = new Set<SMTPConnection>();
  return {
    async runAll(n) {
      const queue: string[][] = [];
      for (let i = 0; i < n; i++) for (const group of byDomain(sendFor(spec.shape, i, spec.round).to).values()) queue.push(group);
      let next = 0;
      let accepted = 0;
      let failed = 0;
      let firstError: string | undefined;
      const worker = async (): Promise<void> => {
        let connection: SMTPConnection | undefined;
        let delivered = 0;
        while (next < queue.length) {
          if (!connection) {
            connection = await open();
            live.add(connection);
            delivered = 0;
            // Other workers may have taken the rest of the queue while this one connected.
            if (next >= queue.length) break;
          }
          const to = queue[next++];
          try {
            const n = await transact(connection, to);
            accepted += n;
            delivered += n;
          } catch (err) {
            failed++;
            firstError ??= String(err);
          }
          if (spec.limit > 0 && delivered >= spec.limit) {
            connection.quit();
            live.delete(connection);
            connection = undefined;
          }
        }
      };
      await Promise.all(Array.from({ length: CONNECTIONS }, worker));
      return { accepted, failed, ...(firstError !== undefined && { firstError }) };
    },
    async close() {
      for (const connection of live) connection.quit();
      live.clear();
    },
  };
}
