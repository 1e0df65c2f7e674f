// The /docs page: a self-contained interactive reference (no CDN, works offline). It reads /openapi.json and renders
// each operation with a form that sends a real request with the key typed at the top.
export const DOCS_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>klein serve — API reference</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#111;color:#eee;padding:12px 20px;position:sticky;top:0;display:flex;gap:16px;align-items:center}
header input{flex:1;max-width:420px;padding:4px 8px;font:inherit}
main{max-width:1000px;margin:0 auto;padding:16px}
details{background:#fff;border:1px solid #ddd;border-radius:6px;margin:8px 0;padding:8px 12px}
summary{cursor:pointer;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:64px;font-weight:bold}.get{color:#0a6}.post{color:#06c}.delete{color:#c30}
textarea{width:100%;min-height:120px;font:13px ui-monospace,monospace}
pre{background:#f3f3f3;padding:8px;overflow:auto;max-height:400px;font-size:13px}
label{display:block;font-size:13px;margin-top:4px}label input{font:13px ui-monospace,monospace;width:60%}
</style></head><body>
<header><strong>klein serve</strong><input id="key" placeholder="API key (Bearer)" autocomplete="off"><a style="color:#9cf" href="/openapi.json">openapi.json</a><a style="color:#9cf" href="/llms.txt">llms.txt</a></header>
<main id="ops">Loading /openapi.json…</main>
<script>
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
function example(schema, doc, depth) {
  if (!schema || depth > 6) return null;
  if (schema.$ref) return example(doc.components.schemas[schema.$ref.split('/').pop()], doc, depth + 1);
  if (schema.example !== undefined) return schema.example;
  if (schema.default !== undefined) return schema.default;
  if (schema.anyOf) return example(schema.anyOf[0], doc, depth + 1);
  if (schema.type === 'object' || schema.properties) {
    const o = {};
    for (const k of schema.required || []) o[k] = example(schema.properties[k], doc, depth + 1);
    return o;
  }
  if (schema.enum) return schema.enum[0];
  return schema.type === 'string' ? 'a red bicycle' : schema.type === 'integer' || schema.type === 'number' ? 1 : null;
}
fetch('/openapi.json').then((r) => r.json()).then((doc) => {
  const root = document.getElementById('ops');
  root.innerHTML = '<h1>' + esc(doc.info.title) + '</h1><p>' + esc(doc.info.description || '') + '</p>';
  for (const [path, ops] of Object.entries(doc.paths)) for (const [method, op] of Object.entries(ops)) {
    const d = document.createElement('details');
    const params = (op.parameters || []).filter((p) => p.in === 'path' || p.in === 'query');
    const body = op.requestBody && op.requestBody.content['application/json'];
    d.innerHTML = '<summary><span class="m ' + method + '">' + method.toUpperCase() + '</span>' + esc(path) + ' — ' + esc(op.summary || '') + '</summary>' +
      '<p>' + esc(op.description || '') + '</p>' +
      params.map((p) => '<label>' + esc(p.in + ' ' + p.name) + ' <input data-in="' + p.in + '" data-name="' + esc(p.name) + '" value="' + esc(p.example || (p.schema && p.schema.example) || '') + '"></label>').join('') +
      (body ? '<label>body</label><textarea>' + esc(JSON.stringify(example(body.schema, doc, 0), null, 2)) + '</textarea>' : '') +
      '<p><button>Send</button></p><pre hidden></pre>';
    d.querySelector('button').onclick = async () => {
      let url = path; const q = new URLSearchParams();
      d.querySelectorAll('input').forEach((i) => { if (i.dataset.in === 'path') url = url.replace('{' + i.dataset.name + '}', i.value); else if (i.value) q.set(i.dataset.name, i.value); });
      const headers = { 'content-type': 'application/json' };
      const key = document.getElementById('key').value.trim(); if (key) headers.authorization = 'Bearer ' + key;
      const ta = d.querySelector('textarea');
      const res = await fetch(url + (q.toString() ? '?' + q : ''), { method: method.toUpperCase(), headers, body: ta ? ta.value : undefined });
      const pre = d.querySelector('pre'); pre.hidden = false;
      const text = await res.text();
      try { pre.textContent = res.status + '\\n' + JSON.stringify(JSON.parse(text), null, 2); } catch { pre.textContent = res.status + '\\n' + text; }
    };
    root.appendChild(d);
  }
}).catch((e) => { document.getElementById('ops').textContent = 'could not load /openapi.json: ' + e; });
</script></body></html>`;
