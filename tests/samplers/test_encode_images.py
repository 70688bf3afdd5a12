"""``Sampler.encode_images``, the inverse of ``decode`` (what offline preference data and supervised
fine-tuning train on), for every family."""

import pytest
import torch

import visalign.samplers as vs


def test_toy_encode_is_the_exact_inverse_of_decode():
    sampler = vs.load("toy-shapes")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = sampler.encode_images(x)
    assert z.shape == (3, 12, 16, 16) and z.dtype == torch.float32
    assert torch.allclose(sampler.decode(z), x, atol=1e-6)
    latents = sampler.noise(2, torch.Generator().manual_seed(1)).clamp(-1, 1)  # any latent in the data range
    assert torch.allclose(sampler.encode_images(sampler.decode(latents)), latents, atol=1e-6)


@pytest.mark.parametrize("family,variant", [("sd", "eps"), ("sd", "v"), ("sdxl", None), ("sd3", None),
                                            ("flux", "dev"), ("flux", "schnell"), ("qwenimage", None),
                                            ("flux2", None)])
def test_vae_encode_gives_latents_in_the_samplers_layout(tiny_model_dir, family, variant):
    """Shapes, dtype and device are those of ``noise`` (what ``add_noise`` expects), the posterior
    mean is deterministic, a draw uses the generator, and ``decode`` accepts the result; the scaling /
    shift factors are applied (the latent equals the raw posterior mean transformed by hand)."""
    options = {"max_sequence_length": 8} if family in ("sd3", "flux", "qwenimage", "flux2") else {}
    sampler = vs.load(str(tiny_model_dir(family, variant)), **options)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = sampler.encode_images(x)
    ref = sampler.noise(2, torch.Generator().manual_seed(0), height=32, width=32)
    assert z.shape == ref.shape and z.dtype == torch.float32 and z.device == ref.device
    assert torch.equal(z, sampler.encode_images(x))  # the mean: no randomness
    a = sampler.encode_images(x, torch.Generator().manual_seed(3))
    b = sampler.encode_images(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, z)
    assert sampler.decode(z).shape == x.shape
    vae = sampler.pipeline.vae
    with torch.no_grad():
        raw = vae.encode((x * 2 - 1)[:, :, None] if family == "qwenimage" else x * 2 - 1).latent_dist.mode()
    cfg = vae.config
    if family == "qwenimage":  # a one-frame video VAE with per-channel latent statistics
        stats = [torch.tensor(v).view(1, -1, 1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std)]
        expected = ((raw - stats[0]) / stats[1])[:, :, 0]
    elif family == "flux2":  # 2x2 patchify, then the VAE's batch-norm statistics
        from visalign.samplers.families.flux2 import patchify

        bn = vae.bn
        expected = (patchify(raw) - bn.running_mean.view(1, -1, 1, 1)) / (
            bn.running_var.view(1, -1, 1, 1) + cfg.batch_norm_eps).sqrt()
    elif family in ("sd3", "flux"):
        expected = (raw - cfg.shift_factor) * cfg.scaling_factor
    else:
        expected = raw * cfg.scaling_factor
    assert torch.allclose(z.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_wan_encodes_4k_plus_1_frames_into_its_video_latents(tiny_model_dir, variant):
    """Wan2.1's VAE and Wan2.2-TI2V-5B's (48 channels, 2x2 pixel patchify inside, /16)."""
    sampler = vs.load(str(tiny_model_dir("wan", variant)), max_sequence_length=8)
    video = torch.rand(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = sampler.encode_images(video)
    ref = sampler.noise(1, torch.Generator().manual_seed(0), height=32, width=32, num_frames=5)
    assert z.shape == ref.shape and z.dtype == torch.float32
    assert sampler.decode(z).shape == video.shape
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        sampler.encode_images(video[:, :4])
