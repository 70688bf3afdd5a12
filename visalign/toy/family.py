"""The built-in ``toy-shapes`` model: a pixel-space rectified-flow UNet with a tiny jointly
trained text encoder (see ``visalign.toy.model`` and docs/toy_world.md).

It runs through the same flow kernels as SD3 / FLUX: the UNet predicts ``v = eps - x0`` from
``timestep = 1000 s``; classifier-free guidance uses the empty prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

from visalign.samplers.contract import Conditioning, Sampler, Schedule
from visalign.samplers.families._common import flow_schedule, from_unit_range, randn, to_unit_range


class ToySampler(Sampler):
    family = "toy"
    lora_prefix = "unet"
    lora_writer = "StableDiffusionPipeline"  # the UNet LoRA layout diffusers' SD loader reads
    parameterization = "flow"
    guidance = "cfg"
    default_steps = 20
    default_guidance = 3.0

    def __init__(self, model, name: str = "toy-shapes") -> None:
        super().__init__(model.unet, pipeline=model, name=name)
        self.patch = int(round((model.unet.config.in_channels / 3) ** 0.5))  # space-to-depth factor
        self.resolution = int(model.unet.config.sample_size) * self.patch

    @classmethod
    def from_folder(cls, path: str, dtype=None, device=None, name: str = "", **options) -> "ToySampler":
        from . import model as toy_model

        model = toy_model.load(path, dtype=dtype)
        if device is not None:
            model.unet.to(device)
            model.text_encoder.to(device)
        return cls(model, name=name or str(path), **options)

    def default_size(self) -> tuple[int, int]:
        return self.resolution, self.resolution

    def ode_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        from .model import encode_prompts

        return encode_prompts(self.pipeline, list(prompts))

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        prompts = list(prompts)
        negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        both = self._embed(prompts + negative)
        n = len(prompts)
        return Conditioning({"encoder_hidden_states": both[:n]}, {"encoder_hidden_states": both[n:]}, prompts)

    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        h, w = height or self.resolution, width or self.resolution
        c, p = self.denoiser.config.in_channels, self.patch
        return randn((n, c, h // p, w // p), generator, self.device, self.dtype)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        return flow_schedule(self.ode_scheduler(), num_steps, self.device)

    def _model(self, x, t, cond, guidance_scale):
        return self.denoiser(x, t.expand(x.shape[0]), encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents are space-to-depth pixels: ``pixel_shuffle`` puts them back, ``(B, 3, H, W)``."""
        return to_unit_range(torch.nn.functional.pixel_shuffle(latents.float(), self.patch))

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Pixels in ``[0, 1]`` -> ``pixel_unshuffle`` of ``[-1, 1]`` pixels: exactly the inverse of
        :meth:`decode` on images in range (``generator`` is unused: there is no posterior)."""
        return torch.nn.functional.pixel_unshuffle(from_unit_range(images), self.patch).to(self.device)
