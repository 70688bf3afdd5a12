"""The memory planner (`visalign plan`) against what is really held: the bytes of a built trainer's
weights, gradients, optimizer state and copies after one optimizer step, and the bytes a real CPU
forward pass of the tiny models keeps for backward; the published configs against their parameter
counts; the sharding arithmetic; the command line."""

import json

import pytest
import torch
import yaml

from visalign.cli import main
from visalign.trainers import build_trainer, load_recipe
from visalign.trainers import plan as P

MAX_SEQ = 16


def _recipe(tmp_path, name, algorithm, section, *, lora=True, dtype="float32", rewards=None, model=None, **extra):
    data = {
        "algorithm": algorithm,
        "model": {"name": str(name), "dtype": dtype, "device": "cpu", "height": 32, "width": 32, **(model or {})},
        "data": {"train": "toy:train", "eval": None},
        "rewards": rewards if rewards is not None else {"jpeg_compressibility": 1.0},
        "lora": {"rank": 4, "alpha": 4} if lora else None,
        algorithm: section,
        "run": {"run_dir": str(tmp_path / "run"), "iterations": 1, "progress": False, "save_sample_grid": False,
                "eval_every": 0, "threads": 1, **extra.pop("run", {})},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def _model(tiny_model_dir, family):
    return "toy-shapes" if family == "toy" else tiny_model_dir(family)


def _options(family):
    return {"max_sequence_length": MAX_SEQ} if family in ("sd3", "flux", "wan") else {}


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
    return sum(seen.values())


def _modules(sampler):
    pipe = sampler.pipeline
    parts = pipe.components.values() if hasattr(pipe, "components") else vars(pipe).values()
    return [m for m in parts if isinstance(m, torch.nn.Module)]


def _held(modules) -> int:
    return _storage_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())])


# ---- weights, gradients, optimizer state and copies --------------------------------------------

GROUP = {"group_size": 2, "prompts_per_iteration": 1, "num_steps": 2, "train_batch_size": 2}
CASES = {
    # family, algorithm, section, lora, dtype, extra recipe keys
    "sd3-nft-full": ("sd3", "nft", {**GROUP}, False, "float32", {}),
    "flux-grpo-lora": ("flux", "grpo", {**GROUP, "guidance_scale": 3.5}, True, "float32", {}),
    "wan-grpo-full-bf16": ("wan", "grpo", {**GROUP, "ema_decay": 0.0}, False, "bfloat16",
                           {"model": {"options": {"num_frames": 5, "max_sequence_length": MAX_SEQ}}}),
    "sd-grpo-lora-refresh": ("sd", "grpo", {**GROUP, "kernel": "ddim"}, True, "float32",
                             {"guards": {"reference_refresh_every": 5}}),
    "toy-backprop-full-ckpt": ("toy", "backprop", {"batch_size": 2, "num_steps": 2, "guidance_scale": 1.0},
                               False, "float32",
                               {"model": {"gradient_checkpointing": True}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planned_bytes_equal_what_a_trainer_holds_after_one_step(case, tiny_model_dir, tmp_path):
    family, algorithm, section, lora, dtype, extra = CASES[case]
    extra = {k: dict(v) for k, v in extra.items()}
    if family != "wan" and _options(family):
        extra.setdefault("model", {})["options"] = _options(family)
    rewards = {"shapes-proxy": 1.0} if algorithm == "backprop" else None
    recipe = _recipe(tmp_path, _model(tiny_model_dir, family), algorithm, section, lora=lora, dtype=dtype,
                     rewards=rewards, **extra)
    plan = P.plan_recipe(recipe, gpus=1, strategies=["ddp"])
    row = plan.row("ddp")

    trainer = build_trainer(recipe)
    sampler = trainer.sampler
    if recipe.guards.reference_refresh_every:
        sampler.refresh_reference()  # the adapter the first refresh adds
    if recipe.model.gradient_checkpointing:
        assert sampler.denoiser.is_gradient_checkpointing
    src = P.resolve_model(recipe.model.name, dtype)
    inputs = P.denoiser_inputs(src, 1, 32, 32, frames=5, tokens=P.text_tokens(src, _options(family)),
                               device="cpu", dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(0))
    step = trainer.optimizer_step(lambda: sampler.denoiser(**inputs)[0].float().square().mean())
    assert not step.skipped

    params = trainer.params
    assert all(p.grad is not None for p in params), "every trained parameter gets a gradient"
    states = [t for s in trainer.optimizer.state.values() for k, t in s.items() if k != "step"]
    held = {
        "weights": _held(_modules(sampler)),
        "trainable": _storage_bytes(params),
        "gradients": _storage_bytes(p.grad for p in params),
        "optimizer": _storage_bytes(states),
        "ema": _storage_bytes(trainer.ema.shadow) if trainer.ema is not None else 0,
        "old": _storage_bytes(trainer.old.shadow) if hasattr(trainer, "old") else 0,
        "reference": _held([sampler._reference_module]) if sampler._reference_module is not None else 0,
    }
    planned = {
        "weights": row.weights_trainable + row.weights_frozen + row.weights_other
        + (row.reference if lora else 0),  # LoRA's refreshed reference is an adapter inside the denoiser
        "trainable": row.weights_trainable,
        "gradients": row.gradients,
        "optimizer": row.optimizer,
        "ema": row.ema,
        "old": row.old,
        "reference": 0 if lora else row.reference,
    }
    assert planned == held
    assert plan.trainable_parameters == sum(p.numel() for p in params)
    expected = {"sd3-nft-full": {"reference", "ema", "old"}, "flux-grpo-lora": {"ema"}, "wan-grpo-full-bf16": {"reference"},
                "sd-grpo-lora-refresh": {"reference", "ema"}, "toy-backprop-full-ckpt": {"reference", "ema"}}[case]
    assert set(plan.copies) == expected


# ---- activations: a meta forward against a real one ---------------------------------------------

def _real_checkpoint(block, *args):
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "wan", "toy"])
def test_activation_estimate_equals_a_real_forward(family, checkpointing, tiny_model_dir, tmp_path):
    """The planner's activations (a meta forward, attention counted as a flash kernel) equal the
    bytes the same hooks count in a real CPU forward of the tiny model (PyTorch's CPU attention is a
    flash kernel), with the sampler's CFG batch; with gradient checkpointing the real blocks run
    under torch.utils.checkpoint."""
    import visalign.samplers as vs

    guidance = 1.0 if family == "flux" else 3.0  # FLUX.1-dev: embedded guidance, no CFG batch
    options = {"num_frames": 5, **_options(family)} if family == "wan" else _options(family)
    section = {**GROUP, "guidance_scale": guidance, **({"kernel": "ddim"} if family in ("sd", "sdxl") else {})}
    recipe = _recipe(tmp_path, _model(tiny_model_dir, family), "grpo", section, lora=True,
                     model={"options": options, "gradient_checkpointing": checkpointing})
    plan = P.plan_recipe(recipe, strategies=["ddp"])
    row = plan.row("ddp")
    assert plan.forward_batch == (1 if family == "flux" else 2) * GROUP["train_batch_size"]

    sampler = vs.load(recipe.model.name, dtype="float32", **options)
    from visalign.trainers.common.lora import add_lora

    add_lora(sampler, recipe.lora)
    src = P.resolve_model(recipe.model.name)
    inputs = P.denoiser_inputs(src, plan.forward_batch, plan.height, plan.width, frames=5, tokens=plan.text_tokens,
                               device="cpu", generator=torch.Generator().manual_seed(0))
    real = P.measure_activations(sampler.denoiser, inputs, flash=False, checkpointing=checkpointing,
                                 checkpoint_function=_real_checkpoint if checkpointing else None)
    assert real.saved > 0
    assert row.activations == pytest.approx(real.saved, rel=0.02)
    if checkpointing:  # the recompute peak: one block run with its saved tensors counted
        block = P.measure_activations(sampler.denoiser, inputs, flash=False, checkpointing=True)
        assert row.recompute == pytest.approx(block.recompute, rel=0.02)
        assert 0 < row.recompute
    else:
        assert row.recompute == 0


def test_the_sampler_call_keeps_what_the_planner_counts(tiny_model_dir, tmp_path):
    """Through the sampler's own prediction (prompt encoding, CFG batch, FLUX's packing) the saved
    bytes are the planner's (within 2 %)."""
    import visalign.samplers as vs

    for family in ("sd3", "flux"):
        guidance = 3.5 if family == "flux" else 3.0
        recipe = _recipe(tmp_path, tiny_model_dir(family), "grpo", {**GROUP, "guidance_scale": guidance},
                         model={"options": _options(family)})
        plan = P.plan_recipe(recipe, strategies=["ddp"])
        sampler = vs.load(recipe.model.name, dtype="float32", **_options(family))
        from visalign.trainers.common.lora import add_lora

        add_lora(sampler, recipe.lora)
        with torch.no_grad():  # as the trainers encode (frozen text encoders)
            cond = sampler.encode(["a red cube", "a blue ball"][: GROUP["train_batch_size"]])
        x = sampler.noise(GROUP["train_batch_size"], torch.Generator().manual_seed(0), height=32, width=32)
        meter = P.SavedTensorMeter([*sampler.denoiser.parameters(), *sampler.denoiser.buffers()])
        with torch.enable_grad(), meter.hooks():
            sampler.predict(x, torch.tensor(500.0), cond, guidance)
        assert plan.row("ddp").activations == pytest.approx(meter.bytes, rel=0.02), family


def test_flash_accounting_keeps_no_attention_matrix():
    q, k, v = (torch.empty(1, 2, 4096, 64, device="meta", requires_grad=True) for _ in range(3))
    plain, flash = P.SavedTensorMeter(), P.SavedTensorMeter()
    with plain.hooks():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with flash.hooks(), P.flash_attention_accounting():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    qkvo = 4 * q.numel() * 4
    assert flash.bytes == qkvo + 2 * 4096 * 4  # q, k, v, out and the float32 log-sum-exp
    assert plain.bytes > 4096 * 4096 * 4  # the math path keeps the L x L matrix
    assert torch.nn.functional.scaled_dot_product_attention is P._SDPA


# ---- the published checkpoints ----------------------------------------------------------------------

#: parameters (with persistent buffers: SD3's positional embedding) of each published denoiser
PUBLISHED_COUNTS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 0.86e9,
    "stabilityai/stable-diffusion-xl-base-1.0": 2.57e9,
    "stabilityai/stable-diffusion-3.5-medium": 2.47e9,
    "stabilityai/stable-diffusion-3.5-large": 8.1e9,
    "black-forest-labs/FLUX.1-dev": 11.9e9,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": 1.42e9,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": 14.3e9,
}


@pytest.mark.parametrize("hub_id", list(PUBLISHED_COUNTS))
def test_published_configs_build_with_their_parameter_counts(hub_id):
    src = P.resolve_model(hub_id, "bfloat16")
    den = P.build_denoiser(src, "bfloat16")
    assert all(p.device.type == "meta" for p in den.parameters())
    assert P.state_numel(den) == pytest.approx(PUBLISHED_COUNTS[hub_id], rel=0.01)
    assert src.family in ("sd", "sdxl", "sd3", "flux", "wan")
    assert all(c.bytes == 2 * c.parameters for c in src.others)


def test_every_published_id_is_counted():
    assert set(PUBLISHED_COUNTS) | {"runwayml/stable-diffusion-v1-5"} == set(P.PUBLISHED)


# ---- sharding and fitting ------------------------------------------------------------------------


def test_sharding_divides_as_stated(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir("sd3"), "nft", dict(GROUP), lora=False,
                     model={"options": _options("sd3")})
    one, four = (P.plan_recipe(recipe, gpus=n) for n in (1, 4))
    ddp1, ddp4 = one.row("ddp"), four.row("ddp")
    assert ddp1.total == ddp4.total  # DDP replicates everything
    z2, fsdp, z3 = four.row("zero2"), four.row("fsdp"), four.row("zero3")
    t = ddp1.weights_trainable
    assert z2.weights_trainable == t and z2.gradients == -(-t // 4) and z2.optimizer == -(-2 * t // 4)
    assert z2.reference == ddp1.reference and z2.ema == ddp1.ema
    for r in (fsdp, z3):
        assert r.weights_trainable == -(-t // 4) and r.gradients == -(-t // 4) and r.optimizer == -(-2 * t // 4)
        assert r.ema == -(-t // 4) and r.old == -(-t // 4)
        assert r.weights_other == ddp1.weights_other  # the text encoders and VAE are not sharded
        assert r.gathered > 0 and r.activations == ddp1.activations
    assert fsdp.total == z3.total < z2.total < ddp4.total


def test_a_recipe_that_cannot_fit_says_so(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, "black-forest-labs/FLUX.1-dev", "grpo", {**GROUP, "train_batch_size": 1}, lora=False,
                     dtype="bfloat16", model={"height": 256, "width": 256, "options": {"max_sequence_length": 64}})
    alone = P.plan_recipe(recipe, gpus=1, gpu_mem_gib=80)
    assert not any(r.fits for r in alone.rows)
    ddp = alone.row("ddp")
    full = 11.9e9 * 2
    assert ddp.weights_trainable == pytest.approx(full, rel=0.01) and ddp.optimizer == 2 * ddp.gradients
    assert ddp.reference == pytest.approx(full, rel=0.01) and ddp.ema == ddp.weights_trainable
    text = P.format_plan(alone)
    assert "does not fit" in text and "fits with" not in text
    eight = P.plan_recipe(recipe, gpus=8, gpu_mem_gib=80)
    assert eight.row("fsdp").fits and not eight.row("ddp").fits


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_prints_a_table_and_json(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "nft", "model": {"name": str(tiny_model_dir("sd3")), "options": _options("sd3")},
        "rewards": {"jpeg_compressibility": 1.0}, "lora": None, "nft": dict(GROUP)}))
    assert main(["plan", str(recipe), "model.height=32", "model.width=32", "--gpus", "2", "--gpu-mem", "1"]) == 0
    out = capsys.readouterr().out
    assert "FSDP" in out and "ZeRO-3" in out and "fits with" in out
    assert main(["plan", str(recipe), "lora={rank: 2, alpha: 2}", "--gpus", "2", "--json", "--strategy", "fsdp"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "lora" and data["gpus"] == 2 and [r["strategy"] for r in data["rows"]] == ["fsdp"]
    assert main(["plan", str(recipe), "--gpu-mem", "0.000001"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("family", ["sd", "sd3", "wan"])
def test_autocast_activations_equal_a_real_autocast_forward(family, tiny_model_dir, tmp_path):
    """float32 weights under bf16 autocast: the planner's explicit casts on meta keep what
    torch.autocast keeps on the CPU (the weights' bf16 copies included)."""
    import visalign.samplers as vs

    options = {"num_frames": 5, **_options(family)} if family == "wan" else _options(family)
    section = {**GROUP, "guidance_scale": 1.0, **({"kernel": "ddim"} if family == "sd" else {})}
    recipe = _recipe(tmp_path, _model(tiny_model_dir, family), "grpo", section, lora=False,
                     model={"options": options}, run={"mixed_precision": "bf16"})
    plan = P.plan_recipe(recipe, strategies=["ddp"])
    sampler = vs.load(recipe.model.name, dtype="float32", **options)
    sampler.denoiser.requires_grad_(True)
    src = P.resolve_model(recipe.model.name)
    inputs = P.denoiser_inputs(src, plan.forward_batch, plan.height, plan.width, frames=5, tokens=plan.text_tokens,
                               device="cpu", generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = P.measure_activations(sampler.denoiser, inputs, flash=False)
    plain = P.measure_activations(sampler.denoiser, inputs, flash=False)
    assert plan.row("ddp").activations == pytest.approx(real.saved, rel=0.02)
    assert real.saved != plain.saved  # autocast changes what is kept
