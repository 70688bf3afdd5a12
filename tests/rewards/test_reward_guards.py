"""Reward-side guards: the uncertainty penalty and the within-group diversity bonus, against their formulas."""

import pytest
import torch
import torch.nn.functional as F

from visalign import rewards as R
from visalign.rewards import head as H
from visalign.rewards.guards import UncertaintyPenalty, group_diversity


@pytest.fixture(scope="module")
def cnn_head(tmp_path_factory):
    """An (untrained) 3-member binary head on a trainable CNN, saved and loaded by path."""
    path = tmp_path_factory.mktemp("cnn_head")
    model = H.RewardHeadModel("binary", H.BackboneConfig(kind="cnn", options={"width": 8, "depth": 2}),
                              16, [8], 3, use_prompt=False, seed=0)
    H.save_head(model, path)
    return path


def test_uncertainty_penalty_is_score_minus_kappa_times_std(cnn_head, images):
    head = R.load("head", path=str(cnn_head))
    base = head(images)
    members = head.model(images)["members"]  # (K, B) member probabilities
    assert torch.allclose(base.components["uncertainty"], members.std(0, unbiased=False), atol=1e-6)
    assert (base.components["uncertainty"] > 0).all()
    for kappa in (0.0, 0.5, 2.0):
        out = R.load(f"uncertainty_penalty:reward=head,path={cnn_head},kappa={kappa}")(images)
        assert torch.allclose(out.scores, members.mean(0) - kappa * members.std(0, unbiased=False), atol=1e-6)
        assert torch.allclose(out.components["penalty"], kappa * base.components["uncertainty"], atol=1e-6)
        assert torch.equal(out.components["unpenalized"], base.scores)
    x = images.clone().requires_grad_(True)
    UncertaintyPenalty(head, kappa=1.0)(x).scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_uncertainty_penalty_errors_teach(images):
    with pytest.raises(ValueError, match="no component 'uncertainty'"):
        UncertaintyPenalty(R.load("artifact"))(images)
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        UncertaintyPenalty(R.load("artifact"), kappa=-1)
    with pytest.raises(ValueError, match="needs reward=NAME"):
        R.load("uncertainty_penalty")


def _by_hand(f, groups, aggregate):
    out = []
    for i in range(len(f)):
        d = [1 - F.cosine_similarity(f[i], f[j], dim=0) for j in range(len(f)) if j != i and groups[j] == groups[i]]
        out.append(0.0 if not d else (sum(d) / len(d) if aggregate == "mean" else min(d)))
    return torch.tensor([float(v) for v in out])


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_group_diversity_matches_the_formula(aggregate):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, generator=g)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 1])  # sample 5 is alone: 0
    d = group_diversity(f, groups, aggregate)
    assert torch.allclose(d, _by_hand(f, groups, aggregate), atol=1e-5)
    assert d[5] == 0
    same = torch.ones(4, 5)
    assert torch.allclose(group_diversity(same, torch.zeros(4, dtype=torch.long), aggregate), torch.zeros(4), atol=1e-6)


def test_diversity_reward_on_dino_groups_from_size_or_metadata(tiny_dinov2, images, cnn_head):
    bonus = R.load("diversity", model=str(tiny_dinov2), group_size=2, weight=0.5)
    feats = bonus.backbone.image_features(images)["cls"]
    out = bonus(images)
    assert torch.allclose(out.scores, 0.5 * _by_hand(feats, torch.tensor([0, 0, 1, 1]), "mean"), atol=1e-5)
    meta = [{"group": "a"}, {"group": "b"}, {"group": "a"}, {"group": "a"}]
    by_meta = bonus(images, metadata=meta)
    assert torch.allclose(by_meta.components["diversity"], _by_hand(feats, torch.tensor([0, 1, 0, 0]), "mean"), atol=1e-5)
    assert by_meta.scores[1] == 0  # alone in its group
    x = images.clone().requires_grad_(True)
    bonus(x).scores.sum().backward()
    assert x.grad.abs().sum() > 0
    # added to a reward, directly or through combine
    wrapped = R.load(f"diversity:model={tiny_dinov2},group_size=2,weight=0.5,reward=head,path={cnn_head}")
    w = wrapped(images)
    head = R.load("head", path=str(cnn_head))(images)
    assert torch.allclose(w.scores, head.scores + out.scores, atol=1e-5)
    assert torch.equal(w.components["base"], head.scores)
    combined = R.combine({f"head:path={cnn_head}": 1.0, bonus: 1.0})(images)
    assert torch.allclose(combined.scores, w.scores, atol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        R.load("diversity", model=str(tiny_dinov2))(images[:3])
