"""The toy world as a plug-in: it registers itself through visalign's public registries.

:func:`register` is what a package of yours would write to add a model, rewards and data to
visalign (docs/architecture.md, "Plug-ins").  It is declared as an entry point of the group
``visalign.plugins`` (pyproject.toml) and, being a ``plugin.py`` inside visalign, also loaded from a
source checkout; either way the first lookup in any registry calls it once.  It imports no model
code: every target is a ``"module:attr"`` string imported when first used.

What it registers:

- the model family ``toy`` (``ToyShapesPipeline`` folders, :mod:`visalign.toy.family`) and the
  built-in models ``toy-shapes`` and ``toy-shapes-cn`` (folders of the shipped assets);
- the prompt source ``toy`` (``toy:train``, ``toy:eval``...: :func:`visalign.toy.prompts.records`);
- the pair sources ``toy`` and ``toy-strict`` (``toy:DIR``: pairs of the base model labelled by the
  gold verifier, :mod:`visalign.toy.pairs`);
- the rewards ``shapes`` (gold verifier), ``shapes-proxy`` (learned, differentiable) and
  ``shapes-artifact`` (artifact classifier);
- the trainable reward-head backbone ``shapes-proxy`` and the reward-training data providers
  ``shapes-proxy`` and ``shapes-artifact`` (``visalign rewards train shapes-proxy``).
"""

from __future__ import annotations

__all__ = ["register"]

_PRETRAIN_HINT = "Or pass --model DIR, a toy-shapes folder saved by `python -m visalign.toy.pretrain --out DIR`."


def register() -> None:
    """Register the toy world's model, data and rewards (idempotent)."""
    from visalign.models import register_family, register_model
    from visalign.pairs import register_pair_source
    from visalign.prompts import register_source
    from visalign.rewards import RewardInfo
    from visalign.rewards import register as register_reward
    from visalign.rewards.head import register_backbone
    from visalign.rewards.head_train import register_provider

    register_family("ToyShapesPipeline", "toy", "visalign.toy.family:ToySampler")
    # the base model and its second base, tuned on near-miss captions so that it follows prompts
    # unreliably (docs/toy_world.md, "The second base")
    register_model("toy-shapes", "toy-shapes", hint=_PRETRAIN_HINT)
    register_model("toy-shapes-cn", "toy-shapes-cn", hint=_PRETRAIN_HINT)

    register_source("toy", "visalign.toy.prompts:records",
                    description="the shapes world's splits (train, eval...) with GenEval metadata")
    register_pair_source("toy", "visalign.toy.pairs:ensure_pairs",
                         description="base-model samples ranked by the gold verifier, made in DIR when missing")
    register_pair_source("toy-strict", "visalign.toy.pairs:ensure_strict_pairs",
                         description="as toy:, keeping only strict-pass over strict-fail pairs")

    ip = ("images", "prompts")
    register_reward(RewardInfo(
        "shapes", "1", "none", "image", ip, (0.0, 1.0), weights="none",
        description="toy-world gold verifier: colour segmentation + shape moments, GenEval clauses (partial credit or strict)"),
        "visalign.toy.shapes_reward:ShapesReward")
    register_reward(RewardInfo(
        name="shapes-proxy", version="1", licence="none", modality="image", inputs=ip, native_range=(0.0, 1.0),
        differentiable=True, weights="assets/shapes-proxy (trained by `visalign rewards train shapes-proxy`)",
        description="toy-world learned proxy of the gold verifier: head ensemble on a prompt-conditioned CNN, "
                    "P(strict pass), uncertainty; differentiable"),
        "visalign.toy.proxy_reward:ShapesProxyReward")
    register_reward(RewardInfo(
        name="shapes-artifact", version="1", licence="none", modality="image", inputs=("images",),
        native_range=(0.0, 1.0), differentiable=True,
        weights="assets/shapes-artifact (trained by `visalign rewards train shapes-artifact`)",
        description="toy-world artifact reward: P(clean) from a head ensemble on a small CNN, trained on base "
                    "samples with injected blur / saturation / grid / blotches"),
        "visalign.toy.artifact_reward:ShapesArtifactReward")

    register_backbone("shapes-proxy", "visalign.toy.proxy:ProxyBackbone")
    register_provider("shapes-proxy", "visalign.toy.proxy:training_data")
    register_provider("shapes-artifact", "visalign.toy.artifacts:training_data")
