"""The HTML report: hostile prompts and file names stay text, summary.json numbers, and a real browser check."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from galleries import HOSTILE_NAME, HOSTILE_PROMPT, HOSTILE_PROMPT2
from PIL import Image

from visalign.gallery import score
from visalign.gallery.report import escape_json_for_html

REWARD = "jpeg_compressibility"


class Parsed(HTMLParser):
    """Every start tag with its attributes, the JSON data block, and the text of each table row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.rows, self.json_text = [], [], None
        self._in_json = self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "script" and attrs.get("type") == "application/json":
            self._in_json = ""
        if tag == "tr" and "data-i" in attrs:
            self._row = [int(attrs["data-i"]), "hidden" in attrs, []]
            self.rows.append(self._row)
        if tag == "td" and self._row is not None:
            self._row[2].append("")

    def handle_endtag(self, tag):
        if tag == "script" and self._in_json is not None:
            self.json_text, self._in_json = self._in_json, None
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._in_json is not None:
            self._in_json += data
        elif self._row is not None and self._row[2]:
            self._row[2][-1] += data


@pytest.fixture
def scored(gallery, tmp_path):
    report = tmp_path / "out" / "report.html"
    run = score([gallery["root"]], f"{REWARD},artifact", out=tmp_path / "out" / "r.jsonl", report=report,
                prompt="fallback", prompts=gallery["mapping"], batch_size=4)
    return run, report


def test_user_text_stays_text(scored):
    run, report = scored
    text = report.read_text()
    p = Parsed()
    p.feed(text)
    scripts = [a for t, a in p.tags if t == "script"]
    assert scripts == [{"type": "application/json", "id": "report-data"}, {}]  # only the page's own two
    assert not [(t, k) for t, a in p.tags for k in a if k.startswith("on")]  # no event handler attribute anywhere
    assert all(a["src"].startswith("data:image/jpeg;base64,") for t, a in p.tags if t == "img")
    assert len([1 for t, a in p.tags if t == "img"]) > 3 * len(run.rows) // 2  # thumbnails are embedded
    # one table row per file, and the hostile prompt / name read back as the exact text
    assert sorted(r[0] for r in p.rows) == list(range(len(run.rows)))
    cells = {tuple(r[2][2:4]) for r in p.rows}
    assert (Path("x").with_name(HOSTILE_NAME).name, HOSTILE_PROMPT2) in cells
    assert ("00000_000_p.png", HOSTILE_PROMPT) in cells
    assert "<script>document" not in text and "<img src=x" not in text
    data = json.loads(p.json_text)
    assert data["prompts"] == [r["prompt"] for r in run.rows] and "</" not in p.json_text
    csp = next(a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp


def test_json_for_html_cannot_close_the_block():
    s = escape_json_for_html({"p": "</script><!-- & >"})
    assert "<" not in s and ">" not in s and "&" not in s and json.loads(s) == {"p": "</script><!-- & >"}


def test_summary_json_matches_numpy(scored):
    run, report = scored
    summary = json.loads((report.parent / "summary.json").read_text())
    vals = np.array([r[REWARD] for r in run.rows if r[f"{REWARD}.valid"]])
    s = summary["rewards"][REWARD]
    assert s["count_valid"] == len(vals) == summary["scored"]
    assert s["mean"] == pytest.approx(vals.mean()) and s["std"] == pytest.approx(vals.std(ddof=1))
    sv = np.sort(vals)
    pos = 0.25 * (len(sv) - 1)  # linear interpolation between order statistics
    assert s["quantiles"]["q25"] == pytest.approx(sv[int(pos)] + (pos - int(pos)) * (sv[int(pos) + 1] - sv[int(pos)]))
    assert s["min"] == sv[0] and s["max"] == sv[-1]
    assert summary["failed"] == sum(summary["failed_by_reason"].values()) > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=3000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_in_headless_chromium_shows_every_row_and_sorts(scored, tmp_path):
    run, report = scored
    url = report.resolve().as_uri()
    values = [r[REWARD] for r in run.rows]
    valid = sorted((i for i, v in enumerate(values) if v is not None), key=lambda i: (-values[i], i))
    expected = valid + [i for i, v in enumerate(values) if v is None]  # invalid rows sort last

    out = chromium(url + f"#sort={REWARD}:desc", tmp_path, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    p = Parsed()
    p.feed(out.stdout)
    assert [r[0] for r in p.rows] == expected  # the script ran and reordered the rows
    body = next(a for t, a in p.tags if t == "body")
    assert "data-pwned" not in body  # none of the hostile prompts / names executed
    table = next(a for t, a in p.tags if t == "table" and a.get("id") == "results")
    assert table["data-sorted"] == f"{REWARD}:desc"
    assert "<title>visalign gallery report</title>" in out.stdout

    out = chromium(url + f"#sort={REWARD}:asc&filter=prompt%201", tmp_path, "--dump-dom")
    p = Parsed()
    p.feed(out.stdout)
    assert [r[0] for r in p.rows][: len(valid)] == sorted(valid, key=lambda i: (values[i], i))  # ties keep file order
    shown = [r[0] for r in p.rows if not r[1]]
    assert sorted(shown) == sorted(i for i, r in enumerate(run.rows) if "prompt 1" in (r["prompt"] or ""))
    assert len(shown) == 2

    shot = tmp_path / "report.png"
    out = chromium(url + f"#sort={REWARD}:desc", tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (1600, 1200, 3) and img.std() > 10  # a rendered page, not a blank one
