"""CLIP-family rewards against scores computed independently with the official pipelines."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visalign import rewards as R
from visalign.rewards.backbones import clear_backbone_cache, get_backbone
from visalign.rewards.clip_rewards import AESTHETIC_HEAD_KEYS, AestheticHead, load_aesthetic_head
from visalign.rewards.loading import MissingWeightsError

REAL_HEAD = Path(__file__).resolve().parents[3] / "shared/data/weights/laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth"


# Our tensor preprocessing vs the official PIL pipelines differs by about one grey level at some
# pixels (PIL resamples in 8-bit fixed point); random tiny models amplify that, so cosines agree
# to ~3e-4 absolute here (1e-3 relative on scores of trained size, e.g. the aesthetic score).
COS_ATOL = 5e-4


def _pils(images):
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in u8]


def _open_clip_reference(arch, weights, images, prompts, mode):
    """cos(image, text) with open_clip's own loader, transform and tokenizer."""
    import open_clip
    from open_clip.transform import image_transform

    model = open_clip.create_model(arch, pretrained=str(weights)).eval()
    tf = image_transform(32, is_train=False, resize_mode=mode)
    pix = torch.stack([tf(p) for p in _pils(images)])
    with torch.no_grad():
        img = model.encode_image(pix)
        txt = model.encode_text(open_clip.get_tokenizer(arch)(prompts))
    return torch.nn.functional.cosine_similarity(img, txt), img


def _hf_reference(path, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    inputs = proc(text=prompts, images=_pils(images), return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    return torch.nn.functional.cosine_similarity(img, txt), model.logit_scale.exp().item()


def test_clipscore_equals_100_cos(tiny_open_clip, images, prompts):
    cos, _ = _open_clip_reference(tiny_open_clip.arch, tiny_open_clip.weights, images, prompts, "shortest")
    reward = R.load(f"clipscore:model={tiny_open_clip.arch},pretrained={tiny_open_clip.weights}")
    out = reward(images, prompts)
    assert torch.allclose(out.components["cos"], cos, atol=COS_ATOL)
    assert torch.allclose(out.scores, 100 * out.components["cos"].clamp(min=0), atol=1e-5)
    assert torch.allclose(out.scores, 100 * cos.clamp(min=0), atol=100 * COS_ATOL)
    hessel = R.load("clipscore", model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights), scale=2.5)
    assert torch.allclose(hessel(images, prompts).scores, 2.5 * out.components["cos"].clamp(min=0), atol=1e-6)
    assert (out.scores >= 0).all()


def test_clipscore_transformers_backend(tiny_hf_clip, images, prompts):
    cos, _ = _hf_reference(tiny_hf_clip, images, prompts)
    out = R.load("clipscore", model=str(tiny_hf_clip), pretrained=None)(images, prompts)
    assert torch.allclose(out.components["cos"], cos, atol=COS_ATOL)


def test_pickscore_is_logit_scale_times_cos(tiny_hf_clip, images, prompts):
    cos, scale = _hf_reference(tiny_hf_clip, images, prompts)
    out = R.load("pickscore", model=str(tiny_hf_clip), processor=str(tiny_hf_clip))(images, prompts)
    assert torch.allclose(out.scores, scale * out.components["cos"], rtol=1e-6)
    assert torch.allclose(out.scores, scale * cos, atol=scale * COS_ATOL)


def test_hpsv2_letterbox_cos(tiny_open_clip, images, prompts):
    cos, _ = _open_clip_reference(tiny_open_clip.arch, tiny_open_clip.hps_weights, images, prompts, "longest")
    reward = R.load("hpsv2", checkpoint=str(tiny_open_clip.hps_weights), model=tiny_open_clip.arch)
    assert reward.backbone.spec.resize == "letterbox"
    assert torch.allclose(reward(images, prompts).scores, cos, atol=COS_ATOL)


def _affine_of_head(state):
    """The aesthetic MLP has no activations: W = W7 W6 W4 W2 W0, b follows."""
    w = torch.eye(state["layers.0.weight"].shape[1], dtype=torch.float64)
    b = torch.zeros(state["layers.0.weight"].shape[1], dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):
        wi, bi = state[f"layers.{i}.weight"].double(), state[f"layers.{i}.bias"].double()
        w, b = wi @ w, wi @ b + bi
    return w[0], b[0]


def test_aesthetic_is_affine_map_of_normalised_embedding(tiny_open_clip, tiny_aesthetic_head, images):
    from safetensors.torch import load_file

    _, emb = _open_clip_reference(tiny_open_clip.arch, tiny_open_clip.weights, images, ["x"] * 4, "shortest")
    w, b = _affine_of_head(load_file(str(tiny_aesthetic_head)))
    expected = (emb.double() / emb.double().norm(dim=-1, keepdim=True)) @ w + b
    reward = R.load("aesthetic", model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights),
                    head=str(tiny_aesthetic_head))
    assert torch.allclose(reward(images).scores.double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"real LAION aesthetic head not present at {REAL_HEAD}")
def test_real_aesthetic_head_loads_strictly_and_is_affine():
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(AESTHETIC_HEAD_KEYS)
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    head = load_aesthetic_head(str(REAL_HEAD), 768)
    w, b = _affine_of_head(state)
    x = torch.nn.functional.normalize(torch.randn(8, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.allclose(head(x).double(), x.double() @ w + b, atol=1e-4)


def test_official_checkpoint_key_names(tiny_open_clip, tiny_hf_clip, tiny_dinov2):
    """Key names of the official checkpoints, written out: our model classes must expect them."""
    assert AESTHETIC_HEAD_KEYS == ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias",
                                   "layers.4.weight", "layers.4.bias", "layers.6.weight", "layers.6.bias",
                                   "layers.7.weight", "layers.7.bias")
    assert set(AestheticHead(768).state_dict()) == set(AESTHETIC_HEAD_KEYS)
    hps = set(get_backbone("open_clip", tiny_open_clip.arch, str(tiny_open_clip.hps_weights)).model.state_dict())
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.ln_post.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight",
            "positional_embedding", "text_projection", "ln_final.weight", "logit_scale",
            "transformer.resblocks.0.mlp.c_fc.weight"} <= hps
    pick = set(get_backbone("transformers-clip", str(tiny_hf_clip), str(tiny_hf_clip)).model.state_dict())
    assert {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
            "text_model.embeddings.token_embedding.weight", "visual_projection.weight", "text_projection.weight",
            "logit_scale", "vision_model.encoder.layers.0.self_attn.q_proj.weight"} <= pick
    # DINOv2 hub checkpoints (facebook/dinov2-*) use the transformers-4 names; transformers 5 converts on load.
    assert {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "layernorm.weight"} <= set(_official_dino_state(tiny_dinov2))


DINO_RENAMES = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


def _official_dino_state(folder):
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for k, v in state.items():
        for new, old in DINO_RENAMES.items():
            k = k.replace(new, old)
        out[k] = v
    return out


def test_dinov2_official_key_names_load_strictly(tiny_dinov2, tmp_path, images):
    import shutil

    from safetensors.torch import save_file

    official = _official_dino_state(tiny_dinov2)
    assert {"encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.0.layer_scale1.lambda1", "encoder.layer.0.mlp.fc1.weight", "encoder.layer.1.norm2.bias"} <= set(official)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(tiny_dinov2) / name, tmp_path / name)
    save_file(official, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    a = R.load("dino", model=str(tiny_dinov2))(images, references=images.flip(0)).scores
    b = R.load("dino", model=str(tmp_path))(images, references=images.flip(0)).scores
    assert torch.allclose(a, b)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(tiny_dinov2) / name, broken / name)
    official.pop("encoder.layer.0.attention.attention.query.weight")
    save_file(official, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys .*encoder.layer.0.attention.q_proj.weight"):
        R.load("dino", model=str(broken))


def test_strict_loading_rejects_missing_and_unexpected_keys(tiny_open_clip, tmp_path):
    state = torch.load(tiny_open_clip.weights, weights_only=True)
    state.pop("visual.conv1.weight")
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing keys \[visual.conv1.weight\]"):
        R.load("clipscore", model=tiny_open_clip.arch, pretrained=str(tmp_path / "missing.pt"))
    state = torch.load(tiny_open_clip.weights, weights_only=True)
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \[visual.extra\]"):
        R.load("clipscore", model=tiny_open_clip.arch, pretrained=str(tmp_path / "extra.pt"))
    head = AestheticHead(32).state_dict()
    head.pop("layers.7.bias")
    torch.save(head, tmp_path / "head.pt")
    with pytest.raises(ValueError, match=r"missing keys \[layers.7.bias\]"):
        load_aesthetic_head(str(tmp_path / "head.pt"), 32)


def test_pickled_objects_are_refused(tmp_path, tiny_open_clip):
    torch.save({"state_dict": object()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        R.load("hpsv2", checkpoint=str(tmp_path / "pickled.pt"), model=tiny_open_clip.arch)


def test_offline_missing_weights_name_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match=r"xswu/HPSv2.*huggingface-cli download"):
        R.load("hpsv2")
    with pytest.raises(MissingWeightsError, match=r"timm/vit_large_patch14_clip_224.openai"):
        R.load("clipscore")  # open_clip tag 'openai' -> its hub repo
    with pytest.raises(MissingWeightsError, match="nobody/no-such-clip"):
        R.load("pickscore", model="nobody/no-such-clip")
    monkeypatch.setenv("VISALIGN_CACHE", str(tmp_path / "vc"))
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        load_aesthetic_head(None, 768)


def test_stub_tokenizer_is_rejected(tiny_hf_clip, tmp_path):
    from transformers import CLIPTokenizer

    CLIPTokenizer().save_pretrained(tmp_path)  # the 3-token default vocabulary: what a broken lookup gives
    clear_backbone_cache()
    with pytest.raises(ValueError, match="tokenizer"):
        R.load("pickscore", model=str(tiny_hf_clip), processor=str(tmp_path))
    clear_backbone_cache()


def test_batch_chunks_give_the_same_scores(tiny_open_clip, images, prompts):
    kw = dict(model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))
    whole = R.load("clipscore", **kw)(images, prompts).components["cos"]
    chunked = R.load("clipscore", batch_size=3, **kw)(images, prompts).components["cos"]
    R.load("clipscore", batch_size=0, **kw)  # reset the shared backbone's chunking (0 = whole batch)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_tokenizers_agree(tiny_hf_clip, prompts):
    """The offline-built transformers tokenizer gives open_clip's token ids (so the fixtures are faithful)."""
    import open_clip
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tiny_hf_clip)(prompts, padding="max_length", max_length=77)["input_ids"]
    theirs = open_clip.tokenize(prompts)
    for a, b in zip(ours, theirs.tolist()):
        n = a.index(49407) + 1
        assert a[:n] == b[:n]
    assert np.asarray(ours).shape == (4, 77)


def test_bfloat16_backbone(tiny_open_clip, images, prompts):
    kw = dict(model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))
    full = R.load("clipscore", **kw)
    half = R.load("clipscore", dtype="bfloat16", **kw)
    assert half.backbone is not full.backbone and half.backbone.dtype == torch.bfloat16
    out = half(images, prompts)
    assert out.scores.dtype == torch.float32
    assert torch.allclose(out.components["cos"], full(images, prompts).components["cos"], atol=0.03)
