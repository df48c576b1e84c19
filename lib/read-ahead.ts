/**
 * The read-ahead budget: how many messages may be read (built into bytes) before they are
 * delivered. Without it, a queue of 200 sends with a 20 MiB attachment builds all 200 at once
 * (several GiB) while five connections carry five of them.
 *
 * Two gates, both taken before a message is read and held until its delivery ends:
 * - per destination (a sender and a domain): at most `limit` messages, about what that
 *   destination's connections carry now plus a few each to start next; a slow destination holds
 *   only its own share, never the others';
 * - overall: the bytes of every message held stay under `maxBytes`. A message's size is known
 *   only once it is built, so a read reserves an estimate (the size of the last messages built;
 *   the whole budget for the first) and is charged its real size when done. A message larger than the whole budget still goes,
 *   alone, so nothing waits forever.
 * Waiting is FIFO per gate: a message held back for a busy destination does not hold back
 * messages for the others.
 */
import { Fifo } from './fifo';

/** One destination a message goes to, with how many messages it may hold. */
export interface ReadAheadKey {
  key: string;
  limit: number;
}

export interface ReadAheadTicket {
  readonly keys: readonly ReadAheadKey[];
  /** Bytes charged against the overall budget. */
  bytes: number;
  /** `bytes` is an estimate (the message is not built yet): refreshed while it waits. */
  estimated: boolean;
  /** Keys whose slot it holds so far. */
  taken: number;
  wake?: () => void;
}

/** The smallest reservation for a message not yet built. */
const MIN_ESTIMATE = 1024;

export class ReadAheadBudget {
  private heldBytes = 0;
  private heldMessages = 0;
  private readonly perKey = new Map<string, number>();
  private readonly keyWaiters = new Map<string, Fifo<ReadAheadTicket>>();
  private readonly byteWaiters = new Fifo<ReadAheadTicket>();
  /**
   * Recent size of built messages, for the reservation of the next read. Before the first is
   * measured, a read reserves the whole budget: the first message is built alone, so a queue of
   * large messages cannot start a dozen reads on a guess.
   */
  private estimate: number;
  private measured = false;

  constructor(readonly maxBytes: number) {
    this.estimate = maxBytes;
  }

  /** Resolves once the message may be read; `size` when it is known already (a raw Buffer). */
  admit(keys: readonly ReadAheadKey[], size?: number): Promise<ReadAheadTicket> | ReadAheadTicket {
    // Gates are taken in one order for every message: a message holding A while waiting for B
    // and another holding B while waiting for A would wait forever.
    const ordered = keys.length > 1 ? [...keys].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0)) : keys;
    const ticket: ReadAheadTicket = { keys: ordered, bytes: size ?? this.estimate, estimated: size === undefined, taken: 0 };
    if (this.advance(ticket)) return ticket;
    return new Promise((resolve) => {
      ticket.wake = () => resolve(ticket);
    });
  }

  /** The message is built: charge its real size instead of the estimate. */
  settle(ticket: ReadAheadTicket, size: number): void {
    const reserved = ticket.bytes;
    const estimated = ticket.estimated;
    this.heldBytes += size - reserved;
    ticket.bytes = size;
    ticket.estimated = false;
    // A moving average, so that a stream of large messages reserves large and a small one small.
    if (estimated) {
      this.estimate = this.measured ? Math.max(MIN_ESTIMATE, Math.round(this.estimate * 0.75 + size * 0.25)) : Math.max(MIN_ESTIMATE, size);
      this.measured = true;
    }
    if (size < reserved) this.wakeByteWaiters();
  }

  /** The message's delivery ended: its slots and bytes go to the next waiting reads. */
  release(ticket: ReadAheadTicket): void {
    this.heldBytes -= ticket.bytes;
    this.heldMessages--;
    for (const { key } of ticket.keys) {
      const left = this.perKey.get(key)! - 1;
      if (left === 0) this.perKey.delete(key);
      else this.perKey.set(key, left);
      const queue = this.keyWaiters.get(key);
      const next = queue?.shift();
      if (queue?.size === 0) this.keyWaiters.delete(key);
      if (next) this.wakeIfAdmitted(next);
    }
    this.wakeByteWaiters();
  }

  /** Figures for stats(). */
  get held(): { messages: number; bytes: number; waiting: number } {
    let waiting = this.byteWaiters.size;
    for (const queue of this.keyWaiters.values()) waiting += queue.size;
    return { messages: this.heldMessages, bytes: this.heldBytes, waiting };
  }

  /** Takes the ticket's gates in order; false when it had to queue at one. */
  private advance(ticket: ReadAheadTicket): boolean {
    for (; ticket.taken < ticket.keys.length; ticket.taken++) {
      const { key, limit } = ticket.keys[ticket.taken];
      const count = this.perKey.get(key) ?? 0;
      if (count >= limit) {
        let queue = this.keyWaiters.get(key);
        if (!queue) this.keyWaiters.set(key, (queue = new Fifo()));
        queue.push(ticket);
        return false;
      }
      this.perKey.set(key, count + 1);
    }
    // Alone, a message goes whatever its size; in company, only within the budget.
    if (ticket.estimated) ticket.bytes = this.estimate;
    if (this.heldMessages > 0 && this.heldBytes + ticket.bytes > this.maxBytes) {
      this.byteWaiters.push(ticket);
      return false;
    }
    this.heldBytes += ticket.bytes;
    this.heldMessages++;
    return true;
  }

  private wakeIfAdmitted(ticket: ReadAheadTicket): void {
    if (this.advance(ticket)) ticket.wake!();
  }

  private wakeByteWaiters(): void {
    for (let next = this.byteWaiters.peek(); next; next = this.byteWaiters.peek()) {
      if (next.estimated) next.bytes = this.estimate;
      if (this.heldMessages > 0 && this.heldBytes + next.bytes > this.maxBytes) return;
      this.byteWaiters.shift();
      this.heldBytes += next.bytes;
      this.heldMessages++;
      next.wake!();
    }
  }
}
