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
 * A message takes all its gates at once or none: held back for a busy destination, it holds
 * nothing of the others. Waiting is FIFO per gate.
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
    const ticket: ReadAheadTicket = { keys, bytes: size ?? this.estimate, estimated: size === undefined };
    if (this.tryAdmit(ticket, false)) return ticket;
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
    const { keys } = ticket;
    for (let i = 0; i < keys.length; i++) {
      const { key } = keys[i];
      const left = this.perKey.get(key)! - 1;
      if (left === 0) this.perKey.delete(key);
      else this.perKey.set(key, left);
    }
    // Nobody waits, the common case: no lookups.
    if (this.keyWaiters.size > 0) {
      for (let i = 0; i < keys.length; i++) {
        const { key } = keys[i];
        const queue = this.keyWaiters.get(key);
        const next = queue?.shift();
        if (queue?.size === 0) this.keyWaiters.delete(key);
        if (next && this.tryAdmit(next, false)) next.wake!();
      }
    }
    if (this.byteWaiters.size > 0) this.wakeByteWaiters();
  }

  /** Figures for stats(). */
  get held(): { messages: number; bytes: number; waiting: number } {
    let waiting = this.byteWaiters.size;
    for (const queue of this.keyWaiters.values()) waiting += queue.size;
    return { messages: this.heldMessages, bytes: this.heldBytes, waiting };
  }

  /**
   * Admits the ticket when every gate has room, taking them all at once; otherwise queues it at
   * the first full one and takes nothing, so a message held back by one destination never holds
   * a slot of another (and no two messages can wait on each other). The byte gate is FIFO: a
   * large message waiting for room is not overtaken by smaller ones forever.
   */
  private tryAdmit(ticket: ReadAheadTicket, atByteQueueHead: boolean): boolean {
    const { keys } = ticket;
    for (let i = 0; i < keys.length; i++) {
      const { key, limit } = keys[i];
      if ((this.perKey.get(key) ?? 0) < limit) continue;
      let queue = this.keyWaiters.get(key);
      if (!queue) this.keyWaiters.set(key, (queue = new Fifo()));
      queue.push(ticket);
      return false;
    }
    // Alone, a message goes whatever its size; in company, only within the budget, in turn.
    if (ticket.estimated) ticket.bytes = this.estimate;
    const inTurn = atByteQueueHead || this.byteWaiters.size === 0;
    if (this.heldMessages > 0 && (!inTurn || this.heldBytes + ticket.bytes > this.maxBytes)) {
      if (!atByteQueueHead) this.byteWaiters.push(ticket);
      return false;
    }
    for (let i = 0; i < keys.length; i++) {
      const { key } = keys[i];
      this.perKey.set(key, (this.perKey.get(key) ?? 0) + 1);
    }
    this.heldBytes += ticket.bytes;
    this.heldMessages++;
    return true;
  }

  private wakeByteWaiters(): void {
    for (let next = this.byteWaiters.peek(); next; next = this.byteWaiters.peek()) {
      // The head may meet a full destination meanwhile: it moves to that queue and comes back.
      const fullKey = next.keys.some(({ key, limit }) => (this.perKey.get(key) ?? 0) >= limit);
      if (!fullKey && this.heldMessages > 0 && this.heldBytes + (next.estimated ? this.estimate : next.bytes) > this.maxBytes) return;
      this.byteWaiters.shift();
      if (this.tryAdmit(next, true)) next.wake!();
    }
  }
}
