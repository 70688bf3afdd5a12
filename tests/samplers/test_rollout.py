"""Rollout, log-prob recomputation, SDE windows, hooks and the reference model, on tiny models."""

import pytest
import torch

import visalign.samplers as vs
from visalign.samplers import HookResult, RandomWindow, resolve_sde_steps

SIZES = {"height": 32, "width": 32}
FAMILIES = [
    ("sd", "eps", "ddim", {"eta": 1.0}, {}),
    ("sd", "v", "ddim", {"eta": 1.0}, {}),
    ("sdxl", None, "ddim", {"eta": 1.0}, {}),
    ("sd3", None, "flow_sde", {"noise_level": 0.7}, {"max_sequence_length": 16}),
    ("flux", "dev", "flow_cps", {"noise_level": 0.8}, {"max_sequence_length": 16}),
    ("wan", None, "flow_sde", {"noise_level": 0.7}, {"max_sequence_length": 16, "num_frames": 5}),
    ("sd3", "large", "flow_sde", {"noise_level": 0.7}, {"max_sequence_length": 16}),
    ("wan", "a14b", "flow_cps", {"noise_level": 0.8},
     {"max_sequence_length": 16, "num_frames": 5, "guidance_scale_2": 2.0}),
    ("wan", "ti2v", "flow_sde", {"noise_level": 0.7}, {"max_sequence_length": 16, "num_frames": 5}),
    ("qwenimage", None, "flow_sde", {"noise_level": 1.2}, {"max_sequence_length": 16}),
    ("flux2", None, "flow_sde", {"noise_level": 0.9}, {"max_sequence_length": 48}),
]


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return vs.load(str(tiny_model_dir("sd3")), max_sequence_length=16)


@pytest.mark.parametrize("family,variant,kernel,kopts,options", FAMILIES, ids=[f[0] + (f"-{f[1]}" if f[1] else "") for f in FAMILIES])
def test_recomputed_log_prob_equals_rollout(tiny_model_dir, family, variant, kernel, kopts, options):
    sampler = vs.load(str(tiny_model_dir(family, variant)), **options)
    with torch.no_grad():
        traj = sampler.rollout(["a red cube", "a blue ball"], num_steps=3, guidance_scale=3.0, kernel=kernel,
                               kernel_options=kopts, generator=torch.Generator().manual_seed(0), **SIZES)
        again = sampler.log_prob(traj)
    assert traj.sde_steps and again.log_prob.shape == (2, len(traj.sde_steps))
    ratio = torch.exp(again.log_prob - traj.log_probs[:, traj.sde_steps])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6), ratio
    assert torch.isfinite(traj.log_probs).all()
    if family == "wan":
        assert traj.latents.ndim == 6  # (B, N + 1, F, C, h, w)
        assert sampler.decode(traj.final).shape == (2, 5, 3, 32, 32)


def test_same_seed_same_trajectory(sd3):
    kw = dict(num_steps=3, guidance_scale=2.0, kernel="flow_sde", **SIZES)
    with torch.no_grad():
        a = sd3.rollout(["a cat"], generator=torch.Generator().manual_seed(5), **kw)
        b = sd3.rollout(["a cat"], generator=torch.Generator().manual_seed(5), **kw)
        c = sd3.rollout(["a cat"], generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_sde_step_selection():
    assert resolve_sde_steps("all", 4).tolist() == [True] * 4
    assert resolve_sde_steps([1, 2], 4).tolist() == [False, True, True, False]
    starts = {resolve_sde_steps(RandomWindow(2, 0, 4), 4, torch.Generator().manual_seed(s)).int().argmax().item()
              for s in range(30)}
    assert starts == {0, 1, 2}  # every legal window start is drawn, none past the end
    with pytest.raises(ValueError, match="does not fit"):
        resolve_sde_steps(RandomWindow(5), 4)
    with pytest.raises(ValueError, match="outside"):
        resolve_sde_steps([7], 4)


def test_window_rollout_is_ode_outside_window(sd3):
    with torch.no_grad():
        ode = sd3.rollout(["a cat"], num_steps=4, generator=torch.Generator().manual_seed(0), **SIZES)
        win = sd3.rollout(["a cat"], num_steps=4, kernel="flow_sde", sde_steps=[2],
                          generator=torch.Generator().manual_seed(0), **SIZES)
    assert win.sde_mask.tolist() == [False, False, True, False]
    assert torch.equal(ode.latents[:, :3], win.latents[:, :3])  # identical before the window
    assert not torch.equal(ode.latents[:, 3], win.latents[:, 3])
    assert win.log_probs[:, [0, 1, 3]].abs().sum() == 0 and win.log_probs[:, 2].abs().sum() > 0
    assert win.stds[2] > 0 and win.stds[0] == 0
    with pytest.raises(ValueError, match="deterministic"):
        sd3.log_prob(win, steps=[1])


def test_hooks_replace_and_reorder(sd3):
    seen = []

    def record(state):
        seen.append(state.i)

    def swap(state):
        if state.i == 1:
            return HookResult(latents=state.latents.flip(0), indices=torch.tensor([1, 0]))
        return None

    with torch.no_grad():
        base = sd3.rollout(["a", "b"], num_steps=3, kernel="flow_sde", generator=torch.Generator().manual_seed(0), **SIZES)
        traj = sd3.rollout(["a", "b"], num_steps=3, kernel="flow_sde", hooks=[record, swap], record_x0=True,
                           generator=torch.Generator().manual_seed(0), **SIZES)
    assert seen == [0, 1, 2]
    # the history was reordered with the resampled rows, so row 0 now descends from row 1
    assert torch.equal(traj.latents[0, :3], base.latents[1, :3])
    assert traj.cond.prompts == ["b", "a"]
    assert traj.x0.shape[:2] == (2, 3)
    # x0-prediction is x - s * v at step 0: consistent with the stored mean of the Euler part
    with torch.no_grad():
        again = sd3.log_prob(traj)
    assert torch.allclose(again.log_prob[:, 2], traj.log_probs[:, 2], atol=1e-5)


def test_reference_disables_lora(sd3):
    from peft import LoraConfig

    sampler = sd3
    sampler.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    try:
        cond = sampler.encode(["a cat"])
        x = sampler.noise(1, torch.Generator().manual_seed(0), **SIZES)
        sched = sampler.schedule(3, x)
        with torch.no_grad():
            tuned = sampler.denoise(x, 0, sched, cond, 1.0)
            with sampler.reference():
                ref = sampler.denoise(x, 0, sched, cond, 1.0)
            tuned_again = sampler.denoise(x, 0, sched, cond, 1.0)
            sampler.denoiser.disable_adapters()
            base = sampler.denoise(x, 0, sched, cond, 1.0)
            sampler.denoiser.enable_adapters()
        assert not torch.allclose(tuned, ref)
        assert torch.equal(ref, base) and torch.equal(tuned, tuned_again)
    finally:
        sampler.denoiser.delete_adapters("default")


def test_reference_without_adapters_is_an_error(sd3):
    with pytest.raises(RuntimeError, match="no reference model"):
        with sd3.reference():
            pass


def test_gradient_flows_through_log_prob(sd3):
    sd3.denoiser.requires_grad_(True)  # peft froze the base weights in the LoRA test
    with torch.no_grad():
        traj = sd3.rollout(["a cat"], num_steps=2, kernel="flow_sde", generator=torch.Generator().manual_seed(0), **SIZES)
    out = sd3.log_prob(traj, steps=[0])
    out.log_prob.sum().backward()
    grads = [p.grad for p in sd3.denoiser.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    sd3.denoiser.zero_grad(set_to_none=True)


def test_conditioning_indexing(sd3):
    cond = sd3.encode(["a", "b"])
    rep = cond.repeat_interleave(3)
    assert len(rep) == 6 and rep.prompts == ["a", "a", "a", "b", "b", "b"]
    assert torch.equal(rep[3].pos["encoder_hidden_states"], cond[1].pos["encoder_hidden_states"])
    assert torch.equal(rep[torch.tensor([0, 5])].neg["pooled_projections"][1], cond.neg["pooled_projections"][1])


BF16 = FAMILIES + [("toy", None, "flow_sde", {"noise_level": 0.7}, {}), ("sd3", None, "flow_cps", {"noise_level": 0.8}, {"max_sequence_length": 16})]


@pytest.mark.parametrize("family,variant,kernel,kopts,options", BF16,
                         ids=[f"{f[0]}-{f[1] or ''}-{f[2]}" for f in BF16])
def test_bf16_weights_recompute_the_rollout_log_prob_exactly(tiny_model_dir, family, variant, kernel, kopts, options):
    """With bf16 weights the trajectory keeps the float32 samples the kernels scored (as Flow-GRPO's
    reference does), so the first inner step's PPO ratio is exactly 1; storing a bf16 copy gave
    |d log p| of 1e-4 per step, above the 1e-4 clip range."""
    path = "toy-shapes" if family == "toy" else str(tiny_model_dir(family, variant))
    sampler = vs.load(path, dtype=torch.bfloat16, **options)
    assert sampler.dtype == torch.bfloat16
    size = {} if family == "toy" else SIZES
    with torch.no_grad():
        traj = sampler.rollout(["a red cube", "a blue ball"], num_steps=3, guidance_scale=3.0, kernel=kernel,
                               kernel_options=kopts, generator=torch.Generator().manual_seed(0), **size)
        again = sampler.log_prob(traj, detach_uncond=True)
    assert traj.latents.dtype == torch.float32
    assert torch.equal(again.log_prob, traj.log_probs[:, traj.sde_steps])  # ratio == 1 exactly


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_refresh_reference_makes_the_current_weights_the_reference(tiny_model_dir, lora):
    """An adaptive reference: after refresh_reference() the reference predicts what the policy
    predicted then, it stays frozen while the policy moves on, and its state restores exactly."""
    from visalign.samplers.lora import add_lora

    sampler = vs.load(str(tiny_model_dir("sd3")), max_sequence_length=16)
    torch.manual_seed(0)
    if lora:
        params = add_lora(sampler, rank=2, alpha=2, init="default")
    else:
        sampler.keep_reference_copy()
        params = list(sampler.denoiser.parameters())
    cond = sampler.encode(["a red cube"])
    x = sampler.noise(1, torch.Generator().manual_seed(0), **SIZES).float()
    sched = sampler.schedule(3, x)

    def pred(reference=False):
        with torch.no_grad():
            if reference:
                with sampler.reference():
                    return sampler.denoise(x, 1, sched, cond, 2.0)
            return sampler.denoise(x, 1, sched, cond, 2.0)

    def move():
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn_like(p))

    move()
    base = pred(reference=True)
    assert (pred() - base).abs().max() > 1e-4  # the policy differs from the base
    sampler.refresh_reference()
    assert torch.equal(pred(reference=True), pred())
    snapshot = pred()
    state = sampler.reference_state()
    move()
    assert torch.equal(pred(reference=True), snapshot)  # frozen while the policy moves
    assert (pred() - snapshot).abs().max() > 1e-4
    assert all(p.requires_grad for p in params)  # the trainable weights stay trainable
    sampler.refresh_reference()
    sampler.load_reference_state(state)  # a checkpoint's reference comes back exactly
    assert torch.equal(pred(reference=True), snapshot)
