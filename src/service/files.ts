// Output images live under <data>/outputs/<run id>/ and are served through signed, expiring URLs:
// /v1/files/<run id>/<name>?expires=<unix s>&signature=<hex HMAC-SHA256(server secret, "run/name:expires")>.
// Capability URLs let clients hand an image to a browser or another service without sharing their API key.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { GeneratedImage } from '../pipeline/types.ts';
import type { Store } from './store.ts';
import { isoNow } from './time.ts';

export interface StoredImage {
  file: string;
  width: number;
  height: number;
  content_type: string;
  bytes: number;
  /** the file carries an alpha channel (a transparent background); absent on runs stored before it existed */
  has_alpha?: boolean;
}

const EXT: Record<string, string> = { 'image/png': 'png', 'image/jpeg': 'jpg', 'image/webp': 'webp' };
const SAFE = /^[A-Za-z0-9._-]+$/;

export class FileStore {
  readonly root: string;
  private secret: Buffer;

  constructor(dataDir: string, store: Store, readonly urlTtlS: number, readonly retentionS: number) {
    this.root = path.join(dataDir, 'outputs');
    fs.mkdirSync(this.root, { recursive: true });
    // the signing secret is per installation and survives restarts, so URLs already handed out stay valid
    let s = store.getMeta('file_url_secret');
    if (!s) {
      s = crypto.randomBytes(32).toString('hex');
      store.setMeta('file_url_secret', s);
    }
    this.secret = Buffer.from(s, 'hex');
  }

  /** Writes on libuv's threads: an image is megabytes, and the API's event loop has requests to answer meanwhile. */
  async save(runId: string, index: number, img: GeneratedImage): Promise<StoredImage> {
    const dir = path.join(this.root, runId);
    await fs.promises.mkdir(dir, { recursive: true });
    const file = `${index}.${EXT[img.contentType] ?? 'bin'}`;
    // write then rename: a crash never leaves a half-written image under the final name
    const tmp = path.join(dir, `.${file}.tmp`);
    try {
      await fs.promises.writeFile(tmp, img.data);
      await fs.promises.rename(tmp, path.join(dir, file));
    } catch (e) {
      // a full disk leaves a partial temp file: drop it, so the failure frees what it took
      await fs.promises.rm(tmp, { force: true });
      throw e;
    }
    return { file, width: img.width, height: img.height, content_type: img.contentType, bytes: img.data.length, has_alpha: img.hasAlpha === true };
  }

  private sign(runId: string, file: string, expires: number): string {
    return crypto.createHmac('sha256', this.secret).update(`${runId}/${file}:${expires}`).digest('hex');
  }

  url(baseUrl: string, runId: string, file: string, now = Date.now()): string {
    const expires = Math.floor(now / 1000) + this.urlTtlS;
    return `${baseUrl}/v1/files/${runId}/${file}?expires=${expires}&signature=${this.sign(runId, file, expires)}`;
  }

  /** The file's path when the signature is valid and unexpired; a reason otherwise. */
  resolve(runId: string, file: string, expires: string | undefined, signature: string | undefined, now = Date.now()): { path: string } | { error: 'invalid' | 'expired' | 'gone' } {
    if (!SAFE.test(runId) || !SAFE.test(file) || !expires || !signature || !/^\d+$/.test(expires) || !/^[0-9a-f]{64}$/.test(signature)) return { error: 'invalid' };
    const want = Buffer.from(this.sign(runId, file, Number(expires)), 'hex');
    if (!crypto.timingSafeEqual(want, Buffer.from(signature, 'hex'))) return { error: 'invalid' };
    if (Number(expires) * 1000 < now) return { error: 'expired' };
    const p = path.join(this.root, runId, file);
    return fs.existsSync(p) ? { path: p } : { error: 'gone' };
  }

  read(runId: string, file: string): Buffer {
    return fs.readFileSync(path.join(this.root, runId, file));
  }

  /** Retention: delete outputs of runs finished more than `retentionS` ago and mark their output expired. */
  cleanup(store: Store, now = Date.now()): string[] {
    const cutoff = isoNow(now - this.retentionS * 1000);
    const cleaned: string[] = [];
    for (const run of store.runsWithFilesBefore(cutoff)) {
      fs.rmSync(path.join(this.root, run.id), { recursive: true, force: true });
      const out = JSON.parse(run.output!);
      out.expired = true;
      store.updateRun(run.id, { output: JSON.stringify(out) });
      cleaned.push(run.id);
    }
    return cleaned;
  }
}
