"""Gold verifier: accuracy on renderer images, failure on crafted wrong images, partial credit."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from visalign.toy.prompts import COLORS, parse_prompt, split
from visalign.toy.render import Obj, Scene, draw, render_batch
from visalign.toy.verify import check, detect, verify


def _eval_sample(n, seed):
    rng = np.random.default_rng(seed)
    ev = split("eval")
    metas = [ev[i] for i in rng.integers(len(ev), size=n)]
    return metas, render_batch(metas, rng)


def _degrade(x, rng):
    x = ndimage.gaussian_filter(x, sigma=(0, 0, 0.5, 0.5))
    return np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1).astype(np.float32)


def test_accuracy_clean_and_degraded():
    metas, imgs = _eval_sample(400, seed=11)  # seed unlike the renderer's development seeds
    clean = np.mean([v.strict for v in verify(imgs, metadata=metas)])
    assert clean >= 0.99
    degraded = np.mean([v.strict for v in verify(_degrade(imgs, np.random.default_rng(1)), metadata=metas)])
    assert degraded >= 0.95
    assert all(v.partial == 1.0 for v in verify(imgs[:50], metadata=metas[:50]) if v.strict)


def test_any_size_and_prompt_text():
    metas, imgs = _eval_sample(40, seed=3)
    x = torch.from_numpy(imgs)
    for size in (64, 96):  # rendered at 32, enlarged; and natively at 64 below
        big = torch.nn.functional.interpolate(x, size=size, mode="nearest")
        assert np.mean([v.strict for v in verify(big, prompts=[m["prompt"] for m in metas])]) >= 0.95
    native = render_batch(metas, np.random.default_rng(5), resolution=64)
    assert np.mean([v.strict for v in verify(native, metadata=metas)]) >= 0.95


def _obj(shape, color, cx, cy, size=11.0):
    return Obj(shape, COLORS[color], cx, cy, size)


BG = (0.95, 0.93, 0.9)


def _img(*objs):
    return draw(Scene(tuple(objs), BG))


def test_right_images_pass():
    img = _img(_obj("square", "red", 8, 10), _obj("circle", "blue", 24, 22))
    assert check(detect(img), parse_prompt("a red square and a blue circle")).strict
    assert check(detect(img), parse_prompt("a blue circle right of a square")).strict
    three = _img(*[_obj("triangle", "green", x, 16, 8.0) for x in (6, 16, 26)])
    assert check(detect(three), parse_prompt("three triangles")).strict


def test_crafted_wrong_images_fail_with_partial_credit():
    # wrong count: "three circles" with two -> count term 1 - 1/3
    v = check(detect(_img(_obj("circle", "red", 8, 16), _obj("circle", "red", 24, 16))), parse_prompt("three circles"))
    assert not v.strict and v.partial == pytest.approx(2 / 3)
    # too many: "two squares" with three -> count term 1 - 1/2, and the exclude clause fails
    img = _img(*[_obj("square", "blue", x, 16, 7.0) for x in (5, 16, 27)])
    v = check(detect(img), parse_prompt("two squares"))
    assert not v.strict and v.partial == pytest.approx(0.5)
    # wrong colour: terms (count 1, colour 0, count 1, colour 1) -> 0.75
    img = _img(_obj("square", "green", 8, 10), _obj("circle", "blue", 24, 22))
    v = check(detect(img), parse_prompt("a red square and a blue circle"))
    assert not v.strict and v.partial == pytest.approx(0.75)
    # swapped colours between the two objects -> both colour terms 0
    img = _img(_obj("square", "blue", 8, 10), _obj("circle", "red", 24, 22))
    assert check(detect(img), parse_prompt("a red square and a blue circle")).partial == pytest.approx(0.5)
    # swapped position: terms (1, 1, position 0)
    img = _img(_obj("circle", "cyan", 24, 16), _obj("square", "purple", 8, 16))
    v = check(detect(img), parse_prompt("a circle left of a square"))
    assert not v.strict and v.partial == pytest.approx(2 / 3)
    # missing object: the circle clause gets 0, its position term 0
    v = check(detect(_img(_obj("square", "purple", 8, 16))), parse_prompt("a circle left of a square"))
    assert not v.strict and v.partial == pytest.approx(1 / 3)
    # wrong shape: a circle drawn for "a yellow triangle" -> count 0 and colour 0
    v = check(detect(_img(_obj("circle", "yellow", 16, 16))), parse_prompt("a yellow triangle"))
    assert not v.strict and v.partial == 0.0
    # blank image
    v = check(detect(_img()), parse_prompt("a circle and a square"))
    assert not v.strict and v.partial == 0.0


def test_crafted_from_renderer_scenes():
    """Perturb real renderer scenes: every perturbation must turn a pass into a fail."""
    from visalign.toy.render import sample_scene

    rng = np.random.default_rng(21)
    names = list(COLORS)
    for m in [x for x in split("eval") if x["tag"] in ("color_attr", "position", "counting")][::9]:
        scene = sample_scene(m, rng)
        assert check(detect(draw(scene)), m).strict, m["prompt"]
        objs = list(scene.objects)
        bad = [replace(scene, objects=tuple(objs[:-1]))]  # missing object
        if m["tag"] == "color_attr":
            c = m["include"][0]["color"]
            other = next(n for n in names if n not in (c, m["include"][1]["color"]))
            bad.append(replace(scene, objects=(replace(objs[0], color=COLORS[other]), *objs[1:])))
        if m["tag"] == "position":
            a, b = objs
            bad.append(replace(scene, objects=(replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy))))
        for b in bad:
            assert not check(detect(draw(b)), m).strict, m["prompt"]


def test_verify_errors():
    with pytest.raises(ValueError, match="needs prompts"):
        verify(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="cannot parse"):
        verify(np.zeros((1, 3, 32, 32), np.float32), prompts=["a photo of a cat"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        verify(np.zeros((1, 4, 32, 32), np.float32), prompts=["a circle"])


@pytest.mark.slow
def test_shaded_object_is_one_object_and_touching_objects_split():
    # a square shaded blue -> cyan (60 / 40) is one blue square, as a detect-then-colour verifier sees it
    img = _img(_obj("square", "blue", 16, 16, 12.0))
    img[:, 10:22, 17:22] = np.asarray(COLORS["cyan"], np.float32)[:, None, None]
    found = detect(img)
    assert [(o.shape, o.color) for o in found] == [("square", "blue")]
    # two squares that touch side by side form a 2:1 blob, which is split by colour
    img = _img(_obj("square", "red", 10, 16, 10.0), _obj("square", "green", 20, 16, 10.0))
    assert sorted((o.shape, o.color) for o in detect(img)) == [("square", "green"), ("square", "red")]
