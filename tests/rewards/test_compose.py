"""combine(): normalisation, transforms, ensembles, invalid masks, shared backbone forward passes."""

import pytest
import torch

from visalign import rewards as R
from visalign.rewards import Reward, RewardInfo, RewardOutput


class Fixed(Reward):
    """Returns preset scores (and validity) whatever the images: isolates the combination maths."""

    def __init__(self, name, scores, valid=None):
        self.info = RewardInfo(name, differentiable=True)
        self.values = torch.tensor(scores, dtype=torch.float32)
        self.mask = None if valid is None else torch.tensor(valid)

    def score(self, images, prompts, references, metadata):
        return RewardOutput(self.values * (1 + 0 * images.mean(dim=(1, 2, 3))), components={"raw": self.values},
                            valid=self.mask)


X = torch.zeros(4, 3, 8, 8)
A = [1.0, 2.0, 3.0, 6.0]
B = [4.0, 0.0, -1.0, 1.0]


def _z(v):
    v = torch.tensor(v)
    return (v - v.mean()) / (v.std() + 1e-6)


def test_weighted_sum_keeps_native_components():
    out = R.combine({Fixed("a", A): 2.0, Fixed("b", B): -0.5})(X)
    assert torch.allclose(out.scores, 2 * torch.tensor(A) - 0.5 * torch.tensor(B))
    assert torch.equal(out.components["a"], torch.tensor(A)) and torch.equal(out.components["b/raw"], torch.tensor(B))


@pytest.mark.parametrize("normalize,expected", [
    ("batch", lambda: _z(A) + _z(B)),
    (("affine", 0.5, 1.0), lambda: 0.5 * torch.tensor(A) + 1 + 0.5 * torch.tensor(B) + 1),
    ("affine:0.5,1", lambda: 0.5 * torch.tensor(A) + 1 + 0.5 * torch.tensor(B) + 1),
    ("group", lambda: torch.cat([_z(A[:2]), _z(A[2:])]) + torch.cat([_z(B[:2]), _z(B[2:])])),
])
def test_normalizers(normalize, expected):
    out = R.combine({Fixed("a", A): 1.0, Fixed("b", B): 1.0}, normalize=normalize, group_size=2)(X)
    assert torch.allclose(out.scores, expected(), atol=1e-5)


def test_group_from_metadata():
    meta = [{"group": "p"}, {"group": "q"}, {"group": "p"}, {"group": "q"}]
    out = R.combine({Fixed("a", A): 1.0}, normalize="group")(X, metadata=meta)
    expected = torch.empty(4)
    expected[[0, 2]], expected[[1, 3]] = _z([A[0], A[2]]), _z([A[1], A[3]])
    assert torch.allclose(out.scores, expected, atol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        R.combine({Fixed("a", A): 1.0}, normalize="group", group_size=3)(X)


@pytest.mark.parametrize("transform,fn", [
    ("sigmoid", torch.sigmoid), ("logsigmoid", torch.nn.functional.logsigmoid),
    ("clamp", lambda t: t.clamp(0, 1)), (("clamp", -1, 2), lambda t: t.clamp(-1, 2)),
])
def test_transforms(transform, fn):
    out = R.combine({Fixed("b", B): 1.0}, transform=transform)(X)
    assert torch.allclose(out.scores, fn(torch.tensor(B)))


def test_rank_transform():
    out = R.combine({Fixed("a", [5.0, -1.0, 2.0, 9.0]): 1.0}, transform="rank")(X)
    assert torch.allclose(out.scores, torch.tensor([2 / 3, 0.0, 1 / 3, 1.0]))


def test_ensembles():
    a, b = torch.tensor(A), torch.tensor(B)
    parts = {Fixed("a", A): 1.0, Fixed("b", B): 1.0}
    assert torch.allclose(R.combine(parts, ensemble="mean")(X).scores, (a + b) / 2)
    assert torch.allclose(R.combine(parts, ensemble="min")(X).scores, torch.minimum(a, b))
    k = 0.5
    expected = (a + b) / 2 - k * (a - b).abs() / 2  # population std of two values = |a - b| / 2
    assert torch.allclose(R.combine(parts, ensemble=("mean_minus_std", k))(X).scores, expected)
    with pytest.raises(ValueError, match="choose one of"):
        R.combine(parts, ensemble="median")


def test_invalid_masks_propagate_and_stay_out_of_statistics():
    out = R.combine({Fixed("a", A, valid=[True, True, False, True]): 1.0, Fixed("b", B): 1.0}, normalize="batch")(X)
    assert out.valid.tolist() == [True, True, False, True]
    assert torch.isnan(out.scores[2])
    keep = [0, 1, 3]
    expected = _z([A[i] for i in keep]) + _z([B[i] for i in keep])
    assert torch.allclose(out.scores[keep], expected, atol=1e-5)


def test_names_and_specs_are_loaded(tiny_open_clip, tiny_aesthetic_head, images, prompts):
    spec = f"clipscore:model={tiny_open_clip.arch},pretrained={tiny_open_clip.weights},scale=2.5"
    combined = R.combine({spec: 1.0})
    out = combined(images, prompts)
    assert spec in out.components and combined.info.inputs == ("images", "prompts")


def test_shared_backbone_one_forward_pass(tiny_open_clip, tiny_aesthetic_head, images, prompts):
    kw = dict(model=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights))
    aesthetic = R.load("aesthetic", head=str(tiny_aesthetic_head), **kw)
    clipscore = R.load("clipscore", **kw)
    assert aesthetic.backbone is clipscore.backbone  # one cached model
    model = clipscore.backbone.model
    calls = {"image": 0, "text": 0}
    encode_image, encode_text = model.encode_image, model.encode_text

    def count_image(*a, **k):
        calls["image"] += 1
        return encode_image(*a, **k)

    def count_text(*a, **k):
        calls["text"] += 1
        return encode_text(*a, **k)

    model.encode_image, model.encode_text = count_image, count_text
    try:
        apart = [aesthetic(images).scores, clipscore(images, prompts).scores]
        assert calls["image"] == 2
        calls["image"] = 0
        both = R.combine({aesthetic: 1.0, clipscore: 1.0, R.load("clipscore", scale=2.5, **kw): 1.0})(images, prompts)
        assert calls["image"] == 1 and calls["text"] == 2  # text: once apart, once combined
    finally:
        del model.encode_image, model.encode_text
    assert torch.allclose(both.components["aesthetic"], apart[0])
    assert torch.allclose(both.components["clipscore"], apart[1])
    assert torch.allclose(both.scores, apart[0] + apart[1] + 2.5 / 100 * apart[1], atol=1e-5)


def test_backbone_cache_key_ignores_spelling(tiny_open_clip):
    from visalign.rewards.backbones import get_backbone

    a = get_backbone("open_clip", tiny_open_clip.arch, str(tiny_open_clip.weights))
    b = get_backbone("open_clip", arch=tiny_open_clip.arch, pretrained=str(tiny_open_clip.weights),
                     resize="shortest_crop", dtype="float32", device="cpu")
    assert a is b
    assert get_backbone("open_clip", tiny_open_clip.arch, str(tiny_open_clip.weights), resize="letterbox") is not a


def test_to_moves_shared_backbone_and_rekeys_cache(tiny_open_clip, tiny_aesthetic_head, tmp_path):
    import shutil

    from visalign.rewards.backbones import get_backbone

    weights = str(tmp_path / "copy.pt")  # a backbone of its own: it ends on the meta device
    shutil.copy(tiny_open_clip.weights, weights)
    aesthetic = R.load("aesthetic", model=tiny_open_clip.arch, pretrained=weights, head=str(tiny_aesthetic_head))
    reward = R.combine({R.load("clipscore", model=tiny_open_clip.arch, pretrained=weights): 1.0, aesthetic: 1.0})
    backbone = reward.backbones[0]
    assert reward.to("meta") is reward and backbone.device.type == "meta"
    assert next(aesthetic.head.parameters()).device.type == "meta"
    assert get_backbone("open_clip", tiny_open_clip.arch, weights, device="meta") is backbone
