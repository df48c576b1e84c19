/**
 * When a (binding, domain) pool may dial, and whether it may hand out connections at all: what
 * the destination's answers taught it. Three rules, each from what MTAs do:
 *
 * - Connect backoff (a dead destination): after a dial that reached no host, no dial for
 *   `connectBackoff`, doubled per failure in a row up to `maxConnectBackoff`. Dials that were
 *   already under way when the outage began count as one failure, not one each. Open
 *   connections go on serving sends meanwhile: the backoff limits dialling, not the queue.
 * - Throttle pause: a 421 greeting with nothing open, or a 421 at the first transaction of a
 *   fresh connection, is the receiver throttling this binding. The pair sends nothing for a
 *   pause that starts at `connectBackoff` and doubles per throttle in a row (up to
 *   `maxConnectBackoff`), then tries one connection.
 * - Probation: after any 421 (also the per-connection limit, a 421 after k ≥ 1 deliveries, which
 *   is answered by a new connection at once) only one new connection at a time, until one of
 *   them delivers: a receiver that has started refusing is not met with a burst of dials.
 *   A probe that delivers ends probation and lowers the pause level by one.
 */
import type { CountingConnection } from '../smtp/connection';
import { describeError } from '../errors';
import { DialFailure } from './host-slots';

export interface DialGateSettings {
  connectBackoff: number;
  maxConnectBackoff: number;
}

export class DialGate {
  /** Failed dials in a row (one outage's concurrent failures count once). */
  failuresInRow = 0;
  private backoffUntil = 0;
  private lastFailureAt = 0;
  lastError: unknown;
  private throttleLevel = 0;
  private pausedUntil = 0;
  /** The reply that started the pause in force. */
  throttleReply = '';
  private probation = false;
  private probe: CountingConnection | undefined;
  /** The probe's deliveries when it came (one taken over from another pool has some already). */
  private probeBase = 0;

  constructor(private readonly settings: DialGateSettings) {}

  /** True while a throttle pause holds every send of the pair. */
  paused(now: number): boolean {
    return now < this.pausedUntil;
  }

  get pauseEnds(): number {
    return this.pausedUntil;
  }

  backingOff(now: number): boolean {
    return now < this.backoffUntil;
  }

  get backoffEnds(): number {
    return this.backoffUntil;
  }

  /** The earliest time a dial could start, when one cannot now. */
  get reopensAt(): number {
    return Math.max(this.backoffUntil, this.pausedUntil);
  }

  /** Whether a dial may start now, with `dialing` dials already under way. */
  mayDial(now: number, dialing: number): boolean {
    if (now < this.backoffUntil || now < this.pausedUntil) return false;
    return !this.probation || (dialing === 0 && this.probe === undefined);
  }

  connected(connection: CountingConnection): void {
    this.failuresInRow = 0;
    this.backoffUntil = 0;
    if (this.probation && this.probe === undefined) {
      this.probe = connection;
      this.probeBase = connection.deliveries;
    }
  }

  /** A dial failed: a crowded host changes nothing here, a throttling one pauses, a dead one backs off. */
  failed(err: unknown, startedAt: number, now: number): void {
    this.lastError = err;
    const verdict = err instanceof DialFailure ? err.verdict : 'unreachable';
    if (verdict === 'crowded') return;
    if (verdict === 'throttled') {
      this.throttle(now, describeError(err));
      return;
    }
    if (this.failuresInRow === 0 || startedAt >= this.lastFailureAt) this.failuresInRow++;
    this.lastFailureAt = now;
    this.backoffUntil = now + this.step(this.failuresInRow);
  }

  /** What a transaction's end says: a 421 is a per-connection limit or a throttle; a probe's delivery ends probation. */
  afterTransaction(connection: CountingConnection, now: number): void {
    if (connection.closingReply !== undefined) {
      if (this.probe === connection) this.probe = undefined;
      if (connection.deliveries === 0) this.throttle(now, connection.closingReply);
      else this.probation = true;
      return;
    }
    if (this.probe === connection && connection.deliveries > this.probeBase) {
      this.probation = false;
      this.probe = undefined;
      this.throttleLevel = Math.max(0, this.throttleLevel - 1);
    }
  }

  /** A connection that closes before proving itself frees the probe's place. */
  forget(connection: CountingConnection): void {
    if (this.probe === connection) this.probe = undefined;
  }

  private throttle(now: number, reply: string): void {
    this.throttleLevel++;
    this.pausedUntil = now + this.step(this.throttleLevel);
    this.throttleReply = reply;
    this.probation = true;
    this.probe = undefined;
  }

  private step(n: number): number {
    return Math.min(this.settings.connectBackoff * 2 ** (n - 1), this.settings.maxConnectBackoff);
  }
}
