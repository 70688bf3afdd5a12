"""SD3 / SD3.5 adapter (``StableDiffusion3Pipeline``): MMDiT, three text encoders (T5 optional).

One adapter serves SD3-Medium, SD3.5-Medium (MMDiT-X: dual attention in the first layers, RMS
q/k norm) and SD3.5-Large (RMS q/k norm, no dual attention); the architecture switches live in
the transformer's config and the pipeline's loop is the same.  Only the sampling defaults of the
model cards differ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Schedule
from ._common import calculate_shift, flow_schedule, randn
from ._mmdit import ShiftedVAEFlowSampler


class SD3Sampler(ShiftedVAEFlowSampler):
    family = "sd3"
    #: Flow-GRPO: the attention projections of both MMDiT streams
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_writer = "StableDiffusion3Pipeline"
    guidance = "cfg"
    default_steps = 28
    default_guidance = 7.0

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 256) -> None:
        super().__init__(pipe, name=name, max_sequence_length=max_sequence_length)
        cfg = pipe.transformer.config
        if cfg.get("qk_norm"):  # SD3.5 (the model cards): Medium 40 steps at CFG 4.5, Large 28 at 3.5
            self.default_steps, self.default_guidance = (40, 4.5) if cfg.get("dual_attention_layers") else (28, 3.5)

    def default_size(self) -> tuple[int, int]:
        side = self.denoiser.config.sample_size * self.vae_scale_factor
        return side, side

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, npe, pooled, npooled = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt=None if negative_prompts is None else list(negative_prompts),
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            {"encoder_hidden_states": pe, "pooled_projections": pooled},
            {"encoder_hidden_states": npe, "pooled_projections": npooled},
            list(prompts),
        )

    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        h, w = (height or dh) // self.vae_scale_factor, (width or dw) // self.vae_scale_factor
        return randn((n, self.denoiser.config.in_channels, h, w), generator, self.device, self.dtype)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        sch = self.ode_scheduler()
        mu = None
        if sch.config.get("use_dynamic_shifting", False):
            if latents is None:
                raise ValueError("this scheduler shifts with resolution: pass the latents to schedule()")
            p = self.denoiser.config.patch_size
            mu = calculate_shift((latents.shape[-2] // p) * (latents.shape[-1] // p), {**sch.config, "max_shift": sch.config.get("max_shift", 1.16)})
        return flow_schedule(sch, num_steps, self.device, mu=mu)

    def _model(self, x, t, cond, guidance_scale):
        return self.denoiser(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
