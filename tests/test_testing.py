"""The offline tiny-model kit: every family saves, reloads through the real diffusers path and runs."""

import pytest
import torch

from visalign import testing

CASES = [
    ("sd", "eps"),
    ("sd", "v"),
    ("sdxl", "base"),
    ("sd3", "t5"),
    ("sd3", "no_t5"),
    ("flux", "dev"),
    ("flux", "schnell"),
    ("wan", "t2v"),
    ("sd3", "large"),
    ("wan", "a14b"),
    ("wan", "ti2v"),
    ("qwenimage", "base"),
    ("flux2", "dev"),
]
IDS = [f"{f}-{v}" for f, v in CASES]

# What the real checkpoints ship in scheduler/scheduler_config.json (typed here from the hub files:
# stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0, stable-diffusion-3-medium,
# FLUX.1-dev, FLUX.1-schnell, Wan2.1-T2V-1.3B-Diffusers, stable-diffusion-3.5-large, Wan2.2-T2V-A14B-Diffusers,
# Wan2.2-TI2V-5B-Diffusers, Qwen-Image; FLUX.2-dev: dynamic shifting, its pipeline sets mu).
SCHEDULERS = {
    ("sd", "eps"): ("PNDMScheduler", {"prediction_type": "epsilon", "steps_offset": 1, "skip_prk_steps": True,
                                      "beta_schedule": "scaled_linear", "beta_end": 0.012}),
    ("sd", "v"): ("DDIMScheduler", {"prediction_type": "v_prediction", "steps_offset": 1, "clip_sample": False,
                                    "set_alpha_to_one": False}),
    ("sdxl", "base"): ("EulerDiscreteScheduler", {"prediction_type": "epsilon", "timestep_spacing": "leading",
                                                  "steps_offset": 1}),
    ("sd3", "t5"): ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_dynamic_shifting": False}),
    ("sd3", "no_t5"): ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_dynamic_shifting": False}),
    ("flux", "dev"): ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_dynamic_shifting": True,
                                                          "base_shift": 0.5, "max_shift": 1.15}),
    ("flux", "schnell"): ("FlowMatchEulerDiscreteScheduler", {"shift": 1.0, "use_dynamic_shifting": False}),
    ("wan", "t2v"): ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                 "flow_shift": 3.0}),
    ("sd3", "large"): ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_dynamic_shifting": False}),
    ("wan", "a14b"): ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                  "flow_shift": 3.0}),
    ("wan", "ti2v"): ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                                  "flow_shift": 5.0}),
    ("qwenimage", "base"): ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "base_shift": 0.5,
                                                                "max_shift": 0.9, "max_image_seq_len": 8192,
                                                                "shift_terminal": 0.02,
                                                                "time_shift_type": "exponential"}),
    ("flux2", "dev"): ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}),
}
#: what each variant's real checkpoint has beyond its family's common layout
ARCHITECTURE = {
    ("sd3", "large"): lambda p: p.transformer.config.qk_norm == "rms_norm" and not p.transformer.config.dual_attention_layers,
    ("wan", "a14b"): lambda p: p.transformer_2 is not None and p.config.boundary_ratio == 0.875,
    ("wan", "ti2v"): lambda p: p.config.expand_timesteps and p.vae.config.z_dim == 48 and p.vae_scale_factor_spatial == 16,
    ("qwenimage", "base"): lambda p: type(p.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration",
    ("flux2", "dev"): lambda p: (type(p.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
                                 and p.text_encoder.config.text_config.num_hidden_layers >= 30
                                 and p.transformer.config.joint_attention_dim == 3 * p.text_encoder.config.text_config.hidden_size),
}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline",
             "qwenimage": "QwenImagePipeline", "flux2": "Flux2Pipeline"}

PROMPTS = ["a red cube on the left of a blue sphere", "two green cats"]
H, W, FRAMES = 32, 48, 5


def _load(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, **testing.load_kwargs(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _size(pipe) -> tuple[int, int]:
    """(H, W): Wan2.2-TI2V-5B's /16 VAE and 2x2 patches need multiples of 32."""
    return (H, 64) if getattr(pipe, "vae_scale_factor_spatial", 8) == 16 else (H, W)


def _generate(pipe, family, seed, prompts=PROMPTS):
    h, w = _size(pipe)
    kwargs = dict(num_inference_steps=2, height=h, width=w, output_type="pt",
                  generator=torch.Generator().manual_seed(seed))
    if family in ("sd3", "flux", "wan", "qwenimage"):
        kwargs["max_sequence_length"] = 32
    if family == "flux2":  # FLUX.2's system turn takes 29 tokens of the sequence
        kwargs["max_sequence_length"] = 64
    if family == "qwenimage":  # true CFG needs a negative prompt
        kwargs.update(negative_prompt=[" "] * len(prompts), true_cfg_scale=4.0)
    if family == "wan":
        out = pipe(prompt=prompts, num_frames=FRAMES, **kwargs)
        return out.frames
    return pipe(prompt=prompts, **kwargs).images


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize(("family", "variant"), CASES, ids=IDS)
def test_reload_and_generate(tiny_model_dir, family, variant):
    pipe = _load(tiny_model_dir(family, variant))
    assert type(pipe).__name__ == PIPELINES[family]
    cls_name, expected = SCHEDULERS[(family, variant)]
    assert type(pipe.scheduler).__name__ == cls_name
    for key, value in expected.items():
        assert pipe.scheduler.config[key] == value, key
    assert ARCHITECTURE.get((family, variant), lambda p: True)(pipe)

    a = _generate(pipe, family, seed=0)
    b = _generate(pipe, family, seed=0)
    c = _generate(pipe, family, seed=1)
    shape = (2, FRAMES, 3, *_size(pipe)) if family == "wan" else (2, 3, H, W)
    assert tuple(a.shape) == shape
    assert a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)  # same seed, same output
    assert (a - c).abs().max() > 1e-3  # another seed, another output
    assert (a[0] - a[1]).abs().max() > 1e-4  # the prompt reaches the image

    # the saved folder is the in-memory pipeline: same output bit for bit
    built = testing.tiny_pipeline(family, variant=variant)
    built.set_progress_bar_config(disable=True)
    assert torch.equal(_generate(built, family, seed=0), a)


@pytest.mark.parametrize(("family", "variant"), CASES, ids=IDS)
def test_weights_seeded_and_reload_exact(tiny_model_dir, family, variant):
    rng_before = torch.get_rng_state()
    built = _modules(testing.tiny_pipeline(family, variant=variant))
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not move the global RNG"
    loaded = _modules(_load(tiny_model_dir(family, variant)))
    assert built.keys() == loaded.keys()
    for name, module in built.items():
        sd_built, sd_loaded = module.state_dict(), loaded[name].state_dict()
        assert sd_built.keys() == sd_loaded.keys(), name
        for key, tensor in sd_built.items():
            assert torch.equal(tensor, sd_loaded[key]), f"{name}.{key}"

    other = _modules(testing.tiny_pipeline(family, variant=variant, seed=1))
    denoiser = "unet" if family in ("sd", "sdxl") else "transformer"
    params, others = dict(built[denoiser].named_parameters()), dict(other[denoiser].named_parameters())
    changed = [k for k, p in params.items() if not torch.equal(p, others[k])]
    assert len(changed) > len(params) // 2  # seed 1 gives other weights (fixed-init ones aside)


def _tokenizers(pipe):
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")]
    # FLUX.2's "tokenizer" is a PixtralProcessor: its text tokenizer is the one to check
    return [(getattr(getattr(pipe, t), "tokenizer", getattr(pipe, t)), getattr(pipe, e)) for t, e in pairs
            if getattr(pipe, t, None) is not None]


@pytest.mark.parametrize(("family", "variant"), CASES, ids=IDS)
def test_tokenizers_sane_after_reload(tiny_model_dir, family, variant):
    pipe = _load(tiny_model_dir(family, variant))
    expected = {"sd": 1, "sdxl": 2, "sd3": 2 if variant == "no_t5" else 3, "flux": 2, "wan": 1, "qwenimage": 1,
                "flux2": 1}[family]
    toks = _tokenizers(pipe)
    assert len(toks) == expected
    prompt = "a photo of 3 red cubes left of the blue sphere"  # CLIP decodes "x," as "x ,"
    for tok, encoder in toks:
        config = getattr(encoder.config, "text_config", encoder.config)  # a VLM's text tower
        assert len(tok) == config.vocab_size > 250  # not a broken 2-token tokenizer
        ids = tok(prompt).input_ids
        assert len(set(ids)) > 8
        assert tok.unk_token_id not in ids or tok.unk_token_id == tok.eos_token_id
        if family not in ("qwenimage", "flux2"):  # a chat tokenizer adds no end token; the template closes turns
            assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_clip_tokenizer_matches_openai_ids():
    """Below the merge cut-off the ids are OpenAI CLIP's own (open_clip's reference tokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = testing.clip_tokenizer()
    prompt = "a photo of the red car on a street"
    reference = SimpleTokenizer().encode(prompt)
    assert max(reference) < len(tok) - 2  # every token lies inside the kept merges
    ids = tok(prompt).input_ids
    assert ids == [len(tok) - 2, *reference, len(tok) - 1]  # <|startoftext|> ... <|endoftext|>
    # text beyond the kept merges falls back to shorter pieces, never to <unk>
    rare = tok("xylophone quokka").input_ids
    assert len(rare) > 4 and tok.decode(rare, skip_special_tokens=True) == "xylophone quokka"


def test_t5_tokenizer_layout_and_roundtrip():
    tok = testing.t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's fixed ids
    text = "A Quokka (x2) near 7 red cubes; isn't it odd?"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("red").input_ids) == 2  # a vocabulary word is one piece (+ </s>)


def test_qwen2_tokenizer_cuts_qwen_images_template_where_the_real_one_does():
    """QwenImagePipeline drops the first 34 tokens of its prompt template (the system turn and the
    user turn's opening): with this vocabulary they are exactly the template's, as with Qwen2's."""
    from diffusers import QwenImagePipeline

    tok = testing.qwen2_tokenizer()
    template = QwenImagePipeline.__init__.__code__.co_consts  # the template is a literal of __init__
    text = next(c for c in template if isinstance(c, str) and c.startswith("<|im_start|>system"))
    prefix = text.split("{}")[0]
    assert len(tok(prefix).input_ids) == 34
    ids = tok(text.format("a red cube, 3 tall trees")).input_ids
    assert tok.decode(ids[34:]) == "a red cube, 3 tall trees<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok("a blue sphere").input_ids) == ["a", "Ġblue", "Ġsphere"]


def test_mistral_processor_renders_flux2s_chat_turns():
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    processor = testing.mistral_processor()
    tok = processor.tokenizer
    out = processor.apply_chat_template(format_input(["a red cube"]), tokenize=True, return_dict=True)
    pieces = tok.convert_ids_to_tokens(out["input_ids"][0])
    assert pieces[:2] == ["<s>", "[SYSTEM_PROMPT]"] and pieces[-5:] == ["[INST]", "a", "Ġred", "Ġcube", "[/INST]"]
    assert pieces.index("[/SYSTEM_PROMPT]") == 29  # one token per word of the system message


def test_sd3_without_t5_needs_explicit_none(tiny_model_dir):
    """diffusers 0.42 will not load a [null, null] non-optional component on its own: the
    documented way (as for the real SD3 checkpoints) is to pass text_encoder_3=None, tokenizer_3=None."""
    from diffusers import DiffusionPipeline

    path = tiny_model_dir("sd3", "no_t5")
    assert testing.load_kwargs(path) == {"text_encoder_3": None, "tokenizer_3": None}
    assert testing.load_kwargs(tiny_model_dir("sd3", "t5")) == {}
    with pytest.raises(ValueError, match="expected"):
        DiffusionPipeline.from_pretrained(path)


def test_tiny_model_dir_is_cached(tiny_model_dir):
    first = tiny_model_dir("sd", "eps")
    stamp = (first / "visalign_tiny.json").stat().st_mtime_ns
    assert tiny_model_dir("sd", None) == first  # None means the default variant
    assert (first / "visalign_tiny.json").stat().st_mtime_ns == stamp
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(first.rglob("*.bin"))


@pytest.mark.parametrize(("family", "variant", "match"), [("sd4", None, "unknown family"),
                                                          ("flux", "pro", "choose one of")])
def test_bad_names_are_explained(family, variant, match):
    with pytest.raises(ValueError, match=match):
        testing.tiny_pipeline(family, variant=variant)


@pytest.mark.slow
def test_bench_pipeline_shapes():
    pipe = testing.bench_pipeline(num_layers=1)
    cfg = pipe.transformer.config
    assert cfg.num_attention_heads * cfg.attention_head_dim == 1536 and cfg.joint_attention_dim == 4096
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=16, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 64, 64)
