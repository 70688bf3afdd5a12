"""Wan2.1 text-to-video adapter (``WanPipeline``): 5-D latents, UMT5 text encoder.

The Sampler's video latents are ``(B, F, C, H, W)`` (frames before channels, like the decoded
video); the Wan transformer and VAE take ``(B, C, F, H, W)``, so the adapter transposes around
them.  Noise is drawn in Wan's layout, so a seed gives the pipeline's noise.  The ODE sampler is
Euler on the flow-matching sigmas with Wan's ``flow_shift``; ``ode_scheduler()`` returns the
``FlowMatchEulerDiscreteScheduler`` that makes the pipeline do the same (Wan ships UniPC, a
multistep solver, which a single-step RL kernel cannot reproduce).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Sampler, Schedule
from ._common import flow_schedule, from_unit_range, module_dtype, randn, vae_encode


class WanSampler(Sampler):
    family = "wan"
    lora_writer = "WanPipeline"
    parameterization = "flow"
    guidance = "cfg"
    cfg_batched = False  # the pipeline runs cond, then uncond, as two calls
    is_video = True
    default_steps = 50
    default_guidance = 5.0

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 512, num_frames: int = 81) -> None:
        super().__init__(pipe.transformer, pipeline=pipe, name=name)
        self.max_sequence_length = max_sequence_length
        self.num_frames = num_frames
        self.scale_spatial = pipe.vae_scale_factor_spatial
        self.scale_temporal = pipe.vae_scale_factor_temporal

    def default_size(self) -> tuple[int, int]:
        return 480, 832

    def ode_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = self.pipeline.scheduler.config
        if type(self.pipeline.scheduler) is FlowMatchEulerDiscreteScheduler:
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        shift = cfg.get("flow_shift") or cfg.get("shift") or 1.0
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=shift)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, npe = self.pipeline.encode_prompt(
            prompt=list(prompts),
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return Conditioning({"encoder_hidden_states": pe}, {"encoder_hidden_states": npe}, list(prompts))

    def noise(self, n: int, generator=None, *, height=None, width=None, num_frames=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        frames = num_frames or self.num_frames
        if (frames - 1) % self.scale_temporal:
            raise ValueError(f"num_frames must be {self.scale_temporal}k + 1 for Wan, got {frames}")
        shape = (
            n,
            self.denoiser.config.in_channels,
            (frames - 1) // self.scale_temporal + 1,
            (height or dh) // self.scale_spatial,
            (width or dw) // self.scale_spatial,
        )
        # Wan keeps its latents in float32 whatever the transformer's dtype.
        return randn(shape, generator, self.device, torch.float32).transpose(1, 2)  # (B, F, C, H, W)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        return flow_schedule(self.ode_scheduler(), num_steps, self.device)

    def _model(self, x, t, cond, guidance_scale):
        hidden = x.transpose(1, 2).to(self.dtype)  # (B, C, F, H, W)
        out = self.denoiser(
            hidden_states=hidden,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]
        return out.transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, h, w)`` latents -> video ``(B, F, 3, H, W)`` in ``[0, 1]``."""
        vae = self.pipeline.vae
        z = latents.transpose(1, 2).to(module_dtype(vae))  # (B, C, F, h, w)
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z * std + mean, return_dict=False)[0]  # (B, 3, F, H, W)
        return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Video ``(B, F, 3, H, W)`` in ``[0, 1]`` (``F = 4k + 1``) -> latents ``(B, (F - 1) / 4 + 1, C,
        h, w)``, ``(z - latents_mean) / latents_std``: the inverse of :meth:`decode`."""
        if images.ndim != 5:
            raise ValueError(f"Wan encodes videos (B, F, 3, H, W); got a tensor of shape {tuple(images.shape)}")
        frames = images.shape[1]
        if (frames - 1) % self.scale_temporal:
            raise ValueError(f"Wan encodes {self.scale_temporal}k + 1 frames; got {frames}: trim the videos to "
                             f"{(frames - 1) // self.scale_temporal * self.scale_temporal + 1} frames")
        vae = self.pipeline.vae
        z = vae_encode(vae, from_unit_range(images).transpose(1, 2), generator)  # (B, C, F', h, w)
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) / std).transpose(1, 2).to(self.device)
