// Debian's redis-server on 127.0.0.1 on a free port, for one test file; killed after it.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export async function startRedis(): Promise<{ url: string; proc: ChildProcess; stop: () => void }> {
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`redis-server did not start: ${out}`)), 15_000);
    proc.stdout!.on('data', (d) => {
      out += d;
      if (/Ready to accept connections/.test(out)) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.on('error', (e) => reject(new Error(`cannot run redis-server (apt-get install -y redis-server): ${e.message}`)));
  });
  return { url: `redis://127.0.0.1:${port}`, proc, stop: () => void (proc.exitCode === null && proc.kill('SIGKILL')) };
}
