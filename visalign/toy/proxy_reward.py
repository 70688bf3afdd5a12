"""The ``shapes-proxy`` reward: a learned, differentiable stand-in for the toy world's gold verifier.

A reward head trained with the kit (``visalign rewards train shapes-proxy``, docs/reward_training.md)
on the toy world's prompt-conditioned backbone (:class:`visalign.toy.proxy.ProxyBackbone`): an
ensemble of binary heads predicting the verifier's strict verdict.  Score: P(strict pass), the
ensemble mean of ``sigmoid(logit_k)``, in [0, 1].  Components, all ``(B,)`` float32:

- ``p_strict``: the score;
- ``logit``: the members' mean logit (the unsquashed value, for gradient methods that prefer it);
- ``partial``: the backbone's prediction of the verifier's partial credit;
- ``uncertainty``: the ensemble's standard deviation of ``p_strict`` (for guards such as
  ``uncertainty_penalty``).

Differentiable: images of any size are resized to 32 px with torch ops (area average down,
bilinear up), so the autograd graph reaches the pixels; the caller chooses grad mode.  A prompt
outside the toy grammar makes its sample invalid (score NaN, ``valid`` False, the parser's message
in ``extras["reason"]``) and its image is not run through the model.  The default folder is
``shapes-proxy`` of the assets shipped with visalign (:mod:`visalign.assets`; ``$VISALIGN_ASSETS``
overrides the assets folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from visalign.rewards.base import RewardOutput
from visalign.rewards.head import CONFIG_NAME, WEIGHTS_NAME, HeadReward

__all__ = ["ShapesProxyReward", "default_path"]


def default_path() -> str:
    """The shipped weights: ``shapes-proxy`` of :func:`visalign.assets.assets_dir` (``$VISALIGN_ASSETS``
    overrides the assets folder)."""
    from visalign.assets import asset_path

    return str(asset_path("shapes-proxy"))


class ShapesProxyReward(HeadReward):
    """Learned proxy of the shapes gold verifier (differentiable).

    Args:
        path (`str`, *optional*): a folder written by ``visalign rewards train shapes-proxy``;
            defaults to the shipped weights (:func:`default_path`).
        device (`str`, *optional*, defaults to ``"cpu"``): where the model runs.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu") -> None:
        if path is None:
            from visalign.assets import missing_asset_message

            path = default_path()
            if not all((Path(path) / f).is_file() for f in (CONFIG_NAME, WEIGHTS_NAME)):
                raise FileNotFoundError(
                    "reward 'shapes-proxy' (default weights): " + missing_asset_message("shapes-proxy")
                    + " Or train one with `visalign rewards train shapes-proxy --out DIR` and pass path=DIR."
                )
        super().__init__(path, device=device, _registered="shapes-proxy")
        if self.model.backbone_config.kind != "shapes-proxy" or self.model.task != "binary":
            raise ValueError(f"{path} holds a {self.model.task} head on a {self.model.backbone_config.kind!r} "
                             "backbone, not a shapes-proxy (a binary head on the 'shapes-proxy' backbone)")

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, references: Any,
              metadata: Sequence[dict] | None) -> RewardOutput:
        from .prompts import parse_prompts

        if images.ndim != 4:
            raise ValueError(f"reward 'shapes-proxy' scores images (B, 3, H, W), not video; got {tuple(images.shape)}")
        b = images.shape[0]
        metas, reasons = parse_prompts(prompts)  # outside the grammar: the proxy never saw such a prompt
        ok = [i for i, m in enumerate(metas) if m is not None]
        nan = torch.full((b,), float("nan"), device=images.device)
        p, logit, partial, unc = nan.clone(), nan.clone(), nan.clone(), nan.clone()
        if ok:
            idx = torch.tensor(ok, device=images.device)
            feats, _ = self.model.features(images[idx], [prompts[i] for i in ok])
            raw = self.model.raw(feats)  # (K, n) member logits
            members = self.model.member_scores(raw)
            std = members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(members[0])
            dev = images.device
            # index_put keeps the graph from the chosen images' pixels to their scores
            p = p.index_put((idx,), members.mean(0).float().to(dev))
            logit = logit.index_put((idx,), raw.mean(0).float().to(dev))
            partial = partial.index_put((idx,), torch.sigmoid(self.model.trainable.partial_logit(feats)).float().to(dev))
            unc = unc.index_put((idx,), std.float().to(dev))
        valid = torch.zeros(b, dtype=torch.bool)
        valid[ok] = True
        return RewardOutput(scores=p, components={"p_strict": p, "logit": logit, "partial": partial, "uncertainty": unc},
                            valid=valid, extras={"reason": reasons})
