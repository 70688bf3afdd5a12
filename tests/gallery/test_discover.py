"""Finding files and their prompts: manifest > sidecar > mapping file > --prompt."""

import json
from pathlib import Path

import pytest
from PIL import Image

from visalign.gallery.discover import GalleryUsageError, discover, read_mapping


def test_prompts_come_from_each_source_in_order(gallery):
    items, skipped, _ = discover([gallery["root"]], prompt="fallback", prompts_file=gallery["mapping"])
    by_name = {str(Path(it.path).relative_to(gallery["root"])): it for it in items}
    assert set(by_name) == set(gallery["good"]) | set(gallery["bad"])  # .txt, .csv, .jsonl are not media
    for name, prompt in gallery["prompts"].items():
        assert by_name[name].prompt == prompt, name
    assert by_name["sampled/00000_000_p.png"].prompt_source == "manifest"
    assert by_name["sampled/00000_000_p.png"].meta["seed"] == 0
    assert by_name["plain.jpg"].prompt_source == "sidecar"
    assert by_name["gray16.png"].prompt_source == "mapping"
    assert by_name["gray.png"].prompt == "fallback" and by_name["gray.png"].prompt_source == "cli"
    assert skipped == []


def test_manifest_beats_sidecar_beats_mapping(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "from manifest"}) + "\n{broken")
    (tmp_path / "a.txt").write_text("from sidecar a")
    (tmp_path / "b.txt").write_text("from sidecar b\n")
    (tmp_path / "map.jsonl").write_text(json.dumps({"path": "a.png", "prompt": "m"}) + "\n" + json.dumps({"path": "b.png", "prompt": "m"}))
    items, _, _ = discover([tmp_path], prompt="cli", prompts_file=tmp_path / "map.jsonl")
    assert [(it.prompt, it.prompt_source) for it in items] == [("from manifest", "manifest"), ("from sidecar b", "sidecar")]


def test_mapping_by_bare_name_and_explicit_files(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "x.png")
    (tmp_path / "map.csv").write_text("image,prompt\nx.png,\"a, quoted <prompt>\"\n")
    items, skipped, _ = discover([tmp_path / "sub" / "x.png", tmp_path / "map.csv", tmp_path / "sub"],
                                 prompts_file=tmp_path / "map.csv")
    assert len(items) == 1 and items[0].prompt == "a, quoted <prompt>" and items[0].prompt_source == "mapping"
    assert skipped == [str(tmp_path / "map.csv")]


def test_no_prompt_anywhere_is_none(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.webp")
    items, _, _ = discover([tmp_path])
    assert items[0].prompt is None and items[0].prompt_source is None


@pytest.mark.parametrize("content, suffix, needle", [
    ("name,text\nx.png,hi\n", ".csv", "needs a 'prompt'"),
    ("{not json\n", ".jsonl", "not JSON"),
    ("x.png hi\n", ".txt", ".csv"),
])
def test_bad_mapping_files_are_usage_errors(tmp_path, content, suffix, needle):
    path = tmp_path / f"map{suffix}"
    path.write_text(content)
    with pytest.raises(GalleryUsageError, match=needle) as err:
        read_mapping(path)
    assert str(path) in str(err.value)


def test_missing_path_is_a_usage_error(tmp_path):
    with pytest.raises(GalleryUsageError, match="nope.*does not exist"):
        discover([tmp_path / "nope"])
    with pytest.raises(GalleryUsageError, match="references"):
        discover([tmp_path], references=tmp_path / "refs")


def test_references_per_file_or_shared(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "r").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "g" / f"{n}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "r" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "r" / "other.png")
    items, _, shared = discover([tmp_path / "g"], references=tmp_path / "r")
    assert items[0].reference == str(tmp_path / "r" / "a.jpg") and items[1].reference is None
    assert sorted(shared) == [str(tmp_path / "r" / "a.jpg"), str(tmp_path / "r" / "other.png")]
