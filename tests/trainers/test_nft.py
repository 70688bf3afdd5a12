"""DiffusionNFT (its own algorithm on the trainer floor): its objective against the formula and
the behaviour that must hold on tiny models."""

import pytest
import torch

from visalign.trainers import NFTConfig

def test_nft_rolls_out_with_the_ode_and_rejects_inconsistent_settings(make_trainer):
    tr = make_trainer(algorithm="nft", timesteps=2)
    traj = tr.collect_groups(0).traj
    assert not bool(traj.sde_mask.any()) and traj.means is None
    with pytest.raises(ValueError, match="timesteps must be in 1..num_steps"):
        NFTConfig(num_steps=3, timesteps=4)
    with pytest.raises(ValueError, match="weighting"):
        NFTConfig(weighting="rwr")
    with pytest.raises(ValueError, match="rectified-flow"):
        make_trainer(algorithm="nft", family="sd", variant="eps")


def test_nft_kl_anchor_is_zero_at_init_and_pulls_back_to_the_reference(make_trainer):
    """kl_beta adds kl_beta |v - v_ref|^2: zero at the LoRA's identity start, positive once the
    field moved, and its gradient there is 2 kl_beta (v - v_ref) dv/dtheta."""
    tr = make_trainer(algorithm="nft", timesteps=1, train_batch_size=8, kl_beta=0.5, learning_rate=3e-2)
    assert tr.step()["kl"] == pytest.approx(0.0, abs=1e-12)
    row = tr.step()
    assert row["kl"] > 0
    batch = tr.collect_groups(5)
    rows = torch.arange(len(batch.traj))
    draws = tr._draws(batch.traj, torch.nonzero(batch.keep).flatten(), torch.Generator().manual_seed(0), single_step=True)
    zero = torch.zeros(rows.numel())  # no advantage: r = 1/2, the NFT part is sum |v - u|^2 terms
    grads = []
    for beta in (0.0, 0.5):
        tr.config.kl_beta = beta
        tr.optimizer.zero_grad(set_to_none=True)
        loss, st = tr._loss(batch.traj, 0, draws["steps"][0], zero, draws, rows)
        loss.sum().backward()
        grads.append(torch.cat([p.grad.flatten().clone() for p in tr.params]))
    kl_grad = grads[1] - grads[0]
    tr.optimizer.zero_grad(set_to_none=True)
    t = draws["steps"][0]
    v = tr._velocity(batch.traj, t, draws["x0"], draws["eps"][:, 0]).float()
    with torch.no_grad(), tr.sampler.reference():
        v_ref = tr._velocity(batch.traj, t, draws["x0"], draws["eps"][:, 0]).float()
    (0.5 * ((v - v_ref) ** 2).flatten(1).mean(1)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in tr.params])
    assert torch.allclose(kl_grad, expected, atol=1e-7, rtol=1e-4)
    assert float(kl_grad.norm()) > 0


@pytest.mark.parametrize("weighting", ["nft", "positive"])
def test_nft_gradient_is_advantage_weighted_flow_matching(make_trainer, weighting):
    """At v = v_old the DiffusionNFT loss has the gradient of
    sum_i beta (2 r_i - 1) |v_i - (eps_i - x0_i)|^2 with r_i = 0.5 + 0.5 clip(A_i, -1, 1):
    pull toward samples better than their group, push from worse ones (DiffusionNFT eq. 7-8).
    The "positive" weighting is flow matching on the better samples only, weight max(A, 0)."""
    beta = 0.7
    tr = make_trainer(algorithm="nft", timesteps=1, beta=beta, train_batch_size=8, weighting=weighting)
    batch = tr.collect_groups(0)
    rows = torch.arange(len(batch.traj))
    draws = tr._draws(batch.traj, torch.nonzero(batch.keep).flatten(), torch.Generator().manual_seed(0), single_step=True)
    adv = torch.linspace(-1.5, 1.5, rows.numel())  # includes clipped values
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr._loss(batch.traj, 0, draws["steps"][0], adv, draws, rows)
    loss.sum().backward()
    g_nft = torch.cat([p.grad.flatten().clone() for p in tr.params])
    tr.optimizer.zero_grad(set_to_none=True)
    t = draws["steps"][0]
    v = tr._velocity(batch.traj, t, draws["x0"], draws["eps"][:, 0]).float()
    w = beta * (2 * (0.5 + 0.5 * adv.clamp(-1, 1)) - 1) if weighting == "nft" else adv.clamp_min(0)
    ((v - (draws["eps"][:, 0] - draws["x0"])) ** 2).flatten(1).mean(1).mul(w).sum().backward()
    g_ref = torch.cat([p.grad.flatten().clone() for p in tr.params])
    assert g_ref.norm() > 0
    err = float((g_nft - g_ref).norm() / g_ref.norm())
    assert err < 1e-4, err


def test_nft_precomputed_old_velocity_equals_the_detached_one(make_trainer):
    """With several optimizer steps per iteration v_old is computed up front; before any step it
    equals the live prediction, so both paths give the same first loss."""
    tr = make_trainer(algorithm="nft", timesteps=2, train_batch_size=4)
    batch = tr.collect_groups(0)
    multi = tr._draws(batch.traj, torch.nonzero(batch.keep).flatten(), torch.Generator().manual_seed(0), single_step=False)
    single = tr._draws(batch.traj, torch.nonzero(batch.keep).flatten(), torch.Generator().manual_seed(0), single_step=True)
    rows = torch.arange(4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    sub = batch.traj[rows]
    a, _ = tr._loss(sub, 1, multi["steps"][1], adv, multi, rows)
    b, _ = tr._loss(sub, 1, single["steps"][1], adv, single, rows)
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["nft", "positive"])
def test_nft_training_raises_the_reward(make_trainer, weighting):
    """The metric must move under the NFT objectives too, in DiffusionNFT's CFG-free setting:
    brightness rises (measured: +0.010 for nft, +0.005 for positive after 6 iterations; base 0.448)."""
    tr = make_trainer(algorithm="nft", weighting=weighting, group_size=8, prompts_per_iteration=2, train_batch_size=16,
                      learning_rate=1e-2, kl_beta=0.0, max_grad_norm=10.0, lora=False, timesteps=3,
                      train_without_cfg=True)
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


