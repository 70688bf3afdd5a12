"""Every steering recipe in configs/steer/ runs: the toy recipes end to end through `visalign steer`
on the shipped toy-shapes model (their own reward, shapes-proxy), the real-model recipes one image
on the tiny model of their family (the reward swapped for brightness, the sizes cut down,
everything else the recipe's own).  Also the command line's files and errors."""

import json
from pathlib import Path

import pytest
import torch
from tests_support import Brightness

from visalign.cli import main
from visalign.config import load_config
from visalign.steering import SteerConfig, steer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "steer"
RECIPES = {
    "sd15_fk_imagereward.yaml": ("sd", "eps"),
    "sdxl_bon_pickscore.yaml": ("sdxl", None),
    "sd35m_fk_pickscore.yaml": ("sd3", None),
    "flux_guidance_hpsv2.yaml": ("flux", "dev"),
    "wan21_fk_vqascore.yaml": ("wan", None),
}
TOY = sorted(p.name for p in CONFIGS.glob("toy_*.yaml"))


def test_every_steer_recipe_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(RECIPES) | set(TOY)
    assert {"toy_fk.yaml", "toy_bon.yaml", "toy_guidance.yaml", "toy_fk_guidance.yaml", "toy_search.yaml"} <= set(TOY)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_real_model_recipe_steers_one_image_on_its_tiny_model(recipe, tiny_model_dir, tmp_path):
    import visalign.samplers as vs

    family, variant = RECIPES[recipe]
    path = tiny_model_dir(family, variant)
    over = [f"model.name={path}", "model.dtype=null", "model.device=null", "steps=3", "particles=2",
            "model.height=32", "model.width=32", "reward_options={}", f"run.out={tmp_path}"]
    if family == "wan":
        over.append("model.num_frames=5")
    cfg = load_config(CONFIGS / recipe, SteerConfig, over)
    options = {"max_sequence_length": 8} if family in ("sd3", "flux", "wan") else {}
    sampler = vs.load(str(path), **options)
    res = steer(sampler, ["a red cube"], Brightness(), cfg, guidance_reward=Brightness(), keep_history=True)
    assert res.method == cfg.method and len(res.items) == 1 and torch.isfinite(res.rewards).all()
    assert res.compute["denoiser_calls"] > 0 and res.items[0].history


@pytest.mark.parametrize("recipe", TOY)
def test_toy_recipe_runs_through_the_command_line(recipe, tmp_path):
    out = tmp_path / "out"
    rc = main(["steer", str(CONFIGS / recipe), "fk.resample_start=0", "fk.resample_end=1", "--prompt",
               "a red square and a blue circle", "--steps", "3", "--out", str(out), "--threads", "1"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    cfg = load_config(out / "config.yaml", SteerConfig)
    assert row["method"] == cfg.method and row["reward_spec"] == "shapes-proxy" and 0 <= row["reward"] <= 1
    assert set(row["compute"]) >= {"denoiser_calls", "reward_calls", "denoiser_grad_calls", "seconds"}
    rounds = cfg.search.rounds if cfg.method == "search" else 1
    ahead = sum(min(cfg.fk.lookahead, 3 - (i + 1)) for i in cfg.fk.resample_steps(3)) if cfg.method.startswith("fk") else 0
    # (rounds x) k x (steps + look-ahead steps) x (cond + uncond)
    assert row["compute"]["denoiser_calls"] == rounds * cfg.particles * (3 + ahead) * 2
    assert len(row["particle_rewards"]) == cfg.particles and row["settings"]["num_steps"] == 3
    assert (out / row["file"]).is_file() and (out / row["grid"]).is_file()
    if cfg.method.startswith("fk"):
        assert [e["step"] for e in row["lineage"]][:2] == [0, 1] and len(row["origin"]) == cfg.particles
        assert all(len(e["parents"]) == cfg.particles for e in row["lineage"])


def test_cli_flags_override_the_recipe_and_images_per_prompt(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\ntwo squares\n")
    rc = main(["steer", "--model", "toy-shapes", "--prompts", str(prompts), "--method", "bon", "--reward", "shapes",
               "--particles", "3", "--steps", "2", "--seed", "7", "--images-per-prompt", "2", "--out", str(tmp_path / "o"),
               "--threads", "1", "--no-grid"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert [r["job"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows][::2] == ["a circle", "two squares"]
    assert rows[0]["seeds"] == [7, 8, 9] and rows[1]["seeds"] == [10, 11, 12]
    assert all(r["reward"] == max(r["particle_rewards"]) for r in rows) and "grid" not in rows[0]


@pytest.mark.parametrize("argv,message", [
    (["--method", "fkk", "--prompt", "a circle"], "Did you mean 'fk'"),
    (["--method", "guidance", "--reward", "shapes", "--prompt", "a circle"], "differentiable"),
    (["--method", "fk"], "no prompts"),
    (["--prompts", "/no/such/prompts.txt"], "no such file"),
    (["fk.potential=maximum", "--prompt", "a circle"], "potential must be one of"),
])
def test_cli_errors_teach(argv, message, tmp_path, capsys):
    over = [a for a in argv if "=" in a]
    rest = [a for a in argv if "=" not in a]
    rc = main(["steer", *over, "--model", "toy-shapes", "--steps", "2", "--out", str(tmp_path), "--threads", "1", *rest])
    assert rc == 2
    assert message in capsys.readouterr().err
