"""`visalign score --rewards shapes` on toy galleries: rewards get task metadata, never file bookkeeping.

The images are drawn by the toy renderer from their own prompt, so the shapes verifier's strict
verdict is known: 1 against that prompt, 0 against a prompt naming a shape the image lacks.
"""

import json
from pathlib import Path

import pytest
from galleries import BOOKKEEPING, TOY_LAYOUTS, geneval_metadata, make_toy_gallery, toy_image
from PIL import Image
from tests_support import MetadataRecorder

from visalign.cli import main
from visalign.gallery import GalleryUsageError, score
from visalign.gallery.discover import discover
from visalign.gallery.writers import read_results


@pytest.mark.parametrize("layout", TOY_LAYOUTS)
def test_shapes_scores_a_toy_gallery_through_the_cli(tmp_path, capsys, layout):
    root = tmp_path / "gallery"
    expected = make_toy_gallery(root, layout)
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(root), "--rewards", "shapes", "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert f"{len(expected)} scored, 0 failed" in capsys.readouterr().out
    rows = {str(Path(r["path"]).relative_to(root)): r for r in read_results(out)}
    assert set(rows) == set(expected)
    for name, (verdict, source) in expected.items():
        r = rows[name]
        assert r["error"] is None and r["shapes.valid"] is True, (name, r["error"], r.get("shapes.reason"))
        assert r["prompt_source"] == source, name
        assert r["shapes.strict"] == verdict, (name, r["prompt"], r["shapes.reason"])
        if verdict == 1.0:
            assert r["shapes"] == 1.0 and r["shapes.reason"] == "", name  # partial credit: every clause holds
        else:
            assert r["shapes"] < 1.0 and r["shapes.reason"], name
        # GenEval metadata drives the verdict where the gallery has it; elsewhere the prompt is parsed
        has_geneval = source == "geneval" or (layout == "geneval_fields" and source == "manifest")
        assert r["shapes.source"] == ("metadata" if has_geneval else "prompt"), name
    if layout == "geneval_fields":  # prompt text outside the grammar, judged by its GenEval fields alone
        free = [r for r in rows.values() if "free text" in r["prompt"]]
        assert sorted(r["shapes.strict"] for r in free) == [0.0, 1.0]


Recorder = MetadataRecorder


def test_bookkeeping_never_reaches_rewards(gallery):
    reward = Recorder()
    run = score([gallery["root"] / "sampled"], {"rec": reward}, batch_size=8)  # manifest rows: seed, model, ...
    assert all(r["rec.valid"] for r in run.rows) and reward.seen and all(m is None for m in reward.seen)


def test_task_metadata_goes_with_its_file_in_a_mixed_batch(tmp_path):
    Image.fromarray(toy_image("a circle", 0)).save(tmp_path / "a.png")
    Image.fromarray(toy_image("a circle", 1)).save(tmp_path / "b.png")
    Image.fromarray(toy_image("a circle", 2)).save(tmp_path / "c.png")
    (tmp_path / "b.txt").write_text("a circle")
    rows = [dict(file="a.png", prompt="a circle", seed=0, metadata={"group": "g1", "note": "task"}),
            dict(file="c.png", prompt="a circle", seed=2, **{k: v for k, v in geneval_metadata("a circle").items()
                                                            if k != "prompt"})]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = Recorder()
    score([tmp_path], {"rec": reward}, batch_size=8)
    meta = geneval_metadata("a circle")
    assert reward.seen == [[{"group": "g1", "note": "task"}, {}, {"tag": meta["tag"], "include": meta["include"]}]]


def test_discover_task_metadata_and_geneval_layout(tmp_path):
    (tmp_path / "run" / "00007" / "samples").mkdir(parents=True)
    meta = geneval_metadata("three squares")
    (tmp_path / "run" / "00007" / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "00007" / "samples" / "0000.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "00007" / "grid.png")  # GenEval's grid: not a sample
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "m.png")
    (tmp_path / "run" / "manifest.jsonl").write_text(json.dumps(dict(file="m.png", prompt="p", seed=1, **BOOKKEEPING)) + "\n")
    items = {it.path.split("run/")[1]: it for it in discover([tmp_path / "run"])[0]}
    sample = items["00007/samples/0000.png"]
    assert (sample.prompt, sample.prompt_source, sample.task) == ("three squares", "geneval", meta)
    assert items["00007/grid.png"].prompt is None and items["00007/grid.png"].task is None
    assert items["m.png"].task is None and items["m.png"].meta["seed"] == 1  # bookkeeping stays in meta


@pytest.mark.parametrize("where, content, needle", [
    ("manifest.jsonl", json.dumps({"file": "x.png", "prompt": "p", "metadata": "tag=counting"}), "'metadata' must be a JSON object"),
    ("metadata.jsonl", "{not json", "not JSON"),
    ("metadata.jsonl", json.dumps({"tag": "counting"}), "with a 'prompt' string"),
])
def test_bad_task_metadata_is_a_usage_error_naming_the_file(tmp_path, where, content, needle):
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "x.png")
    if where == "manifest.jsonl":
        (tmp_path / "samples" / where).write_text(content + "\n")
    else:
        (tmp_path / where).write_text(content + "\n")
    with pytest.raises(GalleryUsageError, match=needle) as err:
        discover([tmp_path])
    assert where in str(err.value)
