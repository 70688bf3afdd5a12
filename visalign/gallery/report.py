"""One self-contained HTML report of a scored gallery (works opened from disk, no network).

Sections: summary statistics, per-reward histograms (inline SVG), top-k and bottom-k per reward,
per-prompt groups, and the full table (sortable by each reward, filterable by prompt).

Safety: prompts and file names are user text and may hold markup or script.  Every piece of it
is written with :func:`html.escape` (text and attributes); the script's data sits in a
``<script type="application/json">`` block with ``<``, ``>`` and ``&`` written as ``\\u003c`` ...;
the script builds no HTML from strings (it only reorders rows and sets ``hidden``/``textContent``);
and a Content-Security-Policy allows only this page's own script and style (by hash), so even
markup that slipped through could not run.

URL hash parameters, read on load and on change: ``#sort=REWARD:asc|desc`` and ``#filter=TEXT``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

__all__ = ["build_report", "escape_json_for_html"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.err{color:#a00}
img.t{max-width:96px;max-height:96px;display:block}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:110px;font-size:11px;overflow-wrap:anywhere}
.hist{display:inline-block;margin:0 1em 1em 0}.muted{color:#777}
tr[hidden]{display:none}
""".strip()

_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var table = document.getElementById("results");
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr[data-i]"));
  var input = document.getElementById("filter");
  var shown = document.getElementById("shown");

  function sortBy(name, dir) {
    var col = data.rewards.indexOf(name);
    if (col < 0) { return; }
    var sign = dir === "asc" ? 1 : -1;
    rows.sort(function (a, b) {
      var i = +a.getAttribute("data-i"), j = +b.getAttribute("data-i");
      var x = data.scores[i][col], y = data.scores[j][col];
      if (x === null && y === null) { return i - j; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return x === y ? i - j : sign * (x < y ? -1 : 1);
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    table.setAttribute("data-sorted", name + ":" + dir);
    Array.prototype.forEach.call(table.querySelectorAll("th[data-reward]"), function (th) {
      if (th.getAttribute("data-reward") === name) { th.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending"); }
      else { th.removeAttribute("aria-sort"); }
    });
  }

  function filter(text) {
    var q = (text || "").toLowerCase(), n = 0;
    rows.forEach(function (r) {
      var p = data.prompts[+r.getAttribute("data-i")] || "";
      var hide = q !== "" && p.toLowerCase().indexOf(q) < 0;
      r.hidden = hide;
      if (!hide) { n += 1; }
    });
    shown.textContent = n + " of " + rows.length + " rows shown";
  }

  function fromHash() {
    var params = new URLSearchParams(window.location.hash.slice(1));
    var sort = params.get("sort");
    if (sort) {
      var k = sort.lastIndexOf(":");
      sortBy(k < 0 ? sort : sort.slice(0, k), k < 0 ? "desc" : sort.slice(k + 1));
    }
    if (params.has("filter")) { input.value = params.get("filter"); }
    filter(input.value);
  }

  Array.prototype.forEach.call(table.querySelectorAll("th[data-reward] button"), function (b) {
    b.addEventListener("click", function () {
      var th = b.parentNode, name = th.getAttribute("data-reward");
      var dir = th.getAttribute("aria-sort") === "descending" ? "asc" : "desc";
      sortBy(name, dir);
    });
  });
  input.addEventListener("input", function () { filter(input.value); });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
""".strip()


def escape_json_for_html(obj) -> str:
    """JSON that cannot end its ``<script>`` block or open markup: ``<``, ``>``, ``&`` as unicode escapes."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _fmt(v) -> str:
    return "" if v is None else f"{float(v):.4g}"


def _score(row: dict, name: str) -> float | None:
    v = row.get(name)
    ok = row.get(f"{name}.valid") in (True, "true")
    return float(v) if ok and v is not None and math.isfinite(float(v)) else None


def _thumb(uri: str | None) -> str:
    return f'<img class="t" alt="" src="{_e(uri)}">' if uri else ""


def _histogram(name: str, values: list[float], bins: int = 20, w: int = 320, h: int = 110) -> str:
    if not values:
        return f'<div class="hist"><b>{_e(name)}</b><p class="muted">no valid scores</p></div>'
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    top = max(counts)
    bw = w / bins
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - 20 - c / top * (h - 30):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (h - 30):.1f}" fill="#4a7bb7"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    labels = (f'<text x="0" y="{h - 4}" font-size="11">{lo:.4g}</text>'
              f'<text x="{w}" y="{h - 4}" font-size="11" text-anchor="end">{hi:.4g}</text>')
    return (f'<div class="hist"><b>{_e(name)}</b> <span class="muted">({len(values)} valid)</span><br>'
            f'<svg width="{w}" height="{h}" role="img" aria-label="histogram of {_e(name)}">{bars}{labels}</svg></div>')


def _card(row: dict, score: float | None, thumbs: Mapping[str, str], key: str) -> str:
    return (f"<figure>{_thumb(thumbs.get(key))}<figcaption><b>{_fmt(score)}</b><br>{_e(Path(str(row['path'])).name)}"
            f"<br><span class=\"muted\">{_e(row.get('prompt'))}</span></figcaption></figure>")


def build_report(rows: Sequence[dict], rewards: Sequence[str], summary: dict, thumbs: Mapping[str, str] | None = None,
                 *, keys: Sequence[str] | None = None, top_k: int = 8, title: str = "visalign gallery report",
                 max_groups: int = 200) -> str:
    """The report's HTML.

    Args:
        rows: result rows (see :mod:`visalign.gallery.scoring`).
        rewards: reward column names, in display order.
        summary: the output of :func:`visalign.gallery.summary.summarize`.
        thumbs: ``{file key: data URI}``; rows without one show no thumbnail.
        keys: the file key of each row (defaults to ``file_key(row["path"])``).
    """
    from .discover import file_key

    thumbs = thumbs or {}
    keys = list(keys) if keys is not None else [file_key(str(r["path"])) for r in rows]
    scores = [[_score(r, n) for n in rewards] for r in rows]
    out = [f"<h1>{_e(title)}</h1>",
           f"<p>{summary['files']} files: {summary['scored']} scored, {summary['failed']} failed"
           + "".join(f"; {n} {_e(reason)}" for reason, n in summary["failed_by_reason"].items())
           + f". Rewards: {_e(', '.join(rewards))}.</p>"]

    out.append("<h2>Summary</h2><table><thead><tr><th>reward</th><th>valid</th><th>mean</th><th>std</th><th>min</th>"
               "<th>q05</th><th>q25</th><th>median</th><th>q75</th><th>q95</th><th>max</th></tr></thead><tbody>")
    for n in rewards:
        s = summary["rewards"][n]
        q = s["quantiles"]
        cells = [s["mean"], s["std"], s["min"], q.get("q05"), q.get("q25"), q.get("q50"), q.get("q75"), q.get("q95"), s["max"]]
        out.append(f"<tr><td>{_e(n)}</td><td class=\"num\">{s['count_valid']}</td>"
                   + "".join(f'<td class="num">{_fmt(c)}</td>' for c in cells) + "</tr>")
    out.append("</tbody></table>")

    out.append("<h2>Histograms</h2>")
    out.extend(_histogram(n, [s[j] for s in scores if s[j] is not None]) for j, n in enumerate(rewards))

    out.append(f"<h2>Top {top_k} and bottom {top_k}</h2>")
    for j, n in enumerate(rewards):
        ranked = sorted((i for i in range(len(rows)) if scores[i][j] is not None), key=lambda i: -scores[i][j])
        for label, pick in (("top", ranked[:top_k]), ("bottom", ranked[::-1][:top_k])):
            out.append(f"<h3>{_e(n)}: {label} {len(pick)}</h3><div class=\"grid\">"
                       + "".join(_card(rows[i], scores[i][j], thumbs, keys[i]) for i in pick) + "</div>")

    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r.get("prompt") or ""].append(i)
    order = sorted(groups, key=lambda p: (-len(groups[p]), p))
    out.append(f"<h2>Per prompt ({len(groups)} prompts)</h2><table><thead><tr><th>prompt</th><th>files</th>"
               + "".join(f"<th>mean {_e(n)}</th>" for n in rewards) + "<th>images</th></tr></thead><tbody>")
    for p in order[:max_groups]:
        idx = groups[p]
        means = []
        for j in range(len(rewards)):
            vals = [scores[i][j] for i in idx if scores[i][j] is not None]
            means.append(sum(vals) / len(vals) if vals else None)
        link = f'<a href="#filter={_e(quote(p, safe=""))}">{_e(p) if p else "<i>(no prompt)</i>"}</a>'
        out.append(f"<tr class=\"group\"><td>{link}</td><td class=\"num\">{len(idx)}</td>"
                   + "".join(f'<td class="num">{_fmt(m)}</td>' for m in means)
                   + f"<td><div class=\"grid\">{''.join(_thumb(thumbs.get(keys[i])) for i in idx[:6])}</div></td></tr>")
    out.append("</tbody></table>")
    if len(order) > max_groups:
        out.append(f"<p class=\"muted\">{len(order) - max_groups} more prompts not shown.</p>")

    out.append('<h2>All files</h2><p><label>Filter by prompt <input id="filter" type="search"></label> '
               '<span id="shown" class="muted"></span></p>')
    out.append('<table id="results"><thead><tr><th>#</th><th>image</th><th>file</th><th>prompt</th>'
               + "".join(f'<th data-reward="{_e(n)}"><button type="button">{_e(n)}</button></th>' for n in rewards)
               + "<th>error</th></tr></thead><tbody>")
    for i, r in enumerate(rows):
        out.append(f'<tr data-i="{i}"><td class="num">{i + 1}</td><td>{_thumb(thumbs.get(keys[i]))}</td>'
                   f'<td title="{_e(r["path"])}">{_e(Path(str(r["path"])).name)}</td><td>{_e(r.get("prompt"))}</td>'
                   + "".join(f'<td class="num">{_fmt(s)}</td>' for s in scores[i])
                   + f'<td class="err">{_e(r.get("error"))}</td></tr>')
    out.append("</tbody></table>")

    data = escape_json_for_html(dict(rewards=list(rewards), scores=scores, prompts=[r.get("prompt") for r in rows]))
    csp = f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(out)
            + f'\n<script type="application/json" id="report-data">{data}</script>\n<script>{_JS}</script>\n</body></html>\n')
