/**
 * Fallback sink when Postfix's smtp-sink cannot be had: an smtp-server that accepts everything and
 * discards it, in its own process (`node build/bench/sink-server.js HOST PORT`) so its CPU is not
 * the client's. Prints `sess=N quit=N mesg=N` counters separated by CR, like `smtp-sink -c`, and
 * `listening` once it accepts connections.
 */
import { SMTPServer } from 'smtp-server';

const [host = '127.0.0.1', portText = '0'] = process.argv.slice(2);
let sessions = 0;
let quits = 0;
let messages = 0;
const report = (): void => {
  process.stdout.write(`sess=${sessions} quit=${quits} mesg=${messages}\r`);
};

const server = new SMTPServer({
  name: 'sink.test',
  authOptional: true,
  disabledCommands: ['STARTTLS', 'AUTH'],
  hideSTARTTLS: true,
  disableReverseLookup: true,
  logger: false,
  maxClients: 20_000,
  size: 0,
  onData(stream, _session, callback) {
    stream.on('data', () => {});
    stream.on('end', () => {
      messages++;
      report();
      callback();
    });
  },
  onClose() {
    sessions++;
    quits++;
    report();
  },
});
server.on('error', (err) => process.stderr.write(`sink error: ${err.message}\n`));
server.listen(Number(portText), host, () => process.stdout.write('listening\n'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
