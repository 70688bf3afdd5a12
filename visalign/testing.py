"""Tiny offline diffusers pipelines for every model family (tests, docs, benchmarks).

Every model here is the REAL diffusers / transformers class, built from a tiny config with seeded
random weights, so the real loading path (``DiffusionPipeline.from_pretrained(folder)``), the real
pipeline ``__call__`` and the real schedulers run in tests without network access. Tokenizers are
built offline: the CLIP tokenizer from the first merges of the BPE table that the ``open_clip``
wheel ships (byte-level, lower-cased, same special tokens and id order as OpenAI CLIP), the T5 /
UMT5 tokenizer as a Unigram model over a small in-memory word + character vocabulary (no ``<unk>``
for printable ASCII), the Qwen2 tokenizer (Qwen-Image) as a byte-level BPE over the same words.

Use (in tests the session fixture ``tiny_model_dir`` of ``tests/conftest.py`` wraps this)::

    path = save_tiny("sd3", tmp_path / "sd3")           # save_pretrained, safetensors
    pipe = DiffusionPipeline.from_pretrained(path)     # the real loading path
    images = pipe("a red cube", num_inference_steps=2, output_type="pt").images

Families, variants and the call parameters that are valid for the tiny models
(``vae_scale_factor`` is 8, as in the real checkpoints, but for Wan2.2-TI2V-5B's 16):

``"sd"`` -- ``StableDiffusionPipeline``; variants ``"eps"`` (default, SD1.5-like: PNDMScheduler as
    SD1.5 ships, ``prediction_type="epsilon"``) and ``"v"`` (SD2.1-like: DDIMScheduler as SD2.1 ships,
    ``prediction_type="v_prediction"``, linear-projection attention). ``height``/``width`` multiples
    of 8 (the UNet handles odd latent sizes); default 64 (UNet ``sample_size`` 8). Prompts are cut
    at 77 CLIP tokens.
``"sdxl"`` -- ``StableDiffusionXLPipeline``: CLIPTextModel + CLIPTextModelWithProjection,
    ``addition_embed_type="text_time"``, EulerDiscreteScheduler (``timestep_spacing="leading"``,
    ``steps_offset=1``) as SDXL-base ships. ``height``/``width`` multiples of 8, default 64.
    No refiner (``text_encoder`` is present, ``requires_aesthetics_score`` is not used).
``"sd3"`` -- ``StableDiffusion3Pipeline``: SD3Transformer2DModel (patch 2), 16-channel VAE with
    SD3's ``scaling_factor``/``shift_factor``, two CLIPTextModelWithProjection and a T5EncoderModel,
    FlowMatchEulerDiscreteScheduler(shift=3.0). Variant ``"no_t5"``: ``text_encoder_3=None``,
    ``tokenizer_3=None`` (the pipeline then feeds zeros for the T5 part); its saved folder only
    loads with ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`` -- diffusers 0.42
    refuses a ``[null, null]`` entry for a non-optional component, as for the real SD3 checkpoints
    loaded without T5; `load_kwargs(path)` returns those keywords. ``height``/``width``
    multiples of 16 (VAE 8 x patch 2; others raise), default 64, at most 256 (``pos_embed_max_size``
    16 patches);
    ``max_sequence_length`` <= 256 (T5 tokens; default 256). Variant ``"large"``: SD3.5-Large's
    transformer switches (``qk_norm="rms_norm"``, no dual attention layers).
``"flux"`` -- ``FluxPipeline``: FluxTransformer2DModel (1 double + 1 single block), 16-channel VAE
    with FLUX's factors, CLIPTextModel + T5EncoderModel. Variants ``"dev"`` (default:
    ``guidance_embeds=True``, scheduler ``use_dynamic_shifting=True`` as FLUX.1-dev ships) and
    ``"schnell"`` (``guidance_embeds=False``, ``shift=1.0``, no dynamic shifting, as FLUX.1-schnell
    ships). ``height`` and ``width`` MUST be passed (the pipeline's default is 1024 px); multiples of
    16 (VAE 8 x 2x2 packing; other sizes are rounded down with a warning). ``max_sequence_length``
    <= 512 (default 512; pass e.g. 32 to be fast).
``"wan"`` -- ``WanPipeline``: WanTransformer3DModel (patch (1, 2, 2)), AutoencoderKLWan (spatial /8,
    temporal /4), UMT5EncoderModel, T5 tokenizer, UniPCMultistepScheduler(flow_prediction,
    use_flow_sigmas, flow_shift=3.0) as Wan2.1-T2V-1.3B-Diffusers ships. ``height``, ``width`` and
    ``num_frames`` MUST be passed (defaults are 480x832x81): ``height``/``width`` multiples of 16,
    ``num_frames = 4k + 1`` (e.g. 5 or 9; at most 125: 32 latent frames of RoPE), at most 512 px.
    ``max_sequence_length`` default 512 (pass e.g. 32).
    ``output_type="pt"`` returns ``.frames`` of shape ``(B, F, 3, H, W)`` in ``[0, 1]``.
    Variants: ``"t2v"`` (default, Wan2.1), ``"a14b"`` (Wan2.2-T2V-A14B: a second transformer,
    ``transformer_2``, for the low-noise steps below ``boundary_ratio=0.875``; ``guidance_scale_2``
    may be passed) and ``"ti2v"`` (Wan2.2-TI2V-5B: 48-channel transformer with
    ``expand_timesteps=True``, the Wan2.2 VAE -- 48 latent channels, 2x2 pixel patchify inside,
    spatial /16 -- with its real latent statistics, UniPC ``flow_shift=5.0``; ``height``/``width``
    multiples of 32).
``"qwenimage"`` -- ``QwenImagePipeline``: QwenImageTransformer2DModel (2 layers, 2x2 packed
    latents), AutoencoderKLQwenImage (one-frame Wan-style VAE with its real latent statistics),
    Qwen2_5_VLForConditionalGeneration (2 text layers, a 1-block vision tower) with
    `qwen2_tokenizer`, FlowMatchEulerDiscreteScheduler as Qwen-Image ships (dynamic exponential
    shift, ``max_shift=0.9`` at 8192 tokens, ``shift_terminal=0.02``). Classifier-free guidance
    runs only with ``true_cfg_scale > 1`` AND a ``negative_prompt`` (e.g. ``" "``, as the model
    card). ``height``/``width`` multiples of 16; pass them (the default is 1024 px).

Cost: a 2-step call at 64 px (Wan: 5 frames) with ``max_sequence_length=32`` takes 0.03-0.07 s
on one CPU thread (Wan 0.14 s); building a pipeline ~0.1 s, saving + loading ~0.2 s.

Quirks vs. the real checkpoints: tiny widths and depths (1-2 layers), a 2048-token CLIP vocabulary
(first 1534 merges of the real table), a ~300-piece T5 vocabulary and a ~680-token Qwen2
vocabulary, so the text encoders' ``vocab_size`` differs from the real 49408 / 32128 / 256384 / 152064. Architecture switches, scheduler
configs and VAE latent factors are the real ones.

``bench_pipeline`` builds an SD3-style pipeline at realistic transformer width (SD3-medium: 24 heads
x 64 = 1536, ``joint_attention_dim`` 4096) but only a few layers, for ``bench/sampler_overhead.py``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "FAMILIES",
    "accelerate_command",
    "bench_pipeline",
    "clip_tokenizer",
    "load_kwargs",
    "mistral_processor",
    "qwen2_tokenizer",
    "save_tiny",
    "t5_tokenizer",
    "tiny_model_dir",
    "tiny_pipeline",
]

#: family -> (valid variants, default variant)
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "sd": (("eps", "v"), "eps"),
    "sdxl": (("base",), "base"),
    "sd3": (("t5", "no_t5", "large"), "t5"),
    "flux": (("dev", "schnell"), "dev"),
    "wan": (("t2v", "a14b", "ti2v"), "t2v"),
    "qwenimage": (("base",), "base"),
    "flux2": (("dev",), "dev"),
}

CLIP_VOCAB_SIZE = 2048  # 256 bytes + 256 end-of-word bytes + 1534 merges + 2 special tokens
T5_MAX_LENGTH = 512

# SD1.x / SD2.x / SDXL DDPM betas, shared by their shipped scheduler configs.
_DDPM_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ----------------------------------------------------------------------------------------------
# seeding


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build a module under a private RNG state: deterministic, and the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval() if isinstance(module, torch.nn.Module) else module


# ----------------------------------------------------------------------------------------------
# tokenizers


def clip_tokenizer(vocab_size: int = CLIP_VOCAB_SIZE, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A real `transformers.CLIPTokenizer` over a prefix of OpenAI CLIP's BPE table (open_clip ships it).

    Ids follow OpenAI CLIP's order: 256 byte symbols, the same with ``</w>``, the merges in rank
    order, then ``<|startoftext|>`` and ``<|endoftext|>`` (the last id, as 49407 is in the real
    vocabulary, so ``argmax`` pooling of CLIP text models finds the end token). A prefix of a BPE
    merge table is itself a closed BPE table, so tokenisation is the real one up to merge rank
    ``vocab_size - 514``.

    Args:
        vocab_size (`int`, defaults to 2048): total vocabulary size, at least 514.
        pad_token (`str`, defaults to `"<|endoftext|>"`): SD1.x pads with the end token; SD2.x and
            SDXL's second tokenizer pad with ``"!"``.
    """
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0:
        raise ValueError(f"clip_tokenizer: vocab_size must be at least 514 (bytes + specials), got {vocab_size}")
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 1 + n_merges]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    symbols = list(oct.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != vocab_size:  # a duplicate would silently shift ids
        raise RuntimeError(f"clip_tokenizer: built {len(vocab)} distinct tokens, expected {vocab_size}")
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


_T5_WORDS = (
    "a an the of and or with on in at to from by for is are was be it this that there as not no "
    "red green blue yellow orange purple pink brown black white gray grey "
    "cube sphere ball circle square triangle star cat dog bird car tree house person man woman "
    "photo image picture painting video of left right above below top bottom front behind near next "
    "one two three four five six seven eight nine ten small big large tall short bright dark "
    "cake kitchen baking cooking sky sea water grass city street night day sun moon light "
    "high quality detailed realistic style art blurry low worst"
).split()


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A real `transformers.T5Tokenizer` (Unigram, tokenizers backend) over an in-memory vocabulary.

    Ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``"▁"``, a few hundred common words
    (``"▁red"``), and every printable ASCII character both word-initial (``"▁x"``) and inside a word
    (``"x"``), so any ASCII text encodes without ``<unk>`` and decodes back. No sentinel tokens.
    The same tokenizer stands in for UMT5 (Wan), whose real tokenizer is also a T5 Unigram model.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(dict.fromkeys(_T5_WORDS))]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


#: the words of Qwen-Image's prompt template: each one token, as in the real Qwen2 vocabulary, so the
#: pipeline's fixed cut of the template's first 34 tokens falls where it does with the real tokenizer
_QWEN_TEMPLATE_WORDS = (
    "Describe the image by detailing color shape size texture quantity text spatial relationships of objects "
    "and background"
).split()
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_bpe(words: list[str], line_starts: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """Pieces and merges of a byte-level BPE in which every word of ``words`` is one token after a
    space (``"Ġred"``) and every word of ``line_starts`` one token without: each word grows from the
    left by merges; the word-initial ones come first, so they outrank the others inside
    ``" word"`` pre-tokens.  The 256 byte symbols (GPT-2's table) come first among the pieces."""
    import open_clip.tokenizer as oct

    byte = oct.bytes_to_unicode()  # GPT-2's byte-to-symbol table, which Qwen2 and Tekken use too
    space = byte[ord(" ")]
    merges: dict[tuple[str, str], None] = {}
    pieces: list[str] = []

    def grow(word: str) -> None:
        current = word[0]
        for ch in word[1:]:
            merges.setdefault((current, ch), None)
            current += ch
            pieces.append(current)

    for w in dict.fromkeys(words):
        grow(space + w)
    for w in line_starts:
        grow(w)
    return list(byte.values()) + list(dict.fromkeys(pieces)), list(merges)


def qwen2_tokenizer():
    """A real `transformers.Qwen2Tokenizer` (byte-level BPE, Qwen2's pre-tokenizer) over a small vocabulary.

    Ids: the 256 byte symbols, then every word of a small list (the T5 word list above and the words
    of Qwen-Image's prompt template) as one token after a space (``"Ġred"``), then
    ``<|endoftext|>`` (also the padding token), ``<|im_start|>`` and ``<|im_end|>``.  Any text encodes
    (bytes are the fallback) and decodes back.  Qwen-Image's template prefix encodes to 34 tokens,
    as with the real tokenizer.
    """
    from transformers import Qwen2Tokenizer

    pieces, merges = _byte_bpe(list(_QWEN_TEMPLATE_WORDS) + _T5_WORDS, ("system", "user", "assistant", "Describe"))
    tokens = pieces + list(QWEN_SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("qwen2_tokenizer: duplicate tokens would shift ids")
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


#: FLUX.2's system message, word by word (each one token, as a sentence piece would be)
_FLUX2_SYSTEM_WORDS = (
    "You are an AI that reasons about image descriptions give structured responses focusing on object "
    "relationships attribution and actions without speculation"
).split()
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                          "[IMG_BREAK]", "[IMG_END]", "<pad>")
# Mistral (Tekken) pre-tokenisation: words with their leading space or punctuation, digits one by one
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                 r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Mistral-Small-3.1's chat layout, the parts FLUX.2 uses: system and user turns of text parts
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def mistral_processor():
    """A real `transformers.PixtralProcessor` (what FLUX.2 loads as its ``tokenizer``): a byte-level BPE
    tokenizer with Mistral's special tokens and pre-tokenisation over a small vocabulary (the T5
    word list and FLUX.2's system message, one token per word), a Mistral-style chat template and a
    tiny Pixtral image processor.  FLUX.2's system turn encodes to 29 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    pieces, merges = _byte_bpe(list(_FLUX2_SYSTEM_WORDS) + _T5_WORDS, ("You", "attribution"))
    tokens = list(MISTRAL_SPECIAL_TOKENS) + pieces
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("mistral_processor: duplicate tokens would shift ids")
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_TEKKEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[3:10]))
    images = PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8)
    return PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=8, spatial_merge_size=2,
                            chat_template=MISTRAL_CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# text encoders


def _clip_config(tokenizer, hidden: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,  # SD3/SDXL read the penultimate hidden state: keep it a real layer's
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text(tokenizer, *, hidden: int = 32, projection_dim: int = 32, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(tokenizer, hidden, projection_dim))


def _t5_config(tokenizer, d_model: int, cls_name: str):
    import transformers

    config_cls = getattr(transformers, cls_name)
    return config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * min(d_model, 32),
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / UMT5 use gated GELU
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=True,
    )


def _t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5EncoderModel

    return T5EncoderModel(_t5_config(tokenizer, d_model, "T5Config"))


def _umt5_encoder(tokenizer, d_model: int = 32):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel(_t5_config(tokenizer, d_model, "UMT5Config"))


def _qwen25vl(tokenizer, hidden: int = 32):
    """A tiny Qwen2.5-VL (the class Qwen-Image's text encoder is): 2 text layers, GQA, M-RoPE, and a
    one-block vision tower that text-only prompts never use."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, out_hidden_size=hidden, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[0]),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _mistral3(tokenizer, hidden: int = 16):
    """A tiny Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``, FLUX.2's text encoder): 30 text
    layers, since FLUX.2 reads the hidden states of layers 10, 20 and 30, and a one-layer Pixtral
    vision tower that text prompts never use."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=30, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=2048,
                         pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"), eos_token_id=ids("</s>")),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=8, image_size=32),
        image_token_index=ids("[IMG]"),
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config)


# ----------------------------------------------------------------------------------------------
# VAEs (4 levels -> vae_scale_factor 8, as in the real checkpoints)


def _vae(latent_channels: int, **factors):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **factors,
    )


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json: the latent statistics of its 48 channels
_WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
_WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]


def _wan22_vae():
    """The Wan2.2 VAE of TI2V-5B: 48 latent channels, residual blocks, 2x2 pixel patchify inside
    (12 channels in and out), spatial /16, temporal /4."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=4,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=_WAN22_LATENTS_MEAN,
        latents_std=_WAN22_LATENTS_STD,
    )


def _flux2_vae():
    """AutoencoderKLFlux2: 32 latent channels, patchified 2x2 and normalised by a batch norm whose
    running statistics (a trained checkpoint's) are drawn here, so decoding exercises them."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _qwenimage_vae():
    """AutoencoderKLQwenImage (a one-frame Wan-style VAE) with its real latent statistics (class defaults)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


# ----------------------------------------------------------------------------------------------
# families


def _unet(*, cross_attention_dim: int, v: bool = False, sdxl_projection_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = {}
    if sdxl_projection_dim is not None:  # SDXL micro-conditioning: 6 size/crop numbers + pooled text
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + sdxl_projection_dim,
            transformer_layers_per_block=(1, 2),
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if sdxl_projection_dim else
        ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if sdxl_projection_dim else
        ("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if (v or sdxl_projection_dim) else 8,
        use_linear_projection=bool(v or sdxl_projection_dim),
        **kwargs,
    )


def _sd(variant: str, seed: int):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    v = variant == "v"
    tok = clip_tokenizer(pad_token="!" if v else "<|endoftext|>")
    if v:  # stabilityai/stable-diffusion-2-1 scheduler_config
        scheduler = DDIMScheduler(**_DDPM_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction")
    else:  # stable-diffusion-v1-5 scheduler_config
        scheduler = PNDMScheduler(**_DDPM_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        unet=_seeded(seed, lambda: _unet(cross_attention_dim=32, v=v)),
        vae=_seeded(seed + 1, lambda: _vae(4, scaling_factor=0.18215)),
        text_encoder=_seeded(seed + 2, lambda: _clip_text(tok)),
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(variant: str, seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config
    scheduler = EulerDiscreteScheduler(**_DDPM_BETAS, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear")
    return StableDiffusionXLPipeline(
        unet=_seeded(seed, lambda: _unet(cross_attention_dim=32 + 32, sdxl_projection_dim=32)),
        vae=_seeded(seed + 1, lambda: _vae(4, scaling_factor=0.13025)),
        text_encoder=_seeded(seed + 2, lambda: _clip_text(tok)),
        text_encoder_2=_seeded(seed + 3, lambda: _clip_text(tok2, projection_dim=32, with_projection=True)),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _sd3_pipeline(variant: str, seed: int, *, heads: int, head_dim: int, layers: int, joint_dim: int,
                  pooled_each: int, sample_size: int = 8, qk_norm: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    with_t5 = variant != "no_t5"
    tok3 = t5_tokenizer(model_max_length=256) if with_t5 else None
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * pooled_each,
        pos_embed_max_size=16,
        qk_norm=qk_norm,
    ))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_seeded(seed + 1, lambda: _vae(16, scaling_factor=1.5305, shift_factor=0.0609,
                                           use_quant_conv=False, use_post_quant_conv=False)),
        text_encoder=_seeded(seed + 2, lambda: _clip_text(tok, projection_dim=pooled_each, with_projection=True)),
        text_encoder_2=_seeded(seed + 3, lambda: _clip_text(tok2, projection_dim=pooled_each, with_projection=True)),
        text_encoder_3=_seeded(seed + 4, lambda: _t5_encoder(tok3, d_model=joint_dim)) if with_t5 else None,
        tokenizer=tok,
        tokenizer_2=tok2,
        tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def _sd3(variant: str, seed: int):
    # CLIP hidden states (32 + 32) are zero-padded up to joint_attention_dim = T5 width (64).
    # "large": stable-diffusion-3.5-large's transformer switches (RMS q/k norm, no dual attention layers)
    return _sd3_pipeline(variant, seed, heads=2, head_dim=16, layers=2, joint_dim=64, pooled_each=32,
                         qk_norm="rms_norm" if variant == "large" else None)


def _flux(variant: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    dev = variant == "dev"
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        pooled_projection_dim=32,  # CLIP width (pooler_output)
        guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ))
    shifting = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if dev else 1.0,
                                                use_dynamic_shifting=dev, **shifting)
    return FluxPipeline(
        transformer=transformer,
        vae=_seeded(seed + 1, lambda: _vae(16, scaling_factor=0.3611, shift_factor=0.1159,
                                           use_quant_conv=False, use_post_quant_conv=False)),
        text_encoder=_seeded(seed + 2, lambda: _clip_text(tok)),
        text_encoder_2=_seeded(seed + 3, lambda: _t5_encoder(tok2, d_model=32)),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=scheduler,
    )


def _wan_transformer(channels: int):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope splits it into t/h/w parts: 4 + 4 + 4
        in_channels=channels,
        out_channels=channels,
        text_dim=32,  # UMT5 width
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan(variant: str, seed: int):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tok = t5_tokenizer()
    ti2v = variant == "ti2v"
    extra: dict[str, Any] = {}
    if variant == "a14b":  # Wan-AI/Wan2.2-T2V-A14B-Diffusers: a high-noise and a low-noise expert
        extra = dict(transformer_2=_seeded(seed + 3, lambda: _wan_transformer(16)), boundary_ratio=0.875)
    elif ti2v:  # Wan-AI/Wan2.2-TI2V-5B-Diffusers: one transformer, per-token timesteps
        extra = dict(expand_timesteps=True)
    # the Diffusers checkpoints' scheduler_config: Wan2.1-T2V-1.3B and Wan2.2-T2V-A14B flow_shift 3,
    # Wan2.2-TI2V-5B flow_shift 5 (its sample_shift)
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=5.0 if ti2v else 3.0, solver_order=2,
                                        predict_x0=True, solver_type="bh2", lower_order_final=True)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=_seeded(seed + 2, lambda: _umt5_encoder(tok, d_model=32)),
        vae=_seeded(seed + 1, _wan22_vae if ti2v else _wan_vae),
        scheduler=scheduler,
        transformer=_seeded(seed, lambda: _wan_transformer(48 if ti2v else 16)),
        **extra,
    )


def _qwenimage(variant: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tok = qwen2_tokenizer()
    transformer = _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the text encoder's width
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ))
    # Qwen/Qwen-Image scheduler_config: exponential time shift, mu from 256..8192 tokens, terminal 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    return QwenImagePipeline(
        transformer=transformer,
        vae=_seeded(seed + 1, _qwenimage_vae),
        text_encoder=_seeded(seed + 2, lambda: _qwen25vl(tok)),
        tokenizer=tok,
        scheduler=scheduler,
    )


def _flux2(variant: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    processor = mistral_processor()
    text_hidden = 16
    transformer = _seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patchify
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,  # three text-encoder layers stacked per token
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        guidance_embeds=True,
    ))
    # dynamic shifting on; Flux2Pipeline computes mu itself (empirical, from tokens and steps)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2Pipeline(
        transformer=transformer,
        vae=_seeded(seed + 1, _flux2_vae),
        text_encoder=_seeded(seed + 2, lambda: _mistral3(processor.tokenizer, hidden=text_hidden)),
        tokenizer=processor,
        scheduler=scheduler,
    )


_BUILDERS: dict[str, Callable[[str, int], Any]] = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "wan": _wan,
                                                    "qwenimage": _qwenimage, "flux2": _flux2}


def _check(family: str, variant: str | None) -> str:
    if family not in FAMILIES:
        raise ValueError(f"tiny_pipeline: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    variants, default = FAMILIES[family]
    variant = default if variant is None else variant
    if variant not in variants:
        raise ValueError(f"tiny_pipeline: family {family!r} has no variant {variant!r}; choose one of {list(variants)}")
    return variant


def tiny_pipeline(family: str, *, variant: str | None = None, seed: int = 0):
    """A diffusers pipeline of the real classes with tiny, seeded random weights (float32, CPU).

    Args:
        family (`str`): one of ``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"wan"``, ``"qwenimage"``.
        variant (`str`, *optional*): see the module docstring; ``None`` picks the family default.
        seed (`int`, defaults to 0): weights are a pure function of ``(family, variant, seed)``; the
            global torch RNG is left as it was.
    """
    variant = _check(family, variant)
    return _BUILDERS[family](variant, seed)


def save_tiny(family: str, path: str | Path, *, variant: str | None = None, seed: int = 0) -> Path:
    """Build `tiny_pipeline(family, variant=variant, seed=seed)` and `save_pretrained` it (safetensors).

    The folder loads with ``DiffusionPipeline.from_pretrained(path)``; a ``visalign_tiny.json``
    records what was built.
    """
    variant = _check(family, variant)
    path = Path(path)
    pipe = tiny_pipeline(family, variant=variant, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "visalign_tiny.json").write_text(json.dumps({"family": family, "variant": variant, "seed": seed}))
    return path


def tiny_model_dir(family: str, variant: str | None, root: str | Path, *, seed: int = 0) -> Path:
    """Saved tiny model under ``root/<family>-<variant>-<seed>``, built once and reused afterwards.

    A folder counts as built when its ``visalign_tiny.json`` exists (written last by `save_tiny`),
    so a half-written folder from an interrupted run is rebuilt.
    """
    variant = _check(family, variant)
    path = Path(root) / f"{family}-{variant}-{seed}"
    if not (path / "visalign_tiny.json").is_file():
        save_tiny(family, path, variant=variant, seed=seed)
    return path


def load_kwargs(path: str | Path) -> dict[str, None]:
    """Keywords that ``DiffusionPipeline.from_pretrained(path, **load_kwargs(path))`` needs for a
    saved folder: every non-optional component stored as ``[null, null]`` in ``model_index.json``
    (SD3 without T5) must be passed as ``None`` explicitly."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(path) / "model_index.json").read_text())
    cls = getattr(__import__("diffusers"), index["_class_name"], DiffusionPipeline)
    optional = set(getattr(cls, "_optional_components", []))
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value == [None, None] and name not in optional
    }


def bench_pipeline(family: str = "sd3", *, num_layers: int = 2, seed: int = 0):
    """An SD3-style pipeline at SD3-medium's transformer width with only ``num_layers`` layers.

    The transformer has SD3-medium's shapes -- 24 heads x 64 = 1536 wide, ``joint_attention_dim``
    4096, ``pooled_projection_dim`` 2048, patch 2 -- so one denoiser call costs what one
    SD3-medium layer pair costs; text encoders and VAE stay tiny (they run once per rollout, not
    per step). Meant for 64 px (``sample_size`` 8: 16 image tokens) and a short
    ``max_sequence_length`` (e.g. 32: 77 + 32 text tokens). Measured on one CPU thread with
    ``num_layers=2`` (159 M transformer parameters, ~0.64 GB float32, built in ~3.5 s): one
    transformer call 0.29 s at batch 1, 0.43 s at batch 2 (a CFG pair); a 1-step pipeline call
    0.45 s. The T5 encoder is 4096 wide (``joint_attention_dim``) but one layer of 2 heads x 8.
    """
    if family != "sd3":
        raise ValueError(f"bench_pipeline: only the 'sd3' family is available, got {family!r}")
    if num_layers < 1:
        raise ValueError(f"bench_pipeline: num_layers must be >= 1, got {num_layers}")
    return _sd3_pipeline("t5", seed, heads=24, head_dim=64, layers=num_layers, joint_dim=4096, pooled_each=1024)


def accelerate_command() -> str | None:
    """The ``accelerate`` command installed next to this Python (else the one on ``PATH``), for tests
    that ``accelerate launch`` several processes; ``None`` when there is none."""
    import shutil
    import sys

    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")
