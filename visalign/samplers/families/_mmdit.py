"""What the flow-matching MMDiT adapters share (SD3, FLUX.1, FLUX.2, Qwen-Image): a transformer
with a diffusers ``FlowMatchEulerDiscreteScheduler``, the 2x2 token packing of the FLUX-style
models, their resolution-shifted schedule, and a VAE whose latents are ``(z - shift_factor) *
scaling_factor`` (SD3, FLUX.1)."""

from __future__ import annotations

import numpy as np
import torch

from ..contract import Sampler, Schedule
from ._common import flow_schedule, from_unit_range, module_dtype, to_unit_range, vae_encode


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)`` (2x2 patches, channel-major within a patch), the
    token layout of FLUX.1 and Qwen-Image."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latent height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def shifted_linear_schedule(scheduler, num_steps: int, device, mu: float) -> Schedule:
    """The schedule of the FLUX-style pipelines (FLUX.1, FLUX.2, Qwen-Image): sigmas
    ``linspace(1, 1/N, N)`` (or the scheduler's own flow sigmas when its config asks for them),
    shifted by the resolution-dependent ``mu``."""
    if scheduler.config.get("use_flow_sigmas", False):
        return flow_schedule(scheduler, num_steps, device, mu=mu)
    return flow_schedule(scheduler, num_steps, device, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


class FlowMatchSampler(Sampler):
    """A pipeline's ``transformer`` as the denoiser and its ``FlowMatchEulerDiscreteScheduler``
    as the ODE reference; subclasses add prompt encoding, noise, schedule, the model call and the VAE."""

    parameterization = "flow"

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 256) -> None:
        super().__init__(pipe.transformer, pipeline=pipe, name=name)
        self.max_sequence_length = max_sequence_length

    def ode_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)


class ShiftedVAEFlowSampler(FlowMatchSampler):
    """SD3 and FLUX.1: a VAE with shift and scale."""

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 256) -> None:
        super().__init__(pipe, name=name, max_sequence_length=max_sequence_length)
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(module_dtype(vae)), return_dict=False)[0]
        return to_unit_range(images.float())

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """``(z - shift_factor) * scaling_factor``, the inverse of :meth:`decode`."""
        z = vae_encode(self.pipeline.vae, from_unit_range(images), generator)
        cfg = self.pipeline.vae.config
        return ((z - cfg.shift_factor) * cfg.scaling_factor).to(self.device)
