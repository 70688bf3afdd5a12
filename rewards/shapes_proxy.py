"""The ``shapes-proxy`` reward: a learned, differentiable stand-in for the toy world's gold verifier.

Score: P(strict pass) = ``sigmoid(logit)`` of :class:`visalign.toy.proxy.ShapesProxy`, in [0, 1].
Components, all ``(B,)`` float32 and differentiable:

- ``p_strict``: the score;
- ``logit``: its logit (the unsquashed value, for gradient methods that prefer it);
- ``partial``: the model's prediction of the verifier's partial credit, ``sigmoid`` of the second
  output.

Images of any size are resized to 32 px with torch ops (area average down, bilinear up), so the
autograd graph reaches the pixels; the caller chooses grad mode.  A prompt outside the toy grammar
makes its sample invalid (score NaN, ``valid`` False, the parser's message in ``extras["reason"]``)
and its image is not run through the model.  The weights are trained by ``visalign toy train-proxy``
(:mod:`visalign.toy.proxy`); the default folder is ``shapes-proxy`` of the assets shipped with
visalign (:mod:`visalign.assets`; ``$VISALIGN_ASSETS`` overrides the assets folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import Reward, RewardOutput
from .registry import info as _registered_info

__all__ = ["ShapesProxyReward", "default_path"]


def default_path() -> str:
    """The shipped weights: ``shapes-proxy`` of :func:`visalign.assets.assets_dir` (``$VISALIGN_ASSETS``
    overrides the assets folder)."""
    from visalign.assets import asset_path

    return str(asset_path("shapes-proxy"))


class ShapesProxyReward(Reward):
    """Learned proxy of the shapes gold verifier (differentiable).

    Args:
        path (`str`, *optional*): folder with ``config.json`` and ``model.safetensors`` written by
            ``visalign toy train-proxy``; defaults to the shipped weights (:func:`default_path`).
        device (`str`, *optional*, defaults to ``"cpu"``): where the model runs.
    """

    info = _registered_info("shapes-proxy")  # the facts live in catalog.py

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu") -> None:
        from visalign.toy.proxy import load

        if path is None:
            from visalign.assets import missing_asset_message
            from visalign.toy.proxy import CONFIG_NAME, WEIGHTS_NAME

            path = default_path()
            if not all((Path(path) / f).is_file() for f in (CONFIG_NAME, WEIGHTS_NAME)):
                raise FileNotFoundError(
                    "reward 'shapes-proxy' (default weights): " + missing_asset_message("shapes-proxy")
                    + " Or train one with `visalign toy train-proxy --out DIR` and pass path=DIR."
                )
        self.path = str(path)
        self.model = load(self.path).to(device)
        self.model.requires_grad_(False)  # a reward: gradients go to the pixels, not to these weights

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        references: Any,
        metadata: Sequence[dict] | None,
    ) -> RewardOutput:
        from visalign.toy.prompts import parse_prompts

        if images.ndim != 4:
            raise ValueError(f"reward 'shapes-proxy' scores images (B, 3, H, W), not video; got {tuple(images.shape)}")
        b = images.shape[0]
        metas, reasons = parse_prompts(prompts)  # outside the grammar: the proxy never saw such a prompt
        ok = [i for i, m in enumerate(metas) if m is not None]
        device = self.model.pos_emb.device
        nan = torch.full((b,), float("nan"), device=images.device)
        logit, partial = nan.clone(), nan.clone()
        if ok:
            idx = torch.tensor(ok, device=images.device)
            out = self.model(images[idx].to(device), [prompts[i] for i in ok]).float().to(images.device)  # (n, 2)
            # index_put keeps the graph from the chosen images' pixels to their scores
            logit = logit.index_put((idx,), out[:, 0])
            partial = partial.index_put((idx,), torch.sigmoid(out[:, 1]))
        p_strict = torch.sigmoid(logit)
        valid = torch.zeros(b, dtype=torch.bool)
        valid[ok] = True
        return RewardOutput(scores=p_strict, components={"p_strict": p_strict, "logit": logit, "partial": partial},
                            valid=valid, extras={"reason": reasons})
