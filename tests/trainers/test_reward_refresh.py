"""Reward refresh in the loop (trainers/common/refresh.py, rewards/judge.py): the refresh happens at
the configured iterations only, resumes exactly, teaches the head what it got wrong, leaves a run
without it (or with a judge that gives nothing) bit-identical, and every toy refresh recipe of
every algorithm refreshes; a pairwise (Bradley-Terry) head is refreshed from pairs a judge compares
(ranks better what it mis-ranked, counts pairs against the budget, resumes exactly)."""

import json
from pathlib import Path

import pytest
import torch

from visalign.trainers import build_trainer, load_recipe
from visalign.trainers.common.refresh import RefreshSettings, expand_ensemble

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BACKPROP = CONFIGS / "toy" / "reward_backprop.yaml"
SMALL = ["data.eval=null", "eval_rewards=[]", "run.progress=false", "run.save_sample_grid=false",
         "backprop.batch_size=2", "backprop.num_steps=2", "run.eval_num_steps=2", "run.checkpoint_every=0"]
JUDGE = "{reward: shapes, component: strict}"


def _refresh(**kw) -> str:
    settings = {"every": 2, "samples": 6, "judge": JUDGE, "steps": 4, "batch": 6, **kw}
    return "reward_refresh={" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}"


def _trainer(run_dir, *overrides):
    return build_trainer(load_recipe(BACKPROP, [*SMALL, f"run.run_dir={run_dir}", *overrides]))


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.params]


def _head(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.reward_refresh.model.state_dict().items()}


def test_refresh_happens_at_the_configured_iterations_only(tmp_path):
    trainer = _trainer(tmp_path / "run", "run.iterations=5", _refresh(every=2, ensemble=3),
                       "data.eval=toy:eval", "data.eval_max_prompts=2", "eval_rewards=[shapes]")
    trainer.train()
    rows = _rows(tmp_path / "run")
    refreshed = [r["iteration"] for r in rows if "refresh/round" in r]
    assert refreshed == [3, 5]  # before 0-based iterations 2 and 4
    assert [r["refresh/labels"] for r in rows] == [0, 0, 6, 6, 12]  # the label budget, on every row
    assert [r["refresh/judge_calls"] for r in rows] == [0, 0, 1, 1, 2]
    assert trainer.reward_refresh.model.heads.members == 3
    # the algorithm trains on the refreshed head: its reward holds the very object that was updated
    assert any(part[1] is trainer.reward_refresh.reward for part in trainer.reward.parts)
    assert len(trainer.reward_refresh.store) == 12
    evals = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(e["iteration"], e["refresh/labels"]) for e in evals] == [(0, 0), (5, 12)]
    # the refreshed head is exported with the final weights and scores like the live one
    from visalign.toy.proxy_reward import ShapesProxyReward

    exported = ShapesProxyReward(str(tmp_path / "run" / "final" / "reward_head"))
    assert exported.meta["refreshed"]["labels"] == 12 and exported.model.heads.members == 3
    x, prompts = torch.rand(2, 3, 32, 32), ["a red circle", "two blue squares"]
    with torch.no_grad():
        assert torch.allclose(exported(x, prompts).scores, trainer.reward_refresh.reward(x, prompts).scores)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["reward_refresh"]["every"] == 2


def test_the_label_budget_caps_the_labels(tmp_path):
    trainer = _trainer(tmp_path / "run", "run.iterations=4", _refresh(every=1, samples=4, max_labels=10))
    trainer.train()
    rows = _rows(tmp_path / "run")
    assert [r.get("refresh/new_labels") for r in rows] == [None, 4, 4, 2]
    assert rows[-1]["refresh/labels"] == 10


def test_resume_after_a_refresh_equals_an_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", "run.iterations=5", _refresh(every=2))
    full.train()
    part = _trainer(tmp_path / "part", "run.iterations=5", "run.checkpoint_every=3", _refresh(every=2))
    part.train(iterations=3)  # a refresh at iteration 2, checkpointed after iteration 3
    resumed = _trainer(tmp_path / "part", "run.iterations=5", "run.checkpoint_every=3", _refresh(every=2))
    assert resumed.resume() and resumed.iteration == 3 and resumed.reward_refresh.rounds == 1
    resumed.train()
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    head_full, head_resumed = _head(full), _head(resumed)
    assert head_full.keys() == head_resumed.keys()
    assert all(torch.equal(head_full[k], head_resumed[k]) for k in head_full)
    keys = ("loss", "reward/mean", "refresh/labels", "refresh/accuracy_after")
    assert [[r.get(k) for k in keys] for r in _rows(tmp_path / "full")] == \
        [[r.get(k) for k in keys] for r in _rows(tmp_path / "part")]


def test_every_zero_is_todays_run(tmp_path):
    today = _trainer(tmp_path / "a", "run.iterations=3")
    today.train()
    off = _trainer(tmp_path / "b", "run.iterations=3", _refresh(every=0))
    assert off.reward_refresh is None
    off.train()
    for a, b in zip(_params(today), _params(off)):
        assert torch.equal(a, b)
    assert not any(k.startswith("refresh/") for r in _rows(tmp_path / "b") for k in r)


def _no_labels(images, prompts, metadata):
    return None  # a judge that gives nothing (a folder round that timed out)


def test_a_refresh_without_labels_changes_nothing_but_its_counters(tmp_path):
    """The refresh samples, asks the judge and gives up: the training stream is untouched (its own
    generators, a forked RNG), so the policy is bit-identical to a run without refresh."""
    from visalign.rewards.judge import FunctionJudge

    today = _trainer(tmp_path / "a", "run.iterations=3")
    today.train()
    idle = _trainer(tmp_path / "b", "run.iterations=3", _refresh(every=1))
    idle.reward_refresh.judge = FunctionJudge(_no_labels)
    head0 = _head(idle)
    idle.train()
    for a, b in zip(_params(today), _params(idle)):
        assert torch.equal(a, b)
    rows = _rows(tmp_path / "b")
    assert [r.get("refresh/skipped") for r in rows] == [None, 1, 2]
    assert rows[-1]["refresh/labels"] == 0 and rows[-1]["refresh/judge_calls"] == 2
    assert all(torch.equal(head0[k], v) for k, v in _head(idle).items())


class _Contrarian:
    """A judge that says the opposite of the head: every sample is mis-scored before the refresh."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images, prompts, metadata):
        with torch.no_grad():
            score = self.model(images.float(), prompts)["score"]
        return (score <= 0.5).float()


def test_a_refreshed_head_scores_the_samples_it_mis_scored_better(tmp_path):
    trainer = _trainer(tmp_path / "run", "run.iterations=2",
                       _refresh(every=1, samples=12, steps=60, batch=12, lr=3e-3, ensemble=2))
    rr = trainer.reward_refresh
    from visalign.rewards.judge import FunctionJudge

    rr.judge = FunctionJudge(_Contrarian(rr.model))
    images, prompts, _ = rr.sample(trainer, 1)
    with torch.no_grad():
        p_before = rr.model(images, prompts)["score"]
    labels = (p_before <= 0.5).float()
    row = rr.refresh(trainer, 1)
    assert row["refresh/accuracy_before"] == 0.0
    assert row["refresh/accuracy_after"] >= 0.75
    with torch.no_grad():
        p_after = rr.model(images, prompts)["score"]
    # every sample moved towards its label: up where the judge said 1, down where it said 0
    assert torch.all(torch.where(labels > 0.5, p_after - p_before, p_before - p_after) > 0)


# ---- a pairwise (Bradley-Terry) head ---------------------------------------------------------------
def _pairwise_head(folder) -> str:
    """A tiny Bradley-Terry kit head (a small trainable CNN, as `visalign rewards train` saves it),
    used as `head:path=DIR` in place of shapes-proxy."""
    from visalign.rewards.head import BackboneConfig, RewardHeadModel, save_head

    model = RewardHeadModel("pairwise", BackboneConfig(kind="cnn", options={"size": 16, "width": 4, "depth": 2}),
                            8, [16], 1, use_prompt=False, seed=1)
    save_head(model, folder, seed=1)
    return "rewards=" + json.dumps({f"head:path={folder}": 1.0})


def _brighter(images_a, images_b, prompts, metadata):
    """A pairwise judge: the brighter image is preferred, a tie within 1e-3 is declared (0.5)."""
    d = images_a.float().mean((1, 2, 3)) - images_b.float().mean((1, 2, 3))
    return torch.where(d.abs() < 1e-3, 0.5, (d > 0).float())


class _ContrarianPairs:
    """A pairwise judge that prefers the image the head ranks lower: every pair is mis-ranked before."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images_a, images_b, prompts, metadata):
        with torch.no_grad():
            return (self.model(images_a.float())["score"] <= self.model(images_b.float())["score"]).float()


def _pair_delta(model, images_a, images_b):
    with torch.no_grad():
        return model(images_a)["score"] - model(images_b)["score"]


def test_a_refreshed_pairwise_head_ranks_the_pairs_it_mis_ranked_better(tmp_path):
    from visalign.rewards.judge import FunctionJudge

    trainer = _trainer(tmp_path / "run", "run.iterations=2", _pairwise_head(tmp_path / "head"),
                       _refresh(every=1, samples=12, steps=60, batch=12, lr=3e-3, ensemble=2, train_backbone="true"))
    rr = trainer.reward_refresh
    assert rr.pairwise and rr.model.task == "pairwise"
    rr.judge = FunctionJudge(_ContrarianPairs(rr.model))
    images_a, images_b, prompts, _ = rr.sample_pairs(trainer, 1)
    assert images_a.shape == images_b.shape and len(prompts) == 12
    assert not torch.equal(images_a, images_b)  # two seeds per prompt
    delta_before = _pair_delta(rr.model, images_a, images_b)
    labels = (delta_before <= 0).float()
    row = rr.refresh(trainer, 1)
    assert row["refresh/new_labels"] == 12 and rr.judge.labels == 12 and rr.judge.calls == 1  # one label per pair
    assert row["refresh/accuracy_before"] == 0.0
    assert row["refresh/accuracy_after"] >= 0.75
    assert rr.store.units == 12 and len(rr.store) == 24 and torch.equal(rr.store.pair_labels, labels)
    delta_after = _pair_delta(rr.model, images_a, images_b)
    # every pair's score difference moved towards the judge's preference
    assert torch.all(torch.where(labels > 0.5, delta_after - delta_before, delta_before - delta_after) > 0)


def test_a_pairwise_refresh_counts_pairs_against_the_budget(tmp_path):
    from visalign.rewards.judge import FunctionJudge

    trainer = _trainer(tmp_path / "run", "run.iterations=3", _pairwise_head(tmp_path / "head"),
                       _refresh(every=1, samples=4, max_labels=6))
    trainer.reward_refresh.judge = FunctionJudge(_brighter)
    trainer.train()
    rows = _rows(tmp_path / "run")
    assert [r.get("refresh/new_labels") for r in rows] == [None, 4, 2]
    assert rows[-1]["refresh/labels"] == 6 and rows[-1]["refresh/judge_calls"] == 2
    store = trainer.reward_refresh.store
    assert store.units == 6 and len(store) == 12 and store.targets is None
    assert torch.equal(store.pairs[4:], torch.tensor([[8, 10], [9, 11]]))  # the second round's pairs, re-indexed


def test_resume_after_a_pairwise_refresh_equals_an_uninterrupted_run(tmp_path):
    from visalign.rewards.judge import FunctionJudge

    head = _pairwise_head(tmp_path / "head")

    def build(run_dir, *more):
        t = _trainer(run_dir, "run.iterations=5", head, _refresh(every=2), *more)
        t.reward_refresh.judge = FunctionJudge(_brighter)
        return t

    full = build(tmp_path / "full")
    full.train()
    part = build(tmp_path / "part", "run.checkpoint_every=3")
    part.train(iterations=3)  # a refresh at iteration 2, checkpointed after iteration 3
    resumed = build(tmp_path / "part", "run.checkpoint_every=3")
    assert resumed.resume() and resumed.iteration == 3 and resumed.reward_refresh.rounds == 1
    assert resumed.reward_refresh.store.units == 6 and resumed.reward_refresh.judge.labels == 6
    resumed.train()
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    head_full, head_resumed = _head(full), _head(resumed)
    assert all(torch.equal(head_full[k], head_resumed[k]) for k in head_full)
    sf, sr = full.reward_refresh.store, resumed.reward_refresh.store
    assert sf.units == sr.units == 12 and torch.equal(sf.pairs, sr.pairs) and torch.equal(sf.pair_labels, sr.pair_labels)
    assert torch.equal(sf.images, sr.images)
    keys = ("loss", "reward/mean", "refresh/labels", "refresh/accuracy_before", "refresh/accuracy_after")
    assert [[r.get(k) for k in keys] for r in _rows(tmp_path / "full")] == \
        [[r.get(k) for k in keys] for r in _rows(tmp_path / "part")]


def test_a_pairwise_head_needs_a_judge_that_compares(tmp_path):
    from visalign.rewards.judge import Judge
    from visalign.trainers.common.refresh import RewardRefresher, head_agreement

    class SingleImagesOnly(Judge):
        def label(self, images, prompts, metadata):
            return torch.ones(len(images))

    trainer = _trainer(tmp_path / "run", "run.iterations=1", _pairwise_head(tmp_path / "head"), _refresh())
    rr = trainer.reward_refresh  # built from the recipe: the gold verifier compares pairs
    with pytest.raises(ValueError, match="labels single images only"):
        RewardRefresher(rr.settings, rr.reward, SingleImagesOnly())
    with pytest.raises(ValueError, match="pass pairs"):
        head_agreement(rr.model, "pairwise", torch.rand(2, 3, 8, 8), [None, None], torch.ones(1))
    # the measure itself: ties are left out, an all-tie round has no accuracy
    x = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.8)])
    s = rr.model(x)["score"]
    better = 0 if s[0] > s[1] else 1
    pairs = torch.tensor([[better, 1 - better], [1 - better, better], [0, 1]])
    m = head_agreement(rr.model, "pairwise", x, [None, None], torch.tensor([1.0, 1.0, 0.5]), pairs)
    assert m["accuracy"] == 0.5 and m["score_mean"] == pytest.approx(float(s.mean()))
    assert "accuracy" not in head_agreement(rr.model, "pairwise", x, [None, None], torch.tensor([0.5]), pairs[:1])


def test_growing_the_ensemble_keeps_the_scores():
    from visalign.rewards.head import BackboneConfig, RewardHeadModel

    model = RewardHeadModel("binary", BackboneConfig(kind="cnn", options={"size": 8, "width": 2, "depth": 2}),
                            4, [4], 2, use_prompt=False, seed=1).eval()
    x = torch.rand(3, 3, 8, 8)
    before = model(x)
    assert expand_ensemble(model, 4) and model.heads.members == 4  # a multiple: the mean is kept exactly
    after = model(x)
    assert torch.allclose(before["score"], after["score"]) and after["members"].shape == (4, 3)
    assert torch.equal(after["members"][2], before["members"][0])
    assert not expand_ensemble(model, 4)
    with pytest.raises(ValueError, match="grown, never cut"):
        expand_ensemble(model, 2)


def test_settings_teach():
    with pytest.raises(ValueError, match="needs a judge"):
        RefreshSettings(every=2)
    with pytest.raises(ValueError, match="exactly one of reward"):
        RefreshSettings(every=2, judge={"reward": "shapes", "folder": "x"})
    with pytest.raises(ValueError, match=r"mix .* \[0, 1\)"):
        RefreshSettings(every=2, judge="shapes", mix=1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        RefreshSettings(every=2, judge={"reward": "shapes", "treshold": 0.5})
    assert RefreshSettings(every=2, judge="shapes").judge_settings.reward == "shapes"


def test_refresh_needs_a_head_reward(tmp_path):
    with pytest.raises(ValueError, match="kit heads"):
        build_trainer(load_recipe(CONFIGS / "toy" / "flow_grpo.yaml",
                                  ["data.eval=null", f"run.run_dir={tmp_path}", _refresh()]))


# ---- every algorithm refreshes (the toy refresh recipes) ---------------------------------------------
REFRESH_RECIPES = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "toy").glob("*refresh*.yaml"))


def test_every_fine_tuning_method_has_a_toy_refresh_recipe():
    import yaml

    algos = {}
    for name in REFRESH_RECIPES:
        data = yaml.safe_load((CONFIGS / name).read_text())
        algos[data["algorithm"]] = name
        budget = data["reward_refresh"]["max_labels"]
        assert budget <= 2000, f"{name}: the label budget {budget} is over 2,000"
    assert set(algos) >= {"backprop", "grpo", "nft", "dpo"}, algos


@pytest.mark.parametrize("recipe_file", REFRESH_RECIPES)
def test_toy_refresh_recipe_refreshes(recipe_file, tmp_path):
    """Each refresh recipe, cut down, refreshes its trained head before its second iteration."""
    import yaml

    algo = yaml.safe_load((CONFIGS / recipe_file).read_text())["algorithm"]
    cut = {"backprop": ["backprop.batch_size=2", "backprop.num_steps=2"],
           "grpo": ["grpo.group_size=2", "grpo.prompts_per_iteration=2", "grpo.num_steps=4", "grpo.train_batch_size=4",
                    "grpo.sde_window_size=2"],
           "nft": ["nft.group_size=2", "nft.prompts_per_iteration=2", "nft.num_steps=2", "nft.train_batch_size=4",
                   "nft.timesteps=1"],
           "dpo": ["dpo.group_size=2", "dpo.prompts_per_iteration=2", "dpo.num_steps=2", "dpo.train_batch_size=2"]}[algo]
    recipe = load_recipe(CONFIGS / recipe_file, [
        *cut, "data.eval=null", "eval_rewards=[]", f"run.run_dir={tmp_path}", "run.iterations=2", "run.progress=false",
        "run.checkpoint_every=0", "run.eval_num_steps=2", "reward_refresh.every=1", "reward_refresh.samples=4",
        "reward_refresh.steps=2", "reward_refresh.batch=4"])
    trainer = build_trainer(recipe)
    trainer.train()
    rows = _rows(tmp_path)
    assert "refresh/round" not in rows[0] and rows[1]["refresh/round"] == 1
    assert rows[1]["refresh/labels"] == 4 and "refresh/accuracy_after" in rows[1]
