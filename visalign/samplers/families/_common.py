"""Pieces shared by the diffusers family adapters."""

from __future__ import annotations

import torch


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Initial noise exactly as diffusers' pipelines draw it (``randn_tensor``)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """VAE output in ``[-1, 1]`` -> images in ``[0, 1]`` (the pipelines' ``postprocess``)."""
    return (images / 2 + 0.5).clamp(0, 1)


def flow_schedule(scheduler, num_steps: int, device, *, sigmas=None, mu=None):
    """Timesteps and sigmas of a FlowMatchEulerDiscreteScheduler, as the pipeline sets them."""
    from ..contract import Schedule

    kwargs = {}
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is None:
        scheduler.set_timesteps(num_steps, device=device, **kwargs)
    else:
        scheduler.set_timesteps(device=device, **kwargs)
    return Schedule(
        parameterization="flow",
        timesteps=scheduler.timesteps.clone(),
        sigmas=scheduler.sigmas.to(device=device, dtype=torch.float32).clone(),
    )


def calculate_shift(image_seq_len: int, config) -> float:
    """The resolution-dependent shift ``mu`` of FLUX / SD3 dynamic shifting (linear in sequence length)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` -> VAE input in ``[-1, 1]`` (the training scripts' ``Normalize([0.5], [0.5])``)."""
    return images.float() * 2 - 1


def vae_encode(vae, pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """The VAE encoder's posterior mean of ``pixels`` (in ``[-1, 1]``), or a draw from the posterior
    with ``generator``; float32, before any scaling."""
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)
    dist = vae.encode(pixels.to(device=vae.device, dtype=module_dtype(vae)), return_dict=False)[0]
    if generator is None:
        return dist.mode().float()
    noise = randn(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise).float()
