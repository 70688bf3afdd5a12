"""The ``shapes-artifact`` reward: P(clean) of a toy-world image, a kit-trained artifact classifier.

A binary reward-head ensemble on a small trainable CNN (:class:`visalign.rewards.head.SmallCNN`), trained with
``visalign rewards train shapes-artifact`` on base-model samples of the toy world, clean (label 1)
or with an injected artifact (label 0: blur, over-saturation, a periodic grid, blotches;
:mod:`visalign.toy.artifacts`).  Use it as a held-out judge or a regulariser in evaluation (an
``eval_rewards`` entry) or add it to a training reward with ``combine``: a rise of the trained
reward with a fall of ``shapes-artifact`` flags artifact hacking.  Components: ``uncertainty``
(ensemble std) and ``raw`` (mean logit).  Differentiable.  The default folder is
``shapes-artifact`` of the shipped assets (``$VISALIGN_ASSETS`` overrides the assets folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from visalign.rewards.head import CONFIG_NAME, WEIGHTS_NAME, HeadReward

__all__ = ["ShapesArtifactReward", "default_path"]


def default_path() -> str:
    from visalign.assets import asset_path

    return str(asset_path("shapes-artifact"))


class ShapesArtifactReward(HeadReward):
    """P(clean) from a head trained with the ``shapes-artifact`` recipe (or any binary head: ``path=``)."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu") -> None:
        if path is None:
            from visalign.assets import missing_asset_message

            path = default_path()
            if not all((Path(path) / f).is_file() for f in (CONFIG_NAME, WEIGHTS_NAME)):
                raise FileNotFoundError(
                    "reward 'shapes-artifact' (default weights): " + missing_asset_message("shapes-artifact")
                    + " Or train one with `visalign rewards train shapes-artifact --out DIR` and pass path=DIR.")
        super().__init__(path, device=device, _registered="shapes-artifact")
        if self.model.task != "binary":
            raise ValueError(f"{path} holds a {self.model.task} head; shapes-artifact needs a binary one (P(clean))")
