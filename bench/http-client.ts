// A lean HTTP/1.1 client for the load benchmarks: node:http over keep-alive sockets. The load generator shares the
// machine with the server it measures, so its own CPU time and garbage (which fetch has several times more of per
// request: WHATWG streams, Request/Response/Headers objects) become the server's latency in the figures.
import http from 'node:http';

export interface HttpAnswer {
  status: number;
  body: string;
}

export class LoadClient {
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

  constructor(readonly origin: string) {}

  /** The whole answer, body as text. */
  request(method: string, path: string, headers: Record<string, string> = {}, body?: string): Promise<HttpAnswer> {
    return new Promise((resolve, reject) => {
      const req = http.request(this.origin + path, { method, headers: body === undefined ? headers : { ...headers, 'content-length': Buffer.byteLength(body) }, agent: this.agent }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (text += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  /** Until the first chunk of a streamed answer (an SSE subscription's first event); then drops the connection. */
  firstChunk(path: string, headers: Record<string, string> = {}): Promise<number> {
    return new Promise((resolve, reject) => {
      const req = http.get(this.origin + path, { headers, agent: this.agent }, (res) => {
        res.once('data', () => {
          resolve(res.statusCode ?? 0);
          req.destroy();
        });
        res.once('end', () => resolve(res.statusCode ?? 0));
        res.on('error', () => undefined); // the reset this destroy causes, after the answer was taken
      });
      req.on('error', reject);
    });
  }

  close(): void {
    this.agent.destroy();
  }
}
