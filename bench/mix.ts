/**
 * The `real-mix` workload: composed messages (text + HTML, attachments) of realistic sizes,
 * built by Nodemailer on every send from a fixed catalogue of variants.
 *
 *   70 % small   5–20 KiB    text + HTML, no attachment
 *   25 % medium  20–200 KiB  text + HTML + one attachment (a "PDF")
 *    5 % big     1–10 MiB    text + HTML + 1–3 attachments
 *
 * Sizes are of the composed message (what goes on the wire before dot-stuffing). Each class has
 * a fixed number of variants whose target sizes are spread evenly over the class's range. Which
 * variant send `i` uses is a pure function of `i` (a seeded hash), so every candidate, in every
 * child process, sends the same sequence. Text is generated once from a seeded word list (with
 * some non-ASCII words, so Nodemailer encodes the parts quoted-printable); attachment contents are
 * slices of one seeded 8 MiB pseudo-random Buffer (incompressible, like JPEG or PDF data),
 * generated once per process and reused by every send.
 */
import nodemailer from 'nodemailer';
import type { SendMailOptions } from 'nodemailer';
import type { Readable } from 'node:stream';
import { mulberry32 } from '../test/support/fault-server';

export const MIX_SEED = 0x5eed_2026;

export interface MixClass {
  name: 'small' | 'medium' | 'big';
  /** Share of the sends. */
  share: number;
  /** Composed size range, bytes. */
  min: number;
  max: number;
  variants: number;
}

const KiB = 1024;
const MiB = 1024 * 1024;

export const MIX_CLASSES: readonly MixClass[] = [
  { name: 'small', share: 0.7, min: 5 * KiB, max: 20 * KiB, variants: 64 },
  { name: 'medium', share: 0.25, min: 20 * KiB, max: 200 * KiB, variants: 32 },
  { name: 'big', share: 0.05, min: 1 * MiB, max: 10 * MiB, variants: 16 },
];

export const MIX_DESCRIPTION = '70 % 5–20 KiB (text + HTML), 25 % 20–200 KiB (+ 1 attachment), 5 % 1–10 MiB (+ 1–3 attachments)';

/** A 32-bit hash of (i, salt): the seeded, stateless choice for send i. */
function hash32(i: number, salt: number): number {
  let h = (Math.imul(i ^ MIX_SEED, 0x9e3779b1) + Math.imul(salt, 0x85ebca77)) | 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Which class and variant send i uses. */
export function mixChoice(i: number): { klass: number; variant: number } {
  const u = hash32(i, 1) / 4294967296;
  let klass = MIX_CLASSES.length - 1;
  let acc = 0;
  for (let k = 0; k < MIX_CLASSES.length; k++) {
    acc += MIX_CLASSES[k].share;
    if (u < acc) {
      klass = k;
      break;
    }
  }
  return { klass, variant: hash32(i, 2) % MIX_CLASSES[klass].variants };
}

interface Variant {
  text: string;
  html: string;
  attachments: { filename: string; content: Buffer; contentType: string }[];
}

const WORDS = (
  'the and for your order account update invoice meeting please thanks regards team project ' +
  'delivery shipment tracking number customer support service request ticket report monthly ' +
  'summary details attached review schedule tomorrow confirm available discount offer newsletter ' +
  'subscribe unsubscribe preferences privacy policy terms click here learn more today week'
).split(' ');
/** About one word in 40 is one of these, so the parts are quoted-printable as most European mail is. */
const ACCENTED = 'Grüße café naïve résumé Zürich déjà señor Ångström für über straße façade'.split(' ');

/** Text of about `length` characters: paragraphs of words, lines wrapped at 72 characters. */
function paragraphs(rand: () => number, length: number): string[] {
  const out: string[] = [];
  let total = 0;
  while (total < length) {
    const target = Math.min(length - total, 200 + Math.floor(rand() * 600));
    let para = '';
    let line = '';
    while (para.length + line.length < target) {
      const word = rand() < 0.025 ? ACCENTED[Math.floor(rand() * ACCENTED.length)] : WORDS[Math.floor(rand() * WORDS.length)];
      if (line.length + word.length + 1 > 72) {
        para += line + '\n';
        line = '';
      }
      line += (line ? ' ' : '') + word;
    }
    para += line;
    out.push(para);
    total += para.length + 2;
  }
  return out;
}

function htmlOf(rand: () => number, paras: string[]): string {
  const style = 'margin:0 0 12px;font-family:Arial,Helvetica,sans-serif;font-size:14px;line-height:20px;color:#333333';
  const body = paras
    .map((p, k) => {
      const flat = p.replace(/\n/g, ' ');
      const link =
        k % 3 === 0
          ? ` <a href="https://news.example.com/t/${Math.floor(rand() * 1e9)}?utm_source=mail&amp;utm_medium=email" style="color:#0066cc">read more</a>`
          : '';
      return `<tr><td style="padding:0 24px"><p style="${style}">${flat}${link}</p></td></tr>`;
    })
    .join('\n');
  return (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Message</title></head>' +
    '<body style="margin:0;padding:0;background:#f4f4f4"><table role="presentation" width="100%" cellpadding="0" cellspacing="0" style="max-width:640px;margin:0 auto;background:#ffffff">\n' +
    body +
    '\n</table></body></html>'
  );
}

let attachmentData: Buffer | undefined;

/** The 8 MiB of seeded pseudo-random bytes every attachment is a slice of (generated once). */
export function attachmentBytes(): Buffer {
  if (attachmentData) return attachmentData;
  const buf = Buffer.allocUnsafe(8 * MiB);
  let x = MIX_SEED | 1;
  for (let o = 0; o < buf.length; o += 4) {
    // xorshift32
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeInt32LE(x | 0, o);
  }
  return (attachmentData = buf);
}

/** Composed bytes per raw attachment byte: base64 (4/3) in 76-character lines plus CRLF. */
const BASE64_FACTOR = (4 / 3) * (78 / 76);
/** Headers, MIME boundaries and part headers, roughly. */
const OVERHEAD = 1_000;
/** Composed bytes per character of text or HTML: quoted-printable soft breaks, =3D in the markup, the odd accented letter. */
const QP_FACTOR = 1.06;

function buildVariant(klass: MixClass, k: number): Variant {
  const rand = mulberry32(MIX_SEED + klass.variants * 1000 + k * 7919 + klass.min);
  // Target sizes spread evenly over the class's range, 3 % in from its ends (the sizes reached are a few hundred bytes off).
  const margin = 0.03 * (klass.max - klass.min);
  const target = Math.round(klass.min + margin + ((klass.max - klass.min - 2 * margin) * (k + 0.5)) / klass.variants);
  let bodyBudget: number;
  if (klass.name === 'small') bodyBudget = (target - OVERHEAD) / QP_FACTOR;
  else bodyBudget = 3 * KiB + Math.floor(rand() * 9 * KiB);
  // Text about a third of the body, HTML (with its markup) the rest.
  const textParas = paragraphs(rand, Math.floor(bodyBudget * 0.33));
  const text = textParas.join('\n\n') + '\n\n-- \nExample Sender, 1 Example Street\n';
  let html = htmlOf(rand, textParas);
  // Pad the HTML with more paragraphs until the body budget is used (the markup adds a lot).
  while (text.length + html.length < bodyBudget * 0.99) {
    const more = paragraphs(rand, Math.min(2_000, bodyBudget - text.length - html.length));
    html = html.replace('\n</table>', '\n' + htmlOf(rand, more).split('\n').slice(1, -1).join('\n') + '\n</table>');
  }
  const attachments: Variant['attachments'] = [];
  if (klass.name !== 'small') {
    const data = attachmentBytes();
    const rawTotal = Math.max(KiB, Math.floor((target - OVERHEAD - QP_FACTOR * (text.length + html.length)) / BASE64_FACTOR));
    const count = klass.name === 'medium' ? 1 : 1 + (k % 3);
    const shares = count === 1 ? [1] : count === 2 ? [0.7, 0.3] : [0.6, 0.3, 0.1];
    const kinds = [
      { ext: 'pdf', type: 'application/pdf' },
      { ext: 'jpg', type: 'image/jpeg' },
      { ext: 'zip', type: 'application/zip' },
    ];
    let used = 0;
    shares.forEach((share, j) => {
      const n = j === shares.length - 1 ? rawTotal - used : Math.floor(rawTotal * share);
      used += n;
      const offset = (j * 257 * KiB + k * 4099) % (data.length - n);
      attachments.push({ filename: `${klass.name}-${k}-${j}.${kinds[j].ext}`, content: data.subarray(offset, offset + n), contentType: kinds[j].type });
    });
  }
  return { text, html, attachments };
}

let catalogue: Variant[][] | undefined;

function variants(): Variant[][] {
  catalogue ??= MIX_CLASSES.map((klass) => Array.from({ length: klass.variants }, (_, k) => buildVariant(klass, k)));
  return catalogue;
}

/** The sendMail options of send i (a fresh attachments array each time; the Buffers are shared). */
export function mixMail(i: number, from: string, to: string[]): SendMailOptions {
  const { klass, variant } = mixChoice(i);
  const v = variants()[klass][variant];
  return {
    from,
    to,
    subject: `Your ${MIX_CLASSES[klass].name} message ${i}`,
    text: v.text,
    html: v.html,
    attachments: v.attachments.map((a) => ({ ...a })),
  };
}

async function streamLength(stream: Readable): Promise<number> {
  let n = 0;
  for await (const chunk of stream) n += (chunk as Buffer).length;
  return n;
}

/** Composed size of every variant, per class (composed once through Nodemailer's stream transport). */
export async function mixVariantSizes(): Promise<number[][]> {
  const transporter = nodemailer.createTransport({ streamTransport: true, buffer: false });
  const sizes: number[][] = [];
  const all = variants();
  for (let klass = 0; klass < all.length; klass++) {
    const row: number[] = [];
    for (let variant = 0; variant < all[klass].length; variant++) {
      const v = all[klass][variant];
      const info = await transporter.sendMail({
        from: 'bench@sender.example',
        to: ['u0r1@example.com'],
        subject: `Your ${MIX_CLASSES[klass].name} message 0`,
        text: v.text,
        html: v.html,
        attachments: v.attachments.map((a) => ({ ...a })),
      });
      row.push(await streamLength(info.message as unknown as Readable));
    }
    sizes.push(row);
  }
  return sizes;
}

/** What `sends` sends of the mix add up to (per-send headers differ from the measured variant by a few bytes). */
export function mixTotals(sends: number, sizes: number[][]): { bytes: number; perClass: number[] } {
  let bytes = 0;
  const perClass = MIX_CLASSES.map(() => 0);
  for (let i = 0; i < sends; i++) {
    const { klass, variant } = mixChoice(i);
    bytes += sizes[klass][variant];
    perClass[klass]++;
  }
  return { bytes, perClass };
}
