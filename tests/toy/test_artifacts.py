"""The toy artifact reward: injected artifacts, its data provider, a kit-trained detector."""

import numpy as np
import pytest
import torch

from visalign import rewards as R
from visalign.rewards import head_train as T
from visalign.rewards.artifact import oversaturation
from visalign.rewards.head_data import LabelledSet
from visalign.toy import artifacts as A
from visalign.toy.proxy import renderer_set


@pytest.fixture(scope="module")
def clean():
    x, _, _ = renderer_set(224, seed=3)
    return x.float() / 255


def _high_freq(x):
    """Energy of the finite differences (blur keeps the total variation of a clean edge, not this)."""
    return (x[..., 1:, :] - x[..., :-1, :]).square().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).square().mean((1, 2, 3))


def test_each_artifact_does_what_its_name_says(clean):
    g = torch.Generator().manual_seed(0)
    x = clean[:16]
    out = {k: A.inject(x, [k] * 16, g) for k in A.KINDS}
    assert (_high_freq(out["blur"]) < 0.8 * _high_freq(x)).all()
    assert (oversaturation(out["saturation"]) >= oversaturation(x)).all()
    assert oversaturation(out["saturation"]).mean() > 1.5 * oversaturation(x).mean()  # toy colours start saturated
    # the grid's change is periodic: rows (and columns) on a line of period 3 or 4 change, the others do not
    diff = (out["grid"] - x).abs().sum(1)  # (B, H, W)
    for profile in (diff.mean(2), diff.mean(1)):  # by row, by column
        contrast = []
        for prof in profile:
            best = max(float(prof[k::p].mean() - torch.cat([prof[j::p] for j in range(p) if j != k]).mean())
                       for p in (3, 4) for k in range(p))
            contrast.append(best)
        assert min(contrast) > 0.03, contrast
    changed = (out["blotches"] - x).abs().amax(1) > 0.05  # (B, H, W)
    assert (changed.float().mean((1, 2)) > 0.01).all()
    assert all(((o >= 0) & (o <= 1)).all() for o in out.values())
    with pytest.raises(ValueError, match="unknown artifact kinds"):
        A.inject(x[:1], ["jpeg"], g)


def test_provider_pairs_each_pool_image_clean_and_corrupted(tmp_path):
    from visalign.toy import model as tm
    from visalign.toy.proxy import make_pool

    toy = tmp_path / "toy"
    tm.save(tm.build(seed=0), toy)
    pool = tmp_path / "pool.safetensors"
    make_pool(pool, str(toy), n_train=12, n_eval=4, num_steps=2, log=lambda s: None)
    d = A.training_data(model=str(toy), pool=str(pool), log=lambda s: None)
    tr, va = d["train"], d["val"]
    assert tr["images"].shape == (24, 3, 32, 32) and tr["images"].dtype == torch.uint8
    assert tr["targets"].tolist() == [1.0] * 12 + [0.0] * 12 and va["targets"].sum() == 4 and len(va["targets"]) == 8
    from visalign.toy.proxy import read_pool

    tensors, _ = read_pool(pool)
    assert torch.equal(tr["images"][:12], tensors["images"][~tensors["is_eval"]])  # the clean half is the pool itself
    assert torch.equal(va["images"][:4], tensors["images"][tensors["is_eval"]])
    assert (tr["images"][12:].float() - tr["images"][:12].float()).abs().amax() > 10
    assert set(d["report"](np.linspace(0, 1, 8))["heldout_auc_by_kind"]) == set(A.KINDS)


def test_kit_trains_a_cnn_artifact_detector(clean, tmp_path):
    """A 3-member binary head on the kit's trainable CNN, 300 steps on 160 renderer images clean and
    corrupted: held-out ROC AUC > 0.9 on 64 others (measured 0.96; about 0.5 untrained)."""
    g = torch.Generator().manual_seed(1)

    def labelled(x):
        kinds = [A.KINDS[i % 4] for i in range(len(x))]
        return LabelledSet.from_tensors(torch.cat([x, A.inject(x, kinds, g)]),
                                        targets=[1.0] * len(x) + [0.0] * len(x))

    train, val = labelled(clean[:160]), labelled(clean[160:])
    from visalign.rewards.head import BackboneConfig, RewardHeadModel, save_head

    model = RewardHeadModel("binary", BackboneConfig(kind="cnn", options={"width": 8, "depth": 4}), 32, [16], 3,
                            use_prompt=False, seed=0)
    before, _ = T.evaluate(model, val)
    T.update(model, train, steps=300, batch=32, lr=1e-2, train_backbone=True, log=lambda s: None)
    after, _ = T.evaluate(model, val)
    assert after["roc_auc"] > 0.9 and after["roc_auc"] > before["roc_auc"] + 0.2, (before, after)
    save_head(model, tmp_path)
    reward = R.load("shapes-artifact", path=str(tmp_path))
    assert reward.info.inputs == ("images",) and reward.info.differentiable
    s = reward(val.image_batch(torch.arange(len(val)))).scores
    assert s[:64].mean() > s[64:].mean()


def test_shipped_artifact_reward_loads_by_name_and_serves_as_an_eval_reward():
    """The shipped head tells corrupted from clean renderer images, and scores through the collect
    step that evaluation uses (an ``eval_rewards: [shapes-artifact]`` entry)."""
    import visalign.samplers as vs

    reward = R.load("shapes-artifact")
    x, _, _ = renderer_set(32, seed=8)
    x = x.float() / 255
    bad = A.inject(x, [A.KINDS[i % 4] for i in range(32)], torch.Generator().manual_seed(0))
    out = reward(torch.cat([x, bad]))
    assert out.valid.all() and set(out.components) == {"uncertainty", "raw"}
    from visalign.rewards.head_metrics import roc_auc

    assert roc_auc(out.scores.numpy(), [True] * 32 + [False] * 32) > 0.9
    rollout = vs.collect(vs.load("toy-shapes"), ["a red circle", "two blue squares"], {"shapes-artifact": reward},
                         num_steps=2, seeds=[0, 1])
    s = rollout.scores("shapes-artifact")
    assert s.shape == (2,) and ((s >= 0) & (s <= 1)).all()
