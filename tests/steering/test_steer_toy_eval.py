"""``visalign steer RECIPE --toy-eval``: steering judged like ``visalign toy eval`` (the README's main
job prints its table), on the shipped toy model and a handful of eval prompts."""

import json

import pytest
import torch

from visalign.config import load_config

PROMPTS = 6


def _cfg(method="bon", particles=1, reward="shapes-proxy", extra=()):
    from visalign.steering.config import SteerConfig

    return load_config(None, SteerConfig, [f"method={method}", f"particles={particles}", f"reward={reward}", "steps=10",
                                          "run.prompts_per_batch=4", *extra])


def test_best_of_one_is_toy_eval_sample_for_sample():
    """Best-of-1 on the ODE draws image n from seed n with toy eval's steps and CFG: the steered
    evaluation must reproduce toy eval exactly (same seeds, same sampler, same judge)."""
    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.toy.evaluate import evaluate_sampler
    from visalign.toy.prompts import split
    from visalign.toy.steer_eval import evaluate_steered

    metas = split("eval")[:PROMPTS]
    sampler = vs.load("toy-shapes")
    with torch.no_grad():
        ref = evaluate_sampler(sampler, metas, samples_per_prompt=2, num_steps=10, progress=False)
    got = evaluate_steered(sampler, metas, vr.load("shapes-proxy"), _cfg(), samples=2, progress=False)
    assert got["per_category"] == ref["per_category"]
    assert got["overall_strict"] == ref["overall_strict"] and got["partial"] == pytest.approx(ref["partial"])
    assert got["denoiser_calls_per_image"] > 0 and len(got["images"]) == 2 * PROMPTS


def test_steering_by_the_gold_verifier_beats_the_base_and_resumes(tmp_path, monkeypatch):
    """Best-of-4 by the gold verifier must pass more held-out scenes than the base; an evaluation
    interrupted after its first batch continues from its saved images to the same result."""
    import visalign.rewards as vr
    import visalign.samplers as vs
    from visalign.toy import steer_eval as toy_eval
    from visalign.toy.evaluate import evaluate_sampler
    from visalign.toy.prompts import split

    metas = [m for m in split("eval") if m["tag"] in ("position", "color_attr")][:8]
    sampler = vs.load("toy-shapes")
    with torch.no_grad():
        base = evaluate_sampler(sampler, metas, samples_per_prompt=1, num_steps=10, progress=False)
    cfg = _cfg(particles=4, reward="shapes")
    full = toy_eval.evaluate_steered(sampler, metas, vr.load("shapes"), cfg, samples=1, progress=False)
    assert full["strict_all_samples"] > base["strict_all_samples"]

    import visalign.steering.config as sc

    state, calls, orig = tmp_path / "images.pt", [], sc.steer

    def interrupted_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sc, "steer", interrupted_second_batch)
        with pytest.raises(KeyboardInterrupt):
            toy_eval.evaluate_steered(sampler, metas, vr.load("shapes"), cfg, samples=1, state_file=state,
                                      progress=False)
    assert len(torch.load(state, weights_only=True)["images"]) == 4  # the first batch was kept
    again = toy_eval.evaluate_steered(sampler, metas, vr.load("shapes"), cfg, samples=1, state_file=state,
                                      progress=False)
    assert again["per_category"] == full["per_category"]
    assert torch.equal(torch.stack(again["images"]), torch.stack(full["images"]))


def test_cli_toy_eval_prints_base_lora_and_steered(tmp_path, capsys):
    """The README's main-job table: base, + LoRA (a LoRA that changes the model), steered; the
    LoRA row equals toy eval with that LoRA; a missing LoRA folder is a clear error."""
    import visalign.samplers as vs
    from visalign.cli import main
    from visalign.samplers.lora import save_lora
    from visalign.toy.evaluate import evaluate_model
    from visalign.trainers.common.lora import LoraSettings, add_lora

    sampler = vs.load("toy-shapes")
    params = add_lora(sampler, LoraSettings(rank=4, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_lora(sampler, tmp_path / "lora")
    out = tmp_path / "steer"
    rc = main(["steer", "configs/steer/toy_bon.yaml", "--lora", str(tmp_path / "lora"), "--toy-eval",
               "--toy-eval-prompts", str(PROMPTS), "--toy-eval-samples", "1", "--out", str(out), "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = json.loads((out / "toy_eval.json").read_text())["rows"]
    assert [r["name"].split(" ")[0] for r in rows] == ["base", "+", "+"] and "steered: bon" in rows[2]["name"]
    ref = evaluate_model("toy-shapes", lora=str(tmp_path / "lora"), samples_per_prompt=1, max_prompts=PROMPTS,
                         progress=False)
    assert rows[1]["per_category"] == ref["per_category"]
    assert "| base (toy-shapes) |" in text and "points" in text

    rc = main(["steer", "configs/steer/toy_bon.yaml", "--lora", str(tmp_path / "nope"), "--toy-eval",
               "--toy-eval-prompts", "1", "--out", str(out)])
    assert rc == 2 and "no such folder" in capsys.readouterr().err
