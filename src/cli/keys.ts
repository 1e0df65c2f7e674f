// `klein keys create|list|revoke --data DIR`: API keys in the service's database (works while it runs: SQLite WAL).
import path from 'node:path';
import type { Command } from 'commander';
import { createKey } from '../service/auth.ts';
import { defaultDataDir } from '../service/config.ts';
import { Store } from '../service/store.ts';
import { UsageError } from './errors.ts';
import { parseIntOption } from './option-parsers.ts';

function openStore(data?: string): Store {
  return Store.open(path.resolve(data ?? defaultDataDir()));
}

export function registerKeys(program: Command): void {
  const keys = program.command('keys').description('manage API keys of klein serve');
  keys
    .command('create')
    .description('create an API key; the key is printed once, alone on the last line')
    .option('--data <dir>', 'data folder of klein serve (default: $KLEIN_DATA_DIR or ~/.klein)')
    .option('--name <name>', 'a label for the key', 'default')
    .option('--admin', 'sees every key\'s runs and usage')
    .option('--rate-limit <n>', 'run creations per minute (default: the server\'s)')
    .option('--concurrency <n>', 'runs of this key running at once (default: the server\'s)')
    .action((o: { data?: string; name: string; admin?: boolean; rateLimit?: string; concurrency?: string }) => {
      const rate = parseIntOption(o.rateLimit, '--rate-limit');
      const conc = parseIntOption(o.concurrency, '--concurrency');
      if (rate === 0 || conc === 0) throw new UsageError('--rate-limit and --concurrency must be at least 1');
      if (!o.name.trim() || o.name.length > 100) throw new UsageError('--name must be 1–100 characters');
      const store = openStore(o.data);
      try {
        const { key, row } = createKey(store, { name: o.name, admin: o.admin, rateLimitPerMin: rate, maxConcurrency: conc });
        console.log(`created key ${row.id} (${row.name}${row.is_admin ? ', admin' : ''}); it is shown only now:`);
        console.log(key);
      } finally {
        store.close();
      }
    });
  keys
    .command('list')
    .description('list API keys (never their values)')
    .option('--data <dir>', 'data folder of klein serve')
    .option('--json', 'JSON output')
    .action((o: { data?: string; json?: boolean }) => {
      const store = openStore(o.data);
      try {
        const rows = store.listKeys();
        if (o.json) return console.log(JSON.stringify(rows.map(({ hash: _h, ...r }) => r), null, 2));
        if (rows.length === 0) return console.log('no keys (klein serve creates an admin key on first start)');
        for (const r of rows) {
          console.log([r.id, r.prefix + '…', r.name, r.is_admin ? 'admin' : '-', r.revoked_at ? `revoked ${r.revoked_at}` : 'active', `created ${r.created_at}`, `last used ${r.last_used_at ?? 'never'}`].join('  '));
        }
      } finally {
        store.close();
      }
    });
  keys
    .command('revoke')
    .description('revoke a key by id or prefix; it stops working at once')
    .argument('<id>', 'key id (key_…) or its prefix (kl_live_xxxxxx)')
    .option('--data <dir>', 'data folder of klein serve')
    .action((id: string, o: { data?: string }) => {
      const store = openStore(o.data);
      try {
        const row = store.revokeKey(id);
        if (!row) throw new UsageError(`no key with id or prefix "${id}" (see klein keys list)`);
        console.log(`revoked ${row.id} (${row.name})`);
      } finally {
        store.close();
      }
    });
}
