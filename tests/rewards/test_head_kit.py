"""The reward-head kit: Bradley-Terry / rating / binary heads on tiny frozen backbones, the
embedding cache, ensembles, strict save/load by path, fine-tuning, the CLI."""

import json

import numpy as np
import pytest
import torch

from visalign import rewards as R
from visalign.rewards import head as H
from visalign.rewards import head_train as T
from visalign.rewards.head_data import LabelledSet, read_dataset


def _quiet(*_):
    pass


def _tinted(values: np.ndarray, seed: int) -> torch.Tensor:
    """Smooth random images (32 px, grey +-0.2) blended towards red by ``values`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(len(values), 3, 4, 4, generator=g)
    x = 0.5 + 0.4 * (torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False) - 0.5)
    red = torch.tensor([1.0, 0.1, 0.1]).view(1, 3, 1, 1)
    v = torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    return ((1 - 0.6 * v) * x + 0.6 * v * red).clamp(0, 1)


def _write_images(folder, images):
    from PIL import Image

    names = []
    for i, img in enumerate(images):
        name = f"img_{i:03d}.png"
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    """Pairs preferring the redder image: 60 training images (redness in [0, 0.7]) and 40 held-out
    ones; pairs whose redness differs by at least 0.1."""
    root = tmp_path_factory.mktemp("prefs")
    rng = np.random.default_rng(0)
    out = {}
    for split, n, seed, n_pairs in (("train", 60, 0, 300), ("val", 40, 1, 200)):
        red = rng.uniform(0, 0.7, n)
        names = _write_images(root, _tinted(red, seed)) if split == "train" else None
        if split == "val":
            sub = root / "val"
            sub.mkdir()
            names = [f"val/{x}" for x in _write_images(sub, _tinted(red, seed))]
        rows = []
        while len(rows) < n_pairs:
            a, b = rng.integers(n, size=2)
            if abs(red[a] - red[b]) < 0.1:
                continue
            hi, lo = (a, b) if red[a] > red[b] else (b, a)
            rows.append({"prompt": "a picture", "chosen": names[hi], "rejected": names[lo]})
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = path
    return out


def _oc(tiny_open_clip):
    return dict(kind="open_clip", model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))


def _recipe(pref_data, tiny_open_clip, tmp_path, **over):
    cfg = {"task": "pairwise", "data": {"train": str(pref_data["train"]), "val": str(pref_data["val"])},
           "backbone": _oc(tiny_open_clip), "head": {"hidden": [64], "use_prompt": False},
           "ensemble": {"members": 4}, "optim": {"steps": 300, "batch": 64, "lr": 3e-3},
           "cache_dir": str(tmp_path / "cache"), "log_every": 1000}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    from visalign.config import from_dict

    return from_dict(T.RewardTrainConfig, cfg)


@pytest.fixture(scope="module")
def trained_bt(pref_data, tiny_open_clip, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bt")
    cfg = _recipe(pref_data, tiny_open_clip, tmp)
    metrics = T.train(cfg, out=tmp / "head", log=_quiet)
    return tmp / "head", metrics, cfg


def test_bradley_terry_head_learns_a_synthetic_preference(trained_bt, pref_data):
    """Held-out pairs of unseen images: > 95% of them ordered as the preference says (an untrained
    ensemble orders about half)."""
    path, metrics, _ = trained_bt
    assert metrics["pair_accuracy"] > 0.95, metrics
    reward = R.load(f"head:path={path}")
    data = read_dataset(pref_data["val"], "pairwise")
    x = data.image_batch(torch.arange(len(data)))
    s = reward(x).scores
    acc = (s[data.pairs[:, 0]] > s[data.pairs[:, 1]]).float().mean()
    assert acc == pytest.approx(metrics["pair_accuracy"], abs=1e-6)
    # the saved files: strict config + weights, the calibration plot, the log
    assert (path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((path / "metrics.json").read_text())["pair_accuracy"] == metrics["pair_accuracy"]


def test_untrained_head_is_at_chance(trained_bt, pref_data, tiny_open_clip):
    _, _, cfg = trained_bt
    model, _ = H.load_head(trained_bt[0])
    fresh = H.RewardHeadModel("pairwise", cfg.backbone, model.heads.in_dim, [64], 4, False, seed=3)
    fresh.frozen_backbone = model.frozen_backbone
    fresh.input_mean.copy_(model.input_mean)
    fresh.input_std.copy_(model.input_std)
    data = read_dataset(pref_data["val"], "pairwise")
    metrics, _ = T.evaluate(fresh, data)
    assert abs(metrics["pair_accuracy"] - 0.5) < 0.3


def test_embedding_cache_is_reused_and_keyed_by_content(trained_bt, pref_data, tiny_open_clip, tmp_path):
    path, first, cfg = trained_bt
    assert first["cache_misses"] == 100 and first["cache_hits"] == 0  # 60 + 40 distinct images, embedded once
    again = T.train(_recipe(pref_data, tiny_open_clip, tmp_path, optim={"steps": 2}), out=tmp_path / "h2", log=_quiet)
    assert again["cache_misses"] == 100  # another cache_dir: nothing shared
    cache_file = next((tmp_path / "cache").glob("*.safetensors"))
    third = T.train(_recipe(pref_data, tiny_open_clip, tmp_path, optim={"steps": 2}), out=tmp_path / "h3", log=_quiet)
    assert third["cache_hits"] == 100 and third["cache_misses"] == 0
    # a changed file is embedded again; the others are not
    from PIL import Image

    row = json.loads(pref_data["train"].read_text().splitlines()[0])
    img_path = pref_data["train"].parent / row["chosen"]
    original = img_path.read_bytes()
    try:
        Image.new("RGB", (32, 32), (0, 255, 0)).save(img_path)
        fourth = T.train(_recipe(pref_data, tiny_open_clip, tmp_path, optim={"steps": 2}), out=tmp_path / "h4",
                         log=_quiet)
        assert fourth["cache_misses"] == 1 and fourth["cache_hits"] == 99
    finally:
        img_path.write_bytes(original)
    # another backbone (other weights, or another feature) keys another cache file
    other = H.BackboneConfig(**{**_oc(tiny_open_clip), "pretrained": str(tiny_open_clip.hps_weights)})
    assert other.digest() != cfg.backbone.digest()
    assert cache_file.name == f"{cfg.backbone.digest()}.safetensors"


def test_loads_back_by_path_strictly_with_the_same_scores(trained_bt, images, tmp_path):
    from safetensors.torch import load_file, save_file

    path = trained_bt[0]
    model, meta = H.load_head(path)
    r1, r2 = R.load("head", path=str(path)), R.load(f"head:path={path}")
    out = r1(images)
    assert torch.equal(out.scores, r2(images).scores)
    assert set(out.components) == {"uncertainty", "raw"}
    with torch.no_grad():
        members = model.member_scores(model.raw(*model.features(images, None)))
    assert torch.allclose(out.scores, members.mean(0), atol=1e-6)
    assert torch.allclose(out.components["uncertainty"], members.std(0, unbiased=False), atol=1e-6)
    assert meta["model"]["members"] == 4 and r1.info.inputs == ("images",) and r1.info.differentiable
    # a missing key and an extra key both fail, naming the keys
    for change, name in ((lambda s: s.pop("heads.bias.1"), "heads.bias.1"),
                         (lambda s: s.__setitem__("heads.extra", torch.zeros(1)), "heads.extra")):
        bad = tmp_path / name
        bad.mkdir()
        state = load_file(str(path / H.WEIGHTS_NAME))
        change(state)
        save_file(state, str(bad / H.WEIGHTS_NAME))
        (bad / H.CONFIG_NAME).write_text((path / H.CONFIG_NAME).read_text())
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            R.load("head", path=str(bad))
    with pytest.raises(FileNotFoundError, match="visalign rewards train"):
        R.load("head", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="needs path=DIR"):
        R.load("head")


def test_gradient_reaches_the_pixels(trained_bt, images):
    reward = R.load("head", path=str(trained_bt[0]))
    x = images.clone().requires_grad_(True)
    reward(x).scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ensemble_spread_is_larger_off_the_training_distribution(trained_bt):
    """Trained on smooth, moderately red images; the spread on held-out images of the same kind is
    smaller than on images unlike any training image (saturated noise, flat blue)."""
    reward = R.load("head", path=str(trained_bt[0]))
    on = reward(_tinted(np.random.default_rng(5).uniform(0, 0.7, 32), seed=7)).components["uncertainty"]
    g = torch.Generator().manual_seed(0)
    off_images = torch.cat([torch.rand(16, 3, 32, 32, generator=g).round(),
                            torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(16, 3, 32, 32)])
    off = reward(off_images).components["uncertainty"]
    assert off.median() > 2 * on.median(), (on.median(), off.median())


def test_rating_and_binary_heads(tmp_path, tiny_dinov2):
    """Regression recovers a monotone score (Spearman > 0.9) in the ratings' units; a binary head
    separates red from not red (ROC AUC > 0.95); both on a DINOv2 backbone (no prompts)."""
    rng = np.random.default_rng(1)
    red = rng.uniform(0, 1, 120)
    names = _write_images(tmp_path, _tinted(red, 3))
    (tmp_path / "ratings.jsonl").write_text("".join(
        json.dumps({"image": n, "score": float(3 + 4 * r)}) + "\n" for n, r in zip(names, red)))
    (tmp_path / "labels.jsonl").write_text("".join(
        json.dumps({"image": n, "label": bool(r > 0.5)}) + "\n" for n, r in zip(names, red)))
    from visalign.config import from_dict

    common = {"backbone": {"kind": "dinov2", "model": str(tiny_dinov2)}, "head": {"hidden": [64], "use_prompt": False},
              "ensemble": {"members": 3}, "optim": {"steps": 300, "batch": 32, "lr": 3e-3},
              "cache_dir": str(tmp_path / "cache"), "log_every": 1000}
    rating = T.train(from_dict(T.RewardTrainConfig, {**common, "task": "rating",
                                                     "data": {"train": str(tmp_path / "ratings.jsonl"),
                                                              "val_fraction": 0.25}}), out=tmp_path / "rate", log=_quiet)
    assert rating["spearman"] > 0.9 and rating["rmse"] < 0.8, rating
    r = R.load("head", path=str(tmp_path / "rate"))
    s = r(_tinted(np.array([0.0, 1.0]), seed=11)).scores
    assert 2.0 < s[0] < s[1] < 8.0  # native units (ratings 3..7)
    binary = T.train(from_dict(T.RewardTrainConfig, {**common, "task": "binary",
                                                     "data": {"train": str(tmp_path / "labels.jsonl"),
                                                              "val_fraction": 0.25}}), out=tmp_path / "bin", log=_quiet)
    assert binary["roc_auc"] > 0.95 and 0 <= binary["ece"] <= 1, binary
    out = R.load("head", path=str(tmp_path / "bin"))(_tinted(np.array([0.0, 1.0]), seed=12))
    assert ((out.scores >= 0) & (out.scores <= 1)).all() and out.scores[1] > out.scores[0]


def test_finetune_moves_the_head_towards_new_labels(trained_bt, pref_data, tmp_path):
    """Reversed preferences on new images: fine-tuning flips the head's order on them; replaying the
    original pairs (half of each batch) keeps more of the original preference on held-out pairs.
    The saved head records the fine-tuning."""
    import shutil

    red = np.linspace(0, 0.7, 24)
    x = _tinted(red, seed=21)
    pairs = torch.tensor([(i, j) for i in range(24) for j in range(24) if red[j] - red[i] > 0.1])  # bluer wins now
    new = LabelledSet.from_tensors(x, pairs=pairs)
    val = read_dataset(pref_data["val"], "pairwise")
    before = R.load("head", path=str(trained_bt[0]))(x).scores
    assert (before[pairs[:, 0]] < before[pairs[:, 1]]).float().mean() > 0.9
    acc = {}
    for replay in (None, pref_data["train"]):
        path = tmp_path / ("replay" if replay else "plain")
        shutil.copytree(trained_bt[0], path)
        T.finetune(path, new, replay=replay, replay_fraction=0.5, steps=150, batch=64, lr=3e-3, log=_quiet)
        reward = R.load("head", path=str(path))
        if replay is None:
            after = reward(x).scores
            assert (after[pairs[:, 0]] > after[pairs[:, 1]]).float().mean() > 0.9
        acc[bool(replay)] = T.evaluate(reward.model, val)[0]["pair_accuracy"]
        meta = json.loads((path / H.CONFIG_NAME).read_text())
        assert meta["finetuned"][0]["units"] == len(pairs) and "metrics" in meta  # the original metrics kept
        assert meta["finetuned"][0]["replay_units"] == (300 if replay else 0)
    assert acc[True] > acc[False] + 0.2, acc


def test_recipe_errors_teach(tiny_open_clip, tiny_dinov2, tmp_path, capsys):
    from visalign.config import ConfigError, from_dict

    dino = {"kind": "dinov2", "model": str(tiny_dinov2)}
    with pytest.raises(ValueError, match="no text tower"):
        from_dict(T.RewardTrainConfig, {"backbone": dino, "head": {"use_prompt": True}})
    # a request the backbone cannot honour is refused; unset, use_prompt follows the backbone
    with pytest.raises(ValueError, match="use_prompt: true cannot be honoured: backbone.kind='cnn' reads images"):
        from_dict(T.RewardTrainConfig, {"backbone": {"kind": "cnn"}, "head": {"use_prompt": True}})
    with pytest.raises(ValueError, match="use_prompt: false cannot be honoured: .*always reads the prompt"):
        from_dict(T.RewardTrainConfig, {"backbone": {"kind": "shapes-proxy"}, "head": {"use_prompt": False}})
    assert from_dict(T.RewardTrainConfig, {"backbone": dino}).head.use_prompt is False
    assert from_dict(T.RewardTrainConfig, {"backbone": {"kind": "cnn"}}).head.use_prompt is False
    assert from_dict(T.RewardTrainConfig, {"backbone": {"kind": "shapes-proxy"}}).head.use_prompt is True
    assert from_dict(T.RewardTrainConfig, {"backbone": _oc(tiny_open_clip)}).head.use_prompt is True
    from visalign import cli

    recipe = tmp_path / "cnn_prompt.yaml"
    recipe.write_text("task: pairwise\nout: out\ndata: {train: pairs.jsonl}\nbackbone: {kind: cnn}\n"
                      "head: {use_prompt: true}\n")
    assert cli.main(["rewards", "train", str(recipe)]) == 2
    assert "use_prompt: true cannot be honoured" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="choose one of"):
        from_dict(T.RewardTrainConfig, {"task": "ranking"})
    with pytest.raises(ConfigError, match="Did you mean 'members'"):
        from_dict(T.RewardTrainConfig, {"ensemble": {"member": 3}})
    with pytest.raises(ValueError, match="exactly one of"):
        from_dict(T.RewardTrainConfig, {"data": {"train": "a.jsonl", "provider": "shapes-proxy"}})
    with pytest.raises(ValueError, match="needs backbone.pretrained"):
        from_dict(T.RewardTrainConfig, {"backbone": {"kind": "open_clip", "model": "ViT-B-32"}})


def test_data_formats(tmp_path):
    from PIL import Image

    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n'
        '{"prompt": "y", "chosen": "b.png", "rejected": "a.png", "label": 0.5}\n')
    d = read_dataset(tmp_path / "p.jsonl", "pairwise")
    assert len(d) == 4 and d.prompts == ["x", "x", "y", "y"]  # an image under two prompts is two items
    assert d.pairs.tolist() == [[0, 1], [2, 3]] and d.pair_labels.tolist() == [1.0, 0.5]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match=r"lacks \['rejected'\]"):
        read_dataset(tmp_path / "bad.jsonl", "pairwise")
    (tmp_path / "missing.jsonl").write_text('{"image": "nope.png", "label": 1}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_dataset(tmp_path / "missing.jsonl", "binary")
    (tmp_path / "lab.jsonl").write_text('{"image": "a.png", "label": 2}\n')
    with pytest.raises(ValueError, match="0/1 or true/false"):
        read_dataset(tmp_path / "lab.jsonl", "binary")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    blob = lambda n: (tmp_path / n).read_bytes()  # noqa: E731
    pq.write_table(pa.table({"caption": ["c1", "c2"], "jpg_0": [blob("a.png"), blob("b.png")],
                             "jpg_1": [blob("b.png"), blob("a.png")], "label_0": [1.0, 0.5],
                             "label_1": [0.0, 0.5]}), tmp_path / "pap.parquet")
    d = read_dataset(tmp_path / "pap.parquet", "pairwise")
    assert len(d) == 4 and d.pairs.tolist() == [[0, 1], [2, 3]] and d.pair_labels.tolist() == [1.0, 0.5]


def test_hub_pairs_stream_through_datasets(tmp_path, monkeypatch):
    """``hub:OWNER/NAME[:SPLIT]`` streams Pick-a-Pic rows through datasets.load_dataset (a stand-in
    module: tests never touch the network); ``max_rows`` stops early; the Image feature's dicts
    are read as their bytes; a recipe's hub id is not made relative to the recipe's folder."""
    import sys
    import types

    from PIL import Image

    blobs = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "x.png")
        blobs.append((tmp_path / "x.png").read_bytes())
    rows = [{"caption": "c0", "jpg_0": {"bytes": blobs[0], "path": None}, "jpg_1": blobs[1], "label_0": 0.0},
            {"caption": "c1", "jpg_0": blobs[1], "jpg_1": blobs[0], "label_0": 0.5},
            {"caption": "c2", "jpg_0": blobs[0], "jpg_1": blobs[1], "label_0": 1.0}]
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append((a, k)) or iter(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    d = read_dataset("hub:someone/pairs:validation", "pairwise", max_rows=2)
    assert calls == [(("someone/pairs",), {"split": "validation", "streaming": True})]
    assert d.prompts == ["c0", "c0", "c1", "c1"] and d.pair_labels.tolist() == [0.0, 0.5]
    assert d.images[0] == blobs[0] and d.images[1] == blobs[1]
    with pytest.raises(ValueError, match="for task 'pairwise'"):
        read_dataset("hub:someone/pairs", "binary")
    (tmp_path / "r.yaml").write_text("task: pairwise\nbackbone: {kind: cnn}\ndata: {train: 'hub:someone/pairs'}\n")
    cfg = T.load_train_config(tmp_path / "r.yaml")
    assert cfg.data.train == "hub:someone/pairs"


def test_bootstrap_weights_are_multiplicities():
    """Each member's unit weights count the draws of a resample of size U: they sum to U and
    differ between members; without bootstrap every weight is 1."""
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(50, (4, 50), generator=g)
    w = torch.zeros(4, 50).scatter_add_(1, draws, torch.ones(4, 50))
    assert torch.equal(w.sum(1), torch.full((4,), 50.0))
    assert all(torch.equal(w[k], torch.bincount(draws[k], minlength=50).float()) for k in range(4))


def test_ensemble_mlp_members_are_independent():
    mlp = H.EnsembleMLP(6, [5], members=3, seed=0)
    x = torch.randn(4, 6)
    out = mlp(x)
    for k in range(3):
        h = torch.nn.functional.silu(x @ mlp.weight[0][k] + mlp.bias[0][k])
        assert torch.allclose(out[k], (h @ mlp.weight[1][k] + mlp.bias[1][k]).squeeze(-1), atol=1e-6)
    assert not torch.allclose(out[0], out[1])


def test_cli_trains_and_lists(pref_data, tiny_open_clip, tmp_path, capsys):
    import yaml

    from visalign.cli import main

    recipe = {"task": "pairwise", "data": {"train": pref_data["train"].name, "val": pref_data["val"].name},
              "backbone": _oc(tiny_open_clip), "head": {"hidden": [], "use_prompt": True},
              "ensemble": {"members": 2}, "optim": {"steps": 5}, "cache_dir": str(tmp_path / "c")}
    cfg = pref_data["train"].parent / "recipe.yaml"  # data paths relative to the recipe's folder
    cfg.write_text(yaml.safe_dump(recipe))
    assert main(["rewards", "train", str(cfg), "--out", str(tmp_path / "h"), "--set", "optim.steps=3"]) == 0
    text = capsys.readouterr().out
    assert "pair_accuracy" in text and (tmp_path / "h" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "h" / "config.json").read_text())
    assert meta["recipe"]["optim"]["steps"] == 3 and meta["model"]["use_prompt"] is True
    r = R.load(f"head:path={tmp_path / 'h'}")
    assert r.info.inputs == ("images", "prompts")
    assert main(["rewards", "train", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["rewards", "train", str(cfg), "--set", "ensemble.member=3", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'members'" in capsys.readouterr().err
    assert main(["rewards"]) == 0 and "| head |" in capsys.readouterr().out
    assert main(["rewards", "--json"]) == 0
    assert any(i["name"] == "head" for i in json.loads(capsys.readouterr().out))
