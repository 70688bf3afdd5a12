"""The Sampler's forward process (what DPO / NFT / supervised fine-tuning train on) and the rollout
with gradients through the last K steps, on tiny models."""

import pytest
import torch

import visalign.samplers as vs

SIZES = {"height": 32, "width": 32}


@pytest.mark.parametrize("variant", ["eps", "v"])
def test_ddpm_forward_process_matches_diffusers(tiny_model_dir, variant):
    from diffusers import DDPMScheduler

    sampler = vs.load(str(tiny_model_dir("sd", variant)))
    ref = DDPMScheduler.from_config(sampler.pipeline.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t = sampler.sample_times(4, g)
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < sampler.num_train_timesteps
    assert torch.allclose(sampler.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    target = sampler.training_target(x0, noise, t)
    assert torch.allclose(target, noise if variant == "eps" else ref.get_velocity(x0, noise, t), atol=1e-6)


def test_flow_forward_process_is_rectified_flow(tiny_model_dir):
    sampler = vs.load(str(tiny_model_dir("sd3")), max_sequence_length=8)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    s = sampler.sample_times(3, g, distribution="logit_normal")
    assert ((s > 0) & (s < 1)).all() and s.dtype == torch.float32
    xt = sampler.add_noise(x0, noise, s)
    sv = s.view(-1, 1, 1, 1)
    assert torch.allclose(xt, (1 - sv) * x0 + sv * noise)
    v = sampler.training_target(x0, noise, s)
    assert torch.allclose(xt - sv * v, x0, atol=1e-6)  # the x0-prediction of a perfect velocity is x0
    with pytest.raises(ValueError, match="logit_normal"):
        sampler.sample_times(3, g, distribution="cosine")


@pytest.mark.parametrize("family,variant", [("sd3", None), ("sd", "eps"), ("sd", "v"), ("toy", None),
                                            ("qwenimage", None), ("wan", "a14b"), ("flux2", None)])
def test_prediction_at_training_times_equals_the_rollout_step(tiny_model_dir, family, variant):
    """``predict_at`` at the training time of step i is ``denoise`` at step i (the same model time),
    so forward-process trainers and rollouts see the same network (Wan2.2-A14B: the same expert)."""
    path = "toy-shapes" if family == "toy" else str(tiny_model_dir(family, variant))
    options = {"max_sequence_length": 8} if family in ("sd3", "qwenimage", "wan", "flux2") else {}
    if family == "wan":
        options.update(num_frames=5, guidance_scale_2=1.5)
    sampler = vs.load(path, **options)
    size = {} if family == "toy" else SIZES
    cond = sampler.encode(["a red cube", "a blue ball"])
    x = sampler.noise(2, torch.Generator().manual_seed(0), **size).float()
    sched = sampler.schedule(4, x)
    for i in (0, 2):
        if sampler.parameterization == "flow":
            t = sched.sigmas[i].repeat(2)
        else:
            t = sched.timesteps[i].repeat(2)
        assert torch.allclose(sampler.model_time(t).float(), sched.timesteps[i].float().repeat(2))
        with torch.no_grad():
            a = sampler.predict_at(x, t, cond, 2.0)
            b = sampler.denoise(x, i, sched, cond, 2.0)
        assert torch.allclose(a, b, atol=1e-5), (family, i)


def test_grad_steps_reach_only_the_last_k_and_checkpointing_gives_the_same_gradient(tiny_model_dir):
    from visalign.samplers.lora import add_lora

    sampler = vs.load(str(tiny_model_dir("sd3")), max_sequence_length=8)
    torch.manual_seed(0)
    params = add_lora(sampler, rank=2, alpha=2, init="default")
    with torch.no_grad():  # a non-zero B so the LoRA has a gradient path of its own
        for p in params:
            p.add_(0.05 * torch.randn_like(p))

    with torch.no_grad():
        cond = sampler.encode(["a red cube"])

    def grads(k, checkpoint):
        sampler.denoiser.zero_grad(set_to_none=True)
        traj = sampler.rollout(cond, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1),
                               grad_steps=k, checkpoint=checkpoint, **SIZES)
        sampler.decode(traj.final).mean().backward()
        return traj, torch.cat([p.grad.flatten() for p in params])

    traj, g1 = grads(1, False)
    # the sample entering the last step carries no graph: the gradient is the last step's alone
    x_in = traj.latents[:, -2].detach()
    sampler.denoiser.zero_grad(set_to_none=True)
    pred = sampler.denoise(x_in, 2, traj.schedule, traj.cond, 2.0)
    from visalign.samplers import ode_step

    sampler.decode(ode_step(pred, x_in, traj.schedule, 2).prev_sample).mean().backward()
    manual = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(g1, manual, atol=1e-6) and manual.norm() > 0
    _, g1c = grads(1, True)
    assert torch.allclose(g1, g1c, atol=1e-6)
    _, g3 = grads(3, False)
    _, g3c = grads(3, True)
    assert torch.allclose(g3, g3c, atol=1e-6)
    assert not torch.allclose(g1, g3, atol=1e-6)  # more steps, another gradient
    with pytest.raises(ValueError, match="grad_steps"):
        sampler.rollout(["a"], num_steps=3, grad_steps=4, **SIZES)
