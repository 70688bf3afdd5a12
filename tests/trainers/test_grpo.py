"""GRPO invariants (trl-style) and behaviour on tiny models."""

import json

import pytest
import torch

from visalign.trainers import GRPOConfig
from visalign.trainers.grpo.advantages import group_advantages
from visalign.trainers.grpo.trainer import TrainingStopped

from tests_support import Brightness


def lora_vector(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.params])


@pytest.mark.parametrize("extra", [{}, {"noise_pool": 2, "shared_noise": True, "sde_mode": "window", "sde_window_size": 2}],
                         ids=["default", "pooled-shared"])
def test_on_policy_ratio_is_one_and_kl_zero_at_init(make_trainer, extra):
    tr = make_trainer(kl_beta=0.04, train_batch_size=8, **extra)  # one optimizer step: every ratio is on-policy
    before = lora_vector(tr)
    row = tr.step()
    assert row["optimizer_steps"] == 1
    assert abs(row["ratio/min"] - 1) < 1e-6 and abs(row["ratio/max"] - 1) < 1e-6
    assert row["kl"] == pytest.approx(0.0, abs=1e-10)  # LoRA starts as the identity (B = 0)
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert not torch.equal(before, lora_vector(tr))  # parameters changed
    # after the update the policy moved: a second iteration sees KL > 0 against the reference
    row2 = tr.step()
    assert row2["kl"] > 0


def test_accumulation_equals_big_batch(make_trainer):
    a = make_trainer(train_batch_size=1, gradient_accumulation=4, run_dir="a", max_grad_norm=1e9)
    b = make_trainer(train_batch_size=4, gradient_accumulation=1, run_dir="b", max_grad_norm=1e9)
    assert torch.equal(lora_vector(a), lora_vector(b))
    ra, rb = a.step(), b.step()
    assert ra["optimizer_steps"] == rb["optimizer_steps"] == 2
    assert torch.allclose(lora_vector(a), lora_vector(b), atol=1e-6, rtol=1e-5)
    assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-8)  # sums of +-A*ratio cancel: compare absolutely


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_resume_gives_the_same_next_metrics(make_trainer):
    straight = make_trainer(run_dir="straight", ema_decay=0.9)
    rows = [straight.step() for _ in range(3)]
    first = make_trainer(run_dir="resumed", ema_decay=0.9)
    first.step(), first.step()
    first.save_checkpoint()
    second = make_trainer(run_dir="resumed", ema_decay=0.9)  # a fresh process: new model, new optimizer
    assert second.resume()
    assert second.iteration == 2
    row = second.step()
    a, b = _comparable(rows[2]), _comparable(row)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
        else:
            assert a[k] == b[k], k
    assert torch.allclose(lora_vector(straight), lora_vector(second), atol=1e-6)
    lines = (tmp := second.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3], tmp


def test_nan_rewards_are_masked_not_averaged(make_trainer):
    tr = make_trainer(reward=Brightness(nan_every=4))
    row = tr.step()
    assert row["reward/valid_fraction"] == pytest.approx(0.75)
    assert torch.isfinite(torch.tensor(row["reward/mean"])) and row["optimizer_steps"] >= 1


def test_nan_losses_stop_with_checkpoint(make_trainer, monkeypatch):
    tr = make_trainer(train_batch_size=2, max_nan_steps=3)
    real = tr.sampler.log_prob

    def broken(traj, steps=None):
        out = real(traj, steps)
        out.log_prob = out.log_prob * float("nan")
        return out

    monkeypatch.setattr(tr.sampler, "log_prob", broken)
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row"):
        tr.step()
    assert list((tr.run_dir / "checkpoints").glob("iter_*.pt"))


def test_batch_geometry_errors_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        GRPOConfig(prompts_per_iteration=3).check_geometry(2)
    with pytest.raises(ValueError, match="divides 12"):
        GRPOConfig(prompts_per_iteration=2, group_size=6, train_batch_size=5).check_geometry(1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="kernel must be"):
        GRPOConfig(kernel="euler")


def test_group_advantages_formula():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    valid = torch.ones(8, dtype=torch.bool)
    adv, keep = group_advantages(r, valid, 4, std="group")
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (g - g.mean()) / (g.std(unbiased=False) + 1e-4)
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4  # a group with equal rewards carries no signal
    adv_g, _ = group_advantages(r, valid, 4, std="global")
    assert torch.allclose(adv_g[:4], (g - g.mean()) / (r.std(unbiased=False) + 1e-4), atol=1e-6)
    clipped, _ = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.ones(4, dtype=torch.bool), 4,
                                  std="global", clip=1.5)
    assert clipped.max() == 1.5
    masked, keep = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 5.0]), torch.ones(4, dtype=torch.bool), 4)
    assert keep.tolist() == [True, False, True, True] and masked[1] == 0


def test_windowed_sde_trains_only_window_steps(make_trainer):
    tr = make_trainer(num_steps=4, sde_mode="window", sde_window_size=2, sde_window_start=1)
    batch = tr.collect(0)
    assert batch["traj"].sde_steps == [1, 2]
    assert tr._trained_steps(batch["traj"], torch.Generator().manual_seed(0)) == [1, 2]
    tr2 = make_trainer(num_steps=4, sde_mode="sliding", sde_window_size=2, sde_window_shift_every=1, run_dir="s")
    assert [tr2._sde_steps(i) for i in range(4)] == [[0, 1], [1, 2], [2, 3], [0, 1]]


def test_shared_noise_makes_groups_differ_only_from_the_window(make_trainer):
    """shared_noise: a group starts from one noise draw, so with ODE steps before the window its
    samples are identical up to the window and differ after it; other groups start elsewhere."""
    tr = make_trainer(num_steps=4, sde_mode="window", sde_window_size=2, sde_window_start=1, shared_noise=True)
    lat = tr.collect(0)["traj"].latents  # (N, steps + 1, ...)
    g = tr.config.group_size
    first = lat[:g]
    assert torch.equal(first[:, 0], first[:1, 0].expand_as(first[:, 0]))  # same initial noise
    assert torch.equal(first[:, 1], first[:1, 1].expand_as(first[:, 1]))  # ODE step 0: still the same
    assert (first[1:, 2] - first[:1, 2]).abs().amax() > 1e-3  # after SDE step 1: they differ
    assert (lat[g, 0] - lat[0, 0]).abs().amax() > 1e-3  # the next prompt has its own noise
    indep = make_trainer(num_steps=4, sde_mode="window", sde_window_size=2, sde_window_start=1, run_dir="i")
    lat = indep.collect(0)["traj"].latents
    assert (lat[1, 0] - lat[0, 0]).abs().amax() > 1e-3


def test_random_window_stays_in_its_range(make_trainer):
    tr = make_trainer(num_steps=6, sde_mode="random", sde_window_size=2, sde_window_start=1, sde_window_end=4)
    seen = set()
    for it in range(12):
        steps = tr.collect(it)["traj"].sde_steps
        assert len(steps) == 2 and steps[0] >= 1 and steps[-1] < 4
        seen.add(steps[0])
    assert seen == {1, 2}
    with pytest.raises(ValueError, match="sde_window_end"):
        GRPOConfig(num_steps=6, sde_mode="random", sde_window_size=2, sde_window_start=3, sde_window_end=4)


def test_ddpo_on_eps_model_learns_direction(make_trainer):
    """DDPO (DDIM eta = 1) on a tiny SD1.x model: one iteration is on-policy and moves the weights."""
    tr = make_trainer(family="sd", variant="eps", kl_beta=0.0, train_batch_size=8)
    before = lora_vector(tr)
    row = tr.step()
    assert abs(row["ratio/mean"] - 1) < 1e-6 and row["kl"] == 0
    assert not torch.equal(before, lora_vector(tr))


def test_training_raises_the_reward(make_trainer):
    """The metric must move: a few iterations of GRPO on brightness make images brighter."""
    # full fine-tuning (the reference copy is kept for KL); the tiny random VAE leaves little room
    tr = make_trainer(group_size=8, prompts_per_iteration=2, train_batch_size=8, learning_rate=1e-2,
                      clip_range=0.2, kl_beta=0.0, max_grad_norm=10.0, lora=False)
    gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    def brightness():
        with torch.no_grad():
            imgs = tr.sampler.decode(tr.sampler.rollout(["a red cube"] * 8, num_steps=3, guidance_scale=2.0,
                                                        generator=gen(), height=32, width=32).final)
        return float(imgs.mean())
    base = brightness()
    for _ in range(6):
        tr.step()
    assert brightness() > base + 0.004  # measured: 0.4485 -> 0.4585


@pytest.mark.parametrize("family,variant", [("sd3", None), ("sd", "eps")])
def test_saved_lora_loads_in_diffusers_and_reproduces_sampler(make_trainer, tiny_model_dir, family, variant):
    from diffusers import DiffusionPipeline

    tr = make_trainer(family=family, variant=variant, learning_rate=5e-2, clip_range=0.5, kl_beta=0.0)
    tr.step()
    path = tr.save_final()
    pipe = DiffusionPipeline.from_pretrained(str(tiny_model_dir(family, variant)))
    pipe.load_lora_weights(str(path))
    pipe.scheduler = tr.sampler.ode_scheduler()
    extra = {"max_sequence_length": 8} if family == "sd3" else {}
    expected = pipe(["a red cube"], num_inference_steps=3, guidance_scale=2.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **extra).images
    with torch.no_grad():
        ours = tr.sampler.decode(tr.sampler.rollout(["a red cube"], num_steps=3, guidance_scale=2.0, height=32,
                                                    width=32, generator=torch.Generator().manual_seed(0)).final)
        with tr.sampler.reference():
            base = tr.sampler.decode(tr.sampler.rollout(["a red cube"], num_steps=3, guidance_scale=2.0, height=32,
                                                        width=32, generator=torch.Generator().manual_seed(0)).final)
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - base).abs().max() > 1e-4  # the LoRA changed the output, so the match is not vacuous


# ---- DiffusionNFT objective -------------------------------------------------------------------
def test_nft_rolls_out_with_the_ode_and_rejects_inconsistent_settings(make_trainer):
    tr = make_trainer(objective="nft", nft_timesteps=2)
    traj = tr.collect(0)["traj"]
    assert not bool(traj.sde_mask.any()) and traj.means is None
    with pytest.raises(ValueError, match="shared_noise"):
        GRPOConfig(objective="nft", shared_noise=True)
    with pytest.raises(ValueError, match="rectified-flow"):
        GRPOConfig(objective="nft", kernel="ddim")


def test_nft_kl_anchor_is_zero_at_init_and_pulls_back_to_the_reference(make_trainer):
    """kl_beta adds kl_beta |v - v_ref|^2: zero at the LoRA's identity start, positive once the
    field moved, and its gradient there is 2 kl_beta (v - v_ref) dv/dtheta."""
    tr = make_trainer(objective="nft", nft_timesteps=1, train_batch_size=8, kl_beta=0.5, learning_rate=3e-2)
    assert tr.step()["kl"] == pytest.approx(0.0, abs=1e-12)
    row = tr.step()
    assert row["kl"] > 0
    batch = tr.collect(5)
    rows = torch.arange(len(batch["traj"]))
    draws = tr._nft_targets(batch["traj"], torch.nonzero(batch["keep"]).flatten(), torch.Generator().manual_seed(0), single_step=True)
    zero = torch.zeros(rows.numel())  # no advantage: r = 1/2, the NFT part is sum |v - u|^2 terms
    grads = []
    for beta in (0.0, 0.5):
        tr.config.kl_beta = beta
        tr.optimizer.zero_grad(set_to_none=True)
        loss, st = tr._nft_loss(batch["traj"], 0, draws["steps"][0], zero, draws, rows)
        loss.sum().backward()
        grads.append(torch.cat([p.grad.flatten().clone() for p in tr.params]))
    kl_grad = grads[1] - grads[0]
    tr.optimizer.zero_grad(set_to_none=True)
    t = draws["steps"][0]
    v = tr._nft_velocity(batch["traj"], t, draws["x0"], draws["eps"][:, 0]).float()
    with torch.no_grad(), tr.sampler.reference():
        v_ref = tr._nft_velocity(batch["traj"], t, draws["x0"], draws["eps"][:, 0]).float()
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
    tr = make_trainer(objective="nft", nft_timesteps=1, nft_beta=beta, train_batch_size=8, nft_weighting=weighting)
    batch = tr.collect(0)
    rows = torch.arange(len(batch["traj"]))
    draws = tr._nft_targets(batch["traj"], torch.nonzero(batch["keep"]).flatten(), torch.Generator().manual_seed(0), single_step=True)
    adv = torch.linspace(-1.5, 1.5, rows.numel())  # includes clipped values
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr._nft_loss(batch["traj"], 0, draws["steps"][0], adv, draws, rows)
    loss.sum().backward()
    g_nft = torch.cat([p.grad.flatten().clone() for p in tr.params])
    tr.optimizer.zero_grad(set_to_none=True)
    t = draws["steps"][0]
    v = tr._nft_velocity(batch["traj"], t, draws["x0"], draws["eps"][:, 0]).float()
    w = beta * (2 * (0.5 + 0.5 * adv.clamp(-1, 1)) - 1) if weighting == "nft" else adv.clamp_min(0)
    ((v - (draws["eps"][:, 0] - draws["x0"])) ** 2).flatten(1).mean(1).mul(w).sum().backward()
    g_ref = torch.cat([p.grad.flatten().clone() for p in tr.params])
    assert g_ref.norm() > 0
    err = float((g_nft - g_ref).norm() / g_ref.norm())
    assert err < 1e-4, err


def test_nft_precomputed_old_velocity_equals_the_detached_one(make_trainer):
    """With several optimizer steps per iteration v_old is computed up front; before any step it
    equals the live prediction, so both paths give the same first loss."""
    tr = make_trainer(objective="nft", nft_timesteps=2, train_batch_size=4)
    batch = tr.collect(0)
    multi = tr._nft_targets(batch["traj"], torch.nonzero(batch["keep"]).flatten(), torch.Generator().manual_seed(0), single_step=False)
    single = tr._nft_targets(batch["traj"], torch.nonzero(batch["keep"]).flatten(), torch.Generator().manual_seed(0), single_step=True)
    rows = torch.arange(4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    sub = batch["traj"][rows]
    a, _ = tr._nft_loss(sub, 1, multi["steps"][1], adv, multi, rows)
    b, _ = tr._nft_loss(sub, 1, single["steps"][1], adv, single, rows)
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["nft", "positive"])
def test_nft_training_raises_the_reward(make_trainer, weighting):
    """The metric must move under the NFT objectives too, in DiffusionNFT's CFG-free setting:
    brightness rises (measured: +0.010 for nft, +0.005 for positive after 6 iterations; base 0.448)."""
    tr = make_trainer(objective="nft", nft_weighting=weighting, group_size=8, prompts_per_iteration=2, train_batch_size=16,
                      learning_rate=1e-2, kl_beta=0.0, max_grad_norm=10.0, lora=False, nft_timesteps=3,
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


def test_export_writes_the_lora_of_a_kept_checkpoint(tiny_model_dir, tmp_path, capsys):
    """`visalign train CONFIG --export RUN [--iteration N]`: the newest checkpoint's export equals
    `final/` (EMA weights in both); an older one differs; a missing one is a clear error."""
    from safetensors.torch import load_file

    from visalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    cfg = tmp_path / "recipe.yaml"
    run = tmp_path / "run"
    cfg.write_text(
        f"model: {{name: {tiny_model_dir('sd3')}, options: {{max_sequence_length: 8}}, height: 32, width: 32}}\n"
        f"data: {{train: {prompts}, eval: null}}\n"
        "rewards: {jpeg_incompressibility: 1.0}\n"
        "lora: {rank: 4, alpha: 4}\n"
        "grpo: {group_size: 2, prompts_per_iteration: 2, num_steps: 3, train_batch_size: 2, guidance_scale: 2.0,"
        " learning_rate: 1.0e-2, ema_decay: 0.5}\n"
        f"run: {{run_dir: {run}, iterations: 2, checkpoint_every: 1, keep_checkpoints: 2, progress: false}}\n"
    )
    assert main(["train", str(cfg)]) == 0
    final = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert main(["train", str(cfg), "--export", str(run)]) == 0
    newest = load_file(str(run / "export" / "iter_000002" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == newest.keys() and all(torch.equal(final[k], newest[k]) for k in final)
    assert main(["train", str(cfg), "--export", str(run), "--iteration", "1"]) == 0
    older = load_file(str(run / "export" / "iter_000001" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(final[k], older[k]) for k in final)
    capsys.readouterr()
    assert main(["train", str(cfg), "--export", str(run), "--iteration", "7"]) == 2
    assert "kept: 1, 2" in capsys.readouterr().err
    assert main(["train", str(cfg), "--iteration", "1"]) == 2
