/**
 * Connection caps across processes (`coordination`): before a dial, a lease from Redis on the
 * pair's `maxOutboundConnections` (pool/registry.ts) and on the host's `maxHostConnections`
 * (routing/router.ts), held until the connection's socket is gone (coordination/redis-store.ts).
 * When every lease is held elsewhere the dial waits a moment and asks again. When Redis fails,
 * `onFailure` decides: `'wait'` (the default) dials nothing until Redis answers, so sends wait
 * and, past `acquireTimeout`, go pending; `{ processes: N }` goes on with this process's share of
 * each cap (rounded up), as if N processes shared it evenly.
 */
import type { CountingConnection } from '../smtp/connection';
import type { CoordinationOptions, Lease, RedisStore } from '../coordination/redis-store';

/** How soon a dial asks again when the cluster holds every lease, and after Redis failed. */
const FULL_RETRY_MS = 100;
const FAILED_RETRY_MS = 500;

export type FailurePolicy = NonNullable<CoordinationOptions['onFailure']>;

/** The outcome of asking for a lease. */
export interface LeaseGrant {
  granted: boolean;
  /** Not granted: when to ask again. */
  retryInMs: number;
  /** Holds the lease until the connection's socket is gone. */
  holdFor(connection: CountingConnection): void;
  /** Gives it back at once (the dial failed). */
  release(): void;
}

const LOCAL_GRANT: LeaseGrant = { granted: true, retryInMs: 0, holdFor: () => undefined, release: () => undefined };

export class ClusterLeases {
  constructor(
    readonly store: RedisStore,
    private readonly onFailure: FailurePolicy,
  ) {}

  /** The failure Redis is in, while it fails. */
  get failure(): Error | undefined {
    return this.store.failure;
  }

  /** A lease on `name` (at most `cap` across processes); `localHeld` counts this process's, this dial included. */
  async take(name: string, cap: number, localHeld: number): Promise<LeaseGrant> {
    let lease: Lease | undefined;
    try {
      lease = await this.store.lease(name, cap);
    } catch {
      if (this.onFailure !== 'wait' && localHeld <= Math.ceil(cap / this.onFailure.processes)) return LOCAL_GRANT;
      return { ...LOCAL_GRANT, granted: false, retryInMs: FAILED_RETRY_MS };
    }
    if (!lease) return { ...LOCAL_GRANT, granted: false, retryInMs: FULL_RETRY_MS };
    const held = lease;
    return {
      granted: true,
      retryInMs: 0,
      holdFor: (connection) => {
        // Lost (Redis restarted and the cap filled meanwhile): the connection goes after its transaction.
        held.onLost = () => connection.retire('shaped');
        void connection.whenEnded().then(() => this.store.release(held));
      },
      release: () => this.store.release(held),
    };
  }
}
