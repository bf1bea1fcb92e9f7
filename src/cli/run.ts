/** Process entry: runs the CLI and exits with its code once output is flushed. */
import { VERSION } from '../version.js';

const argv = process.argv.slice(2);
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  // Start-up time (issue 19): the version needs neither the argument parser nor any command module.
  process.stdout.write(`${VERSION}\n`);
} else {
  const { main } = await import('./main.js');
  process.exitCode = await main(argv);
}
