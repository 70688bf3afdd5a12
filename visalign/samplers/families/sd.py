"""SD1.x / SD2.x (eps and v-prediction) and SDXL adapters (UNet2DConditionModel, DDPM schedule).

The deterministic sampler is DDIM with eta = 0 (``ode_step``) on the numbers of a
``DDIMScheduler`` built from the checkpoint's scheduler config; ``ode_scheduler()`` returns that
scheduler, so a pipeline given it reproduces the Sampler's ODE output.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Sampler, Schedule
from ._common import from_unit_range, module_dtype, randn, to_unit_range, vae_encode


class SDSampler(Sampler):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``)."""

    family = "sd"
    lora_prefix = "unet"
    lora_writer = "StableDiffusionPipeline"
    guidance = "cfg"
    default_steps = 50
    default_guidance = 7.5

    def __init__(self, pipe, name: str = "") -> None:
        super().__init__(pipe.unet, pipeline=pipe, name=name)
        pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pred_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name or 'model'}: unsupported prediction_type {pred_type!r} (expected epsilon or v_prediction)")
        self.parameterization = "v" if pred_type == "v_prediction" else "eps"
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        side = self.denoiser.config.sample_size * self.vae_scale_factor
        return side, side

    def ode_scheduler(self):
        from diffusers import DDIMScheduler

        cfg = self.pipeline.scheduler.config
        # PNDM / Euler configs (SD1.5, SDXL) carry no clip_sample and never clip x0; DDIM's
        # default would clip, so say so explicitly.
        extra = {} if "clip_sample" in cfg else {"clip_sample": False}
        return DDIMScheduler.from_config(cfg, **extra)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pos, neg = self.pipeline.encode_prompt(
            list(prompts), self.device, 1, True, negative_prompt=None if negative_prompts is None else list(negative_prompts)
        )
        return Conditioning({"encoder_hidden_states": pos}, {"encoder_hidden_states": neg}, list(prompts))

    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        h, w = (height or dh) // self.vae_scale_factor, (width or dw) // self.vae_scale_factor
        # DDIM's init_noise_sigma is 1.0
        return randn((n, self.denoiser.config.in_channels, h, w), generator, self.device, self.dtype)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        sch = self.ode_scheduler()
        sch.set_timesteps(num_steps)
        ts = sch.timesteps  # (N,) int64
        ac = sch.alphas_cumprod.to(torch.float32)
        prev_t = ts - sch.config.num_train_timesteps // num_steps
        final = torch.as_tensor(sch.final_alpha_cumprod, dtype=torch.float32)
        ab_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], final)
        if sch.config.get("thresholding", False):
            raise ValueError(f"{self.name}: dynamic thresholding schedulers are not supported by the DDIM kernels")
        clip = float(sch.config.clip_sample_range) if sch.config.get("clip_sample", False) else None
        return Schedule(
            self.parameterization, ts.to(self.device), alphas_cumprod=ac[ts], alphas_cumprod_prev=ab_prev,
            clip_sample_range=clip,
        )

    def _added_cond(self, x: torch.Tensor, cond: dict) -> dict | None:
        return None

    def _model(self, x, t, cond, guidance_scale):
        return self.denoiser(
            x,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=self._added_cond(x, cond),
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
        cfg = vae.config
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            c = latents.shape[1]
            mean = torch.tensor(cfg.latents_mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        images = vae.decode(latents.to(module_dtype(vae)), return_dict=False)[0]
        return to_unit_range(images.float())

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """``z * scaling_factor`` (or ``(z - latents_mean) * scaling_factor / latents_std`` when the
        VAE config has latent statistics), the inverse of :meth:`decode`."""
        z = vae_encode(self.pipeline.vae, from_unit_range(images), generator)
        cfg = self.pipeline.vae.config
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            c = z.shape[1]
            mean = torch.tensor(cfg.latents_mean).view(1, c, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(cfg.latents_std).view(1, c, 1, 1).to(z.device, z.dtype)
            z = (z - mean) * cfg.scaling_factor / std
        else:
            z = z * cfg.scaling_factor
        return z.to(self.device)


class SDXLSampler(SDSampler):
    """SDXL (``StableDiffusionXLPipeline``): two text encoders, pooled embeds and size time ids."""

    family = "sdxl"
    lora_writer = "StableDiffusionXLPipeline"
    default_guidance = 5.0

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, npe, pooled, npooled = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
        )
        return Conditioning(
            {"encoder_hidden_states": pe, "text_embeds": pooled},
            {"encoder_hidden_states": npe, "text_embeds": npooled},
            list(prompts),
        )

    def _added_cond(self, x: torch.Tensor, cond: dict) -> dict:
        # original_size + crop top-left (0, 0) + target_size, as the pipeline's defaults
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond["text_embeds"].dtype, device=x.device)
        return {"text_embeds": cond["text_embeds"], "time_ids": time_ids.repeat(x.shape[0], 1)}
