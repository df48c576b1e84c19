/**
 * The SMTP sink the candidates deliver to, on loopback only: Postfix's smtp-sink (installed when
 * missing and we are root with apt-get), else a separate-process smtp-server sink. Both print
 * session/message counters, which the harness reads to check that the sink really got the mail.
 */
import { freePort } from '../test/support/free-port';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createConnection } from 'node:net';
import path from 'node:path';
import { sleep } from './common';

export interface SinkCounters {
  sessions: number;
  messages: number;
}

export interface Sink {
  kind: 'smtp-sink' | 'smtp-server';
  host: string;
  port: number;
  command: string;
  counters(): SinkCounters;
  /** Counters once they stopped moving (sessions end shortly after a client exits). */
  settledCounters(): Promise<SinkCounters>;
  stop(): Promise<void>;
}

const SMTP_SINK_PATHS = ['/usr/sbin/smtp-sink', '/usr/bin/smtp-sink', '/usr/lib/postfix/sbin/smtp-sink'];

function findSmtpSink(): string | undefined {
  for (const candidate of SMTP_SINK_PATHS) if (existsSync(candidate)) return candidate;
  const which = spawnSync('sh', ['-c', 'command -v smtp-sink'], { encoding: 'utf8' });
  const found = which.stdout.trim();
  return which.status === 0 && found ? found : undefined;
}

/** Installs Postfix (for smtp-sink) without configuring or starting a mail system. */
function installPostfix(): boolean {
  if (process.getuid?.() !== 0 || spawnSync('sh', ['-c', 'command -v apt-get']).status !== 0) {
    console.log('smtp-sink is missing and apt-get cannot be used here (not root or no apt-get)');
    return false;
  }
  console.log('smtp-sink is missing: installing postfix ("No configuration": no daemon runs) …');
  const script =
    'echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && ' +
    'DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix';
  const result = spawnSync('sh', ['-c', script], { encoding: 'utf8', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  if (result.status !== 0) {
    console.log(`installing postfix failed (exit ${result.status}): ${(result.stderr || result.stdout).trim().split('\n').slice(-3).join(' | ')}`);
    return false;
  }
  console.log('postfix installed');
  return true;
}

async function waitForListener(host: string, port: number, child: ChildProcess, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (child.exitCode !== null) throw new Error(`sink exited with code ${child.exitCode}`);
    const ok = await new Promise<boolean>((resolve) => {
      const socket = createConnection({ host, port }, () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`sink did not listen on ${host}:${port} within ${timeoutMs} ms`);
}

function trackCounters(child: ChildProcess): () => SinkCounters {
  const counters: SinkCounters = { sessions: 0, messages: 0 };
  let pending = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    pending += chunk;
    const parts = pending.split(/[\r\n]/);
    pending = parts.pop() ?? '';
    for (const part of parts) {
      const match = /sess=(\d+) quit=\d+ mesg=(\d+)/.exec(part);
      if (match) {
        counters.sessions = Number(match[1]);
        counters.messages = Number(match[2]);
      }
    }
  });
  return () => ({ ...counters });
}

function makeSink(kind: Sink['kind'], host: string, port: number, command: string, child: ChildProcess): Sink {
  const counters = trackCounters(child);
  return {
    kind,
    host,
    port,
    command,
    counters,
    async settledCounters() {
      let last = counters();
      for (let i = 0; i < 40; i++) {
        await sleep(50);
        const now = counters();
        if (now.sessions === last.sessions && now.messages === last.messages && i >= 2) return now;
        last = now;
      }
      return last;
    },
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
        setTimeout(() => {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        }, 2_000).unref();
      }),
  };
}

export interface SinkOptions {
  host?: string;
  /** smtp-sink `-m`: concurrent sessions. */
  maxSessions?: number;
  /** Force a kind (BENCH_SINK). */
  prefer?: 'smtp-sink' | 'smtp-server';
  install?: boolean;
  /** More smtp-sink flags (say `-w 30`, a slow receiver); the smtp-server fallback refuses them. */
  extraArgs?: string[];
}

export async function startSink(options: SinkOptions = {}): Promise<Sink> {
  const host = options.host ?? '127.0.0.1';
  const maxSessions = options.maxSessions ?? 1000;
  if (options.prefer !== 'smtp-server') {
    let binary = findSmtpSink();
    if (!binary && options.install !== false && installPostfix()) binary = findSmtpSink();
    if (binary) {
      const port = await freePort(host);
      const args = ['-c', '-u', 'nobody', '-m', String(maxSessions), '-h', 'sink.test', ...(options.extraArgs ?? []), `${host}:${port}`, '1024'];
      const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      child.stderr!.on('data', (chunk: Buffer) => process.stderr.write(`[smtp-sink] ${chunk.toString()}`));
      try {
        await waitForListener(host, port, child);
        return makeSink('smtp-sink', host, port, `${binary} ${args.join(' ')}`, child);
      } catch (err) {
        console.log(`smtp-sink did not start (${(err as Error).message}); falling back to smtp-server`);
        child.kill('SIGKILL');
      }
    } else {
      console.log('smtp-sink not available; falling back to a separate-process smtp-server sink');
    }
  }
  if (options.extraArgs?.length) throw new Error(`smtp-sink is needed for ${options.extraArgs.join(' ')} (the smtp-server fallback has no such option)`);
  const port = await freePort(host);
  const script = path.join(__dirname, 'sink-server.js');
  const child = spawn(process.execPath, [script, host, String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stderr!.on('data', (chunk: Buffer) => process.stderr.write(`[sink-server] ${chunk.toString()}`));
  await waitForListener(host, port, child);
  return makeSink('smtp-server', host, port, `node ${script} ${host} ${port}`, child);
}

export { freePort };
