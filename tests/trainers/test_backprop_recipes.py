"""Every reward back-propagation recipe in configs/ for a real model runs one iteration end to end on
the tiny model of its family, with its reward(s) on tiny backbones (the toy recipe runs on the
shipped toy-shapes model in test_recipes.py, like every toy recipe).

The model path and the reward weights are pointed at tiny random models; everything else (method,
K, AlignProp's range, ReFL's window and target, DRaFT-LV's n, guidance, LoRA, checkpointing,
the reward weights) is the recipe's own, with the sizes cut down so an iteration takes seconds.
"""

import json
from pathlib import Path

import pytest

from visalign.rewards import parse_spec
from visalign.trainers import build_trainer, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {
    "sd15/alignprop_aesthetic.yaml": ("sd", "eps"),
    "sdxl/draft_lv_hpsv2.yaml": ("sdxl", None),
    "sd35m/refl_pickscore.yaml": ("sd3", None),
    "flux/draft_hpsv2.yaml": ("flux", "dev"),
    "wan21/draft_frames_hpsv2.yaml": ("wan", None),
}


def _algorithm(path: Path) -> str:
    import yaml

    return str((yaml.safe_load(path.read_text()) or {}).get("algorithm", "grpo"))


def test_every_backprop_recipe_is_covered():
    """Every real-model recipe of algorithm backprop is in RECIPES; the toy one exists (it runs in
    test_recipes.py with the other toy recipes)."""
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if _algorithm(p) == "backprop"}
    toy = {f for f in found if f.startswith("toy/")}
    assert toy == {"toy/reward_backprop.yaml", "toy/reward_backprop_guarded.yaml", "toy/reward_backprop_refresh.yaml"}
    assert found - toy == set(RECIPES)
    methods = {load_recipe(CONFIGS / f).config.method for f in found}
    assert methods == {"draft", "draft_lv", "alignprop", "refl"}  # every method has a recipe


@pytest.fixture
def tiny_reward_options(tiny_open_clip, tiny_hf_clip, tiny_dinov2, tiny_aesthetic_head):
    oc = {"model": tiny_open_clip.arch, "pretrained": str(tiny_open_clip.weights)}
    return {
        "pickscore": {"model": str(tiny_hf_clip), "processor": str(tiny_hf_clip)},
        "hpsv2": {"checkpoint": str(tiny_open_clip.hps_weights), "model": tiny_open_clip.arch},
        "aesthetic": {**oc, "head": str(tiny_aesthetic_head)},
        "clipscore": oc,
        "temporal_consistency": {"model": str(tiny_dinov2)},
        "artifact": {},
    }


def _tiny_spec(spec: str, table: dict) -> str:
    name, opts = parse_spec(spec)
    opts.update(table[opts.get("reward", name)])
    return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


@pytest.mark.parametrize("recipe_file", sorted(RECIPES))
def test_recipe_runs_one_iteration(recipe_file, tiny_model_dir, tiny_reward_options, tmp_path):
    family, variant = RECIPES[recipe_file]
    recipe = load_recipe(CONFIGS / recipe_file)
    c = recipe.config
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    rewards = {_tiny_spec(s, tiny_reward_options): w for s, w in recipe.rewards.items()}
    eval_rewards = [_tiny_spec(s, tiny_reward_options) for s in recipe.eval_rewards]
    options = dict(recipe.model.options)
    options.update({k: v for k, v in {"max_sequence_length": 8, "num_frames": 5}.items() if k in options})
    steps = min(c.num_steps, 4)
    overrides = [
        f"model.name={tiny_model_dir(family, variant)}", "model.dtype=float32", "model.device=cpu",
        "model.height=32", "model.width=32", f"model.options={json.dumps(options)}",
        f"data.train={prompts}", f"data.eval={prompts}", "data.eval_max_prompts=1",
        f"rewards={json.dumps(rewards)}", f"eval_rewards={json.dumps(eval_rewards)}", "reward_options={}",
        "backprop.batch_size=2", "backprop.gradient_accumulation=1", f"backprop.num_steps={steps}",
        f"backprop.grad_steps={min(c.grad_steps, steps)}",
        "run.iterations=1", f"run.run_dir={tmp_path / 'run'}", "run.eval_num_steps=2", "run.mixed_precision=fp32",
        "run.trackers=[]", "run.progress=false",
    ]
    if c.method == "refl":  # keep the recipe's "last quarter" window inside the shortened chain
        overrides += [f"backprop.refl_first_step={steps - 1}", f"backprop.refl_last_step={steps - 1}"]
    recipe = load_recipe(CONFIGS / recipe_file, overrides)
    trainer = build_trainer(recipe)
    assert trainer.sampler.family == family and trainer.algorithm == "backprop"
    before = [p.detach().clone() for p in trainer.params]
    summary = trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["iteration"] == 1
    assert rows[0]["reward/valid_fraction"] == 1.0 and rows[0]["optimizer_steps"] == 1
    assert rows[0]["grad_norm"] > 0  # the reward's gradient reached the weights through decoder and steps
    assert any(not (a == p.detach()).all() for a, p in zip(before, trainer.params))
    assert summary["final"] and (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.png").is_file() and (tmp_path / "run" / "eval.json").is_file()
