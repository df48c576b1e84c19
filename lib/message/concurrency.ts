/**
 * A FIFO limit on how many tasks run at once. The transport reads (builds) messages through
 * one: Nodemailer's streams interleave, so 20 000 messages read at once all finish together at
 * the end, holding every one in memory and leaving the connections idle until then. Read a few
 * at a time, each message is handed to a connection as soon as it is built.
 */
import { Fifo } from './fifo';
/** Messages read (built) at once, by the transport and by the queue's add(). */
export const MAX_CONCURRENT_READS = 16;

export class ConcurrencyLimit {
  private running = 0;
  private readonly waiting = new Fifo<() => void>();

  constructor(readonly limit: number) {}

  /** Runs task once fewer than `limit` others run; tasks start in the order they came. */
  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.running >= this.limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.running++;
    try {
      return await task();
    } finally {
      this.release();
    }
  }

  /** Tasks waiting for a turn. */
  get queued(): number {
    return this.waiting.size;
  }

  private release(): void {
    // The slot passes straight to the next task: `running` stays the same.
    const next = this.waiting.shift();
    if (next) next();
    else this.running--;
  }
}
