"""Faithfulness: with the ODE kernel, a Sampler's decoded images equal the diffusers pipeline's
own output for the same model, seed and settings (float32, max abs diff <= 1e-4).

The pipeline's call keywords are in ``call``; the Sampler's guidance scale is the pipeline's
``guidance_scale`` (Qwen-Image: its ``true_cfg_scale`` against the Sampler's default negative prompt)."""

import pytest
import torch

import visalign.samplers as vs

# (family, variant, call kwargs valid for the tiny model, sampler options)
CASES = [
    ("sd", "eps", dict(height=32, width=32, guidance_scale=5.0), {}),
    ("sd", "v", dict(height=32, width=32, guidance_scale=5.0), {}),
    ("sdxl", None, dict(height=32, width=32, guidance_scale=5.0), {}),
    ("sd3", None, dict(height=32, width=32, guidance_scale=4.5, max_sequence_length=16), {"max_sequence_length": 16}),
    ("sd3", "no_t5", dict(height=32, width=32, guidance_scale=4.5, max_sequence_length=16), {"max_sequence_length": 16}),
    ("flux", "dev", dict(height=32, width=32, guidance_scale=3.5, max_sequence_length=16), {"max_sequence_length": 16}),
    ("flux", "schnell", dict(height=32, width=32, guidance_scale=0.0, max_sequence_length=16), {"max_sequence_length": 16}),
    ("wan", None, dict(height=32, width=32, num_frames=5, guidance_scale=5.0, max_sequence_length=16),
     {"max_sequence_length": 16, "num_frames": 5}),
    # SD3.5-Large's transformer switches (RMS q/k norm, no dual attention)
    ("sd3", "large", dict(height=32, width=32, guidance_scale=3.5, max_sequence_length=16), {"max_sequence_length": 16}),
    # Wan2.2-A14B: 3 steps at shift 3 put step 0 on the high-noise expert and steps 1-2 on the low-noise one
    ("wan", "a14b", dict(height=32, width=32, num_frames=5, guidance_scale=4.0, guidance_scale_2=2.0,
                         max_sequence_length=16), {"max_sequence_length": 16, "num_frames": 5, "guidance_scale_2": 2.0}),
    # Wan2.2-TI2V-5B: 48-channel VAE at /16, per-token timesteps; 64 px gives 2x2 tokens per frame
    ("wan", "ti2v", dict(height=64, width=64, num_frames=5, guidance_scale=5.0, max_sequence_length=16),
     {"max_sequence_length": 16, "num_frames": 5}),
    # Qwen-Image: prompts of different token lengths (the padding mask), true CFG with norm rescale
    ("qwenimage", None, dict(height=64, width=64, true_cfg_scale=4.0, negative_prompt=[" ", " "], max_sequence_length=16),
     {"max_sequence_length": 16}),
    # FLUX.2-dev: patchified, batch-norm-normalised latents, embedded guidance, empirical mu; the
    # system turn takes 29 tokens, so 64 keep the prompts
    ("flux2", None, dict(height=64, width=64, guidance_scale=4.0, max_sequence_length=64), {"max_sequence_length": 64}),
]
IDS = [f"{f}-{v}" if v else f for f, v, _, _ in CASES]


@pytest.mark.parametrize("family,variant,call,options", CASES, ids=IDS)
def test_ode_matches_pipeline(tiny_model_dir, family, variant, call, options):
    path = tiny_model_dir(family, variant)
    sampler = vs.load(str(path), **options)
    assert sampler.family == family
    pipe = sampler.pipeline
    pipe.scheduler = sampler.ode_scheduler()  # the deterministic sampler the Sampler implements
    prompts = ["a red cube on a table", "two blue circles"]
    steps = 3
    out = pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    expected = out.frames if family == "wan" else out.images
    sizes = {k: call[k] for k in ("height", "width", "num_frames") if k in call}
    guidance = call.get("true_cfg_scale", call.get("guidance_scale"))
    with torch.no_grad():
        traj = sampler.rollout(
            prompts, num_steps=steps, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0), **sizes,
        )
        images = sampler.decode(traj.final)
    expected = torch.as_tensor(expected)
    assert images.shape == expected.shape
    if family == "wan":
        assert images.ndim == 5 and images.shape[2] == 3  # (B, F, 3, H, W)
    diff = (images - expected).abs().max().item()
    assert diff <= 1e-4, f"{family}/{variant}: max abs diff {diff:.2e}"
    # the ODE rollout is not a constant: a different seed gives a different image
    with torch.no_grad():
        other = sampler.decode(sampler.rollout(prompts, num_steps=steps, guidance_scale=guidance,
                                               generator=torch.Generator().manual_seed(1), **sizes).final)
    assert (other - images).abs().max() > 1e-3
