"""Fixtures for trainer tests: a cheap pixel reward and a factory of small trainers of any
registered group algorithm (GRPO, NFT) on tiny models."""

import pytest
import torch
from tests_support import Brightness


@pytest.fixture
def make_trainer(tiny_model_dir, tmp_path):
    import visalign.samplers as vs
    from visalign.trainers import LoraSettings, RunSettings, registry
    from visalign.trainers.common.lora import add_lora

    def make(family="sd3", variant=None, reward=None, run_dir="run", lora=True, algorithm="grpo", **cfg):
        options = {"max_sequence_length": 8} if family in ("sd3", "flux", "wan") else {}
        sampler = vs.load(str(tiny_model_dir(family, variant)), **options)
        torch.manual_seed(0)  # LoRA A matrices
        trainable = add_lora(sampler, LoraSettings(rank=4, alpha=4)) if lora else None
        defaults = dict(group_size=4, prompts_per_iteration=2, num_steps=3, guidance_scale=2.0, train_batch_size=4,
                        learning_rate=1e-3, ema_decay=0.0)
        if algorithm == "grpo":
            defaults["kernel"] = "flow_sde" if family != "sd" else "ddim"
        defaults.update(cfg)
        algo = registry.get(algorithm)
        prompts = [{"prompt": p, "metadata": None} for p in ["a red cube", "a blue ball", "a green tree", "a cat"]]
        run = RunSettings(run_dir=str(tmp_path / run_dir), iterations=2, checkpoint_every=1, eval_every=0,
                          progress=False, save_sample_grid=False)
        return algo.trainer_class(sampler, {"brightness": (reward or Brightness(), 1.0)}, algo.config_class(**defaults),
                                  train_prompts=prompts, run=run, trainable=trainable, size={"height": 32, "width": 32})

    return make
