"""A static HTML feature browser: one self-contained page per run (inline CSS, JS and data; no server,
no network), opened straight from disk.

    from sae.features.browser import write_browser
    write_browser("runs/pf/features.html", records, title="Persona latents", meta={"model": ..., "layer": 15})

The page lists every latent record (the JSONL schema of sae.features.label): label, firing density, mean /
max activation, detection score, per-role firing rates (bars), ranking info, the decoder direction's
top positive / negative tokens, and the contexts (top activations, quantile samples per bin, random
non-activating windows) with token-level highlighting (background opacity = activation / the
latent's max; the marked token outlined; hover a token for its activation). A search box filters by
latent id, label or ranking text; a select re-orders by rank, density or detection score.

When the script has rendered everything it sets `data-ok="1"` (and `data-latents="<count>"`) on
<body>; any script error sets `data-error` instead. Tests load the file in headless Chromium and
check both (tests/test_browser.py).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Sequence

from sae.features.label import _jsonable

_CSS = r"""
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e3e3e8; --accent:#d35400; --bg:#fafafa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg); background: var(--bg);
       margin: 0; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 10px 18px; z-index: 2; }
header h1 { font-size: 18px; margin: 0 0 4px 0; }
header .meta { color: var(--muted); font-size: 12px; }
header .controls { margin-top: 6px; display: flex; gap: 10px; align-items: center; }
header input { width: 320px; padding: 4px 8px; border: 1px solid var(--line); border-radius: 4px; }
main { padding: 12px 18px; max-width: 1200px; }
section.latent { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; margin: 0 0 14px 0; }
section.latent h2 { font-size: 16px; margin: 0 0 4px 0; }
section.latent h2 .label { color: var(--accent); font-weight: 600; }
.stats { color: var(--muted); font-size: 12px; margin-bottom: 6px; }
.stats b { color: var(--fg); font-weight: 600; }
.roles { display: flex; gap: 14px; font-size: 12px; margin: 4px 0 8px 0; flex-wrap: wrap; }
.role { display: flex; align-items: center; gap: 4px; }
.bar { width: 80px; height: 8px; background: #eee; border-radius: 4px; overflow: hidden; display: inline-block; }
.bar span { display: block; height: 100%; background: var(--accent); }
.ranking { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
.toks { font-size: 12px; margin: 2px 0; }
.chip { display: inline-block; padding: 0 5px; margin: 1px 2px; border-radius: 3px; font-family: ui-monospace, Menlo, monospace;
        white-space: pre; }
.chip.pos { background: #e3f3e6; } .chip.neg { background: #f8e1e1; }
details { margin: 4px 0; } summary { cursor: pointer; font-size: 13px; font-weight: 600; }
.ex { font-family: ui-monospace, Menlo, monospace; font-size: 12px; padding: 3px 6px; border-bottom: 1px dotted var(--line);
      white-space: pre-wrap; word-break: break-word; }
.ex .info { color: var(--muted); font-size: 11px; margin-right: 6px; }
.t { border-radius: 2px; }
.t.mark { outline: 1.5px solid #222; }
.t.role-0 { color: #999; } .t.role-1 { font-style: italic; }
.hidden { display: none; }
"""

_JS = r"""
(function () {
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text; return e; }
  function fmt(x, d) { if (x === null || x === undefined || (typeof x === 'number' && !isFinite(x))) return 'n/a';
    if (typeof x !== 'number') return String(x); if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(2);
    return x.toFixed(d === undefined ? 3 : d); }
  function showTok(s) { return s.replace(/\n/g, '\u23ce').replace(/\t/g, '\u21e5'); }
  var ROLE_NAMES = ['template', 'system', 'user', 'assistant', 'text'];
  function renderExample(ex, maxAct) {
    var row = el('div', 'ex');
    var info = el('span', 'info', (ex.kind === 'quantile' ? 'bin ' + ex.bin : ex.kind) + ' \u00b7 act ' + fmt(ex.act, 2) +
                  ' \u00b7 ctx ' + ex.context + '@' + ex.pos + (ex.split === 'score' ? ' \u00b7 held out' : ''));
    row.appendChild(info);
    for (var i = 0; i < ex.tokens.length; i++) {
      var a = ex.acts[i] || 0;
      var s = el('span', 't role-' + ex.roles[i] + (i === ex.mark ? ' mark' : ''), showTok(ex.tokens[i]));
      if (a > 0) { var alpha = Math.min(1, Math.max(0.08, a / (maxAct || 1)));
        s.style.background = 'rgba(255, 130, 0, ' + alpha.toFixed(3) + ')'; }
      s.title = 'act ' + fmt(a, 3) + ' \u00b7 ' + (ROLE_NAMES[ex.roles[i]] || 'pad');
      row.appendChild(s);
    }
    return row;
  }
  function renderLatent(r, rank) {
    var sec = el('section', 'latent');
    sec.id = 'latent-' + r.latent;
    sec.setAttribute('data-latent', String(r.latent));
    sec.setAttribute('data-rank', String(rank));
    sec.setAttribute('data-density', String(r.density));
    var det = r.detection || {};
    sec.setAttribute('data-detection', String(det.balanced_accuracy === undefined || det.balanced_accuracy === null ? -1 : det.balanced_accuracy));
    var h = el('h2', null, 'Latent ' + r.latent + ' ');
    h.appendChild(el('span', 'label', r.label ? '\u201c' + r.label + '\u201d' : '(unlabelled)'));
    sec.appendChild(h);
    var st = el('div', 'stats');
    var parts = [['density', fmt(r.density, 4)], ['mean act when firing', fmt(r.mean_act_when_firing, 2)],
                 ['max act', fmt(r.max_act, 2)], ['firing tokens', r.n_firing_tokens],
                 ['detection bal. acc.', fmt(det.balanced_accuracy, 2)], ['AUROC', fmt(det.auroc, 2)],
                 ['n', det.n_pos !== undefined ? det.n_pos + '+/' + det.n_neg + '-' : 'n/a']];
    parts.forEach(function (p, i) { if (i) st.appendChild(document.createTextNode(' \u00b7 '));
      st.appendChild(document.createTextNode(p[0] + ' ')); st.appendChild(el('b', null, String(p[1]))); });
    sec.appendChild(st);
    var roles = el('div', 'roles');
    var maxRate = 0; ROLE_NAMES.forEach(function (k) { var v = (r.role_rates || {})[k]; if (v > maxRate) maxRate = v; });
    ROLE_NAMES.forEach(function (k) { var v = (r.role_rates || {})[k]; if (v === null || v === undefined) return;
      var d = el('span', 'role'); d.appendChild(el('span', null, k));
      var bar = el('span', 'bar'); var fill = el('span'); fill.style.width = (maxRate > 0 ? 100 * v / maxRate : 0).toFixed(1) + '%';
      bar.appendChild(fill); d.appendChild(bar); d.appendChild(el('span', null, fmt(v, 4))); roles.appendChild(d); });
    sec.appendChild(roles);
    var rk = r.ranking || {}; var keys = Object.keys(rk);
    if (keys.length) { sec.appendChild(el('div', 'ranking', keys.map(function (k) {
      var v = rk[k]; return k + ': ' + (typeof v === 'number' ? fmt(v, 3) : JSON.stringify(v)); }).join(' \u00b7 '))); }
    if (r.top_tokens) {
      [['positive', 'pos', 'promotes'], ['negative', 'neg', 'suppresses']].forEach(function (x) {
        var line = el('div', 'toks'); line.appendChild(el('span', null, x[2] + ': '));
        (r.top_tokens[x[0]] || []).forEach(function (t) { var c = el('span', 'chip ' + x[1], showTok(t.token));
          c.title = 'logit ' + fmt(t.logit, 3); line.appendChild(c); });
        sec.appendChild(line); });
    }
    var maxAct = r.max_act || 1;
    var groups = [['Top activations', function (e) { return e.kind === 'top'; }, true]];
    var bins = {}; (r.examples || []).forEach(function (e) { if (e.kind === 'quantile') bins[e.bin] = true; });
    Object.keys(bins).map(Number).sort(function (a, b) { return b - a; }).forEach(function (b) {
      var edges = (r.quantile_edges || [])[b] || [null, null];
      groups.push(['Quantile bin ' + b + ' (act ' + fmt(edges[0], 2) + '\u2013' + fmt(edges[1], 2) + ')',
                   function (e) { return e.kind === 'quantile' && e.bin === b; }, false]); });
    groups.push(['Random non-activating', function (e) { return e.kind === 'random'; }, false]);
    groups.forEach(function (g) {
      var exs = (r.examples || []).filter(g[1]); if (!exs.length) return;
      var d = el('details'); if (g[2]) d.open = true;
      d.appendChild(el('summary', null, g[0] + ' (' + exs.length + ')'));
      exs.forEach(function (e) { d.appendChild(renderExample(e, maxAct)); });
      sec.appendChild(d);
    });
    return sec;
  }
  function main() {
    var data = JSON.parse(document.getElementById('psm-data').textContent);
    var list = document.getElementById('latents');
    var secs = data.records.map(function (r, i) { var s = renderLatent(r, i); list.appendChild(s); return s; });
    var q = document.getElementById('search'), sel = document.getElementById('sort');
    function text(r) { return (String(r.latent) + ' ' + (r.label || '') + ' ' + JSON.stringify(r.ranking || {})).toLowerCase(); }
    var texts = data.records.map(text);
    q.addEventListener('input', function () { var v = q.value.toLowerCase();
      secs.forEach(function (s, i) { s.classList.toggle('hidden', v !== '' && texts[i].indexOf(v) < 0); }); });
    sel.addEventListener('change', function () { var key = sel.value;
      var sorted = secs.slice().sort(function (a, b) {
        if (key === 'rank') return Number(a.dataset.rank) - Number(b.dataset.rank);
        return Number(b.dataset[key]) - Number(a.dataset[key]); });
      sorted.forEach(function (s) { list.appendChild(s); }); });
    document.getElementById('count').textContent = String(secs.length);
    document.body.setAttribute('data-latents', String(secs.length));
    document.body.setAttribute('data-ok', '1');
  }
  window.addEventListener('error', function (e) { document.body.setAttribute('data-error', String(e.message || e)); });
  try { main(); } catch (err) { document.body.setAttribute('data-error', String(err && err.stack || err)); }
})();
"""


def render_html(records: Sequence[Mapping], *, title: str = "SAE feature browser", meta: Mapping | None = None) -> str:
    """The whole page as a string (records in the sae.features.label JSONL schema)."""
    payload = {"records": _jsonable([dict(r) for r in records]), "meta": _jsonable(dict(meta or {}))}
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    # keep the JSON inert inside <script>: no "</script>" or "<!--" can close or confuse it
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    meta_line = " \u00b7 ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in (meta or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
  <h1>{html.escape(title)}</h1>
  <div class="meta">{meta_line} \u00b7 latents: <span id="count">0</span></div>
  <div class="controls">
    <input id="search" type="search" placeholder="filter by latent id, label, ranking...">
    <label>order <select id="sort"><option value="rank">rank</option><option value="density">density</option>
    <option value="detection">detection score</option></select></label>
  </div>
</header>
<main id="latents"></main>
<script id="psm-data" type="application/json">{data}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_browser(path, records: Sequence[Mapping], *, title: str = "SAE feature browser",
                  meta: Mapping | None = None) -> Path:
    """Write the page atomically to `path` (a .html file) and return the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"browser path {str(path)!r} should end in .html")
    from psm_jax.atomic import atomic_write_text

    atomic_write_text(path, render_html(records, title=title, meta=meta))
    return path
