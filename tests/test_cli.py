"""The command line: `visalign sample` end to end on a saved tiny model, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.cli import main


def test_help_lists_the_jobs():
    out = subprocess.run([sys.executable, "-m", "visalign", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("sample", "score", "train", "plan", "steer", "rewards"):
        assert cmd in out.stdout


def test_sample_writes_images_and_manifest(tiny_model_dir, tmp_path):
    model = tiny_model_dir("sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na <b>blue</b> ball\n")
    rc = main(["sample", "--model", str(model), "--prompts", str(prompts), "--num-images", "2", "--steps", "2",
               "--guidance", "3", "--seed", "7", "--out", str(tmp_path / "out"), "--height", "32", "--width", "32",
               "--batch-size", "3"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {r["prompt"] for r in rows} == {"a red cube", "a <b>blue</b> ball"}
    assert [r["seed"] for r in rows] == [7, 8, 9, 10]
    for r in rows:
        assert set(r) == {"file", "prompt", "seed", "model", "steps", "guidance", "kernel"}
        assert r["steps"] == 2 and r["guidance"] == 3.0 and r["kernel"] == "ode"
        img = Image.open(tmp_path / "out" / r["file"])
        assert img.size == (32, 32) and img.mode == "RGB"
    # per-image seeds make an image reproducible on its own, whatever the batch it was in
    rc = main(["sample", "--model", str(model), "--prompt", "a red cube", "--num-images", "1", "--steps", "2",
               "--guidance", "3", "--seed", "8", "--out", str(tmp_path / "one"), "--height", "32", "--width", "32"])
    assert rc == 0
    one = json.loads((tmp_path / "one" / "manifest.jsonl").read_text())
    a = torch.from_numpy(np.asarray(Image.open(tmp_path / "one" / one["file"]))).int()
    b = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / rows[1]["file"]))).int()
    c = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / rows[0]["file"]))).int()
    assert (a - b).abs().max() <= 1  # batched vs single matmuls may round one uint8 level apart
    assert (a - c).abs().max() > 10  # ...while another seed is a different image


def test_sample_video_writes_gif(tiny_model_dir, tmp_path):
    model = tiny_model_dir("wan")
    rc = main(["sample", "--model", str(model), "--prompt", "a dog runs", "--steps", "2", "--out", str(tmp_path),
               "--height", "32", "--width", "32", "--num-frames", "5"])
    assert rc == 0
    row = json.loads((tmp_path / "manifest.jsonl").read_text())
    gif = Image.open(tmp_path / row["file"])
    assert row["file"].endswith(".gif") and gif.n_frames == 5


@pytest.mark.parametrize("model", ["/no/such/model/dir", "./missing"])
def test_missing_model_exits_2_and_names_it(model, tmp_path, capsys):
    rc = main(["sample", "--model", model, "--prompt", "x", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert model in err and "model_index.json" in err


def test_offline_hub_id_names_the_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc = main(["sample", "--model", "nobody/not-a-model", "--prompt", "x", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nobody/not-a-model" in err and "--local-dir" in err


def test_folder_without_model_index(tmp_path, capsys):
    rc = main(["sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no model_index.json" in capsys.readouterr().err


def test_rewards_catalogue_lists_rewards(capsys):
    assert main(["rewards", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"aesthetic", "clipscore"} <= names


def test_real_import_errors_surface(capsys, monkeypatch):
    """A command whose visalign module fails to import shows that ImportError (a broken install or
    a bug), not a generic message."""
    from visalign import cli

    monkeypatch.setitem(cli.COMMANDS, "score", ("score", *cli._delegate("visalign.gallery.no_such_module")))
    with pytest.raises(ModuleNotFoundError, match="visalign.gallery.no_such_module"):
        main(["score", "x.png"])


def test_recipes_lists_shows_and_resolves_names(capsys, tmp_path, monkeypatch):
    from visalign.config import ConfigError, read_yaml
    from visalign.recipes import find

    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["toy/dpo_offline_cn"]["kind"] == "train" and rows["steer/toy_fk"]["kind"] == "steer"
    assert rows["shapes-proxy"]["kind"] == "reward" and rows["toy/nft_cn"]["summary"].startswith("DiffusionNFT")
    assert main(["recipes", "show", "toy/nft_cn"]) == 0
    assert "algorithm: nft" in capsys.readouterr().out
    assert main(["recipes", "show", "toy/nft_c"]) == 2
    assert "Did you mean 'toy/nft_cn'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no configs/ here: names and the docs' paths find the shipped copies
    assert find("toy/nft_cn") == find("configs/toy/nft_cn.yaml") == find("toy/nft_cn.yaml") is not None
    assert read_yaml("configs/toy/nft_cn.yaml")["algorithm"] == "nft"
    assert find("../toy/nft_cn") is None
    (tmp_path / "mine.yaml").write_text("algorithm: grpo\n")
    assert read_yaml("mine.yaml") == {"algorithm": "grpo"}  # a file of that name wins
    with pytest.raises(ConfigError, match="not found: it is neither a file nor a shipped recipe"):
        read_yaml("nope.yaml")


def test_threads_setting(monkeypatch):
    """run.threads / --threads: an explicit number wins; auto uses the cores other processes leave."""
    from visalign import threads

    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 1.1)  # another process holds a core
        assert threads.configure_threads(None) == 1
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 0.05)  # idle: every core
        assert threads.configure_threads(None) == 2
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: None)  # unknown: torch's default
        assert threads.configure_threads(None) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's own choice is kept
        monkeypatch.setattr(threads, "busy_cores", lambda window=0.25: 0.0)
        torch.set_num_threads(1)
        assert threads.configure_threads(None) == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            threads.configure_threads(0)
    finally:
        torch.set_num_threads(before)
