"""What the SD3 and FLUX.1 adapters share: a flow-matching transformer with a diffusers
``FlowMatchEulerDiscreteScheduler`` and a VAE whose latents are ``(z - shift_factor) *
scaling_factor``."""

from __future__ import annotations

import torch

from ..contract import Sampler
from ._common import from_unit_range, module_dtype, to_unit_range, vae_encode


class ShiftedVAEFlowSampler(Sampler):
    """A pipeline's ``transformer`` as the denoiser, its scheduler as the ODE reference, its VAE
    with shift and scale; subclasses add prompt encoding, noise, schedule and the model call."""

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 256) -> None:
        super().__init__(pipe.transformer, pipeline=pipe, name=name)
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.max_sequence_length = max_sequence_length

    def ode_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

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
