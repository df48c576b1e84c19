/**
 * A server that drops the connection instead of answering RSET (after a refused transaction).
 * SMTPConnection forgets the RSET callback then; the send must still settle. smtp-server has no
 * hook for RSET, so this peer is a scripted SMTP server on a loopback TCP socket.
 */
import { createServer, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { makeTransport } from './support/send';

test('a connection dropped in reply to RSET settles the send and is retired', async () => {
  const commands: string[] = [];
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    socket.write('220 scripted ESMTP\r\n');
    let buffered = '';
    socket.on('data', (chunk) => {
      buffered += chunk.toString();
      let end;
      while ((end = buffered.indexOf('\r\n')) >= 0) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        commands.push(line.split(' ')[0].toUpperCase());
        if (/^EHLO/i.test(line)) socket.write('250 scripted\r\n');
        else if (/^MAIL/i.test(line)) socket.write('250 ok\r\n');
        else if (/^RCPT/i.test(line)) socket.write('550 no such user\r\n');
        else if (/^RSET/i.test(line)) socket.destroy();
        else if (/^QUIT/i.test(line)) socket.end('221 bye\r\n');
        else socket.write('502 unknown\r\n');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  const { pool, transporter } = makeTransport({ route: { host: '127.0.0.1', port } });

  const err = await transporter.sendMail({ from: 's@example.com', to: 'nobody@rset.test', text: 'x' }).catch((e: unknown) => e);
  const stats = pool.stats();
  await transporter.close();
  await new Promise<void>((resolve) => server.close(() => resolve()));

  expect(err).toMatchObject({ code: 'EREJECTED', rejected: ['nobody@rset.test'] });
  expect(commands).toEqual(['EHLO', 'MAIL', 'RCPT', 'RSET']);
  // The dropped connection was not handed back as usable.
  expect(stats.pools[0]).toMatchObject({ busy: 0, open: 0 });
});
