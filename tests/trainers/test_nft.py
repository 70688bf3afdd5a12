"""DiffusionNFT (its own algorithm on the trainer floor): its objective against a transcription of
the reference implementation's formulas (NVlabs/DiffusionNFT ``train_nft_sd3.py``), gradients
included, and the behaviour that must hold on tiny models."""

import pytest
import torch

from visalign.trainers import NFTConfig
from visalign.trainers.nft.trainer import nft_loss


# ---- the reference, transcribed on plain tensors ---------------------------------------------------
def reference_return_decay(step: int, decay_type: int) -> float:
    """The reference's old-policy decay schedule (``return_decay``)."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def reference_nft_loss(forward_prediction, old_prediction, ref_prediction, xt, x0, t, advantages, *, beta,
                       adv_clip_max, kl_beta):
    """The reference's loss of one micro-batch at one timestep (its batch mean), written as it
    computes it: clip, normalise, implicit policies, x0 space, adaptive weights, scale, KL."""
    dims = tuple(range(1, x0.ndim))
    t_expanded = t.view(-1, *([1] * (x0.ndim - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    r = torch.clamp(advantages_clip / adv_clip_max / 2.0 + 0.5, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=1e-5)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = torch.abs(negative_x0_prediction.double() - x0.double()).mean(
            dim=dims, keepdim=True).clip(min=1e-5)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl = ((forward_prediction - ref_prediction) ** 2).mean(dim=dims)
    return policy_loss + kl_beta * torch.mean(kl)


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
def test_nft_loss_equals_the_reference_formula_with_gradients(beta):
    g = torch.Generator().manual_seed(0)
    b = 6
    x0 = torch.randn(b, 4, 5, 5, generator=g)
    eps = torch.randn(b, 4, 5, 5, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(b, 4, 5, 5, generator=g)
    v_ref = eps - x0 + 0.3 * torch.randn(b, 4, 5, 5, generator=g)
    v0 = v_old + 0.2 * torch.randn(b, 4, 5, 5, generator=g)
    adv = torch.tensor([-7.0, -2.0, -0.3, 0.0, 1.5, 6.0])  # includes values beyond the clip

    v_a = v0.clone().requires_grad_(True)
    ref = reference_nft_loss(v_a, v_old, v_ref, xt, x0, t, adv, beta=beta, adv_clip_max=5.0, kl_beta=1e-4)
    ref.backward()

    cfg = NFTConfig(beta=beta)  # the reference's defaults: c = 5, scale c / beta, kl 1e-4
    v_b = v0.clone().requires_grad_(True)
    r = (0.5 + adv.clamp(-cfg.advantage_clip, cfg.advantage_clip) / (2 * cfg.advantage_clip)).clamp(0, 1)
    ours = cfg.scale * nft_loss(v_b, v_old, xt, x0, t, r, beta) + cfg.kl_beta * ((v_b - v_ref) ** 2).flatten(1).mean(1)
    ours.mean().backward()
    assert torch.allclose(ours.mean(), ref.float(), rtol=1e-6, atol=1e-7)  # the reference computes in float64
    assert torch.allclose(v_b.grad, v_a.grad, rtol=1e-4, atol=1e-7)
    assert v_a.grad.abs().sum() > 0


def test_nft_defaults_are_the_reference_config():
    c = NFTConfig()
    assert (c.guidance_scale, c.beta, c.advantage_clip, c.kl_beta, c.group_size) == (1.0, 1.0, 5.0, 1e-4, 8)
    assert c.trained_levels == 9 and c.num_steps == 10 and c.level_sampling == "per_sample"
    assert c.adaptive_weighting and c.scale == 5.0 and NFTConfig(beta=0.1).scale == pytest.approx(50.0)
    for step in (0, 1, 7, 499, 500, 501, 2000):
        assert c.old_decay(step) == pytest.approx(reference_return_decay(step, 1))
        ocr = NFTConfig(old_decay_rate=0.0075, old_decay_max=0.999, old_decay_flat=75)
        assert ocr.old_decay(step) == pytest.approx(reference_return_decay(step, 2))
        assert NFTConfig(old_decay_rate=0.0, old_decay_max=0.0).old_decay(step) == reference_return_decay(step, 0)


def test_nft_rejects_inconsistent_settings(make_trainer):
    with pytest.raises(ValueError, match="timesteps must be in 1..num_steps"):
        NFTConfig(num_steps=3, timesteps=4)
    with pytest.raises(ValueError, match="weighting"):
        NFTConfig(weighting="rwr")
    with pytest.raises(ValueError, match="level_sampling"):
        NFTConfig(level_sampling="continuous")
    with pytest.raises(ValueError, match="old_decay_max"):
        NFTConfig(old_decay_max=1.0)
    with pytest.raises(ValueError, match="rectified-flow"):
        make_trainer(algorithm="nft", family="sd", variant="eps")


def test_nft_rolls_out_with_the_ode_and_draws_levels_per_sample(make_trainer):
    """ODE rollouts (no log-probs); each sample trains int(0.99 N) distinct levels of the rollout
    schedule in its own random order, as the reference's per-sample permutation."""
    tr = make_trainer(algorithm="nft", num_steps=5, guidance_scale=1.0)
    traj = tr.collect_groups(0).traj
    assert not bool(traj.sde_mask.any()) and traj.means is None
    draws = tr._draws(traj, torch.Generator().manual_seed(0))
    levels = draws["levels"]
    assert levels.shape == (len(traj), 4)
    assert all(len(set(row.tolist())) == 4 and max(row.tolist()) < 5 for row in levels)
    assert len({tuple(row.tolist()) for row in levels}) > 1  # not shared by the batch
    shared = make_trainer(algorithm="nft", num_steps=5, timesteps=2, level_sampling="shared")
    lv = shared._draws(traj, torch.Generator().manual_seed(0))["levels"]
    assert lv.shape == (len(traj), 2) and bool((lv == lv[:1]).all())


def test_nft_trainer_loss_equals_the_reference_on_a_model(make_trainer):
    """The trainer's loss of one micro-batch at per-sample levels, and its parameter gradient,
    equal the reference transcription fed with the same model's velocities (old != current)."""
    tr = make_trainer(algorithm="nft", num_steps=4, guidance_scale=1.0, train_batch_size=8, kl_beta=0.5)
    batch = tr.collect_groups(0)
    with torch.no_grad():  # make the old policy differ from the live weights
        for p in tr.params:
            p.add_(0.05 * torch.randn_like(p))
    tr.old_is_current = False
    tr._single_step = True
    rows = torch.arange(len(batch.traj))
    sub = batch.traj[rows]
    draws = tr._draws(batch.traj, torch.Generator().manual_seed(1))
    levels, x0, eps = draws["levels"][:, 0], draws["x0"], draws["eps"][:, 0]
    adv = torch.linspace(-6, 6, rows.numel())
    v_old = tr._old_velocities(sub, draws["levels"][:, :1], x0, draws["eps"][:, :1])[:, 0]
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr._loss(sub, levels, x0, eps, adv, v_old)
    loss.mean().backward()
    g_ours = torch.cat([p.grad.flatten().clone() for p in tr.params])

    tr.optimizer.zero_grad(set_to_none=True)
    sched = sub.schedule
    s = sched.sigmas[levels].float()
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():  # v_old under the old weights, before the graph of v (weights swap in place)
        live = [p.detach().clone() for p in tr.params]
        for p, o in zip(tr.params, tr.old.shadow):
            p.copy_(o)
        v_old2 = tr.sampler.predict(xt, sched.timesteps[levels], sub.cond, 1.0).float()
        for p, kept in zip(tr.params, live):
            p.copy_(kept)
    v = tr.sampler.predict(xt, sched.timesteps[levels], sub.cond, 1.0).float()
    with torch.no_grad(), tr.sampler.reference():
        v_ref = tr.sampler.predict(xt, sched.timesteps[levels], sub.cond, 1.0).float()
    assert torch.allclose(v_old, v_old2, atol=1e-6)
    assert not torch.allclose(v_old2, v.detach(), atol=1e-4)
    ref = reference_nft_loss(v, v_old2, v_ref, xt, x0, s, adv, beta=1.0, adv_clip_max=5.0, kl_beta=0.5)
    ref.backward()
    g_ref = torch.cat([p.grad.flatten().clone() for p in tr.params])
    assert torch.allclose(loss.mean(), ref.detach().float(), rtol=1e-5)
    assert float((g_ours - g_ref).norm() / g_ref.norm()) < 1e-4


def test_nft_old_policy_samples_and_is_soft_updated(make_trainer):
    """The old policy rolls out; after an iteration old <- d old + (1 - d) theta with the decay of
    the optimizer steps taken (the reference's decay_type 1: d = min(0.001 steps, 0.5))."""
    tr = make_trainer(algorithm="nft", num_steps=3, guidance_scale=1.0, learning_rate=1e-2, old_decay_rate=0.25)
    before = [p.detach().clone() for p in tr.params]
    row = tr.step()
    assert row["optimizer_steps"] == 2 and row["old/decay"] == pytest.approx(0.5)
    # after the first iteration: old = 0.5 theta_0 + 0.5 theta_1
    for o, b, p in zip(tr.old.shadow, before, tr.params):
        assert torch.allclose(o, 0.5 * b + 0.5 * p.detach(), atol=1e-6)
    assert not tr.old_is_current
    # the rollout is the old policy's: equal to a rollout with the old weights put in by hand
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    def roll():
        return tr.sampler.rollout(["a red cube"] * 2, num_steps=3, guidance_scale=1.0, generator=gen(),
                                  height=32, width=32).final
    with torch.no_grad():
        live = roll()
        with tr.old_weights():
            old = roll()
        for p, o in zip(tr.params, tr.old.shadow):
            p.data, o.data = o.data.clone(), p.data.clone()
        by_hand = roll()
    assert torch.allclose(old, by_hand) and not torch.allclose(old, live)


def test_nft_old_policy_is_checkpointed(make_trainer):
    tr = make_trainer(algorithm="nft", num_steps=3, guidance_scale=1.0, learning_rate=1e-2, old_decay_rate=0.25)
    tr.step()
    tr.save_checkpoint()
    again = make_trainer(algorithm="nft", num_steps=3, guidance_scale=1.0, learning_rate=1e-2, old_decay_rate=0.25)
    assert again.resume()
    assert again.nft_steps == tr.nft_steps and again.old_is_current == tr.old_is_current
    for a, b in zip(again.old.shadow, tr.old.shadow):
        assert torch.equal(a, b)


def test_nft_kl_anchor_is_zero_at_init_and_pulls_back_to_the_reference(make_trainer):
    """kl_beta adds kl_beta |v - v_ref|^2: zero at the LoRA's identity start, positive once the
    field moved, and its gradient there is 2 kl_beta (v - v_ref) dv/dtheta."""
    tr = make_trainer(algorithm="nft", num_steps=3, train_batch_size=8, kl_beta=0.5, learning_rate=3e-2)
    assert tr.step()["kl"] == pytest.approx(0.0, abs=1e-12)
    row = tr.step()
    assert row["kl"] > 0
    batch = tr.collect_groups(5)
    rows = torch.arange(len(batch.traj))
    draws = tr._draws(batch.traj, torch.Generator().manual_seed(0))
    levels, x0, eps = draws["levels"][:, 0], draws["x0"], draws["eps"][:, 0]
    zero = torch.zeros(rows.numel())
    grads = []
    for beta in (0.0, 0.5):
        tr.config.kl_beta = beta
        tr.optimizer.zero_grad(set_to_none=True)
        loss, _ = tr._loss(batch.traj, levels, x0, eps, zero, None)
        loss.sum().backward()
        grads.append(torch.cat([p.grad.flatten().clone() for p in tr.params]))
    kl_grad = grads[1] - grads[0]
    tr.optimizer.zero_grad(set_to_none=True)
    x_t, _ = tr._forward(batch.traj, levels, x0, eps)
    v = tr._velocity(batch.traj, levels, x_t).float()
    with torch.no_grad(), tr.sampler.reference():
        v_ref = tr._velocity(batch.traj, levels, x_t).float()
    (0.5 * ((v - v_ref) ** 2).flatten(1).mean(1)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in tr.params])
    assert torch.allclose(kl_grad, expected, atol=1e-7, rtol=1e-4)
    assert float(kl_grad.norm()) > 0


@pytest.mark.parametrize("weighting", ["nft", "positive"])
def test_nft_velocity_form_is_advantage_weighted_flow_matching(make_trainer, weighting):
    """The plain velocity form (adaptive_weighting false, loss_scale 1, advantage_clip 1): at
    v = v_old its gradient is that of sum_i beta (2 r_i - 1) |v_i - (eps_i - x0_i)|^2 with
    r_i = 0.5 + 0.5 clip(A_i, -1, 1) (DiffusionNFT eq. 7-8 before the adaptive weighting); the
    "positive" weighting is flow matching on the better samples only, weight max(A, 0)."""
    beta = 0.7
    tr = make_trainer(algorithm="nft", num_steps=3, beta=beta, train_batch_size=8, weighting=weighting,
                      adaptive_weighting=False, loss_scale=1.0, advantage_clip=1.0, kl_beta=0.0)
    batch = tr.collect_groups(0)
    rows = torch.arange(len(batch.traj))
    draws = tr._draws(batch.traj, torch.Generator().manual_seed(0))
    levels, x0, eps = draws["levels"][:, 0], draws["x0"], draws["eps"][:, 0]
    adv = torch.linspace(-1.5, 1.5, rows.numel())  # includes clipped values
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr._loss(batch.traj, levels, x0, eps, adv, None)
    loss.sum().backward()
    g_nft = torch.cat([p.grad.flatten().clone() for p in tr.params])
    tr.optimizer.zero_grad(set_to_none=True)
    x_t, _ = tr._forward(batch.traj, levels, x0, eps)
    v = tr._velocity(batch.traj, levels, x_t).float()
    w = beta * (2 * (0.5 + 0.5 * adv.clamp(-1, 1)) - 1) if weighting == "nft" else adv.clamp_min(0)
    ((v - (eps - x0)) ** 2).flatten(1).mean(1).mul(w).sum().backward()
    g_ref = torch.cat([p.grad.flatten().clone() for p in tr.params])
    assert g_ref.norm() > 0
    err = float((g_nft - g_ref).norm() / g_ref.norm())
    assert err < 1e-4, err


def test_nft_several_steps_per_iteration_use_the_old_velocity(make_trainer):
    """With several optimizer steps an iteration, v_old comes from the old weights (not v.detach()):
    before any step both are the same, so the first loss equals the one-step path's."""
    tr = make_trainer(algorithm="nft", num_steps=3, train_batch_size=4)
    batch = tr.collect_groups(0)
    rows = torch.arange(4)
    sub = batch.traj[rows]
    draws = tr._draws(batch.traj, torch.Generator().manual_seed(0))
    levels, x0, eps = draws["levels"][rows], draws["x0"][rows], draws["eps"][rows]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    tr._single_step = False
    v_old = tr._old_velocities(sub, levels, x0, eps)
    assert v_old is not None
    a, _ = tr._loss(sub, levels[:, 1], x0, eps[:, 1], adv, v_old[:, 1])
    tr._single_step = True
    assert tr._old_velocities(sub, levels, x0, eps) is None
    b, _ = tr._loss(sub, levels[:, 1], x0, eps[:, 1], adv, None)
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["nft", "positive"])
def test_nft_training_raises_the_reward(make_trainer, weighting):
    """The metric must move under the NFT objectives, in DiffusionNFT's CFG-free setting with its
    defaults (old policy, adaptive weighting, per-sample levels): brightness rises."""
    tr = make_trainer(algorithm="nft", weighting=weighting, group_size=8, prompts_per_iteration=2, train_batch_size=16,
                      learning_rate=1e-2, max_grad_norm=10.0, lora=False, guidance_scale=1.0)
    gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    def brightness():
        with torch.no_grad():
            imgs = tr.sampler.decode(tr.sampler.rollout(["a red cube"] * 8, num_steps=3, guidance_scale=1.0,
                                                        generator=gen(), height=32, width=32).final)
        return float(imgs.mean())
    base = brightness()
    for _ in range(6):
        row = tr.step()
        assert row["optimizer_steps"] == 1
    assert brightness() > base + 0.003, (base, brightness())
