"""Model families and built-in model names: the registries ``visalign.samplers.load`` reads.

Kept apart from :mod:`visalign.samplers` (which re-exports them) so that a plug-in registers a
family or a model name without importing torch or the sampler layer.
"""

from __future__ import annotations

from pathlib import Path

from visalign.assets import asset_path
from visalign.registry import Registry

__all__ = ["FAMILIES", "BUILTIN_MODELS", "register_family", "register_model", "builtin_model_path"]

#: pipeline class in model_index.json (its ``_class_name``) -> Entry(Sampler class, family=...);
#: short targets (``"sd:SDSampler"``) name modules of visalign.samplers.families
FAMILIES = Registry("model family", plural="model families", package="visalign.samplers.families", unique=True)
#: built-in model names -> Entry(folder, hint=...): the folder is under the assets folder
#: (:mod:`visalign.assets`) when relative; ``hint`` says how to make it when it is missing
BUILTIN_MODELS = Registry("built-in model", unique=True)


def register_family(pipeline_class: str, family: str, sampler: str | type) -> None:
    """Load folders whose ``model_index.json`` names ``pipeline_class`` with ``sampler`` (a
    :class:`visalign.samplers.Sampler` subclass or an absolute ``"package.module:Class"``), as family ``family``.

    The class is built as ``Sampler(pipe, name=..., **options)`` from the diffusers pipeline, or,
    when it defines a ``from_folder(path, dtype=, device=, name=, **options)`` classmethod, from
    the folder itself (a model that is not a diffusers pipeline)."""
    FAMILIES.register(pipeline_class, sampler, family=family)


def register_model(name: str, folder: str, *, hint: str = "") -> None:
    """Make ``name`` a built-in model name for ``load(name)``: ``folder`` (relative: under the
    assets folder) holds its ``model_index.json``; ``hint`` tells how to make a missing folder."""
    BUILTIN_MODELS.register(name, folder, hint=hint)


register_family("StableDiffusionPipeline", "sd", "sd:SDSampler")
register_family("StableDiffusionXLPipeline", "sdxl", "sd:SDXLSampler")
register_family("StableDiffusion3Pipeline", "sd3", "sd3:SD3Sampler")
register_family("FluxPipeline", "flux", "flux:FluxSampler")
register_family("WanPipeline", "wan", "wan:WanSampler")
register_family("QwenImagePipeline", "qwenimage", "qwenimage:QwenImageSampler")
register_family("Flux2Pipeline", "flux2", "flux2:Flux2Sampler")


def builtin_model_path(name: str) -> Path:
    """The folder of the built-in model ``name`` (whether or not it exists)."""
    folder = Path(BUILTIN_MODELS.entry(name).target)
    return folder if folder.is_absolute() else asset_path(str(folder))
