"""Every DPO recipe in configs/ for a real model runs one iteration end to end on the tiny model of
its family: the dataset recipes on a tiny Pick-a-Pic parquet (or a folder of video pairs) built
here, the online recipe with its reward on tiny backbones.  Everything but the sizes, the paths
and the model is the recipe's own (beta, time density and shift, caption dropout, flips, LoRA...).
The toy recipes run in test_recipes.py's generic toy test."""

import json
from pathlib import Path

import numpy as np
import pytest

from visalign.rewards import parse_spec
from visalign.trainers import build_trainer, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: recipe -> (family, variant, data: "parquet" / "video" / None for online)
RECIPES = {
    "sd15/diffusion_dpo_pickapic.yaml": ("sd", "eps", "parquet"),
    "sdxl/diffusion_dpo_pickapic.yaml": ("sdxl", None, "parquet"),
    "sd35m/flow_dpo_pickapic.yaml": ("sd3", None, "parquet"),
    "sd35m/dpo_online_pickscore.yaml": ("sd3", None, None),
    "wan21/flow_dpo_video_pairs.yaml": ("wan", None, "video"),
    "wan22/flow_dpo_video_pairs.yaml": ("wan", "ti2v", "video"),
    "qwenimage/flow_dpo_pickapic.yaml": ("qwenimage", None, "parquet"),
    "flux2/flow_dpo_pickapic.yaml": ("flux2", None, "parquet"),
}


def _algorithm(path: Path) -> str:
    import yaml

    return str((yaml.safe_load(path.read_text()) or {}).get("algorithm", "grpo"))


def test_every_dpo_recipe_is_covered():
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if _algorithm(p) == "dpo"}
    toy = {f for f in found if f.startswith("toy/")}
    assert {"toy/dpo_offline.yaml", "toy/dpo_online.yaml"} <= toy
    assert found - toy == set(RECIPES)


def _video_pairs(root: Path, n: int = 3, frames: int = 5) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for side in "ab":
            d = root / f"{i}{side}"
            d.mkdir(parents=True)
            for f in range(frames):
                Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(d / f"{f:03d}.png")
        rows.append({"prompt": f"a video {i}", "chosen": f"{i}a", "rejected": f"{i}b"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def tiny_reward_options(tiny_open_clip, tiny_hf_clip, tiny_dinov2, tiny_aesthetic_head):
    oc = {"model": tiny_open_clip.arch, "pretrained": str(tiny_open_clip.weights)}
    return {"pickscore": {"model": str(tiny_hf_clip), "processor": str(tiny_hf_clip)},
            "aesthetic": {**oc, "head": str(tiny_aesthetic_head)}, "clipscore": oc, "artifact": {},
            "temporal_consistency": {"model": str(tiny_dinov2)}}


def _tiny_spec(spec: str, table: dict) -> str:
    name, opts = parse_spec(spec)
    opts.update(table[opts.get("reward", name)])
    opts.pop("device", None)
    return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


@pytest.mark.parametrize("recipe_file", sorted(RECIPES))
def test_dpo_recipe_runs_one_iteration(recipe_file, tiny_model_dir, tiny_reward_options, tmp_path):
    from test_dpo import pickapic_parquet

    family, variant, data = RECIPES[recipe_file]
    recipe = load_recipe(CONFIGS / recipe_file)
    c = recipe.config
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    options = dict(recipe.model.options)
    options.update({k: v for k, v in {"max_sequence_length": 8, "num_frames": 5}.items() if k in options})
    overrides = [
        f"model.name={tiny_model_dir(family, variant)}", "model.dtype=float32", "model.device=cpu",
        "model.height=32", "model.width=32", f"model.options={json.dumps(options)}",
        f"data.eval={prompts}", "data.eval_max_prompts=1", "reward_options={}",
        f"eval_rewards={json.dumps([_tiny_spec(s, tiny_reward_options) for s in recipe.eval_rewards])}",
        "dpo.train_batch_size=2", "dpo.gradient_accumulation=1",
        "run.iterations=1", f"run.run_dir={tmp_path / 'run'}", "run.eval_num_steps=2", "run.mixed_precision=fp32",
        "run.trackers=[]", "run.progress=false",
    ]
    if data is None:
        assert c.mode == "online" and recipe.rewards
        rewards = {_tiny_spec(s, tiny_reward_options): w for s, w in recipe.rewards.items()}
        overrides += [f"data.train={prompts}", f"rewards={json.dumps(rewards)}", "dpo.group_size=2",
                      "dpo.prompts_per_iteration=2", f"dpo.num_steps={min(c.num_steps, 3)}"]
    else:
        assert c.mode == "offline" and not recipe.rewards
        pairs = (pickapic_parquet(tmp_path / "pickapic" / "train-00000.parquet", [1, 0, 0.5, 1, 0])
                 if data == "parquet" else _video_pairs(tmp_path / "video_pairs"))
        overrides += [f"dpo.pairs={pairs.parent if data == 'parquet' else pairs}",
                      f"dpo.latent_cache={tmp_path / 'cache'}", "dpo.num_workers=0"]
        if c.resolution is not None:
            overrides.append("dpo.resolution=32")
        if c.num_frames is not None:
            overrides.append("dpo.num_frames=5")
    recipe = load_recipe(CONFIGS / recipe_file, overrides)
    trainer = build_trainer(recipe)
    assert trainer.sampler.family == family
    summary = trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["optimizer_steps"] >= 1 and rows[0]["pairs"] >= 1
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # model == reference at the first step
    assert summary["final"]
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "metrics.png").is_file()
    if data == "parquet":
        assert trainer.cache.manifest["ties"] == 1 and len(trainer.cache) == 4
