"""The ``shapes`` reward through the registry."""

import math

import numpy as np
import pytest
import torch

from visalign import rewards as R
from visalign.toy.prompts import COLORS, parse_prompt
from visalign.toy.render import Obj, Scene, draw
from visalign.toy.verify import check, detect

BG = (0.93, 0.95, 0.9)


def _images():
    good = draw(Scene((Obj("square", COLORS["red"], 8, 10, 11), Obj("circle", COLORS["blue"], 24, 22, 11)), BG))
    wrong_colour = draw(Scene((Obj("square", COLORS["green"], 8, 10, 11), Obj("circle", COLORS["blue"], 24, 22, 11)), BG))
    three = draw(Scene(tuple(Obj("circle", COLORS["cyan"], x, 16, 8) for x in (6, 16, 26)), BG))
    return torch.from_numpy(np.stack([good, wrong_colour, three, three]))


PROMPTS = ["a red square and a blue circle", "a red square and a blue circle", "four circles", "a photo of a cat"]


def test_registered_and_info():
    info = R.info("shapes")
    assert info.inputs == ("images", "prompts") and not info.differentiable and info.native_range == (0.0, 1.0)
    assert "shapes" in [i.name for i in R.available()]


def test_scores_components_validity():
    reward = R.load("shapes")
    out = reward(_images(), PROMPTS)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (4,)
    assert out.valid.tolist() == [True, True, True, False]
    # partial credit computed by hand: all clauses; colour term 0 of 4 terms; 1 - |4 - 3| / 4
    assert out.scores[:3].tolist() == pytest.approx([1.0, 0.75, 0.75])
    assert math.isnan(out.scores[3]) and "cannot parse" in out.extras["reason"][3]
    assert out.components["strict"][:3].tolist() == [1.0, 0.0, 0.0]
    assert out.components["strict/color_attr"][:2].tolist() == [1.0, 0.0]
    assert math.isnan(out.components["strict/color_attr"][2]) and out.components["strict/counting"][2] == 0.0
    assert out.extras["tag"][:3] == ["color_attr", "color_attr", "counting"]
    strict = R.load("shapes:mode=strict")(_images(), PROMPTS)
    assert strict.scores[:3].tolist() == [1.0, 0.0, 0.0]


def test_metadata_overrides_text_and_any_size():
    imgs = torch.nn.functional.interpolate(_images()[:3], size=80, mode="bilinear", antialias=True)
    metas = [parse_prompt("a blue circle right of a square"), parse_prompt("a circle"), parse_prompt("three circles")]
    out = R.load("shapes", mode="strict")(imgs, ["ignored"] * 3, metadata=metas)
    expected = [float(check(detect(i), m).strict) for i, m in zip(_images()[:3], metas)]
    assert out.scores.tolist() == expected == [1.0, 1.0, 1.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown mode"):
        R.load("shapes", mode="soft")
    with pytest.raises(ValueError, match="needs prompts"):
        R.load("shapes")(_images())
    with pytest.raises(ValueError, match="not video"):
        R.load("shapes")(torch.rand(1, 2, 3, 32, 32), ["a circle"])


def test_metadata_without_geneval_keys_falls_back_to_the_prompt_per_sample():
    # the gallery used to pass file bookkeeping here, and every sample failed with KeyError: 'include'
    bookkeeping = [{"path": f"{i}.png", "seed": i, "model": "toy", "tag": "not a category"} for i in range(4)]
    plain = R.load("shapes")(_images(), PROMPTS)
    out = R.load("shapes")(_images(), PROMPTS, metadata=bookkeeping)
    assert out.valid.tolist() == plain.valid.tolist() == [True, True, True, False]
    assert out.scores[:3].tolist() == plain.scores[:3].tolist() == pytest.approx([1.0, 0.75, 0.75])
    assert out.extras["source"] == ["prompt"] * 4 and out.extras["tag"][:3] == ["color_attr", "color_attr", "counting"]


def test_metadata_is_read_per_sample():
    # sample 0: GenEval metadata that the image fails, whatever its (unparseable) text says;
    # 1: None; 2: other keys only; 3: GenEval metadata that judges the "cat" image (three circles)
    metas = [parse_prompt("a green square and a blue circle"), None, {"group": 7}, parse_prompt("three circles")]
    prompts = ["not in the grammar", PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    out = R.load("shapes:mode=strict")(_images(), prompts, metadata=metas)
    assert out.valid.all() and out.scores.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert out.extras["source"] == ["metadata", "prompt", "prompt", "metadata"]
    assert out.extras["tag"] == ["color_attr", "color_attr", "counting", "counting"]


@pytest.mark.parametrize("bad, needle", [
    ({"include": "a circle"}, "'include' must be a non-empty list"),
    ({"include": [{"class": "circle"}]}, "include[0] must be a dict with 'class' and 'count'"),
    ({"include": [{"class": "dog", "count": 1}]}, "class 'dog' is not a shape of the toy world"),
    ({"include": [{"class": "circle", "count": "two"}]}, "count must be a positive integer"),
    ({"include": [{"class": "circle", "count": 1, "color": "teal"}]}, "colour 'teal'"),
    ({"include": [{"class": "circle", "count": 1, "position": ["near", 0]}]}, "position must be"),
    ({"include": [{"class": "circle", "count": 3}], "exclude": [{"class": "circle"}]}, "exclude[0] must be a dict"),
])
def test_malformed_geneval_metadata_makes_only_that_sample_invalid(bad, needle):
    out = R.load("shapes")(_images()[:2], PROMPTS[:2], metadata=[bad, None])
    assert out.valid.tolist() == [False, True] and math.isnan(out.scores[0]) and out.scores[1] == 0.75
    assert out.extras["reason"][0].startswith("metadata[0]: ") and needle in out.extras["reason"][0]
