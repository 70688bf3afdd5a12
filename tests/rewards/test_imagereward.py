"""ImageReward on a tiny random BLIP: official key names round-trip, strict loading, the score formula."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visalign import rewards
from visalign.rewards.imagereward import (
    MAX_TOKENS,
    REWARD_MEAN,
    REWARD_STD,
    ImageReward,
    ImageRewardModel,
    imagereward,
    load_official_state_dict,
    module_to_official,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = ["a", "red", "cat", "blue", "dog", "on", "the", "square", "photo", "of"]
V_DEPTH, T_DEPTH = 2, 2


def official_key_names() -> set[str]:
    """The official ImageReward.pt key names for the tiny architecture, written out literally."""
    names = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
             "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.patch_embed.proj.bias",
             "blip.visual_encoder.norm.weight", "blip.visual_encoder.norm.bias",
             "blip.text_encoder.embeddings.word_embeddings.weight",
             "blip.text_encoder.embeddings.position_embeddings.weight",
             "blip.text_encoder.embeddings.LayerNorm.weight", "blip.text_encoder.embeddings.LayerNorm.bias"}
    for i in range(V_DEPTH):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            names |= {f"blip.visual_encoder.blocks.{i}.{part}.weight", f"blip.visual_encoder.blocks.{i}.{part}.bias"}
    for i in range(T_DEPTH):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "crossattention.self.query", "crossattention.self.key",
                     "crossattention.self.value", "crossattention.output.dense", "crossattention.output.LayerNorm",
                     "intermediate.dense", "output.dense", "output.LayerNorm"):
            names |= {f"blip.text_encoder.encoder.layer.{i}.{part}.weight",
                      f"blip.text_encoder.encoder.layer.{i}.{part}.bias"}
    for i in (0, 2, 4, 6, 7):
        names |= {f"mlp.layers.{i}.weight", f"mlp.layers.{i}.bias"}
    return names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ImageReward saved in the official layout, and a BERT tokenizer folder."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    root = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.save_pretrained(root / "tokenizer")
    vision = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=V_DEPTH, num_attention_heads=1,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=T_DEPTH,
                          num_attention_heads=1, encoder_hidden_size=64, max_position_embeddings=64, is_decoder=True,
                          pad_token_id=0, bos_token_id=2, sep_token_id=3)
    torch.manual_seed(0)
    model = ImageRewardModel(vision, text).eval()
    with torch.no_grad():  # random init of BLIP is ~0; spread the head so scores differ between images
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = {module_to_official(k): v.clone() for k, v in model.state_dict().items()}
    unused = {"blip.vision_proj.weight": torch.zeros(8, 64), "blip.vision_proj.bias": torch.zeros(8),
              "blip.text_proj.weight": torch.zeros(8, 64), "blip.text_proj.bias": torch.zeros(8),
              "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]}
    torch.save({**official, **unused}, root / "ImageReward.pt")
    return {"root": root, "model": model, "tok": tok, "official": official, "unused": unused}


def test_official_names_round_trip(tiny):
    assert set(tiny["official"]) == official_key_names()
    reward = imagereward(str(tiny["root"]), tokenizer=str(tiny["root"] / "tokenizer"))
    loaded = reward.model.state_dict()
    for k, v in tiny["model"].state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert reward.model.image_size == 32 and reward.model.text.config.encoder_hidden_size == 64


def _official_pipeline(model, tok, pil_images, prompts):
    """The official scoring steps: PIL Resize(bicubic) + CenterCrop + Normalize, BERT tokens padded to 35,
    ViT tokens -> text encoder cross-attention -> [CLS] -> MLP -> (r - mean) / std."""
    from torchvision import transforms as T

    size = model.image_size
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(CLIP_MEAN, CLIP_STD)])
    pixels = torch.stack([tf(im) for im in pil_images])
    text = tok(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    assert text["input_ids"].shape[1] == 35
    with torch.no_grad():
        img = model.vision(pixel_values=pixels).last_hidden_state
        hid = model.text(input_ids=text["input_ids"], attention_mask=text["attention_mask"], encoder_hidden_states=img,
                         encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
        raw = model.mlp.layers(hid[:, 0]).squeeze(-1)
    return (raw - 0.16717362830052426) / 1.0333394966054072, raw


def test_scores_equal_official_formula(tiny):
    reward = rewards.load("imagereward", checkpoint=str(tiny["root"] / "ImageReward.pt"),
                          tokenizer=str(tiny["root"] / "tokenizer"))
    assert isinstance(reward, ImageReward)
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)  # model size: exact preprocessing
    prompts = ["a red cat", "a photo of a blue dog on the square", "unknownword"]
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]
    expected, raw = _official_pipeline(tiny["model"], tiny["tok"], pil, prompts)
    out = reward(u8.float() / 255, prompts)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["raw"], raw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, (out.components["raw"] - REWARD_MEAN) / REWARD_STD)
    assert out.scores.dtype == torch.float32 and out.valid.all() and out.scores.std() > 0
    # a 48x40 picture goes through bicubic shortest-side resize + centre crop; PIL rounds to uint8 in between
    big = torch.randint(0, 256, (1, 3, 48, 40), generator=g, dtype=torch.uint8)
    exp_big, _ = _official_pipeline(tiny["model"], tiny["tok"], [Image.fromarray(big[0].permute(1, 2, 0).numpy())],
                                    ["a cat"])
    torch.testing.assert_close(reward(big.float() / 255, ["a cat"]).scores, exp_big, atol=2e-2, rtol=2e-2)


def test_gradient_reaches_pixels(tiny):
    reward = imagereward(str(tiny["root"]), tokenizer=str(tiny["root"] / "tokenizer"), batch_size=1)
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    reward(x, ["a cat", "a dog"]).scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_strict_loading_lists_bad_keys(tiny):
    model = ImageRewardModel(tiny["model"].vision.config, tiny["model"].text.config)
    sd = dict(tiny["official"])
    del sd["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"vision\.encoder\.layers\.1\.self_attn\.qkv\.weight"):
        load_official_state_dict(model, sd)
    sd = {**tiny["official"], "blip.itm_head.weight": torch.zeros(2, 64)}
    with pytest.raises(ValueError, match=r"blip\.itm_head\.weight"):
        load_official_state_dict(model, sd)
    sd = {**tiny["official"], "mlp.layers.7.weight": torch.zeros(1, 8)}
    with pytest.raises(ValueError, match="shape mismatches"):
        load_official_state_dict(model, sd)
    load_official_state_dict(model, {**tiny["official"], **tiny["unused"]})  # the documented unused keys pass


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        imagereward(str(tmp_path))
