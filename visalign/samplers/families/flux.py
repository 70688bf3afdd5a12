"""FLUX.1 adapter (``FluxPipeline``), dev and schnell.

Latents are kept image-shaped ``(B, C, H, W)`` in the Sampler (so hooks and steering see
images); they are packed into FLUX's ``(B, H/2 * W/2, 4C)`` token sequence around each
transformer call.  Packing is a reshape, so kernels and log-probs are unchanged by it.
FLUX.1-dev is guidance-distilled: ``guidance_scale`` feeds the guidance embedding and no
classifier-free guidance is run; schnell takes no guidance.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Schedule
from ._common import calculate_shift, randn
from ._mmdit import ShiftedVAEFlowSampler, pack, shifted_linear_schedule, unpack


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positional ids ``(h/2 * w/2, 3)`` of the packed latent tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxSampler(ShiftedVAEFlowSampler):
    family = "flux"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_writer = "FluxPipeline"

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 512) -> None:
        super().__init__(pipe, name=name, max_sequence_length=max_sequence_length)
        self.guidance = "embedded" if pipe.transformer.config.guidance_embeds else "none"
        # dev: 28 steps, guidance 3.5; schnell: 4 steps, no guidance (the model cards)
        self.default_steps, self.default_guidance = (28, 3.5) if self.guidance == "embedded" else (4, 0.0)

    def default_size(self) -> tuple[int, int]:
        side = 128 * self.vae_scale_factor  # the pipeline's default_sample_size
        return side, side

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": pe, "pooled_projections": pooled}, None, list(prompts))

    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        h = 2 * ((height or dh) // (self.vae_scale_factor * 2))
        w = 2 * ((width or dw) // (self.vae_scale_factor * 2))
        c = self.denoiser.config.in_channels // 4
        return randn((n, c, h, w), generator, self.device, self.dtype)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        if latents is None:
            raise ValueError("FLUX shifts its schedule with resolution: pass the latents to schedule()")
        sch = self.ode_scheduler()
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return shifted_linear_schedule(sch, num_steps, self.device, calculate_shift(seq_len, sch.config))

    def _model(self, x, t, cond, guidance_scale):
        b, _, h, w = x.shape
        tokens = pack(x)
        guidance = None
        if self.guidance == "embedded":
            guidance = torch.full((b,), float(guidance_scale), device=x.device, dtype=torch.float32)
        ehs = cond["encoder_hidden_states"]
        out = self.denoiser(
            hidden_states=tokens,
            timestep=t.expand(b).to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=ehs,
            txt_ids=torch.zeros(ehs.shape[1], 3, device=x.device, dtype=ehs.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)
