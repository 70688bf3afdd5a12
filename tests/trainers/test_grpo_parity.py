"""GRPO's parity with the published reference code (flow_grpo, ddpo-pytorch), each item against its
formula: exact on-policy ratio in bf16, the KL's normalisation, the CFG gradient, the CPS log-prob."""

import math

import pytest
import torch

import visalign.samplers as vs
from visalign.samplers import Conditioning, flow_cps_step
from visalign.trainers import GRPOConfig


@pytest.mark.parametrize("family,kernel", [("sd3", "flow_sde"), ("sd", "ddim")])
def test_bf16_first_inner_step_ratio_is_exactly_one(tiny_model_dir, tmp_path, family, kernel):
    """bf16 weights (the SD3.5-M / FLUX recipes load bf16): the trajectory keeps the float32 samples
    the kernel scored, so every (sample, step) ratio of the first inner step is exactly 1 and none is
    clipped at 1e-4 (storing bf16 copies clipped about half of them)."""
    from tests_support import Brightness

    from visalign.trainers import GRPOTrainer, LoraSettings, RunSettings
    from visalign.trainers.common.lora import add_lora

    opts = {"max_sequence_length": 8} if family == "sd3" else {}
    sampler = vs.load(str(tiny_model_dir(family, "eps" if family == "sd" else None)), dtype=torch.bfloat16, **opts)
    torch.manual_seed(0)
    params = add_lora(sampler, LoraSettings(rank=4, alpha=4))
    cfg = GRPOConfig(group_size=4, prompts_per_iteration=2, num_steps=3, guidance_scale=2.0, train_batch_size=8,
                     kernel=kernel, kl_beta=0.0, clip_range=1e-4, ema_decay=0.0)
    run = RunSettings(run_dir=str(tmp_path / "run"), eval_every=0, progress=False, save_sample_grid=False)
    tr = GRPOTrainer(sampler, {"b": (Brightness(), 1.0)}, cfg, train_prompts=[{"prompt": "a red cube"}, {"prompt": "a cat"}],
                     run=run, trainable=params, size={"height": 32, "width": 32})
    assert tr.sampler.dtype == torch.bfloat16
    row = tr.step()
    assert row["ratio/min"] == 1.0 and row["ratio/max"] == 1.0 and row["clip_fraction"] == 0.0


def test_kl_divides_by_the_reference_std_dev_t(make_trainer):
    """KL = ||mu - mu_ref||^2 / (2 (a sqrt(s / (1 - s)))^2), averaged over dims: the step's sqrt(-dt)
    is not in the denominator (flow_grpo's std_dev_t), so published kl_beta values keep their meaning."""
    tr = make_trainer(kl_beta=0.04, learning_rate=5e-2, clip_range=0.5)
    tr.step()  # move the policy away from the reference
    batch = tr.collect(1)
    sub = batch.traj[torch.arange(4)]
    a = 0.7
    for t in (0, 1):
        _, stats = tr._step_loss(sub, t, torch.zeros(4))
        with torch.no_grad():
            mu = tr.sampler.log_prob(sub, steps=[t]).mean[:, 0]
            with tr.sampler.reference():
                mu_ref = tr.sampler.log_prob(sub, steps=[t]).mean[:, 0]
        sig = sub.schedule.sigmas
        s = float(sig[t])
        s_den = float(sig[1]) if s >= 1 else s
        std_dev_t = a * math.sqrt(s / (1 - s_den))
        expected = ((mu - mu_ref) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)
        assert float(expected.min()) > 0
        assert torch.allclose(stats["kl"], expected, rtol=1e-5), t
        dt = float(sig[t + 1] - sig[t])
        with_dt = expected / -dt  # what dividing by the step's std would have given: 1/|dt| times stronger
        assert float((with_dt / stats["kl"]).min()) > 1.2  # 3 steps: |dt| <= 0.75


def _grads(tr, loss):
    tr.optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    g = torch.cat([p.grad.flatten().clone() for p in tr.params])
    tr.optimizer.zero_grad(set_to_none=True)
    return g


def test_cfg_gradient_detaches_the_unconditional_branch_by_default(make_trainer):
    """flow_grpo recomputes log-probs with pred = sg(uncond) + g (cond - sg(uncond)): only the
    conditional branch trains.  That is the default (checked against the formula built here from two
    separate branch predictions); detach_uncond: false trains both and gives another gradient."""
    tr = make_trainer(learning_rate=5e-2, clip_range=0.5, kl_beta=0.0)
    assert tr.config.detach_uncond is True
    tr.step()  # non-zero LoRA B, so both branches have a gradient path
    batch = tr.collect(1)
    sub = batch.traj[torch.arange(4)]
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    t = 1
    g_default = _grads(tr, tr._step_loss(sub, t, adv)[0])
    # the formula, from the two branches computed separately
    s = tr.sampler
    x = sub.latents[:, t]
    time_t = sub.schedule.timesteps[t]
    cond = s.predict(x, time_t, Conditioning(sub.cond.pos), 1.0)
    with torch.no_grad():
        uncond = s.predict(x, time_t, Conditioning(sub.cond.neg), 1.0)
    pred = uncond + sub.guidance_scale * (cond - uncond)
    out = vs.flow_sde_step(pred, x, sub.schedule, t, prev_sample=sub.latents[:, t + 1], **sub.kernel_options)
    ratio = torch.exp(out.log_prob - sub.log_probs[:, t])
    c = tr.config.clip_range
    manual = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c, 1 + c))
    g_manual = _grads(tr, manual)
    assert g_manual.norm() > 0
    assert float((g_default - g_manual).norm() / g_manual.norm()) < 1e-3
    tr.config.detach_uncond = False
    g_both = _grads(tr, tr._step_loss(sub, t, adv)[0])
    cos = float(torch.nn.functional.cosine_similarity(g_both, g_default, dim=0))
    assert cos < 0.999 and float((g_both - g_default).norm() / g_default.norm()) > 1e-2


def test_reference_defaults_per_kernel():
    assert GRPOConfig(kernel="flow_sde").detach_uncond is True  # flow_grpo
    assert GRPOConfig(kernel="flow_cps").detach_uncond is True
    assert GRPOConfig(kernel="ddim").detach_uncond is False  # ddpo-pytorch trains both branches
    assert GRPOConfig(kernel="ddim", detach_uncond=True).detach_uncond is True
    assert GRPOConfig(kernel="flow_cps").kernel_options()["log_prob_type"] == "mse"
    assert GRPOConfig(kernel="flow_cps", cps_log_prob="gaussian").kernel_options()["log_prob_type"] == "gaussian"
    with pytest.raises(ValueError, match="cps_log_prob"):
        GRPOConfig(kernel="flow_cps", cps_log_prob="exact")


def test_cps_rollouts_score_with_the_reference_log_prob(make_trainer):
    """With kernel flow_cps the trainer's trajectories carry -mean((x' - mu)^2), not the Gaussian
    density, so a clip range means what it means in flow_grpo's CPS runs."""
    tr = make_trainer(kernel="flow_cps", train_batch_size=8, kl_beta=0.04)
    batch = tr.collect(0)
    traj = batch.traj
    for t in traj.sde_steps:
        expected = -((traj.latents[:, t + 1] - traj.means[:, t]) ** 2).flatten(1).mean(1)
        assert torch.allclose(traj.log_probs[:, t], expected, atol=1e-7)
    row = tr.step()
    assert row["ratio/min"] == pytest.approx(1.0, abs=1e-6) and row["kl"] == pytest.approx(0.0, abs=1e-12)
    # the last step has no noise: with it trained, a KL is undefined and the error says what to do
    last = tr.config.num_steps - 1
    if bool(traj.sde_mask[last]):
        with pytest.raises(ValueError, match="skip_last_step"):
            tr._step_loss(traj[torch.arange(2)], last, torch.zeros(2))
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    assert flow_cps_step(v, x, traj.schedule, 0, generator=g).log_prob.shape == (2,)
