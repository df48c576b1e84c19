/**
 * A real DNS server (dns2, UDP) on loopback serving a zone the test writes: MX and A records with
 * TTLs, null MX, NXDOMAIN, SERVFAIL, names it never answers (a timeout) or whose first queries it
 * drops (a lost packet). It counts the queries it receives per (name, type), so tests see the
 * client's cache and retries from the server side.
 */
import dns2 from 'dns2';

const { Packet } = dns2;

export interface Zone {
  /** domain → MX records; `{ priority: 0, exchange: '' }` alone is a null MX. */
  mx?: Record<string, { priority: number; exchange: string }[]>;
  /** host → IPv4 addresses. */
  a?: Record<string, string[]>;
  /** Names that get NXDOMAIN. */
  nxdomain?: string[];
  /** Names that get SERVFAIL. */
  servfail?: string[];
  /** Names whose queries are never answered. */
  silent?: string[];
  /** Names whose first N queries of each type go unanswered (a lost packet), so a client retry is seen. */
  dropFirst?: Record<string, number>;
  /** Names whose answers come this many ms late. */
  delays?: Record<string, number>;
  /** TTL of every record (seconds); per-name override in `ttls`. */
  ttl?: number;
  ttls?: Record<string, number>;
}

/** dns2 encodes plain record objects; its typings ask for its Resource class. */
const resource = (record: Record<string, unknown>) => record as unknown as InstanceType<typeof Packet.Resource>;

export class DnsServer {
  /** `name TYPE` → queries received. */
  readonly queries = new Map<string, number>();
  private server!: ReturnType<typeof dns2.createServer>;
  address = '';

  constructor(public zone: Zone) {}

  static async start(zone: Zone): Promise<DnsServer> {
    const server = new DnsServer(zone);
    await server.listen();
    return server;
  }

  count(name: string, type: 'MX' | 'A' | 'AAAA'): number {
    return this.queries.get(`${name} ${type}`) ?? 0;
  }

  async stop(): Promise<void> {
    await this.server.close();
  }

  private listen(): Promise<void> {
    this.server = dns2.createServer({
      udp: true,
      handle: (request, send) => {
        const [question] = request.questions;
        const name = question.name.toLowerCase();
        const type = Object.entries(Packet.TYPE).find(([, value]) => value === question.type)?.[0] ?? String(question.type);
        const key = `${name} ${type}`;
        const seen = (this.queries.get(key) ?? 0) + 1;
        this.queries.set(key, seen);
        const zone = this.zone;
        if (zone.silent?.includes(name) || seen <= (zone.dropFirst?.[name] ?? 0)) return;
        const response = Packet.createResponseFromRequest(request);
        const ttl = zone.ttls?.[name] ?? zone.ttl ?? 300;
        if (zone.nxdomain?.includes(name)) response.header.rcode = 3;
        else if (zone.servfail?.includes(name)) response.header.rcode = 2;
        else if (question.type === Packet.TYPE.MX) {
          for (const record of zone.mx?.[name] ?? []) response.answers.push(resource({ name, type: Packet.TYPE.MX, class: Packet.CLASS.IN, ttl, ...record }));
        } else if (question.type === Packet.TYPE.A) {
          for (const address of zone.a?.[name] ?? []) response.answers.push(resource({ name, type: Packet.TYPE.A, class: Packet.CLASS.IN, ttl, address }));
        }
        const delay = zone.delays?.[name];
        if (delay) setTimeout(() => send(response), delay);
        else send(response);
      },
    });
    return new Promise((resolve) => {
      this.server.on('listening', () => {
        const { udp } = this.server.addresses() as { udp: { address: string; port: number } };
        this.address = `127.0.0.1:${udp.port}`;
        resolve();
      });
      void this.server.listen({ udp: { port: 0, address: '127.0.0.1' } });
    });
  }
}
