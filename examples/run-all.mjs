// `npm run examples`: runs every compiled example (build/examples/<name>.js) in turn, each with a
// 20 s timeout, and prints `example <name>: ok`, or its output and exits non-zero when it fails.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const names = ['relay', 'direct-mx', 'big-receivers', 'shaping', 'stats', 'graceful-shutdown', 'queue', 'demo'];

for (const name of names) {
  const started = Date.now();
  const result = spawnSync(process.execPath, [join(root, 'build', 'examples', `${name}.js`)], { cwd: root, encoding: 'utf8', timeout: 20_000 });
  if (result.status === 0) {
    console.log(`example ${name}: ok (${Date.now() - started} ms)`);
    continue;
  }
  const why = result.error ? result.error.message : result.signal ? `killed by ${result.signal}` : `exit code ${result.status}`;
  console.error(`example ${name}: FAILED (${why})\n--- stdout ---\n${result.stdout}\n--- stderr ---\n${result.stderr}`);
  process.exit(1);
}
