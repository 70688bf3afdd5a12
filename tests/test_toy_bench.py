"""bench/toy_alignment.py end to end on the shipped toy model, cut to seconds: a budget of about
two seconds per training row, six eval prompts x one sample, the base, the oracle (batch 4), one
training row and one steering row."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "toy_alignment.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("toy_alignment_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_every_toy_recipe_is_a_bench_row(bench):
    """Each toy training recipe has its row (so the bench ranks every algorithm the toy world ships)."""
    recipes = {r.recipe for r in bench.ROWS}
    for path in sorted((BENCH.parent.parent / "configs" / "toy").glob("*.yaml")):
        assert f"configs/toy/{path.name}" in recipes, path.name
    for r in bench.ROWS:
        assert r.recipe is None or (BENCH.parent.parent / r.recipe).is_file(), r.recipe


def test_eval_prompts_all_or_balanced(bench):
    from visalign.toy.prompts import TAGS, split

    assert bench.eval_prompts(None) == split("eval")  # `visalign toy eval`'s prompts, in its order
    six = bench.eval_prompts(6)
    assert sorted(m["tag"] for m in six) == sorted(TAGS)
    assert len({m["prompt"] for m in bench.eval_prompts(40)}) == 40
    with pytest.raises(ValueError, match="--eval-prompts"):
        bench.eval_prompts(0)


@pytest.mark.slow  # about 35 s: four rows, each loading the model and the proxy
def test_bench_end_to_end_resumes_and_reruns_one_row(bench, tmp_path):
    out = tmp_path / "bench"
    budget = 0.03  # minutes: 1.8 s of iterations per training row
    common = ["--out", str(out), "--budget-minutes", str(budget), "--fractions", "0.5", "1", "--eval-prompts", "6",
              "--eval-samples", "1", "--set", "reward_backprop:backprop.batch_size=2", "--set", "oracle:batch=4"]
    rows = ["base", "oracle", "reward_backprop", "bon4"]
    first = bench.main(common + ["--only", *rows])
    assert first["ran"] == rows and first["skipped"] == []
    for f in ("table.md", "table.json", "curve.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = {r["name"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert list(table) == rows
    md = (out / "table.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and "6 eval prompts x 1 samples" in md

    base = table["base"]["overall_strict"]
    for name, batch in (("reward_backprop", 2), ("oracle", 4)):
        pts = table[name]["points"]
        assert [p["fraction"] for p in pts] == [0.0, 0.5, 1.0]
        assert pts[0]["overall_strict"] == base and pts[0]["iterations"] == 0
        for p in pts[1:]:  # the budget stops the run only once the iterations have used it up
            assert p["train_seconds"] >= p["fraction"] * budget * 60
            assert p["iterations"] >= 1 and p["samples"] == p["iterations"] * batch and p["labels"] == 0
            assert 0.0 <= p["overall_strict"] <= 1.0 and 0.0 < p["proxy"] < 1.0
        assert pts[2]["iterations"] >= pts[1]["iterations"] and pts[2]["train_seconds"] >= pts[1]["train_seconds"]
        assert table[name]["overall_strict"] == pts[-1]["overall_strict"]
    assert (out / "rows" / "reward_backprop" / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    bon = table["bon4"]
    assert bon["steer"]["denoiser_calls_per_image"] == pytest.approx(4 * 10 * 2)  # 4 candidates, 10 steps, CFG
    assert bon["points"] is None and 0.0 <= bon["overall_strict"] <= 1.0

    stamps = {n: (out / "rows" / n / "result.json").stat().st_mtime_ns for n in rows}
    again = bench.main(common + ["--only", *rows])
    assert again["ran"] == [] and again["skipped"] == rows
    assert {n: (out / "rows" / n / "result.json").stat().st_mtime_ns for n in rows} == stamps

    alone = bench.main(common + ["--only", "bon4", "--fresh"])  # one row again, the others untouched
    assert alone["ran"] == ["bon4"]
    assert {n: (out / "rows" / n / "result.json").stat().st_mtime_ns for n in rows if n != "bon4"} == \
        {n: s for n, s in stamps.items() if n != "bon4"}
    assert (out / "rows" / "bon4" / "result.json").stat().st_mtime_ns != stamps["bon4"]
    assert json.loads((out / "table.json").read_text())["rows"][3]["overall_strict"] == bon["overall_strict"]


@pytest.mark.slow  # about 20 s
def test_combination_row_steers_a_full_fine_tuning(bench, tmp_path):
    """A combination row steers its training row's final weights, a full fine-tuning's denoiser as well as a
    LoRA: here a "fine-tuning" whose output layer is zero (velocity 0: every sample stays noise, which the
    verifier fails), so best-of-4 over it scores 0 where best-of-4 over the base does not."""
    import torch
    from safetensors.torch import save_file

    import visalign.samplers as vs

    out = tmp_path / "bench"
    common = ["--out", str(out), "--eval-prompts", "6", "--eval-samples", "1"]
    bench.main(common + ["--only", "base", "bon4"])
    results = bench.load_results(out)
    assert results["bon4"]["eval"]["overall_strict"] > 0
    final = tmp_path / "ft" / "final"
    final.mkdir(parents=True)
    sd = vs.load("toy-shapes").denoiser.state_dict()
    save_file({k: (torch.zeros_like(v) if k.startswith("conv_out.") else v).contiguous() for k, v in sd.items()},
              str(final / "denoiser.safetensors"))
    ev = results["base"]["eval"]
    point = {"fraction": 1.0, "wall_seconds": 60.0, "train_seconds": 60.0, "iterations": 1, "samples": 1, "labels": 0,
             "overall_strict": ev["overall_strict"], "proxy": ev["proxy"]}
    planted = dict(results["base"], name="dpo_offline_strict", kind="train", lora=str(final), points=[point])
    (out / "rows" / "dpo_offline_strict").mkdir()
    (out / "rows" / "dpo_offline_strict" / "result.json").write_text(json.dumps(planted))
    ran = bench.main(common + ["--only", "dpo_offline_strict+bon4"])
    assert ran["ran"] == ["dpo_offline_strict+bon4"]
    combo = bench.load_results(out)["dpo_offline_strict+bon4"]
    assert combo["steer"]["lora"] == str(final) and combo["eval"]["overall_strict"] == 0.0
    assert "`dpo_offline_strict`'s final weights" in (out / "table.md").read_text()


def test_bench_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "no_such_row"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--fractions", "0", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "oracle=lr"])
