"""Training recipes: one YAML file -> a typed :class:`TrainRecipe` -> a ready trainer.

```yaml
algorithm: grpo
model: {name: toy-shapes, dtype: float32, device: cpu}
data: {train: toy:train, eval: toy:eval, eval_max_prompts: 64}
rewards: {shapes: 1.0}              # trained on: name or spec -> weight
eval_rewards: [shapes, artifact]    # evaluated (may include rewards not trained on)
lora: {rank: 8, alpha: 16}          # null = full fine-tuning
grpo: {group_size: 8, ...}          # GRPOConfig
run: {run_dir: runs/toy, iterations: 60, ...}   # RunSettings
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from visalign.config import load_config

from .common.lora import LoraSettings
from .common.run import RunSettings
from .grpo.config import GRPOConfig

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


@dataclass
class DataSection:
    #: toy:train, a .txt (one prompt per line) or a .jsonl (prompt [+ GenEval metadata]) file
    train: str = "toy:train"
    eval: str | None = "toy:eval"
    #: evaluate on the first N eval prompts (None = all)
    eval_max_prompts: int | None = None
    #: draw training prompts equally from each value of this metadata field (e.g. "tag": GenEval's
    #: categories); None draws every prompt equally
    balance_by: str | None = None


@dataclass
class TrainRecipe:
    algorithm: str = "grpo"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    eval_rewards: list[str] = field(default_factory=list)
    #: options passed to every reward (device, dtype, model paths), e.g. {device: cuda}
    reward_options: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if self.algorithm != "grpo":
            raise ValueError(f"algorithm {self.algorithm!r} is not available yet; this version trains 'grpo'")
        if not self.rewards:
            raise ValueError("rewards: give at least one reward to train on, e.g. {shapes: 1.0}")


def _load_reward(spec: str, shared: dict):
    """Build a reward, passing it only the shared options (device, dtype...) its factory takes."""
    import visalign.rewards as vr
    from visalign.rewards.registry import factory_parameters

    name, _ = vr.parse_spec(spec)
    accepted = factory_parameters(name)
    opts = shared if accepted is None else {k: v for k, v in shared.items() if k in accepted}
    return vr.load(spec, **opts)


def load_recipe(path, overrides=()) -> TrainRecipe:
    return load_config(path, TrainRecipe, overrides)


def build_trainer(recipe: TrainRecipe, accelerator=None):
    """Load the model and rewards of a recipe and return a GRPOTrainer."""
    import visalign.rewards as vr
    import visalign.samplers as vs

    from .common.data import load_prompts
    from .common.lora import add_lora
    from .grpo.trainer import GRPOTrainer

    m = recipe.model
    sampler = vs.load(m.name, dtype=m.dtype, device=m.device, **m.options)
    import torch

    torch.manual_seed(recipe.run.seed)  # LoRA's A matrices: the same on every process
    trainable = add_lora(sampler, recipe.lora) if recipe.lora is not None else None
    rewards = {spec: (_load_reward(spec, recipe.reward_options), w) for spec, w in recipe.rewards.items()}
    eval_rewards = {spec: (rewards[spec][0] if spec in rewards else _load_reward(spec, recipe.reward_options))
                    for spec in recipe.eval_rewards}
    train = load_prompts(recipe.data.train)
    if recipe.data.balance_by:
        from .common.data import balance

        train = balance(train, recipe.data.balance_by)
    evals = load_prompts(recipe.data.eval)[: recipe.data.eval_max_prompts] if recipe.data.eval else []
    return GRPOTrainer(sampler, rewards, recipe.grpo, train_prompts=train, eval_prompts=evals,
                       eval_rewards=eval_rewards, run=recipe.run, trainable=trainable, accelerator=accelerator,
                       log_config={"model": asdict(recipe.model), "data": asdict(recipe.data),
                                   "rewards": recipe.rewards, "eval_rewards": recipe.eval_rewards,
                                   "lora": asdict(recipe.lora) if recipe.lora else None},
                       size={k: v for k, v in (("height", m.height), ("width", m.width)) if v})
