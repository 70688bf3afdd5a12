"""Every GRPO recipe in configs/ runs one iteration end to end on the tiny model of its family, and
every toy recipe (any algorithm) one iteration on the shipped toy-shapes model.

The model path and the reward weights are pointed at tiny random models; everything else (kernel,
windows, advantages, LoRA targets, multi-reward mode...) is the recipe's own, with the sizes cut
down so an iteration takes seconds on a CPU.
"""

import json
from pathlib import Path

import pytest

from visalign.rewards import parse_spec
from visalign.trainers import build_trainer, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {
    "sd35m/flow_grpo_pickscore.yaml": ("sd3", None),
    "sd35m/flow_grpo_vqascore.yaml": ("sd3", None),
    "flux/flow_grpo_pickscore.yaml": ("flux", "dev"),
    "sd15/ddpo_aesthetic_jpeg.yaml": ("sd", "eps"),
    "wan21/flow_grpo_vqascore_temporal.yaml": ("wan", None),
    "wan22/flow_grpo_pickscore.yaml": ("wan", "a14b"),
    "qwenimage/flow_grpo_pickscore.yaml": ("qwenimage", None),
    "flux2/flow_grpo_clip_pickscore.yaml": ("flux2", None),
}


TOY_RECIPES = sorted(str(p.relative_to(CONFIGS)) for p in (CONFIGS / "toy").glob("*.yaml"))


def _algorithm(path: Path) -> str:
    import yaml

    return str((yaml.safe_load(path.read_text()) or {}).get("algorithm", "grpo"))


def test_every_grpo_recipe_is_covered():
    """Every real-model GRPO recipe is in RECIPES (each other algorithm's test module keeps its own
    list and the same check); every toy recipe runs in the test below whatever its algorithm."""
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
             if p.parent.name not in ("steer", "accelerate") and _algorithm(p) == "grpo"}
    # steering recipes: test_steer_recipes.py; accelerate launch configs: test_sharded.py
    assert "toy/flow_grpo.yaml" in TOY_RECIPES
    assert found - set(TOY_RECIPES) == set(RECIPES)


def _tiny_proxy_ensemble_for(recipe, tmp_path) -> list[str]:
    """A recipe that trains on a shapes-proxy ensemble the user trains first (``path=`` of a folder
    that is not there): a 4-member ensemble trained for a few steps on renderer images (seconds)
    takes its place, so the guards see a real uncertainty; ``[]`` when every path exists."""
    specs = [*recipe.rewards, *recipe.eval_rewards]
    missing = {o["path"] for s in specs for n, o in [parse_spec(s)] if "path" in o and not Path(o["path"]).exists()}
    if not missing:
        return []
    for s in specs:
        name, opts = parse_spec(s)
        assert opts.get("path") not in missing or "shapes-proxy" in (name, opts.get("reward")), (
            f"{s}: only a missing shapes-proxy folder is trained here")
    from visalign.rewards.head_train import load_train_config, train

    out = tmp_path / "proxy_ensemble"
    cfg = load_train_config("shapes-proxy", ["optim.steps=5", "optim.batch=16", "data.options.model=null",
                                             "data.options.renderer=64", "data.options.renderer_eval=32"])
    train(cfg, out=out, log=lambda *a, **k: None)

    def sub(spec: str) -> str:
        for m in missing:
            spec = spec.replace(f"path={m}", f"path={out}")
        return spec

    return [f"rewards={json.dumps({sub(k): v for k, v in recipe.rewards.items()})}",
            f"eval_rewards={json.dumps([sub(s) for s in recipe.eval_rewards])}"]


@pytest.mark.parametrize("recipe_file", TOY_RECIPES)
def test_toy_recipe_runs_one_iteration_on_the_shipped_model(recipe_file, tmp_path):
    """The README's main job as shipped (toy-shapes, the gold verifier, the recipe's own geometry),
    cut to one iteration and a two-prompt evaluation."""
    run = tmp_path / "run"
    overrides = ["run.iterations=1", f"run.run_dir={run}", "data.eval_max_prompts=2", "run.eval_num_steps=2",
                 "run.progress=false", "run.save_sample_grid=false"]
    shipped = load_recipe(CONFIGS / recipe_file)
    if shipped.algorithm == "dpo" and shipped.config.mode == "offline":
        from visalign.toy.pairs import make_pairs  # a small pair folder instead of the recipe's 1,464 labels

        strict = str(shipped.config.pairs).startswith("toy-strict:")  # pass-over-fail pairs only: more samples
        assert make_pairs(tmp_path / "pairs", shipped.model.name, samples_per_prompt=6 if strict else 3,
                          max_prompts=24 if strict else 8, num_steps=4, strict_only=strict, progress=False)["pairs"]
        overrides.append(f"dpo.pairs={tmp_path / 'pairs'}")
        if shipped.config.pairs_options:  # the recipe's source options: through its own scheme, on the small folder
            overrides[-1] = f"dpo.pairs={str(shipped.config.pairs).partition(':')[0]}:{tmp_path / 'pairs'}"
            overrides.append(f"dpo.pairs_options={{samples_per_prompt: {6 if strict else 3}}}")
    overrides += _tiny_proxy_ensemble_for(load_recipe(CONFIGS / recipe_file), tmp_path)
    recipe = load_recipe(CONFIGS / recipe_file, overrides)
    trainer = build_trainer(recipe)
    assert trainer.sampler.family == "toy"
    summary = trainer.train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["reward/valid_fraction"] == 1.0
    assert 0 < rows[0]["reward/mean"] <= 1 and rows[0]["optimizer_steps"] >= 1
    written = "pytorch_lora_weights.safetensors" if recipe.lora is not None else "denoiser.safetensors"  # full FT
    assert summary["final"] and (run / "final" / written).is_file()
    if recipe.guards.kl_gate_quantile is not None:  # the gate sees the ensemble's spread: part of the batch is free
        assert 0 < rows[0]["kl/gated_fraction"] < 1


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from visalign.rewards.vlm_testing import tiny_qwen2vl

    return tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture
def tiny_reward_options(tiny_open_clip, tiny_hf_clip, tiny_dinov2, tiny_aesthetic_head, tiny_vlm):
    oc = {"model": tiny_open_clip.arch, "pretrained": str(tiny_open_clip.weights)}
    return {
        "pickscore": {"model": str(tiny_hf_clip), "processor": str(tiny_hf_clip)},
        "aesthetic": {**oc, "head": str(tiny_aesthetic_head)},
        "clipscore": oc,
        "vqascore": {"model": str(tiny_vlm)},
        "temporal_consistency": {"model": str(tiny_dinov2)},
        "artifact": {},
        "jpeg_compressibility": {},
    }


def _tiny_spec(spec: str, table: dict) -> str:
    name, opts = parse_spec(spec)
    inner = opts.get("reward", name)
    opts.update(table[inner])
    opts.pop("device", None)
    return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


@pytest.mark.parametrize("recipe_file", sorted(RECIPES))
def test_recipe_runs_one_iteration(recipe_file, tiny_model_dir, tiny_reward_options, tmp_path):
    family, variant = RECIPES[recipe_file]
    recipe = load_recipe(CONFIGS / recipe_file)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    rewards = {_tiny_spec(s, tiny_reward_options): w for s, w in recipe.rewards.items()}
    eval_rewards = [_tiny_spec(s, tiny_reward_options) for s in recipe.eval_rewards]
    options = dict(recipe.model.options)
    options.update({k: v for k, v in {"max_sequence_length": 8, "num_frames": 5}.items() if k in options})
    overrides = [
        f"model.name={tiny_model_dir(family, variant)}", "model.dtype=float32", "model.device=cpu",
        "model.height=32", "model.width=32", f"model.options={json.dumps(options)}",
        f"data.train={prompts}", f"data.eval={prompts}", "data.eval_max_prompts=1",
        f"rewards={json.dumps(rewards)}", f"eval_rewards={json.dumps(eval_rewards)}", "reward_options={}",
        "grpo.group_size=2", "grpo.prompts_per_iteration=2", "grpo.train_batch_size=2", "grpo.gradient_accumulation=1",
        f"grpo.num_steps={min(recipe.config.num_steps, 4)}", "grpo.sde_window_size=2",
        *([f"grpo.sde_window_end={min(recipe.config.sde_window_end, 4)}"] if recipe.config.sde_window_end else []),
        "run.iterations=1", f"run.run_dir={tmp_path / 'run'}", "run.eval_num_steps=2", "run.mixed_precision=fp32",
        "run.trackers=[]", "run.progress=false",
    ]
    recipe = load_recipe(CONFIGS / recipe_file, overrides)
    trainer = build_trainer(recipe)
    assert trainer.sampler.family == family
    summary = trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["iteration"] == 1
    assert rows[0]["reward/valid_fraction"] > 0
    assert summary["final"] and (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.png").is_file() and (tmp_path / "run" / "eval.json").is_file()
