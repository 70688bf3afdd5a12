"""The learned ``shapes-proxy`` reward: model files, the reward contract, gradients, training."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visalign import rewards as R
from visalign.cli import main
from visalign.toy import proxy as P
from visalign.toy.prompts import TAGS, by_tag, split
from visalign.toy.render import render
from visalign.toy.verify import verify

SMALL = P.ProxyConfig(width=32, hidden=96, text_dim=48, text_layers=1)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from visalign.toy import model as tm

    path = tmp_path_factory.mktemp("toy")
    tm.save(tm.build(seed=0), path)
    return path


@pytest.fixture(scope="module")
def pooled_run(tmp_path_factory, toy_dir):
    """A few steps with a 32-image base-model pool (random-weight toy model, 2 ODE steps)."""
    out = tmp_path_factory.mktemp("proxy_pool")
    metrics = P.train_proxy(out, model=str(toy_dir), steps=4, batch=16, pool_train=24, pool_eval=8, pool_steps=2,
                            renderer_eval=32, config=SMALL, threads=None, log=_quiet)
    return out, metrics


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("proxy")
    P.save(P.build(SMALL, seed=0), path)
    return path


def test_save_load_round_trip_is_exact(proxy_dir):
    net = P.build(SMALL, seed=0).eval()
    again = P.load(proxy_dir)
    assert again.config == net.config
    ref = net.state_dict()
    assert set(again.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "three squares", "a circle left of a triangle"]
    with torch.no_grad():
        assert torch.equal(net(x, prompts), again(x, prompts))
    assert not torch.equal(P.build(SMALL, seed=1).state_dict()["tok_emb.weight"], ref["tok_emb.weight"])


def test_strict_loading_rejects_a_missing_key(proxy_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(proxy_dir / P.WEIGHTS_NAME))
    del state["head.0.bias"]
    save_file(state, str(tmp_path / P.WEIGHTS_NAME))
    (tmp_path / P.CONFIG_NAME).write_text((proxy_dir / P.CONFIG_NAME).read_text())
    with pytest.raises(RuntimeError, match="head.0.bias"):
        P.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-proxy"):
        P.load(tmp_path / "nowhere")


def test_registered_and_differentiable():
    info = R.info("shapes-proxy")
    assert info.differentiable and info.inputs == ("images", "prompts") and info.native_range == (0.0, 1.0)


def test_reward_scores_validity_and_equals_the_model(proxy_dir):
    reward = R.load("shapes-proxy", path=str(proxy_dir))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "a photo of a cat", "Two Squares."]
    out = reward(x, prompts)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert out.valid.tolist() == [True, False, True]
    assert math.isnan(out.scores[1]) and "cannot parse" in out.extras["reason"][1]
    assert set(out.components) == {"p_strict", "logit", "partial"}
    assert all(v.shape == (3,) for v in out.components.values())
    net = P.load(proxy_dir)
    with torch.no_grad():
        ref = net(x[[0, 2]], ["a red circle", "two squares"])  # the reward normalises case and full stop
    assert torch.allclose(out.scores[[0, 2]], torch.sigmoid(ref[:, 0]), atol=1e-6)
    assert torch.allclose(out.components["partial"][[0, 2]], torch.sigmoid(ref[:, 1]), atol=1e-6)
    assert ((0 <= out.scores[[0, 2]]) & (out.scores[[0, 2]] <= 1)).all()


@pytest.mark.parametrize("size", [64, 16])
def test_gradient_reaches_the_pixels_at_any_size(proxy_dir, size):
    reward = R.load("shapes-proxy", path=str(proxy_dir))
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    prompts = ["a red circle", "a photo of a cat", "a blue square and a green triangle"]
    out = reward(x, prompts)
    out.scores[out.valid].sum().backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    assert g[1].abs().sum() == 0  # an invalid sample never reaches the model
    # the resize is the verifier's: 2x2 area mean down, bilinear up (computed here by hand for 64 px)
    net = P.load(proxy_dir)
    with torch.no_grad():
        small = x.detach().reshape(3, 3, 32, 2, 32, 2).mean((3, 5)) if size == 64 else F.interpolate(
            x.detach(), size=(32, 32), mode="bilinear", align_corners=False)
        ref = torch.sigmoid(net(small[[0, 2]], [prompts[0], prompts[2]])[:, 0])
    assert torch.allclose(out.scores[[0, 2]].detach(), ref, atol=1e-5)


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert P.roc_auc(s, y) == pytest.approx(np.mean(pairs))
    assert P.roc_auc([0.1, 0.9], [False, True]) == 1.0 and math.isnan(P.roc_auc([1.0], [True]))


def test_hard_negatives_change_the_scene_and_mostly_fail_the_verifier():
    rng = np.random.default_rng(0)
    metas = P._balanced(by_tag(split("train")), 120, rng)
    mutated = [P.mutate(m, rng) for m in metas]
    assert all(mu["include"] != m["include"] for mu, m in zip(mutated, metas))
    images = np.stack([render(mu, rng) for mu in mutated])
    fail = np.mean([not v.strict for v in verify(images, metadata=metas)])
    assert fail > 0.9, fail


def test_pool_is_cached_and_metrics_written(pooled_run, toy_dir):
    from safetensors import safe_open

    out, metrics = pooled_run
    with safe_open(str(out / P.POOL_NAME), framework="pt") as f:
        assert f.get_tensor("images").shape == (32, 3, 32, 32) and f.get_tensor("images").dtype == torch.uint8
        assert int(f.get_tensor("is_eval").sum()) == 8 and f.metadata()["model"] == str(toy_dir)
        assert len(json.loads(f.metadata()["prompts"])) == 32
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["pool_eval"] == 8 and saved["pool_train"] == 24 and saved["steps"] == 4
    assert "heldout_auc" in saved and set(saved["heldout_auc_by_tag"]) == set(TAGS)
    assert P.load(out).config == SMALL


def test_cli_train_proxy_reuses_the_pool(pooled_run, toy_dir, tmp_path, capsys):
    import shutil

    shutil.copy(pooled_run[0] / P.POOL_NAME, tmp_path / P.POOL_NAME)
    stamp = (tmp_path / P.POOL_NAME).stat().st_mtime_ns
    args = ["toy", "train-proxy", "--out", str(tmp_path), "--model", str(toy_dir), "--steps", "2", "--seed", "1"]
    assert main(args) == 0
    assert "held-out ROC AUC" in capsys.readouterr().out
    assert (tmp_path / P.POOL_NAME).stat().st_mtime_ns == stamp
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["pool_eval"] == 8
    assert P.load(tmp_path).config == P.ProxyConfig()


def test_short_training_separates_positives_from_hard_negatives(tmp_path):
    """250 steps of 32 renderer images (about 20 s on one core) on the one- and two-object prompts;
    held-out renderer images of eval prompts, half drawn from a mutated prompt (another shape, a
    dropped object, another count).  At initialisation the AUC is about 0.5; the measured value
    after training is 0.88 (0.84 with seed 1)."""
    tags = ("single_object", "two_object")
    metrics = P.train_proxy(tmp_path, model=None, steps=250, batch=32, lr=3e-3, config=SMALL, tags=tags,
                            renderer_eval=128, threads=None, log=_quiet)
    assert metrics["renderer_auc"] > 0.7, metrics
    # the AUC is recomputed here from the saved proxy and an independently drawn test set
    net = P.load(tmp_path)
    x, prompts, strict, mutated = P.renderer_eval_set(128, seed=99, tags=tags)
    assert 0.3 < float(strict.mean()) < 0.7 and bool((strict[mutated] == 0).float().mean() > 0.9)
    with torch.no_grad():
        p = torch.sigmoid(net(x, prompts)[:, 0])
    assert P.roc_auc(p.numpy(), strict.numpy() > 0.5) > 0.7
    untrained = P.build(SMALL, seed=0).eval()
    with torch.no_grad():
        p0 = torch.sigmoid(untrained(x, prompts)[:, 0])
    assert abs(P.roc_auc(p0.numpy(), strict.numpy() > 0.5) - 0.5) < 0.2
