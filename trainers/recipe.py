"""Training recipes: one YAML file -> a typed :class:`TrainRecipe` -> a ready trainer.

```yaml
algorithm: grpo                     # a registered algorithm (visalign.trainers.registry)
model: {name: toy-shapes, dtype: float32, device: cpu}
data: {train: toy:train, eval: toy:eval, eval_max_prompts: 64}
rewards: {shapes: 1.0}              # trained on: name or spec -> weight
eval_rewards: [shapes, artifact]    # evaluated (may include rewards not trained on)
lora: {rank: 8, alpha: 16}          # null = full fine-tuning
grpo: {group_size: 8, ...}          # the algorithm's config, under its own name
run: {run_dir: runs/toy, iterations: 60, ...}   # RunSettings
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from visalign.config import ConfigError, apply_overrides, from_dict, read_yaml

from . import registry
from .common.guards import GuardSettings
from .common.lora import LoraSettings
from .common.refresh import RefreshSettings
from .common.run import RunSettings

__all__ = ["TrainRecipe", "ModelSection", "DataSection", "build_trainer", "load_recipe"]


@dataclass
class ModelSection:
    #: built-in name, local diffusers folder or hub id
    name: str = "toy-shapes"
    #: weights' dtype: float32, bfloat16, float16
    dtype: str = "float32"
    #: cpu, cuda, cuda:1 ...
    device: str = "cpu"
    #: family adapter options, e.g. {max_sequence_length: 128, num_frames: 33}
    options: dict[str, Any] = field(default_factory=dict)
    #: generation size in pixels (None = the model's default)
    height: int | None = None
    width: int | None = None
    #: recompute each block of the denoiser in backward instead of keeping its activations
    #: (diffusers' ``enable_gradient_checkpointing``): activation memory down to the blocks' inputs
    #: for about one more forward pass of compute; `visalign plan` shows both
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    #: prompt source (visalign.prompts): toy:train, a .txt (one prompt per line), a .jsonl or .json
    #: (prompt [+ task metadata such as GenEval's tag / include]) file; null for an algorithm that
    #: trains on a dataset of its own (offline DPO's pairs)
    train: str | None = "toy:train"
    eval: str | None = "toy:eval"
    #: evaluate on the first N eval prompts (None = all)
    eval_max_prompts: int | None = None
    #: draw training prompts equally from each value of this metadata field (e.g. "tag": GenEval's
    #: categories); None draws every prompt equally
    balance_by: str | None = None


@dataclass
class TrainRecipe:
    #: the algorithm (`visalign train --list` / visalign.trainers.registry); its settings go under
    #: a section of the same name
    algorithm: str = "grpo"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    eval_rewards: list[str] = field(default_factory=list)
    #: options passed to every reward (device, dtype, model paths), e.g. {device: cuda}
    reward_options: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    run: RunSettings = field(default_factory=RunSettings)
    #: hacking guards: gated KL, adaptive reference, held-out alarm (trainers/common/guards.py)
    guards: GuardSettings = field(default_factory=GuardSettings)
    #: reward refresh in the loop: the trained reward head keeps learning from a judge's labels of
    #: the policy's samples (trainers/common/refresh.py); every: 0 = off
    reward_refresh: RefreshSettings = field(default_factory=RefreshSettings)
    #: the algorithm's config (built from the section named like the algorithm)
    config: Any = None


def load_recipe(path, overrides=()) -> TrainRecipe:
    """Read a recipe, apply ``key=value`` overrides and build the typed recipe; the algorithm's
    section is checked against its registered config class."""
    data = apply_overrides(read_yaml(path), overrides)
    if "distributed_type" in data and "algorithm" not in data:
        raise ConfigError(f"{path} is an accelerate launch config, not a training recipe: pass it to accelerate, "
                          f"accelerate launch --config_file {path} -m visalign train RECIPE (docs/scaling.md)")
    name = data.pop("algorithm", "grpo")
    try:
        algo = registry.get(str(name))
    except ValueError as err:
        raise ConfigError(f"algorithm: {err}") from None
    others = [k for k in data if k != algo.name and k in {a.name for a in registry.available()}]
    if others:
        raise ConfigError(f"section {others[0]!r} belongs to algorithm {others[0]!r} but this recipe's algorithm is "
                          f"{algo.name!r}: rename the section to {algo.name!r} or set algorithm: {others[0]}")
    if "config" in data:
        raise ConfigError(f"unknown key 'config': put the algorithm's settings under '{algo.name}:'")
    section = data.pop(algo.name, None) or {}
    recipe = from_dict(TrainRecipe, data)
    recipe.algorithm = algo.name
    config_cls = algo.config_class
    if hasattr(config_cls, "from_section"):  # a section whose keys choose the config class (dpo.mode)
        recipe.config = config_cls.from_section(section, where=algo.name)
    else:
        recipe.config = from_dict(config_cls, section, where=algo.name)
    return recipe


def build_trainer(recipe: TrainRecipe, accelerator=None):
    """Load the model, LoRA, rewards and prompts of a recipe and return its algorithm's trainer."""
    import torch

    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.prompts import load_prompts

    from .common.data import balance
    from .common.lora import add_lora

    algo = registry.get(recipe.algorithm)
    trainer_cls = algo.trainer_class
    if getattr(trainer_cls, "needs_rewards", False) and not recipe.rewards:
        raise ValueError(f"rewards: algorithm {recipe.algorithm!r} trains on rewards; give at least one, e.g. {{shapes: 1.0}}")
    m = recipe.model
    sampler = vs.load(m.name, dtype=m.dtype, device=m.device, **m.options)
    if m.gradient_checkpointing:
        if not getattr(sampler.denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing: the {sampler.family} denoiser "
                             f"({type(sampler.denoiser).__name__}) does not support gradient checkpointing")
        sampler.denoiser.enable_gradient_checkpointing()
    torch.manual_seed(recipe.run.seed)  # LoRA's A matrices: the same on every process
    trainable = add_lora(sampler, recipe.lora) if recipe.lora is not None else None
    rewards = {spec: (vr.load(spec, shared=recipe.reward_options), w) for spec, w in recipe.rewards.items()}
    eval_rewards = {spec: (rewards[spec][0] if spec in rewards else vr.load(spec, shared=recipe.reward_options))
                    for spec in recipe.eval_rewards}
    train = load_prompts(recipe.data.train) if recipe.data.train else []
    if recipe.data.balance_by:
        train = balance(train, recipe.data.balance_by)
    evals = load_prompts(recipe.data.eval)[: recipe.data.eval_max_prompts] if recipe.data.eval else []
    log = {"model": asdict(recipe.model), "data": asdict(recipe.data), "rewards": recipe.rewards,
           "eval_rewards": recipe.eval_rewards, "lora": asdict(recipe.lora) if recipe.lora else None,
           "guards": asdict(recipe.guards)}
    refresher = None
    if recipe.reward_refresh.every:
        from .common.refresh import build_refresher

        log["reward_refresh"] = asdict(recipe.reward_refresh)
        refresher = build_refresher(recipe.reward_refresh, rewards, recipe.reward_options)
    extra = {"reward_refresh": refresher} if refresher is not None else {}
    return trainer_cls.from_parts(
        sampler, recipe.config, rewards=rewards, train_prompts=train, eval_prompts=evals, eval_rewards=eval_rewards,
        run=recipe.run, trainable=trainable, accelerator=accelerator, log_config=log, guards=recipe.guards,
        size={k: v for k, v in (("height", m.height), ("width", m.width)) if v}, **extra)
