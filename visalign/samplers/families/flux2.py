"""FLUX.2 adapter (``Flux2Pipeline``, FLUX.2-dev): text-to-image.

FLUX.2's latents are the VAE's 32 channels patchified 2x2 into 128 channels and normalised by the
VAE's batch-norm statistics; the pipeline draws its noise in that patchified layout
``(B, 128, H/16, W/16)`` and that is the Sampler's latent layout too (a seed gives the pipeline's
noise).  Around each transformer call the latents are flattened to tokens ``(B, H/16 * W/16, 128)``
with 4-axis positions ``(t, h, w, l) = (0, row, col, 0)``; flattening is a reshape, so kernels and
densities are unchanged by it.

The text encoder is Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``): prompts go through
its chat template with FLUX.2's system message, padded to ``max_sequence_length``, and the hidden
states of layers 10, 20 and 30 are stacked into each token's embedding.  FLUX.2-dev is
guidance-distilled: ``guidance_scale`` feeds the guidance embedding and no classifier-free
guidance runs.  The schedule is linear in the noise level, shifted by BFL's empirical ``mu``,
which depends on the image's token count and on the number of steps.

Image conditioning (editing with reference images) and prompt up-sampling are not supported.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Schedule
from ._common import from_unit_range, module_dtype, randn, to_unit_range, vae_encode
from ._mmdit import FlowMatchSampler, shifted_linear_schedule


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift: linear in the token count, fitted at 10 and 200 steps and
    interpolated linearly in ``num_steps`` (above 4300 tokens the 200-step line alone); the
    constants of BFL's FLUX.2 reference implementation."""
    a1, b1 = 8.73809524e-05, 1.89833333  # 10 steps
    a2, b2 = 0.00016927, 0.45666666  # 200 steps
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)`` (channel-major, then the 2x2 offset)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = x.shape
    return x.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def _positions(rows: int, cols: int, device) -> torch.Tensor:
    """4-axis ids ``(rows * cols, 4)``: ``(0, row, col, 0)`` in row-major order."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zero = torch.zeros_like(r)
    return torch.stack([zero, r, c, zero], dim=-1).reshape(-1, 4).to(device)


def _text_positions(length: int, device) -> torch.Tensor:
    """4-axis ids ``(length, 4)`` of the text tokens: ``(0, 0, 0, index)``."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


class Flux2Sampler(FlowMatchSampler):
    family = "flux2"
    #: the attention projections of the double-stream blocks and the fused QKV + MLP input projection
    #: of the single-stream blocks
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "to_qkv_mlp_proj")
    lora_writer = "Flux2Pipeline"
    guidance = "embedded"
    #: FLUX.2-dev's model card: 50 steps, guidance 4
    default_steps = 50
    default_guidance = 4.0

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 512) -> None:
        super().__init__(pipe, name=name, max_sequence_length=max_sequence_length)
        self.vae_scale_factor = pipe.vae_scale_factor
        if not pipe.transformer.config.guidance_embeds:
            raise ValueError(f"{name or 'model'}: a FLUX.2 transformer without a guidance embedding is not supported "
                             "by Flux2Pipeline's loop")

    def default_size(self) -> tuple[int, int]:
        side = self.pipeline.default_sample_size * self.vae_scale_factor
        return side, side

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        pe, _text_ids = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return Conditioning({"encoder_hidden_states": pe}, None, list(prompts))

    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        h = (height or dh) // (self.vae_scale_factor * 2)
        w = (width or dw) // (self.vae_scale_factor * 2)
        return randn((n, self.denoiser.config.in_channels, h, w), generator, self.device, self.dtype)

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        if latents is None:
            raise ValueError("FLUX.2 shifts its schedule with resolution: pass the latents to schedule()")
        seq_len = latents.shape[-2] * latents.shape[-1]
        return shifted_linear_schedule(self.ode_scheduler(), num_steps, self.device, empirical_mu(seq_len, num_steps))

    def _model(self, x, t, cond, guidance_scale):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        ehs = cond["encoder_hidden_states"]
        out = self.denoiser(
            hidden_states=tokens,
            timestep=t.expand(b).to(x.dtype) / 1000,
            guidance=torch.full((b,), float(guidance_scale), device=x.device, dtype=torch.float32),
            encoder_hidden_states=ehs,
            txt_ids=_text_positions(ehs.shape[1], x.device),
            img_ids=_positions(h, w, x.device),
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    # ---- the VAE -------------------------------------------------------------------------------
    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 128, h, w)`` latents -> images ``(B, 3, 16h, 16w)`` in ``[0, 1]``: undo the batch-norm
        normalisation and the 2x2 patchify, then the VAE decoder."""
        vae = self.pipeline.vae
        mean, std = self._bn_stats(latents)
        z = unpatchify(latents * std + mean).to(module_dtype(vae))
        return to_unit_range(vae.decode(z, return_dict=False)[0].float())

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """``(patchify(z) - bn_mean) / bn_std``, the inverse of :meth:`decode`."""
        z = patchify(vae_encode(self.pipeline.vae, from_unit_range(images), generator))
        mean, std = self._bn_stats(z)
        return ((z - mean) / std).to(self.device)
