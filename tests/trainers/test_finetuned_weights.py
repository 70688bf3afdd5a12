"""What ``visalign train`` writes to ``RUN/final`` after full fine-tuning (``lora: null``) loads back
with :func:`visalign.samplers.lora.load_finetuned`, the loader behind ``visalign toy eval --lora`` and
``visalign steer --lora``: the same weights as the trainer's, strictly, with clear errors otherwise."""

from pathlib import Path

import pytest
import torch

from visalign.trainers.recipe import build_trainer, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from visalign.toy.pairs import make_pairs

    tmp = tmp_path_factory.mktemp("full")
    assert make_pairs(tmp / "pairs", samples_per_prompt=3, max_prompts=6, num_steps=4, progress=False)["pairs"]
    recipe = load_recipe(CONFIGS / "toy/dpo_offline.yaml",
                         ["lora=null", "run.iterations=2", f"run.run_dir={tmp / 'run'}", "data.eval=null",
                          "run.eval_every=0", "run.progress=false", "run.save_sample_grid=false",
                          f"dpo.pairs={tmp / 'pairs'}", "dpo.train_batch_size=4", "dpo.learning_rate=1e-3",
                          "dpo.sft_weight=1.0"])
    trainer = build_trainer(recipe)
    trainer.train()
    return trainer, tmp / "run" / "final"


def test_full_fine_tuning_round_trips_through_load_finetuned(full_run):
    import visalign.samplers as vs
    from visalign.samplers.lora import load_finetuned

    trainer, final = full_run
    assert (final / "denoiser.safetensors").is_file() and not (final / "pytorch_lora_weights.safetensors").exists()
    trained = {k: v.detach() for k, v in trainer.sampler.denoiser.state_dict().items()}
    fresh = vs.load("toy-shapes")
    assert any(not torch.equal(fresh.denoiser.state_dict()[k], v) for k, v in trained.items())  # training moved it
    assert load_finetuned(fresh, final) == "full"
    got = fresh.denoiser.state_dict()
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)


def test_toy_eval_judges_a_fully_fine_tuned_folder_as_the_trainer_samples(full_run):
    from visalign.toy.evaluate import evaluate_model, evaluate_sampler
    from visalign.toy.prompts import split

    trainer, final = full_run
    with torch.no_grad():
        ref = evaluate_sampler(trainer.sampler, split("eval")[:4], samples_per_prompt=1, num_steps=3, progress=False)
    got = evaluate_model("toy-shapes", lora=str(final), samples_per_prompt=1, num_steps=3, max_prompts=4,
                         progress=False)
    assert got["per_category"] == ref["per_category"] and got["partial"] == pytest.approx(ref["partial"])


def test_load_finetuned_errors_name_the_folder_and_what_it_needs(full_run, tmp_path):
    from safetensors.torch import load_file, save_file

    import visalign.samplers as vs
    from visalign.samplers.lora import load_finetuned

    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors.*denoiser.safetensors"):
        load_finetuned(vs.load("toy-shapes"), tmp_path)
    _, final = full_run
    state = load_file(str(final / "denoiser.safetensors"))
    state.pop(next(iter(state)))  # a denoiser that is not this model's: strict loading refuses it
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "denoiser.safetensors"))
    with pytest.raises(ValueError, match="does not fit the toy-shapes denoiser"):
        load_finetuned(vs.load("toy-shapes"), bad)
