"""GRPO invariants (trl-style) and behaviour on tiny models."""

import json

import pytest
import torch
from tests_support import Brightness

from visalign.trainers import GRPOConfig, TrainingStopped
from visalign.trainers.common.advantages import group_advantages


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
    # sums of +-A*ratio cancel to ~1e-6: compare absolutely (batch-size-dependent float rounding under
    # several threads moves them by ~1e-8)
    assert ra["loss"] == pytest.approx(rb["loss"], abs=5e-8)


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

    def broken(traj, steps=None, **kw):
        out = real(traj, steps, **kw)
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
    assert batch.traj.sde_steps == [1, 2]
    assert tr._trained_steps(batch.traj, torch.Generator().manual_seed(0)) == [1, 2]
    tr2 = make_trainer(num_steps=4, sde_mode="sliding", sde_window_size=2, sde_window_shift_every=1, run_dir="s")
    assert [tr2._sde_steps(i) for i in range(4)] == [[0, 1], [1, 2], [2, 3], [0, 1]]


def test_shared_noise_makes_groups_differ_only_from_the_window(make_trainer):
    """shared_noise: a group starts from one noise draw, so with ODE steps before the window its
    samples are identical up to the window and differ after it; other groups start elsewhere."""
    tr = make_trainer(num_steps=4, sde_mode="window", sde_window_size=2, sde_window_start=1, shared_noise=True)
    lat = tr.collect(0).traj.latents  # (N, steps + 1, ...)
    g = tr.config.group_size
    first = lat[:g]
    assert torch.equal(first[:, 0], first[:1, 0].expand_as(first[:, 0]))  # same initial noise
    assert torch.equal(first[:, 1], first[:1, 1].expand_as(first[:, 1]))  # ODE step 0: still the same
    assert (first[1:, 2] - first[:1, 2]).abs().amax() > 1e-3  # after SDE step 1: they differ
    assert (lat[g, 0] - lat[0, 0]).abs().amax() > 1e-3  # the next prompt has its own noise
    indep = make_trainer(num_steps=4, sde_mode="window", sde_window_size=2, sde_window_start=1, run_dir="i")
    lat = indep.collect(0).traj.latents
    assert (lat[1, 0] - lat[0, 0]).abs().amax() > 1e-3


def test_random_window_stays_in_its_range(make_trainer):
    tr = make_trainer(num_steps=6, sde_mode="random", sde_window_size=2, sde_window_start=1, sde_window_end=4)
    seen = set()
    for it in range(12):
        steps = tr.collect(it).traj.sde_steps
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
