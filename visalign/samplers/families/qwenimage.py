"""Qwen-Image adapter (``QwenImagePipeline``): a 60-layer MMDiT over FLUX-style packed latents,
a Qwen2.5-VL text encoder and a Wan-style VAE with latent statistics.

Latents are kept image-shaped ``(B, 16, h, w)`` in the Sampler and packed into the transformer's
``(B, h/2 * w/2, 64)`` tokens around each call, as for FLUX.1 (a reshape: kernels and densities
are unchanged).  The VAE is a video VAE run on one frame: decoding adds a frame axis of length 1.

Prompt embeddings differ in length from prompt to prompt (the pipeline keeps the encoder's hidden
states of the real tokens only).  ``encode`` pads them with zeros to ``max_sequence_length`` and
records the valid tokens in ``encoder_hidden_states_mask``, so conditionings of different batches
concatenate; each transformer call drops the padding that no sample in its batch uses and passes
no mask when nothing is padded, which gives the pipeline's own inputs.

Guidance is the pipeline's ``true_cfg_scale``: classifier-free guidance against a negative prompt
(``" "`` when none is given, as Flow-GRPO and the model card do) whose result is rescaled to the
norm of the conditional prediction, token by token (``comb * ||cond|| / ||comb||`` over the 64
values of each packed token).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..contract import Conditioning, Schedule
from ._common import calculate_shift, from_unit_range, module_dtype, randn, to_unit_range, vae_encode
from ._mmdit import FlowMatchSampler, pack, shifted_linear_schedule, unpack

#: the negative prompt used when none is given (the model card's and Flow-GRPO's ``" "``)
DEFAULT_NEGATIVE_PROMPT = " "


class QwenImageSampler(FlowMatchSampler):
    family = "qwenimage"
    #: Flow-GRPO's Qwen-Image LoRA: the attention projections and MLPs of both streams
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    lora_writer = "QwenImagePipeline"
    guidance = "cfg"
    cfg_batched = False  # the pipeline runs cond, then uncond, as two calls
    #: the pipeline's defaults (50 steps, true_cfg_scale 4.0)
    default_steps = 50
    default_guidance = 4.0

    def __init__(self, pipe, name: str = "", max_sequence_length: int = 512) -> None:
        super().__init__(pipe, name=name, max_sequence_length=max_sequence_length)
        self.vae_scale_factor = pipe.vae_scale_factor
        if pipe.transformer.config.guidance_embeds:
            raise ValueError(f"{name or 'model'}: guidance-distilled Qwen-Image transformers (guidance_embeds) are "
                             "not supported; the released checkpoints use true classifier-free guidance")

    def default_size(self) -> tuple[int, int]:
        side = self.pipeline.default_sample_size * self.vae_scale_factor
        return side, side

    # ---- conditioning --------------------------------------------------------------------------
    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, mask = self.pipeline.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        b, n, d = pe.shape
        full = torch.ones(b, n, dtype=torch.long, device=pe.device) if mask is None else mask.long()
        length = self.max_sequence_length
        padded = pe.new_zeros(b, length, d)
        padded[:, :n] = pe
        valid = full.new_zeros(b, length)
        valid[:, :n] = full
        return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": valid}

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Conditioning:
        prompts = list(prompts)
        negative = [DEFAULT_NEGATIVE_PROMPT] * len(prompts) if negative_prompts is None else list(negative_prompts)
        return Conditioning(self._embed(prompts), self._embed(negative), prompts)

    # ---- noise and schedule --------------------------------------------------------------------
    def noise(self, n: int, generator=None, *, height=None, width=None, **_) -> torch.Tensor:
        dh, dw = self.default_size()
        h = 2 * ((height or dh) // (self.vae_scale_factor * 2))
        w = 2 * ((width or dw) // (self.vae_scale_factor * 2))
        c = self.denoiser.config.in_channels // 4
        # the pipeline draws (B, 1, C, h, w): the same numbers in the same order as (B, C, h, w)
        return randn((n, 1, c, h, w), generator, self.device, self.dtype)[:, 0]

    def schedule(self, num_steps: int, latents: torch.Tensor | None = None) -> Schedule:
        if latents is None:
            raise ValueError("Qwen-Image shifts its schedule with resolution: pass the latents to schedule()")
        sch = self.ode_scheduler()
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return shifted_linear_schedule(sch, num_steps, self.device, calculate_shift(seq_len, sch.config))

    # ---- the model -----------------------------------------------------------------------------
    def _model(self, x, t, cond, guidance_scale):
        b, _, h, w = x.shape
        mask = cond["encoder_hidden_states_mask"]
        used = int(mask.sum(1).max()) if mask.shape[1] else 0
        ehs, mask = cond["encoder_hidden_states"][:, :used], mask[:, :used]
        out = self.denoiser(
            hidden_states=pack(x),
            timestep=t.expand(b).to(x.dtype) / 1000,
            encoder_hidden_states=ehs,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def _guide(self, pred_uncond, pred_text, guidance_scale, t):
        """True CFG rescaled to the conditional prediction's norm per packed token (the pipeline's
        ``true_cfg_scale``)."""
        h, w = pred_text.shape[-2:]
        text, uncond = pack(pred_text), pack(pred_uncond)
        comb = uncond + guidance_scale * (text - uncond)
        comb = comb * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack(comb, h, w)

    # ---- the VAE -------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipeline.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 16, h, w)`` latents -> images ``(B, 3, H, W)`` in ``[0, 1]``: ``z * std + mean`` on one frame."""
        vae = self.pipeline.vae
        z = latents[:, :, None].to(module_dtype(vae))  # (B, C, 1, h, w)
        mean, std = self._latent_stats(z)
        images = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
        return to_unit_range(images.float())

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """``(z - latents_mean) / latents_std`` of the one-frame posterior, the inverse of :meth:`decode`."""
        z = vae_encode(self.pipeline.vae, from_unit_range(images)[:, :, None], generator)  # (B, C, 1, h, w)
        mean, std = self._latent_stats(z)
        return ((z - mean) / std)[:, :, 0].to(self.device)
