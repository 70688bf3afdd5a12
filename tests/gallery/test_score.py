"""`visalign.gallery.score` and `visalign score`: one row per file, real scores, errors, writers, resume."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from galleries import FailsOnBright, PromptLength
from PIL import Image

from visalign.cli import main
from visalign.gallery import GalleryUsageError, score
from visalign.gallery.scoring import split_specs
from visalign.gallery.writers import read_results
from visalign.rewards import Reward, RewardInfo, RewardOutput


def jpeg_kb(arr: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000.0


def rel(row, root):
    return str(Path(row["path"]).relative_to(root))


def test_every_file_one_row_with_real_scores_and_reasons(gallery, tmp_path):
    root = gallery["root"]
    run = score([root], "jpeg_compressibility,artifact", out=tmp_path / "r.jsonl", prompt="fallback",
                prompts=gallery["mapping"], batch_size=4)
    rows = {rel(r, root): r for r in run.rows}
    assert len(run.rows) == len(rows) == len(gallery["good"]) + len(gallery["bad"])
    for name, expected in gallery["good"].items():
        r = rows[name]
        assert r["error"] is None and r["jpeg_compressibility.valid"] is True, (name, r["error"])
        assert r["prompt"] == gallery["prompts"].get(name, "fallback")
        if expected.ndim == 4:  # the GIF: an image reward on video = mean over its frames
            want = -np.mean([jpeg_kb(f) for f in expected])
            assert r["kind"] == "video" and r["frames"] == 3
        else:
            want = -jpeg_kb(expected)
        tol = 0.03 if name == "alpha.png" else 1e-5  # alpha composite may round one level apart
        assert r["jpeg_compressibility"] == pytest.approx(want, rel=tol), name
        assert r["jpeg_compressibility.size_kb"] == pytest.approx(-want, rel=tol)
        assert -1.0 <= r["artifact"] <= 0.0
    for name, reason in gallery["bad"].items():
        r = rows[name]
        assert r["error_reason"] in ({reason, "not_an_image"} if name.endswith(".mp4") else {reason}), name
        assert r["error"] and r.get("jpeg_compressibility") is None
    s = run.summary
    assert s["files"] == len(rows) and s["scored"] == len(gallery["good"]) and s["failed"] == len(gallery["bad"])
    assert sum(s["failed_by_reason"].values()) == len(gallery["bad"])
    # the file holds the same rows, once each
    on_disk = read_results(tmp_path / "r.jsonl")
    assert sorted(json.dumps(r, sort_keys=True) for r in on_disk) == sorted(json.dumps(r, sort_keys=True) for r in run.rows)


def test_prompts_reach_the_reward_and_batches_hold_one_size(gallery):
    reward = PromptLength()
    run = score([gallery["root"] / "sampled"], {"plen": reward}, batch_size=2)
    for r in run.rows:
        assert r["plen.chars"] == len(r["prompt"])
        assert r["plen"] == pytest.approx(len(r["prompt"]) + r["plen.mean"])
    assert all(c[0] <= 2 for c in reward.calls)
    assert sorted(c[2:] for c in reward.calls) == [(32, 32), (32, 32), (48, 32)]  # 3 + 2 files, grouped by size


def test_missing_prompt_and_failing_reward_are_rows_not_crashes(tmp_path):
    for i, v in enumerate([10, 250, 30]):  # the middle image is bright
        Image.new("RGB", (16, 16), (v, v, v)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("has a prompt")
    run = score([tmp_path], {"plen": PromptLength(), "fb": FailsOnBright()}, batch_size=3)
    r0, r1, r2 = run.rows
    assert r0["error"] is None and r0["plen.chars"] == len("has a prompt")
    assert r1["error_reason"] == "no_prompt" and "too bright" in r1["error"]
    assert r1["fb"] is None and r1["fb.valid"] is False and r1["plen"] is None
    assert r2["error_reason"] == "no_prompt" and r2["fb"] == pytest.approx(30 / 255, abs=1e-6)  # batch retried per file
    assert r0["fb"] == pytest.approx(10 / 255, abs=1e-6)
    assert run.summary["failed_by_reason"] == {"no_prompt": 2}


def test_reward_specs_split_on_commas_between_specs():
    assert split_specs("a, clipscore:model=ViT-L-14,scale=2.5,b,video_frames:reward=c,frames=8") == [
        "a", "clipscore:model=ViT-L-14,scale=2.5", "b", "video_frames:reward=c,frames=8"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_writers_agree_and_resume_never_duplicates(gallery, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    root = gallery["root"]
    out = tmp_path / f"r{suffix}"
    first = score([root / "sampled"], "jpeg_compressibility", out=out, batch_size=2)
    with pytest.raises(GalleryUsageError, match="--resume"):
        score([root], "jpeg_compressibility", out=out)
    run = score([root], "jpeg_compressibility", out=out, resume=True, batch_size=4)
    assert first.new == 5 and run.new == len(gallery["good"]) + len(gallery["bad"]) - 5 and run.skipped_done == 5
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted({r["path"] for r in rows})
    assert len(rows) == len(gallery["good"]) + len(gallery["bad"])
    assert not out.with_name(f".{out.name}.partial.jsonl").exists()
    by_path = {r["path"]: r for r in rows}
    for r in run.rows:
        got = by_path[r["path"]]
        assert (got["jpeg_compressibility"] is None) == (r["jpeg_compressibility"] is None)
        if r["jpeg_compressibility"] is not None:
            assert got["jpeg_compressibility"] == pytest.approx(r["jpeg_compressibility"], rel=1e-6)
        assert got["prompt"] == r["prompt"]
    again = score([root], "jpeg_compressibility", out=out, resume=True)
    assert again.new == 0 and len(read_results(out)) == len(rows)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(GalleryUsageError, match="pip install pyarrow"):
        score([tmp_path], "jpeg_compressibility", out=tmp_path / "r.parquet")


def test_resume_after_a_killed_writer_drops_the_half_line(gallery, tmp_path):
    out = tmp_path / "r.jsonl"
    score([gallery["root"] / "sampled"], "jpeg_compressibility", out=out)
    text = out.read_text()
    out.write_text(text + text.splitlines()[0][:25])  # a row cut mid-write
    run = score([gallery["root"] / "sampled"], "jpeg_compressibility", out=out, resume=True)
    assert run.new == 0 and len(read_results(out)) == 5 and out.read_text() == text


def test_workers_give_the_same_rows(gallery):
    a = score([gallery["root"]], "jpeg_compressibility", batch_size=4, workers=0, prompt="p")
    b = score([gallery["root"]], "jpeg_compressibility", batch_size=4, workers=2, prompt="p")
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(a.rows, key=key) == sorted(b.rows, key=key)


def test_cli_exit_codes_and_usage_errors(gallery, tmp_path, capsys):
    root = gallery["root"]
    out = tmp_path / "r.csv"
    assert main(["score", str(root), "--rewards", "jpeg_compressibility", "--out", str(out), "--workers", "0",
                 "--no-progress", "--prompts", str(gallery["mapping"])]) == 0
    text = capsys.readouterr().out
    assert f"{len(gallery['good'])} scored, {len(gallery['bad'])} failed" in text and "truncated" in text
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "x.png").write_bytes(b"")
    assert main(["score", str(bad_only), "--rewards", "artifact", "--out", str(tmp_path / "b.jsonl"), "--no-progress"]) == 1
    capsys.readouterr()
    cases = [
        (["score", str(tmp_path / "missing"), "--rewards", "artifact", "--out", str(tmp_path / "m.jsonl")], "missing"),
        (["score", str(root), "--rewards", "jpeg_compresibility", "--out", str(tmp_path / "u.jsonl")], "jpeg_compressibility"),
        (["score", str(root), "--rewards", "artifact", "--out", str(out)], "--resume"),
        (["score", str(root), "--rewards", "artifact", "--out", str(tmp_path / "r.txt")], "r.txt"),
        (["score", str(root), "--rewards", "artifact", "--out", str(tmp_path / "x.jsonl"), "--batch-size", "0"], "--batch-size"),
        (["score", str(root), "--rewards", "artifact", "--out", str(tmp_path / "y.jsonl"), "--prompts", str(tmp_path / "nomap.csv")], "nomap.csv"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("visalign score: error:") and needle in err, (argv, err)


class RefMean(Reward):
    """Test reward: the mean of the reference pixels it was given (per file, or of the shared set)."""

    info = RewardInfo("ref_mean", inputs=("images", "references"), native_range=(0.0, 1.0))

    def score(self, images, prompts, references, metadata):
        refs = references if references.ndim == 5 else references[:, None]  # (B or 1, R, 3, S, S)
        assert refs.shape[-2:] == (224, 224)
        return RewardOutput(refs.flatten(1).mean(1).expand(images.shape[0]).clone())


def test_references_per_file_and_shared(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "refs").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "g" / f"{n}.png")
    Image.new("RGB", (300, 200), (51, 51, 51)).save(tmp_path / "refs" / "a.jpg")  # a's own reference
    Image.new("L", (40, 40), 204).save(tmp_path / "refs" / "z.png")
    run = score([tmp_path / "g"], {"ref": RefMean()}, references=tmp_path / "refs", batch_size=1)
    a, b = run.rows
    assert a["ref"] == pytest.approx(51 / 255, abs=2e-3)
    assert b["ref"] == pytest.approx((51 + 204) / 2 / 255, abs=2e-3)  # shared set: both references
    c = score([tmp_path / "g"], {"ref": RefMean()}).rows[0]
    assert c["error_reason"] == "reward_error" and "--references" in c["error"]
