"""Reward back-propagation (DRaFT-K, DRaFT-LV, AlignProp, ReFL): gradients against finite differences
and formulas, truncation, checkpointing, the reward moving, resume, and the errors, on tiny models."""

import json

import pytest
import torch
from tests_support import Brightness

import visalign.samplers as vs
from visalign.rewards import Reward, RewardInfo, RewardOutput
from visalign.samplers import CFGDenoiser, ode_step
from visalign.samplers.kernels import flow_sde_step, predict_x0
from visalign.trainers import RewardBackpropConfig, RunSettings, registry

SIZE = {"height": 32, "width": 32}
PROMPTS = [{"prompt": p, "metadata": None} for p in ["a red cube", "a blue ball", "a green tree", "a cat"]]
METHODS = ["draft", "alignprop", "draft_lv", "refl"]


class Contrast(Reward):
    """A nonlinear, differentiable pixel reward: mean squared distance of the pixels from mid-grey."""

    info = RewardInfo("contrast", differentiable=True)

    def score(self, images, prompts, references, metadata):
        s = ((images.float() - 0.5) ** 2).flatten(1).mean(1)
        return RewardOutput(s, components={"contrast": s.detach()})


class NotDifferentiable(Brightness):
    info = RewardInfo("counter", differentiable=False)


@pytest.fixture
def make(tiny_model_dir, tmp_path):
    from visalign.trainers.common.lora import LoraSettings, add_lora

    def build(family="sd3", variant=None, reward=None, lora=True, run_dir="run", perturb_lora=False, **cfg):
        options = {"max_sequence_length": 8} if family in ("sd3", "flux", "wan") else {}
        sampler = vs.load(str(tiny_model_dir(family, variant)), **options)
        torch.manual_seed(0)
        trainable = add_lora(sampler, LoraSettings(rank=4, alpha=4)) if lora else None
        if perturb_lora:  # a non-zero B so both LoRA factors have a gradient and the anchor is not 0
            with torch.no_grad():
                for p in trainable:
                    p.add_(0.05 * torch.randn_like(p))
        defaults = dict(method="draft", num_steps=3, guidance_scale=2.0, batch_size=2, learning_rate=1e-3,
                        ema_decay=0.0, checkpoint=False, checkpoint_decode=False)
        defaults.update(cfg)
        algo = registry.get("backprop")
        run = RunSettings(run_dir=str(tmp_path / run_dir), iterations=3, checkpoint_every=1, eval_every=0,
                          progress=False, save_sample_grid=False)
        return algo.trainer_class(sampler, {"r": (reward or Brightness(), 1.0)}, algo.config_class(**defaults),
                                  train_prompts=PROMPTS, run=run, trainable=trainable, size=SIZE)

    return build


def grads(tr) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone() for p in tr.params])


def backprop(tr, seed=0, records=PROMPTS[:2]):
    tr.optimizer.zero_grad(set_to_none=True)
    loss, stats = tr.micro_batch(list(records), torch.Generator().manual_seed(seed))
    loss.backward()
    return float(loss.detach()), grads(tr), stats


def test_backprop_is_registered_and_config_errors_teach():
    assert registry.get("backprop").config_class is RewardBackpropConfig
    with pytest.raises(ValueError, match="method must be one of draft, draft_lv, alignprop, refl"):
        RewardBackpropConfig(method="drafting")
    with pytest.raises(ValueError, match=r"grad_steps \(K\) must be in 1..num_steps \(10\)"):
        RewardBackpropConfig(num_steps=10, grad_steps=11)
    with pytest.raises(ValueError, match="min_grad_steps"):
        RewardBackpropConfig(method="alignprop", num_steps=10, grad_steps=3, min_grad_steps=4)
    with pytest.raises(ValueError, match="refl_first_step"):
        RewardBackpropConfig(method="refl", num_steps=10, refl_first_step=10)
    assert RewardBackpropConfig(num_steps=40).refl_steps() == (30, 39)  # ReFL: 30..39 of 40
    with pytest.raises(ValueError, match="refl_prefix must be one of stochastic, ode, got 'ddpm'"):
        RewardBackpropConfig(method="refl", refl_prefix="ddpm")
    with pytest.raises(ValueError, match="refl_noise_level must be >= 0"):
        RewardBackpropConfig(method="refl", refl_noise_level=-1.0)


def test_a_reward_without_gradient_is_an_error_that_names_it_and_points_to_grpo(make):
    import visalign.rewards as vr

    with pytest.raises(ValueError, match=r"'r' is not differentiable.*algorithm: grpo"):
        make(reward=NotDifferentiable())
    algo = registry.get("backprop")
    sampler = vs.load("toy-shapes")
    for spec in ("shapes", "jpeg_compressibility"):
        with pytest.raises(ValueError, match=rf"{spec!r} is not differentiable.*shapes-proxy"):
            algo.trainer_class(sampler, {spec: (vr.load(spec), 1.0)}, RewardBackpropConfig(num_steps=2),
                               train_prompts=PROMPTS, run=RunSettings(run_dir="unused"))


@pytest.mark.parametrize("k,h", [(1, 2e-2), (3, 3e-4)], ids=["K=1", "K=N"])
def test_draft_gradient_equals_finite_differences(make, k, h):
    """DRaFT-K's gradient is the derivative of -r(decode(x_N)) where the first N - K steps are frozen
    at the current weights: checked along the gradient's direction by central differences (K = 1:
    only the last step moves with the weights; K = N: the whole chain).  Measured agreement 2e-4 to
    3e-4; the step h is small for K = N because decode clamps pixels to [0, 1] and a larger step
    crosses those kinks (0.7% off at h = 1e-3, 2e-4 without the clamp)."""
    tr = make(method="draft", grad_steps=k, reward=Contrast(), lora=False)
    _, g, _ = backprop(tr)
    assert g.norm() > 0
    s = tr.sampler
    den = CFGDenoiser(s, 2.0)
    cond = tr.encode([r["prompt"] for r in PROMPTS[:2]])
    with torch.no_grad():
        traj = s.rollout(cond, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **SIZE)

    def objective():
        with torch.no_grad():
            if k == 1:  # the sample entering the last step stays what the current weights made
                x = traj.latents[:, -2]
                x = ode_step(den(x, 2, traj.schedule, cond), x, traj.schedule, 2).prev_sample
            else:
                x = s.rollout(cond, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                              **SIZE).final
            return -float(Contrast()(s.decode(x)).scores.double().mean())

    d = g / g.norm()
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            offset = 0
            for p in tr.params:
                p.add_(sign * h * d[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        values.append(objective())
        with torch.no_grad():
            offset = 0
            for p in tr.params:
                p.sub_(sign * h * d[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    fd = (values[0] - values[1]) / (2 * h)
    assert fd == pytest.approx(float(g.norm()), rel=3e-3), (fd, float(g.norm()))


@pytest.mark.parametrize("method,k", [("draft", 2), ("alignprop", None)])
def test_gradient_reaches_only_the_last_k_steps(make, monkeypatch, method, k):
    """The first N - K denoiser calls run without gradient; the sample entering step N - K carries
    none (it is detached) and the later inputs do.  AlignProp draws K per rollout in its range."""
    tr = make(method=method, num_steps=4, grad_steps=3 if method == "alignprop" else k, min_grad_steps=1)
    calls = []
    real = tr.sampler.predict

    def spy(x, t, cond, guidance_scale=1.0, **kw):
        calls.append((torch.is_grad_enabled(), x.requires_grad))
        return real(x, t, cond, guidance_scale, **kw)

    monkeypatch.setattr(tr.sampler, "predict", spy)
    drawn = set()
    for seed in range(8 if method == "alignprop" else 1):
        calls.clear()
        loss, stats = tr.micro_batch(PROMPTS[:2], torch.Generator().manual_seed(seed))
        kk = stats["grad_steps"]
        drawn.add(kk)
        assert calls == [(False, False)] * (4 - kk) + [(True, False)] + [(True, True)] * (kk - 1)
        assert loss.requires_grad
    if method == "alignprop":
        assert drawn == {1, 2, 3}
    else:
        assert drawn == {k}


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_gradient(make, method):
    plain = make(method=method, grad_steps=2, lv_samples=2, reward=Contrast(), perturb_lora=True, kl_beta=0.5)
    l0, g0, _ = backprop(plain, seed=3)
    plain.config.checkpoint = plain.config.checkpoint_decode = True
    l1, g1, _ = backprop(plain, seed=3)
    assert g0.norm() > 0 and l0 == pytest.approx(l1, abs=1e-7)
    assert torch.allclose(g0, g1, atol=1e-7, rtol=1e-5)


def test_draft_lv_scores_one_step_denoisings_of_the_renoised_final_sample(make):
    """DRaFT-LV: x_0 of a gradient-free rollout, re-noised n times to the last step's noise level and
    denoised in one step; the loss is minus the mean reward of the n x B images."""
    tr = make(method="draft_lv", lv_samples=3, reward=Contrast(), perturb_lora=True)
    loss, g, stats = backprop(tr, seed=5)
    assert stats["scores"].shape == (6,) and g.norm() > 0
    s = tr.sampler
    gen = torch.Generator().manual_seed(5)
    cond = tr.encode([r["prompt"] for r in PROMPTS[:2]])
    with torch.no_grad():
        traj = s.rollout(cond, num_steps=3, guidance_scale=2.0, generator=gen, **SIZE)
        x0 = traj.final.repeat_interleave(3, 0)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = traj.schedule.sigmas[2]
        x = (1 - sigma) * x0 + sigma * eps  # rectified flow at the last step's level
        out = ode_step(CFGDenoiser(s, 2.0)(x, 2, traj.schedule, cond.repeat_interleave(3)), x, traj.schedule, 2)
        expected = -float(Contrast()(s.decode(out.prev_sample)).scores.mean())
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prefix", ["stochastic", "ode"])
def test_refl_loss_is_relu_of_target_minus_reward_on_the_x0_prediction(make, monkeypatch, prefix):
    """ReFL: steps without gradient to a random late step m (on a flow model Flow-GRPO's SDE by
    default, the Euler ODE with refl_prefix: ode), one prediction with gradient, its x0-estimate
    decoded; loss = lambda relu(target - r).  Above the target nothing is learnt."""
    tr = make(method="refl", num_steps=4, refl_first_step=2, refl_last_step=3, reward_weight=0.5, refl_target=10.0,
              refl_prefix=prefix)
    assert tr.refl_prefix_kernel() == ("flow_sde" if prefix == "stochastic" else "ode", {})
    loss, g, stats = backprop(tr, seed=1)
    m = stats["refl_step"]
    assert m in (2, 3) and g.norm() > 0
    s = tr.sampler
    gen = torch.Generator().manual_seed(1)
    torch.randint(2, 4, (1,), generator=gen)  # the draw of m
    cond = tr.encode([r["prompt"] for r in PROMPTS[:2]])
    den = CFGDenoiser(s, 2.0)
    with torch.no_grad():
        x = s.noise(2, gen, **SIZE)
        sched = s.schedule(4, x)
        for i in range(m):
            if prefix == "stochastic":
                x = flow_sde_step(den(x, i, sched, cond), x, sched, i, generator=gen, noise_level=0.7).prev_sample
            else:
                x = ode_step(den(x, i, sched, cond), x, sched, i).prev_sample
        r = Brightness()(s.decode(predict_x0(den(x, m, sched, cond), x, sched, m))).scores
    assert loss == pytest.approx(float((0.5 * torch.relu(10.0 - r)).mean()), rel=1e-5)
    steps = {int(tr.micro_batch(PROMPTS[:2], torch.Generator().manual_seed(sd))[1]["refl_step"]) for sd in range(12)}
    assert steps == {2, 3}
    tr.config.refl_target = -1.0  # every reward is above it
    loss, g, _ = backprop(tr, seed=1)
    assert loss == 0.0 and float(g.norm()) == 0.0


def _ddpm_ancestral_step(pred, x, ab_t, ab_prev, parameterization, z):
    """DDPM's ancestral step (Ho et al. 2020, eq. 6-7), the step of the ReFL reference's
    DDPMScheduler between two timesteps of the inference schedule (beta = 1 - ab_t / ab_prev):
    x' = sqrt(ab_prev) beta / (1 - ab_t) x0 + sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t) x
         + sqrt((1 - ab_prev) / (1 - ab_t) beta) z."""
    if parameterization == "eps":
        x0 = (x - (1 - ab_t).sqrt() * pred) / ab_t.sqrt()
    else:  # v
        x0 = ab_t.sqrt() * x - (1 - ab_t).sqrt() * pred
    beta = 1 - ab_t / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t) * x
    return mean + ((1 - ab_prev) / (1 - ab_t) * beta).sqrt() * z


@pytest.mark.parametrize("variant", ["eps", "v"])
def test_refl_prefix_is_the_references_ddpm_ancestral_sampling(make, variant):
    """ReFL's reference runs the steps before m with diffusers' DDPMScheduler (40 steps, stochastic).
    The default prefix on eps / v models (DDIM, eta = 1) equals DDPM's ancestral step formula and
    the DDPMScheduler loop itself, noise for noise; two generators give different x_m from the same
    initial noise, while refl_prefix: ode (DDIM eta = 0) gives the same x_m for both."""
    from diffusers import DDPMScheduler

    tr = make(family="sd", variant=variant, method="refl", num_steps=6, refl_first_step=4, refl_last_step=5)
    assert tr.refl_prefix_kernel() == ("ddim", {})
    s, m = tr.sampler, 4
    cond = tr.encode([r["prompt"] for r in PROMPTS[:2]])
    den = CFGDenoiser(s, 2.0)
    x_init = s.noise(2, torch.Generator().manual_seed(0), **SIZE).float()
    sched = s.schedule(6, x_init)
    x_a = tr.refl_prefix(x_init, m, sched, cond, torch.Generator().manual_seed(1))
    x_b = tr.refl_prefix(x_init, m, sched, cond, torch.Generator().manual_seed(2))
    assert (x_a - x_b).abs().max() > 1e-2  # stochastic: different noise, different pre-step latents

    # the formula, with the noise drawn in the same order
    gen = torch.Generator().manual_seed(1)
    x = x_init
    with torch.no_grad():
        for i in range(m):
            z = torch.randn(x.shape, generator=gen)
            x = _ddpm_ancestral_step(den(x, i, sched, cond), x, sched.alpha_cumprod(i, x),
                                     sched.alpha_cumprod_prev(i, x), variant, z)
    assert torch.allclose(x_a, x, atol=1e-5)
    # the reference's scheduler (SD1.x / 2.x configs do not clip x0)
    ddpm = DDPMScheduler.from_config(s.pipeline.scheduler.config, clip_sample=False)
    ddpm.set_timesteps(6)
    assert torch.equal(ddpm.timesteps.long(), sched.timesteps.long().cpu())
    gen = torch.Generator().manual_seed(1)
    x = x_init
    with torch.no_grad():
        for i, t in enumerate(ddpm.timesteps[:m]):
            x = ddpm.step(den(x, i, sched, cond), t, x, generator=gen).prev_sample
    assert torch.allclose(x_a, x, atol=1e-5)

    tr.config.refl_prefix = "ode"
    assert tr.refl_prefix_kernel() == ("ode", {})
    x_a = tr.refl_prefix(x_init, m, sched, cond, torch.Generator().manual_seed(1))
    x_b = tr.refl_prefix(x_init, m, sched, cond, torch.Generator().manual_seed(2))
    assert torch.equal(x_a, x_b)
    x = x_init
    with torch.no_grad():
        for i in range(m):
            x = ode_step(den(x, i, sched, cond), x, sched, i).prev_sample
    assert torch.equal(x_a, x)
    tr.config.refl_prefix, tr.config.refl_noise_level = "stochastic", 0.0  # eta = 0 is the ODE too
    assert tr.refl_prefix_kernel() == ("ddim", {"eta": 0.0})
    assert torch.allclose(tr.refl_prefix(x_init, m, sched, cond, torch.Generator().manual_seed(2)), x_b, atol=1e-6)


def test_prediction_anchor_is_zero_at_init_and_has_the_l2_gradient(make):
    """kl_beta adds kl_beta |pred - pred_ref|^2 on the trained predictions: 0 at the LoRA's identity
    start, and its gradient is that of the formula computed by hand (DRaFT-1: the last step)."""
    tr = make(method="draft", grad_steps=1, kl_beta=0.7, learning_rate=3e-2)
    assert tr.step()["kl"] == pytest.approx(0.0, abs=1e-12)
    assert tr.step()["kl"] > 0
    _, g_with, _ = backprop(tr, seed=2)
    tr.config.kl_beta = 0.0
    _, g_without, _ = backprop(tr, seed=2)
    s = tr.sampler
    cond = tr.encode([r["prompt"] for r in PROMPTS[:2]])
    with torch.no_grad():
        traj = s.rollout(cond, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(2), **SIZE)
    x = traj.latents[:, -2]
    den = CFGDenoiser(s, 2.0)
    with torch.no_grad(), s.reference():
        ref = den(x, 2, traj.schedule, cond)
    tr.optimizer.zero_grad(set_to_none=True)
    (0.7 * ((den(x, 2, traj.schedule, cond) - ref) ** 2).flatten(1).mean(1).mean()).backward()
    expected = grads(tr)
    assert expected.norm() > 0
    assert torch.allclose(g_with - g_without, expected, atol=1e-8, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_the_differentiable_reward_rises_within_a_few_steps(make, method):
    """The metric must move: four optimizer steps on brightness make fresh samples brighter (the same
    seeds before and after; measured from 0.448: +0.079 DRaFT-2, +0.085 AlignProp, +0.028 DRaFT-LV,
    +0.086 ReFL; GRPO's test gains +0.010 in six iterations of 16 samples at lr 1e-2)."""
    tr = make(method=method, lora=False, learning_rate=3e-2, max_grad_norm=10.0, batch_size=4, grad_steps=2,
              min_grad_steps=1, refl_first_step=1, refl_last_step=2)

    def brightness():
        with torch.no_grad():
            imgs = tr.sampler.decode(tr.sampler.rollout(["a red cube", "a cat"] * 4, num_steps=3, guidance_scale=2.0,
                                                        generator=torch.Generator().manual_seed(123), **SIZE).final)
        return float(imgs.mean())

    base = brightness()
    for _ in range(4):
        row = tr.step()
        assert row["optimizer_steps"] == 1 and row["reward/valid_fraction"] == 1.0
    assert brightness() > base + 0.02, (method, base, brightness())


def test_resume_gives_the_same_next_metrics(make):
    """AlignProp draws K and DRaFT-LV draws noise from the iteration's generator: a resumed run
    continues exactly (metrics and weights) as one that did not stop."""
    kw = dict(method="alignprop", grad_steps=3, ema_decay=0.9, kl_beta=0.1)
    straight = make(run_dir="straight", **kw)
    rows = [straight.step() for _ in range(3)]
    first = make(run_dir="resumed", **kw)
    first.step(), first.step()
    first.save_checkpoint()
    second = make(run_dir="resumed", **kw)
    assert second.resume() and second.iteration == 2
    row = second.step()
    for key in rows[2]:
        if key.startswith("time/"):
            continue
        assert row[key] == pytest.approx(rows[2][key], abs=1e-6, nan_ok=True), key
    assert torch.allclose(torch.cat([p.flatten() for p in straight.params]),
                          torch.cat([p.flatten() for p in second.params]), atol=1e-6)
    lines = (second.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]


def test_gradient_accumulation_averages_micro_batches(make):
    """Two micro-batches of 2 in one step give the mean of their gradients (each scaled by 1/2)."""
    tr = make(method="draft", grad_steps=2, batch_size=2, gradient_accumulation=2, reward=Contrast(),
              perturb_lora=True)
    import copy

    from visalign.trainers.base import derive_seed

    ahead = copy.deepcopy(tr.prompt_sampler)  # the prompts the step will draw
    parts = []
    for mb in range(2):
        _, g, _ = backprop(tr, seed=derive_seed(tr.run.seed, 0, 0, mb, 3), records=ahead.next(2))
        parts.append(g)
    seen = []
    real = tr.optimizer.step

    def capture():
        seen.append(grads(tr))
        real()

    tr.optimizer.step = capture
    tr.config.max_grad_norm = 1e9  # no clipping, so the applied gradient is the raw one
    tr.step()
    assert torch.allclose(seen[0], (parts[0] + parts[1]) / 2, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("family,variant", [("sd", "eps"), ("sd", "v"), ("flux", "dev")])
def test_draft_trains_every_parameterisation(make, family, variant):
    """DRaFT-2 on eps-, v- and (guidance-distilled) flow models: a finite loss and a weight change."""
    tr = make(family=family, variant=variant, method="draft", grad_steps=2, reward=Contrast(), perturb_lora=True,
              checkpoint=True, checkpoint_decode=True)
    before = torch.cat([p.detach().flatten().clone() for p in tr.params])
    row = tr.step()
    assert row["optimizer_steps"] == 1 and row["grad_norm"] > 0
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in tr.params]))
