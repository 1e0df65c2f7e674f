// cURL and TypeScript for the request the form would send. Reference images are read from files named like the
// uploaded ones (a data URI pasted into a snippet would be unreadable), so the snippet sends the same request.
import type { RunRequest, Settings } from './request.ts';

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** The input with each reference data URI replaced by a marker the language fills in. */
function withPlaceholders(req: RunRequest, s: Settings, marker: (i: number) => string): string {
  const input = { ...req.body.input };
  if (Array.isArray(input.image_urls)) input.image_urls = s.refs.map((_, i) => marker(i));
  return JSON.stringify({ input }, null, 2);
}

const fileName = (s: Settings, i: number) => s.refs[i]?.name || `reference-${i + 1}.png`;

export function curlSnippet(req: RunRequest, s: Settings, origin: string): string {
  const lines: string[] = [];
  const refs = s.mode === 'edit' ? s.refs : [];
  refs.forEach((r, i) => lines.push(`IMG${i + 1}="data:${r.type};base64,$(base64 -w0 ${shellQuote(fileName(s, i))})"`));
  let json = withPlaceholders(req, s, (i) => `@@IMG${i + 1}@@`);
  // close the single-quoted JSON around each "$IMGn" so the shell expands it
  json = shellQuote(json).replace(/@@(IMG\d+)@@/g, `'"$$$1"'`);
  lines.push(
    `curl -sS -X POST ${shellQuote(`${origin}/v1/models/${req.modelId}/runs`)} \\`,
    '  -H "Authorization: Bearer $KLEIN_API_KEY" \\',
    "  -H 'Content-Type: application/json' \\",
    "  -H 'Prefer: wait=60' \\",
    `  -d ${json}`,
  );
  return lines.join('\n');
}

export function tsSnippet(req: RunRequest, s: Settings, origin: string): string {
  const refs = s.mode === 'edit' ? s.refs : [];
  const head: string[] = [];
  if (refs.length) {
    head.push("import { readFileSync } from 'node:fs';", '');
    head.push('const dataUri = (file: string, type: string) => `data:${type};base64,${readFileSync(file).toString(\'base64\')}`;', '');
  }
  let body = withPlaceholders(req, s, (i) => `@@REF${i}@@`);
  body = body.replace(/"@@REF(\d+)@@"/g, (_, i: string) => `dataUri(${JSON.stringify(fileName(s, Number(i)))}, ${JSON.stringify(refs[Number(i)].type)})`);
  return [
    ...head,
    `const res = await fetch(${JSON.stringify(`${origin}/v1/models/${req.modelId}/runs`)}, {`,
    "  method: 'POST',",
    '  headers: {',
    '    Authorization: `Bearer ${process.env.KLEIN_API_KEY}`,',
    "    'Content-Type': 'application/json',",
    "    Prefer: 'wait=60', // wait up to 60 s for the images",
    '  },',
    `  body: JSON.stringify(${body.replace(/\n/g, '\n  ')}),`,
    '});',
    'const run = await res.json();',
    'if (!res.ok) throw new Error(`${run.code}: ${run.message}`);',
    'console.log(run.status_code, run.output?.images.map((i: { url: string }) => i.url));',
  ].join('\n');
}
