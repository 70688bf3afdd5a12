"""Shared pytest fixtures: offline tiny models of every family, saved once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub-aware import: tests never touch the network

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(family, variant=None, seed=0) -> Path`` of a saved tiny pipeline (diffusers layout).

    Each (family, variant, seed) is built and saved once per test session, under a session temp
    folder; load it with ``DiffusionPipeline.from_pretrained(path)``. Treat the folder as read-only.
    See `visalign.testing` for the families, variants and valid call parameters.
    """
    from visalign import testing

    root = tmp_path_factory.mktemp("tiny_models")

    def factory(family: str, variant: str | None = None, seed: int = 0) -> Path:
        return testing.tiny_model_dir(family, variant, root, seed=seed)

    return factory


import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests_support.py: helpers shared by test modules


# ---- tiny reward backbones (shared by reward, gallery and recipe tests) ----------------------
# Tiny random-weight backbones for reward tests, saved to a temp dir and loaded through the real loaders.
#
# - ``tiny_open_clip``: an open_clip config ``visalign-tiny-clip`` (ViT 32 px, patch 8, width 32, 2 layers,
#   embed 32; real CLIP BPE vocabulary) registered with ``open_clip.add_model_config``; weights saved
#   as a plain state dict (``clip.pt``) and HPS-style (``hps.pt``, under ``"state_dict"``).
# - ``tiny_hf_clip``: a transformers ``CLIPModel`` folder with tokenizer (built offline from
#   open_clip's BPE files) and a ``preprocessor_config.json``.
# - ``tiny_dinov2``: a transformers ``Dinov2Model`` folder with a ``BitImageProcessor`` config
#   (shortest side 40, crop 32, ImageNet statistics).
#

TINY_CLIP = "visalign-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass
class TinyOpenClip:
    arch: str
    weights: Path  # plain state dict
    hps_weights: Path  # {"state_dict": ...}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> TinyOpenClip:
    import open_clip

    root = tmp_path_factory.mktemp("tiny_open_clip")
    cfg_path = root / f"{TINY_CLIP}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    with torch.no_grad():  # a larger logit scale than init so scaled scores are not trivially ~14
        model.logit_scale.fill_(3.0)
    torch.save(model.state_dict(), root / "clip.pt")
    torch.manual_seed(1)
    other = open_clip.create_model(TINY_CLIP, pretrained=None)
    torch.save({"state_dict": other.state_dict(), "epoch": 1}, root / "hps.pt")
    return TinyOpenClip(TINY_CLIP, root / "clip.pt", root / "hps.pt")


def _clip_tokenizer(path: Path):
    """A transformers CLIPTokenizer with the real CLIP BPE vocabulary, built offline from open_clip's files."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    # open_clip names the specials <start_of_text>/<end_of_text>; transformers uses <|startoftext|>/<|endoftext|>
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file))
    return tok


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("tiny_hf_clip")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(root)
    tok = _clip_tokenizer(tmp_path_factory.mktemp("bpe"))
    tok.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("tiny_dinov2")
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                       image_size=32)
    torch.manual_seed(0)
    Dinov2Model(cfg).eval().save_pretrained(root)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root)
    return root


@pytest.fixture
def images() -> torch.Tensor:
    """(4, 3, 40, 48) smooth random images in [0, 1], quantised to the uint8 grid."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(4, 3, 6, 7, generator=g)
    x = torch.nn.functional.interpolate(base, size=(40, 48), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


PROMPTS = ["a red cube", "two blue spheres", "a cat on a mat", "a photo of a dog"]


@pytest.fixture(scope="session")
def tiny_aesthetic_head(tmp_path_factory) -> Path:
    """An aesthetic head for the 32-d tiny CLIP, saved as safetensors (keys layers.{0,2,4,6,7}.*)."""
    from safetensors.torch import save_file

    from visalign.rewards.clip_rewards import AestheticHead

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    save_file(AestheticHead(32).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_rewards(tiny_open_clip, tiny_hf_clip, tiny_dinov2, tiny_aesthetic_head):
    """name -> (factory of the reward on tiny weights, is_video)."""
    from visalign import rewards as R

    oc = dict(model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))
    return {
        "aesthetic": (lambda: R.load("aesthetic", head=str(tiny_aesthetic_head), **oc), False),
        "artifact": (lambda: R.load("artifact"), False),
        "clipscore": (lambda: R.load("clipscore", **oc), False),
        "dino": (lambda: R.load("dino", model=str(tiny_dinov2)), False),
        "hpsv2": (lambda: R.load("hpsv2", checkpoint=str(tiny_open_clip.hps_weights), model=tiny_open_clip.arch), False),
        "jpeg_compressibility": (lambda: R.load("jpeg_compressibility"), False),
        "jpeg_incompressibility": (lambda: R.load("jpeg_incompressibility"), False),
        "pickscore": (lambda: R.load("pickscore", model=str(tiny_hf_clip), processor=str(tiny_hf_clip)), False),
        "temporal_consistency": (lambda: R.load("temporal_consistency", model=str(tiny_dinov2)), True),
        "video_frames": (lambda: R.load("video_frames", reward="clipscore", frames=2, **oc), True),
    }


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)
