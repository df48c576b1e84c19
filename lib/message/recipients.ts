/**
 * Envelope addresses: checking them and grouping recipients by destination domain. Domains are
 * compared case-insensitively, internationalised ones in their ASCII (punycode) form.
 */
import { domainToASCII } from 'node:url';
import { BindingPoolError } from '../errors';

/** RFC 5321 4.5.3.1: 64 octets of local part, 255 of domain, 256 of path (with the brackets). */
const MAX_LOCAL_PART = 64;
const MAX_ADDRESS = 254;

/** Characters that would end or smuggle an SMTP command line. */
const INJECTION = /[\r\n\0<>]/;

export interface Recipient {
  /** The address as the message gave it; results report this form. */
  readonly address: string;
  /** What goes into RCPT TO: the local part with the ASCII domain. */
  readonly rcpt: string;
  readonly domain: string;
}

/** A recipient that cannot be sent to, with the reason. */
export interface InvalidRecipient {
  readonly address: string;
  readonly reason: string;
}

/** The lower-case ASCII form of a domain, or '' when it is not a valid domain name. */
/** Plain ASCII host names need no IDNA processing (the common case, kept off the slow path). */
const ASCII_DOMAIN = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$/;

/** One label of a host name in ASCII: letters, digits, inner hyphens, at most 63 (punycode labels fit). */
const LDH_LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

export function normalizeDomain(domain: string): string {
  if (typeof domain !== 'string' || domain === '' || /[\s\0@]/.test(domain)) return '';
  if (domain.length <= 253 && ASCII_DOMAIN.test(domain) && !/(^|\.)xn--/i.test(domain)) return domain.toLowerCase();
  const ascii = domainToASCII(domain.replace(/\.$/, '')).toLowerCase();
  // domainToASCII (WHATWG, non-strict) keeps empty labels, edge hyphens and underscores.
  if (!ascii || ascii.length > 253 || !ascii.split('.').every((label) => LDH_LABEL.test(label))) return '';
  return ascii;
}

/**
 * Throws when an address could inject SMTP commands: the whole message is refused then, since a
 * caller passing such an address is not passing what it thinks it is.
 */
export function assertNoInjection(address: string, role: 'sender' | 'recipient'): void {
  if (INJECTION.test(address)) {
    throw new BindingPoolError('EADDRESS', `${role} ${JSON.stringify(address)} contains CR, LF, NUL or angle brackets; nothing of this message was sent`);
  }
}

/** Parses one recipient; invalid ones come back with the reason so the rest can still go out. */
export function parseRecipient(address: string): Recipient | InvalidRecipient {
  const at = address.lastIndexOf('@');
  if (at <= 0 || at === address.length - 1) return { address, reason: 'has no local part or no domain' };
  // Nodemailer trims what it sends in RCPT TO and reports the replies under the trimmed form.
  if (address.trimStart() !== address) return { address, reason: 'starts with whitespace' };
  const local = address.slice(0, at);
  // RFC 5321 counts octets (RFC 6531: of the UTF-8 form), not characters.
  if (Buffer.byteLength(local) > MAX_LOCAL_PART) return { address, reason: `local part is longer than ${MAX_LOCAL_PART} octets` };
  const domain = normalizeDomain(address.slice(at + 1));
  if (!domain) return { address, reason: `domain ${JSON.stringify(address.slice(at + 1))} is not a valid domain name` };
  const rcpt = `${local}@${domain}`;
  if (Buffer.byteLength(rcpt) > MAX_ADDRESS) return { address, reason: `is longer than ${MAX_ADDRESS} octets` };
  return { address, rcpt, domain };
}

/** CR, LF or NUL: never part of an address or a display name as an application means it. */
const LINE_BREAK_OR_NUL = /[\r\n\0]/;

/** The fields of a message that name its sender or recipients, as the application passes them. */
const ADDRESS_FIELDS = ['from', 'sender', 'replyTo', 'to', 'cc', 'bcc'] as const;
const ENVELOPE_FIELDS = ['from', 'to', 'cc', 'bcc'] as const;

/**
 * Throws EADDRESS when a sender or recipient field, as the application passed it, holds CR, LF
 * or NUL. Checked before Nodemailer's address parser, which would turn
 * `'a@d.test\r\nRCPT TO:<x@d.test>'` into two clean-looking addresses.
 */
export function assertCleanAddressFields(mail: object): void {
  const data = mail as Record<string, unknown>;
  for (const field of ADDRESS_FIELDS) if (data[field] !== undefined) assertClean(data[field], field);
  const envelope = data.envelope as Record<string, unknown> | undefined;
  if (envelope && typeof envelope === 'object') {
    for (const field of ENVELOPE_FIELDS) if (envelope[field] !== undefined) assertClean(envelope[field], 'envelope.', field);
  }
}

/** `prefix` and `field` make the option path, joined only for the error (every send is checked). */
function assertClean(value: unknown, prefix: string, field = ''): void {
  const dirty = dirtyPart(value);
  if (dirty === undefined) return;
  throw new BindingPoolError(
    'EADDRESS',
    `${prefix}${field}${dirty.path} ${JSON.stringify(dirty.value)} contains CR, LF or NUL; nothing of this message was sent`,
  );
}

/** The first part of an address value holding CR, LF or NUL, with its path below the value ('' for the value itself). */
function dirtyPart(value: unknown): { path: string; value: string } | undefined {
  if (typeof value === 'string') return LINE_BREAK_OR_NUL.test(value) ? { path: '', value } : undefined;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const dirty = dirtyPart(value[i]);
      if (dirty) return { path: `[${i}]${dirty.path}`, value: dirty.value };
    }
    return undefined;
  }
  if (!value || typeof value !== 'object') return undefined;
  const { name, address } = value as { name?: unknown; address?: unknown };
  const dirty = dirtyPart(name);
  if (dirty) return { path: `.name${dirty.path}`, value: dirty.value };
  const dirtyAddress = dirtyPart(address);
  return dirtyAddress && { path: `.address${dirtyAddress.path}`, value: dirtyAddress.value };
}

export interface GroupedRecipients {
  /** [domain, recipients], in first-seen order (what an engine is handed). */
  groups: [domain: string, recipients: Recipient[]][];
  invalid: InvalidRecipient[];
}

/**
 * Groups an envelope's recipients by domain. A recipient listed twice (case-insensitive domain,
 * exact local part) is kept once, so it is neither delivered nor reported twice.
 */
export function groupByDomain(addresses: readonly string[]): GroupedRecipients {
  const byDomain = new Map<string, Recipient[]>();
  const groups: [string, Recipient[]][] = [];
  const invalid: InvalidRecipient[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < addresses.length; i++) {
    const address = addresses[i];
    assertNoInjection(address, 'recipient');
    const parsed = parseRecipient(address);
    if ('reason' in parsed) {
      if (!seen.has(address)) invalid.push(parsed);
      seen.add(address);
      continue;
    }
    if (seen.has(parsed.rcpt)) continue;
    seen.add(parsed.rcpt);
    let group = byDomain.get(parsed.domain);
    if (!group) {
      byDomain.set(parsed.domain, (group = []));
      groups.push([parsed.domain, group]);
    }
    group.push(parsed);
  }
  return { groups, invalid };
}

/** The addresses by destination domain, in first-seen order, then the unparseable ones together. */
export function domainGroups(addresses: readonly string[]): string[][] {
  const { groups, invalid } = groupByDomain(addresses);
  const addressGroups = groups.map(([, recipients]) => recipients.map((r) => r.address));
  if (invalid.length > 0) addressGroups.push(invalid.map((r) => r.address));
  return addressGroups;
}
