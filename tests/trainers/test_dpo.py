"""Diffusion-DPO / Flow-DPO (``algorithm: dpo``): the objective against its formula and analytic
gradient, the behaviour that must hold on tiny models (the implicit reward accuracy rises, resume is
exact), the pair sources and the latent cache, and the online mode's pairs."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support import Brightness

from visalign.trainers import DPOConfig, RunSettings, registry
from visalign.trainers.dpo import dpo_loss
from visalign.trainers.dpo.data import LatentCache, build_latent_cache, open_pairs


# ---- helpers -----------------------------------------------------------------------------------
def png_bytes(rng, h=40, w=48, value=None) -> bytes:
    from PIL import Image

    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pair_folder(root: Path, n: int = 6, seed: int = 0, bad: bool = False, scores: bool = False) -> Path:
    """A folder with pairs.jsonl and random PNGs (and one undecodable file when ``bad``)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for side in "ab":
            (root / "img" / f"{i}{side}.png").write_bytes(png_bytes(rng))
        row = {"prompt": f"prompt {i}", "chosen": f"img/{i}a.png", "rejected": f"img/{i}b.png"}
        if scores:
            row.update(chosen_score=0.75, rejected_score=0.25)
        rows.append(row)
    if bad:
        (root / "img" / "bad.png").write_bytes(b"not an image")
        rows.insert(2, {"prompt": "broken", "chosen": "img/bad.png", "rejected": "img/0b.png"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def pickapic_parquet(path: Path, labels, seed: int = 0, bad_row: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    a = [png_bytes(rng, value=10 * i) for i in range(len(labels))]
    b = [png_bytes(rng, value=200 - 10 * i) for i in range(len(labels))]
    if bad_row is not None:
        b[bad_row] = b"\x89PNG broken"
    table = pa.table({"caption": [f"caption {i}" for i in range(len(labels))], "jpg_0": a, "jpg_1": b,
                      "label_0": [float(x) for x in labels], "extra": list(range(len(labels)))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=2)
    return path


def make_dpo(tiny_model_dir, tmp_path, *, family="sd3", variant=None, mode="offline", pairs=None, rewards=None,
             run_dir="run", lora=True, **cfg):
    import visalign.samplers as vs
    from visalign.trainers import LoraSettings
    from visalign.trainers.common.lora import add_lora

    options = {"max_sequence_length": 8} if family in ("sd3", "flux", "wan") else {}
    sampler = vs.load(str(tiny_model_dir(family, variant)), **options)
    torch.manual_seed(0)
    trainable = add_lora(sampler, LoraSettings(rank=4, alpha=4)) if lora else None
    defaults = dict(mode=mode, guidance_scale=2.0, train_batch_size=2, gradient_accumulation=2, learning_rate=1e-3,
                    ema_decay=0.0)
    if mode == "online":  # the rollout groups
        defaults.update(group_size=4, prompts_per_iteration=2, num_steps=3)
    else:  # the pair data
        defaults.update(pairs=pairs, num_workers=0)
    defaults.update(cfg)
    prompts = [{"prompt": p, "metadata": None} for p in ["a red cube", "a blue ball", "a green tree", "a cat"]]
    run = RunSettings(run_dir=str(tmp_path / run_dir), iterations=3, checkpoint_every=1, eval_every=0,
                      progress=False, save_sample_grid=False)
    return registry.get("dpo").trainer_class(sampler, rewards or {}, DPOConfig(**defaults), train_prompts=prompts,
                                             run=run, trainable=trainable, size={"height": 32, "width": 32})


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone()


def draws(tr, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = tr.sampler.noise(1, torch.Generator().manual_seed(0), height=32, width=32).shape[1:]
    x_w, x_l, noise = (torch.randn((n, *shape), generator=g) for _ in range(3))
    return x_w, x_l, noise, tr.draw_times(n, g)


# ---- the objective --------------------------------------------------------------------------------
def test_dpo_loss_is_the_papers_formula():
    e_w, e_l = torch.tensor([0.30, 0.50, 0.40]), torch.tensor([0.40, 0.45, 0.40])
    r_w, r_l = torch.tensor([0.35, 0.50, 0.41]), torch.tensor([0.40, 0.50, 0.40])
    beta = 50.0
    loss, inside = dpo_loss(e_w, e_l, r_w, r_l, beta)
    expect = -0.5 * beta * ((e_w - e_l) - (r_w - r_l))
    assert torch.allclose(inside, expect)
    assert torch.allclose(loss, torch.log1p(torch.exp(-expect)), atol=1e-6)
    # pair 0: the model lowered the winner's error more than the reference -> ranked right
    assert inside[0] > 0 and inside[1] < 0 and inside[2] > 0
    assert torch.allclose(dpo_loss(r_w, r_l, r_w, r_l, beta)[0], torch.full((3,), math.log(2.0)))


@pytest.mark.parametrize("family,variant", [("sd3", None), ("sd", "eps"), ("sd", "v")])
def test_loss_is_log2_at_init_and_its_gradient_is_analytic(tiny_model_dir, tmp_path, family, variant):
    """Model == reference (LoRA B = 0): every pair's loss is log 2 and, since d(-log sigmoid)/dx = -1/2
    at 0, the gradient is beta/4 * grad(e_w - e_l) summed over pairs."""
    tr = make_dpo(tiny_model_dir, tmp_path, family=family, variant=variant, pairs="unused", beta=40.0)
    x_w, x_l, noise, t = draws(tr, 3)
    cond = tr.encode(["a red cube", "a blue ball", "a cat"])
    loss, st = tr.pair_losses(x_w, x_l, cond, noise, t)
    assert torch.allclose(loss.detach(), torch.full((3,), math.log(2.0)), atol=1e-6)
    assert torch.allclose(st["inside"], torch.zeros(3), atol=1e-6)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    g_dpo = flat_grad(tr.params)
    tr.optimizer.zero_grad(set_to_none=True)
    s = tr.sampler
    x, nz, tt = torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t])
    from visalign.samplers import Conditioning

    err = ((s.predict_at(s.add_noise(x, nz, tt), tt, Conditioning.cat([cond, cond])).float()
            - s.training_target(x, nz, tt)) ** 2).flatten(1).mean(1)
    (0.25 * 40.0 * (err[:3] - err[3:]).sum()).backward()
    g_ref = flat_grad(tr.params)
    assert g_ref.norm() > 0
    assert float((g_dpo - g_ref).norm() / g_ref.norm()) < 1e-5


def _loss_inputs():
    """Tiny denoising errors (float64, with gradients) on both sides of every loss's kink / target."""
    e_w = torch.tensor([0.300, 0.500, 0.400, 0.4010], dtype=torch.float64, requires_grad=True)
    e_l = torch.tensor([0.400, 0.450, 0.400, 0.4000], dtype=torch.float64, requires_grad=True)
    r_w = torch.tensor([0.350, 0.500, 0.410, 0.4000], dtype=torch.float64)
    r_l = torch.tensor([0.400, 0.500, 0.400, 0.4000], dtype=torch.float64)
    return e_w, e_l, r_w, r_l


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_each_loss_type_is_its_papers_formula_with_its_gradient(loss_type):
    """Each loss transcribed on the log-ratio margin h = -1/2 ((e_w - e_l) - (e_w_ref - e_l_ref)):
    sigmoid -log sigmoid(beta h) (Diffusion-DPO), ipo beta^2 (h - 1/(2 beta))^2 (IPO, Azar et al. 2023,
    scaled by beta^2), hinge max(0, 1 - beta h) (SLiC, Zhao et al. 2023); value and gradient in e_w, e_l."""
    beta = 100.0  # inside = 2.5, -2.5, 0.5 (IPO's target), -0.05
    e_w, e_l, r_w, r_l = _loss_inputs()
    loss, inside = dpo_loss(e_w, e_l, r_w, r_l, beta, loss_type)
    h = (-0.5 * ((e_w - e_l) - (r_w - r_l))).detach()
    assert torch.allclose(inside.detach(), beta * h)
    expect = {"sigmoid": torch.log1p(torch.exp(-beta * h)),
              "ipo": beta ** 2 * (h - 1 / (2 * beta)) ** 2,
              "hinge": torch.clamp(1 - beta * h, min=0)}[loss_type]
    assert torch.allclose(loss.detach(), expect, atol=1e-12)
    # dL/dh by hand; dh/de_w = -1/2, dh/de_l = +1/2
    dl_dh = {"sigmoid": -beta * torch.sigmoid(-beta * h),
             "ipo": 2 * beta ** 2 * (h - 1 / (2 * beta)),
             "hinge": -beta * (1 - beta * h > 0).double()}[loss_type]
    loss.sum().backward()
    assert torch.allclose(e_w.grad, -0.5 * dl_dh, atol=1e-10)
    assert torch.allclose(e_l.grad, 0.5 * dl_dh, atol=1e-10)
    at_init = dpo_loss(r_w, r_l, r_w, r_l, beta, loss_type)[0]
    assert torch.allclose(at_init, torch.full((4,), {"sigmoid": math.log(2.0), "ipo": 0.25, "hinge": 1.0}[loss_type],
                                              dtype=torch.float64))
    if loss_type == "hinge":  # pair 0 is ranked right by more than 1/beta: no gradient
        assert float(beta * h[0]) > 1 and e_w.grad[0] == 0
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge"):
        dpo_loss(e_w, e_l, r_w, r_l, beta, "kto")


@pytest.mark.parametrize("loss_type,at_init,slope", [("ipo", 0.25, -1.0), ("hinge", 1.0, -1.0)])
def test_loss_type_in_the_trainer_at_init(tiny_model_dir, tmp_path, loss_type, at_init, slope):
    """At the reference (inside = 0) every loss type's value is its formula's and its gradient is
    dL/dinside(0) = slope times d inside = -beta/2 grad(e_w - e_l); the sigmoid's slope is -1/2."""
    tr = make_dpo(tiny_model_dir, tmp_path, pairs="unused", beta=40.0, loss_type=loss_type)
    base = make_dpo(tiny_model_dir, tmp_path, pairs="unused", beta=40.0, run_dir="base")
    x_w, x_l, noise, t = draws(tr, 3)
    grads = []
    for trainer in (tr, base):
        cond = trainer.encode(["a red cube", "a blue ball", "a cat"])
        loss, _ = trainer.pair_losses(x_w, x_l, cond, noise, t)
        if trainer is tr:
            assert torch.allclose(loss.detach(), torch.full((3,), at_init), atol=1e-6)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        grads.append(flat_grad(trainer.params))
    assert grads[1].norm() > 0
    assert float((grads[0] - (slope / -0.5) * grads[1]).norm() / grads[0].norm()) < 1e-5


def test_swapping_winner_and_loser_flips_the_gradient(tiny_model_dir, tmp_path):
    tr = make_dpo(tiny_model_dir, tmp_path, pairs="unused")
    x_w, x_l, noise, t = draws(tr, 2, seed=1)
    cond = tr.encode(["a red cube", "a cat"])
    grads = []
    for a, b in ((x_w, x_l), (x_l, x_w)):
        tr.optimizer.zero_grad(set_to_none=True)
        tr.pair_losses(a, b, cond, noise, t)[0].sum().backward()
        grads.append(flat_grad(tr.params))
    assert grads[0].norm() > 0
    assert torch.allclose(grads[0], -grads[1], atol=1e-7 + 1e-5 * float(grads[0].abs().max()))


def test_sft_term_adds_the_winners_flow_matching_gradient(tiny_model_dir, tmp_path):
    tr = make_dpo(tiny_model_dir, tmp_path, pairs="unused")
    x_w, x_l, noise, t = draws(tr, 2, seed=2)
    cond = tr.encode(["a red cube", "a cat"])
    out = []
    for w in (0.0, 0.5):
        tr.config.sft_weight = w
        tr.optimizer.zero_grad(set_to_none=True)
        loss, st = tr.pair_losses(x_w, x_l, cond, noise, t)
        loss.sum().backward()
        out.append((loss.detach(), st["mse_w"], flat_grad(tr.params)))
    assert torch.allclose(out[1][0] - out[0][0], 0.5 * out[0][1], atol=1e-6)
    assert (out[1][2] - out[0][2]).norm() > 0


def test_beta_defaults_per_family_and_config_errors_teach(tiny_model_dir, tmp_path):
    assert make_dpo(tiny_model_dir, tmp_path, family="sd", variant="eps", pairs="x").beta == 5000.0
    assert make_dpo(tiny_model_dir, tmp_path, pairs="x", run_dir="r2").beta == 100.0
    assert make_dpo(tiny_model_dir, tmp_path, pairs="x", beta=7.0, run_dir="r3").beta == 7.0
    with pytest.raises(ValueError, match="dpo.pairs is required offline"):
        DPOConfig()
    with pytest.raises(ValueError, match="pairing must be"):
        DPOConfig(mode="online", pairing="random")
    with pytest.raises(ValueError, match="time_distribution: uniform"):
        make_dpo(tiny_model_dir, tmp_path, family="sd", variant="eps", pairs="x", time_distribution="logit_normal")
    with pytest.raises(ValueError, match="uses no reward"):
        make_dpo(tiny_model_dir, tmp_path, pairs="x", rewards={"brightness": (Brightness(), 1.0)})
    with pytest.raises(ValueError, match="ranks each group"):
        make_dpo(tiny_model_dir, tmp_path, mode="online")
    with pytest.raises(ValueError, match="does not fit"):
        make_dpo(tiny_model_dir, tmp_path, mode="online", rollout_kernel="ddim",
                 rewards={"brightness": (Brightness(), 1.0)})


def test_dpo_config_picks_the_mode_and_refuses_the_other_modes_settings():
    from visalign.config import ConfigError
    from visalign.trainers.dpo import DPOTrainer, OfflineDPOConfig, OnlineDPOConfig
    from visalign.trainers.recipe import load_recipe

    off, on = DPOConfig(pairs="x"), DPOConfig(mode="online", pairing="all")
    assert type(off) is OfflineDPOConfig and type(on) is OnlineDPOConfig and on.pairing == "all"
    assert not hasattr(off, "group_size") and not hasattr(on, "pairs")  # no setting that means nothing
    assert off.loss_type == on.loss_type == "sigmoid"
    with pytest.raises(ValueError, match=r"dpo.group_size is a setting of online DPO .* set dpo.mode: online"):
        DPOConfig(pairs="x", group_size=4)
    with pytest.raises(ValueError, match=r"dpo.hflip is a setting of offline DPO .* set dpo.mode: offline"):
        DPOConfig(mode="online", hflip=True)
    with pytest.raises(ValueError, match="mode must be offline or online"):
        DPOConfig(mode="both")
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge"):
        DPOConfig(pairs="x", loss_type="kto")
    with pytest.raises(TypeError, match="OfflineDPOConfig or an OnlineDPOConfig"):
        DPOTrainer.from_parts(None, object())
    recipe = Path(__file__).resolve().parents[2] / "configs" / "toy" / "dpo_offline.yaml"
    assert type(load_recipe(recipe).config) is OfflineDPOConfig
    assert load_recipe(recipe, ["dpo.loss_type=ipo"]).config.loss_type == "ipo"
    with pytest.raises(ConfigError, match=r"dpo.pairing is a setting of online DPO"):
        load_recipe(recipe, ["dpo.pairing=all"])
    with pytest.raises(ConfigError, match=r"dpo.num_steps is a setting of online DPO"):
        load_recipe(recipe, ["dpo.num_steps=4"])
    online = recipe.with_name("dpo_online.yaml")
    assert type(load_recipe(online).config) is OnlineDPOConfig
    with pytest.raises(ConfigError, match=r"dpo.pairs is a setting of offline DPO"):
        load_recipe(online, ["dpo.pairs=x"])
    with pytest.raises(ConfigError, match="unknown key 'dpo.pairz'"):
        load_recipe(recipe, ["dpo.pairz=x"])


def test_the_two_modes_are_a_plain_trainer_and_a_group_trainer(tiny_model_dir, tmp_path):
    from visalign.trainers.base import Trainer
    from visalign.trainers.dpo import OfflineDPOTrainer, OnlineDPOTrainer
    from visalign.trainers.group import GroupTrainer

    off = make_dpo(tiny_model_dir, tmp_path, pairs="x")
    on = make_dpo(tiny_model_dir, tmp_path, mode="online", rewards={"brightness": (Brightness(), 1.0)}, run_dir="on")
    assert type(off) is OfflineDPOTrainer and isinstance(off, Trainer) and not isinstance(off, GroupTrainer)
    assert type(on) is OnlineDPOTrainer and isinstance(on, GroupTrainer)


# ---- training behaviour -------------------------------------------------------------------------------
def implicit_accuracy(tr, n_draws=4) -> tuple[float, float]:
    """Implicit reward accuracy and mean loss over every cached pair, fixed draws (paired over time)."""
    cache = tr.cache
    idx = torch.arange(len(cache))
    x_w, x_l = cache.get(idx)
    cond = tr.encode(cache.prompts(idx))
    g = torch.Generator().manual_seed(123)
    inside, losses = [], []
    with torch.no_grad():
        for _ in range(n_draws):
            noise = torch.randn(x_w.shape, generator=g)
            loss, st = tr.pair_losses(x_w, x_l, cond, noise, tr.draw_times(len(idx), g))
            inside.append(st["inside"])
            losses.append(loss)
    return float((torch.cat(inside) > 0).float().mean()), float(torch.cat(losses).mean())


def test_implicit_reward_accuracy_on_the_training_pairs_rises(tiny_model_dir, tmp_path):
    """A few optimizer steps on 8 pairs: measured with fixed draws, the share of pairs the model ranks
    right (inside > 0) goes from 0 (all ties at the reference) to most, and the loss drops below
    log 2 (measured: accuracy 1.0, loss 0.010 after 8 steps)."""
    folder = pair_folder(tmp_path / "pairs", n=8, seed=3)
    tr = make_dpo(tiny_model_dir, tmp_path, pairs=str(folder), train_batch_size=8, gradient_accumulation=1,
                  learning_rate=2e-2, beta=2000.0, max_grad_norm=10.0)
    acc0, loss0 = implicit_accuracy(tr)
    assert acc0 == 0.0 and loss0 == pytest.approx(math.log(2.0), abs=1e-6)
    rows = [tr.step() for _ in range(8)]
    acc1, loss1 = implicit_accuracy(tr)
    assert acc1 >= 0.8 and loss1 < 0.6, (acc1, loss1, [r["loss"] for r in rows])
    assert rows[-1]["implicit_acc"] > rows[0]["implicit_acc"]


def test_offline_resume_is_exact_and_logs_the_labellers_scores(tiny_model_dir, tmp_path):
    folder = pair_folder(tmp_path / "pairs", n=5, seed=4, scores=True)
    cfg = dict(pairs=str(folder), hflip=True, caption_dropout=0.3, timesteps_per_pair=2, ema_decay=0.5)
    a = make_dpo(tiny_model_dir, tmp_path, run_dir="a", **cfg)
    rows = [a.step() for _ in range(3)]
    assert rows[0]["reward/chosen"] == 0.75 and rows[0]["reward/rejected"] == 0.25
    assert rows[0]["reward/valid_fraction"] == 1.0 and rows[0]["pairs"] == 4
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # 5 pairs, 4 a step: seeded epochs
    b = make_dpo(tiny_model_dir, tmp_path, run_dir="b", **cfg)
    b.step()
    b.step()
    b.save_checkpoint()
    c = make_dpo(tiny_model_dir, tmp_path, run_dir="b", **cfg)
    assert c.resume()
    last = c.step()
    for p, q in zip(a.params, c.params):
        assert torch.equal(p, q)
    assert last["loss"] == rows[-1]["loss"]
    assert torch.equal(torch.cat([t.flatten() for t in a.ema.shadow]), torch.cat([t.flatten() for t in c.ema.shadow]))


def test_online_pairs_are_the_best_and_worst_of_each_group(tiny_model_dir, tmp_path):
    from visalign.trainers.group import GroupBatch

    tr = make_dpo(tiny_model_dir, tmp_path, mode="online", rewards={"brightness": (Brightness(), 1.0)})
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.2, 0.2])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    batch = GroupBatch(None, scores, valid, scores, valid, scores, valid, valid, torch.Generator())
    w, lo, gap = tr.make_pairs(batch)
    assert w.tolist() == [1] and lo.tolist() == [0] and gap.tolist() == pytest.approx([0.8])  # group 2 tied
    tr.config.pairing = "all"
    w, lo, _ = tr.make_pairs(batch)
    assert sorted(zip(w.tolist(), lo.tolist())) == [(1, 0), (1, 2), (2, 0)]
    tr.config.min_reward_gap = 0.45
    w, lo, _ = tr.make_pairs(batch)
    assert sorted(zip(w.tolist(), lo.tolist())) == [(1, 0)]


def test_online_dpo_trains_on_its_groups_and_resumes_exactly_with_reference_refresh(tiny_model_dir, tmp_path):
    cfg = dict(mode="online", rewards={"brightness": (Brightness(), 1.0)}, ref_refresh_every=2, pairing="all",
               rollout_kernel="flow_sde", train_batch_size=4, gradient_accumulation=1, learning_rate=3e-3)
    a = make_dpo(tiny_model_dir, tmp_path, run_dir="a", **cfg)
    rows = [a.step() for _ in range(3)]
    assert rows[0]["pairs"] == 12 and rows[0]["optimizer_steps"] == 3  # 2 groups x 6 ordered pairs
    assert rows[0]["reward/chosen"] > rows[0]["reward/rejected"] and rows[2]["reward_calls"] == 24
    assert a.reference_refreshes == 1 and rows[2]["reference/refreshes"] == 1  # refreshed at iteration 2
    b = make_dpo(tiny_model_dir, tmp_path, run_dir="b", **cfg)
    b.step()
    b.step()
    b.save_checkpoint()
    c = make_dpo(tiny_model_dir, tmp_path, run_dir="b", **cfg)
    assert c.resume()
    c.step()
    for p, q in zip(a.params, c.params):
        assert torch.equal(p, q)


def test_refreshed_reference_is_the_weights_of_that_moment(tiny_model_dir, tmp_path):
    tr = make_dpo(tiny_model_dir, tmp_path, pairs="x")
    with torch.no_grad():
        for p in tr.params:
            p.add_(0.01)
    tr.refresh_reference()
    x_w, x_l, noise, t = draws(tr, 2)
    cond = tr.encode(["a", "b"])
    loss, st = tr.pair_losses(x_w, x_l, cond, noise, t)  # model == refreshed reference
    assert torch.allclose(loss.detach(), torch.full((2,), math.log(2.0)), atol=1e-6)
    before = [p.detach().clone() for p in tr.params]
    with tr.reference():
        pass
    assert all(torch.equal(p, q) for p, q in zip(tr.params, before))


# ---- pair sources and the latent cache --------------------------------------------------------------
class CountingSampler:
    """Wraps a sampler, counting encode_images calls (the cache must not re-encode)."""

    def __init__(self, sampler):
        self.inner, self.calls = sampler, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_images(self, images, generator=None):
        self.calls += images.shape[0]
        return self.inner.encode_images(images, generator)


def test_pickapic_parquet_drops_ties_orders_pairs_by_label_and_skips_bad_images(tmp_path, capsys):
    import visalign.samplers as vs

    path = pickapic_parquet(tmp_path / "data" / "train-0.parquet", [1, 0, 0.5, 1, 0, 1], bad_row=3)
    src = open_pairs(str(tmp_path / "data"))
    recs = list(src)
    assert [r.prompt for r in recs] == ["caption 0", "caption 1", "caption 3", "caption 4", "caption 5"]
    assert src.stats == {"rows": 6, "ties": 1}
    sampler = CountingSampler(vs.load("toy-shapes"))
    cache = build_latent_cache(src, sampler, tmp_path / "cache", height=32, width=32, dtype="float32", num_workers=1,
                               encode_batch_size=3, shard_size=2)
    assert "skipped pair train-0.parquet#3: rejected" in capsys.readouterr().out
    assert len(cache) == 4 and cache.skipped == 1 and sampler.calls == 8
    w, lose = cache.get(torch.arange(4))
    # label_0 = 1: jpg_0 (dark, value 10 i) preferred; label_0 = 0: jpg_1 (bright, 200 - 10 i) preferred
    means = (sampler.decode(w).mean((1, 2, 3)) * 255).round().tolist()
    assert means == [0.0, 190.0, 160.0, 50.0]
    assert (sampler.decode(lose).mean((1, 2, 3)) * 255).round().tolist() == [200.0, 10.0, 40.0, 150.0]
    again = build_latent_cache(open_pairs(str(path)), sampler, tmp_path / "cache", height=32, width=32,
                               dtype="float32", num_workers=0, shard_size=2)
    assert sampler.calls == 8 and again.folder == cache.folder  # reused, nothing re-encoded
    other = build_latent_cache(open_pairs(str(path)), sampler, tmp_path / "cache", height=16, width=16,
                               dtype="float32", num_workers=0, shard_size=2)
    assert other.folder != cache.folder  # another geometry, another cache


def test_arrow_files_and_jsonl_folders_read_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = pickapic_parquet(tmp_path / "p.parquet", [1, 0])
    table = pq.read_table(str(path))
    with pa.OSFile(str(tmp_path / "data.arrow"), "wb") as sink:  # datasets' cache files are IPC streams
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert [r.prompt for r in open_pairs(str(tmp_path / "data.arrow"))] == ["caption 0", "caption 1"]
    folder = pair_folder(tmp_path / "pairs", n=3, scores=True)
    recs = list(open_pairs(str(folder)))
    assert [r.prompt for r in recs] == ["prompt 0", "prompt 1", "prompt 2"] and recs[0].scores == (0.75, 0.25)
    assert recs[0].chosen == folder / "img" / "0a.png"
    assert len(list(open_pairs(str(folder / "pairs.jsonl"), max_pairs=2))) == 2


def test_interrupted_cache_build_resumes_at_the_first_missing_shard(tmp_path):
    import visalign.samplers as vs

    folder = pair_folder(tmp_path / "pairs", n=6, bad=True)
    sampler = CountingSampler(vs.load("toy-shapes"))
    kw = dict(height=32, width=32, dtype="float32", num_workers=0, shard_size=3)
    cache = build_latent_cache(open_pairs(str(folder)), sampler, tmp_path / "cache", **kw)
    assert len(cache) == 6 and cache.skipped == 1 and sampler.calls == 12
    (cache.folder / "manifest.json").unlink()  # as if killed before the end, after shard 1
    (cache.folder / "shard_00002.safetensors").unlink()
    again = build_latent_cache(open_pairs(str(folder)), sampler, tmp_path / "cache", **kw)
    assert len(again) == 6 and again.skipped == 1 and sampler.calls == 12 + 2  # only shard 2 (one pair) again
    assert torch.equal(again.get(torch.arange(6))[0], cache.get(torch.arange(6))[0])


def test_sources_that_cannot_be_read_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_pairs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        open_pairs(str(tmp_path / "empty"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: a pair needs prompt, chosen and rejected"):
        list(open_pairs(str(tmp_path / "p.jsonl")))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="visalign\\[datasets\\]"):
            open_pairs("yuvalkirstain/pickapic_v2")


def test_toy_pairs_are_base_samples_ranked_by_the_gold_verifier(tmp_path):
    from visalign.toy.pairs import make_pairs
    from visalign.toy.verify import verify

    out = tmp_path / "toy_pairs"
    s = make_pairs(out, samples_per_prompt=3, max_prompts=4, num_steps=4, progress=False)
    assert s["labels"] == 12 and (out / "summary.json").is_file() and s["pairs"] > 0
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == s["pairs"]
    from PIL import Image

    def verdict(rel, prompt):
        img = torch.from_numpy(np.asarray(Image.open(out / rel), dtype=np.float32) / 255).permute(2, 0, 1)
        return verify(img[None], prompts=[prompt])[0]

    for r in rows:
        a, b = verdict(r["chosen"], r["prompt"]), verdict(r["rejected"], r["prompt"])
        assert (a.strict, a.partial) > (b.strict, b.partial)
        assert r["chosen_score"] == pytest.approx(a.partial) and r["rejected_score"] == pytest.approx(b.partial)
    assert list(open_pairs(str(out)))[0].scores is not None

    import visalign.samplers as vs
    from visalign.toy.pairs import ensure_pairs

    assert ensure_pairs(str(out), vs.load("toy-shapes"), samples_per_prompt=3) == out  # same base: reused as they are
    with pytest.raises(ValueError, match="samples of 'toy-shapes', but this run trains 'toy-shapes-cn'"):
        ensure_pairs(str(out), vs.load("toy-shapes-cn"), samples_per_prompt=3)  # another base must not learn these
    with pytest.raises(ValueError, match="made with 3 samples per prompt, but 8 were asked for"):
        ensure_pairs(str(out), vs.load("toy-shapes"))  # the default 8: not silently the 3 made before


def test_strict_toy_pairs_keep_only_a_pass_over_a_fail(tmp_path):
    """``strict_only`` (the ``toy-strict:DIR`` source) keeps exactly the pass-over-fail pairs of the
    same samples (same seeds, same labels): every winner passed the verifier, every loser failed;
    a folder made with the other setting is refused rather than silently reused."""
    import visalign.samplers as vs
    from visalign.toy.pairs import ensure_pairs, make_pairs

    sampler = vs.load("toy-shapes")
    kw = dict(samples_per_prompt=4, max_prompts=40, num_steps=4, progress=False)
    make_pairs(tmp_path / "all", sampler, **kw)
    s = make_pairs(tmp_path / "strict", sampler, strict_only=True, **kw)
    every = [json.loads(x) for x in (tmp_path / "all" / "pairs.jsonl").read_text().splitlines()]
    strict = [json.loads(x) for x in (tmp_path / "strict" / "pairs.jsonl").read_text().splitlines()]
    expected = [r for r in every if r["chosen_strict"] and not r["rejected_strict"]]
    assert 0 < len(strict) < len(every) and s["strict_only"] is True
    assert sorted((r["chosen"], r["rejected"]) for r in strict) == sorted((r["chosen"], r["rejected"]) for r in expected)
    opts = {"samples_per_prompt": 4}  # dpo.pairs_options
    src = open_pairs("toy-strict:" + str(tmp_path / "strict"), sampler=sampler, options=opts)
    assert len(list(src)) == len(strict)
    with pytest.raises(ValueError, match="made with strict_only"):
        ensure_pairs(str(tmp_path / "strict"), sampler, **opts)
    with pytest.raises(ValueError, match="made without strict_only"):
        open_pairs("toy-strict:" + str(tmp_path / "all"), sampler=sampler, options=opts)
    with pytest.raises(ValueError, match="not an option of the toy-strict: source"):
        open_pairs("toy-strict:" + str(tmp_path / "strict"), sampler=sampler, options={"samples": 4})
    with pytest.raises(ValueError, match="applies to a registered source"):
        open_pairs(str(tmp_path / "strict"), options=opts)


def test_latent_cache_reads_back_what_was_written(tmp_path):
    import visalign.samplers as vs

    folder = pair_folder(tmp_path / "pairs", n=3)
    sampler = vs.load("toy-shapes")
    cache = build_latent_cache(open_pairs(str(folder)), sampler, tmp_path / "c", height=32, width=32,
                               dtype="float16", hflip=True, num_workers=0)
    from visalign.trainers.dpo.data import decode_image

    img = decode_image(folder / "img" / "1a.png", 32, 32)
    w, _ = cache.get([1])
    assert w.dtype == torch.float32
    assert torch.allclose(w[0], sampler.encode_images(img[None])[0], atol=2e-3)  # float16 storage
    wf, _ = cache.get([1], flip=torch.tensor([True]))
    assert torch.allclose(wf[0], sampler.encode_images(img.flip(-1)[None])[0], atol=2e-3)
    assert isinstance(LatentCache(cache.folder), LatentCache)


def test_toy_pairs_cli(tmp_path, capsys):
    from visalign.cli import main

    assert main(["toy", "pairs", "--out", str(tmp_path / "p"), "--samples-per-prompt", "2", "--max-prompts", "3",
                 "--steps", "2", "--threads", "1"]) == 0
    assert "labels by the gold verifier" in capsys.readouterr().out
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["labels"] == 6
    assert main(["toy", "pairs", "--out", str(tmp_path / "q"), "--samples-per-prompt", "1"]) == 2
    assert "samples_per_prompt must be >= 2" in capsys.readouterr().err


def test_hub_ids_stream_through_datasets(monkeypatch):
    """A hub id goes to datasets.load_dataset(id, split=..., streaming=True); its rows are read like
    the parquet ones (a stand-in module here: tests never touch the network)."""
    import sys
    import types

    rng = np.random.default_rng(0)
    rows = [{"caption": "c0", "jpg_0": png_bytes(rng), "jpg_1": png_bytes(rng), "label_0": 0.5},
            {"caption": "c1", "jpg_0": {"bytes": png_bytes(rng), "path": None}, "jpg_1": png_bytes(rng), "label_0": 0}]
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append((a, k)) or iter(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    src = open_pairs("someone/pairs", split="validation")
    recs = list(src)
    assert calls == [(("someone/pairs",), {"split": "validation", "streaming": True})]
    assert [r.prompt for r in recs] == ["c1"] and src.stats == {"rows": 2, "ties": 1}
    assert recs[0].chosen == rows[1]["jpg_1"] and recs[0].rejected == rows[1]["jpg_0"]["bytes"]
