"""Renderer: determinism, range, geometry of the drawn scenes."""

import numpy as np
import pytest

from visalign.toy.prompts import COLORS, parse_prompt, split
from visalign.toy.render import _separated, draw, relations, render, sample_scene


def test_deterministic_and_seeded():
    m = parse_prompt("a red square and a blue circle")
    a = render(m, np.random.default_rng(7))
    b = render(m, np.random.default_rng(7))
    c = render(m, np.random.default_rng(8))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_antialiased_and_resolution():
    m = parse_prompt("a circle")
    scene = sample_scene(m, np.random.default_rng(0), resolution=64)
    img = draw(scene)
    assert img.shape == (3, 64, 64)
    obj = scene.objects[0]
    bg, col = np.asarray(scene.background), np.asarray(obj.color)
    # edge pixels are blends strictly between background and object colour
    t = ((img.transpose(1, 2, 0) - bg) @ (col - bg)) / ((col - bg) @ (col - bg))
    assert ((t > 0.1) & (t < 0.9)).sum() > 10


@pytest.mark.parametrize("seed", range(3))
def test_scenes_satisfy_metadata(seed):
    rng = np.random.default_rng(seed)
    for m in split("eval")[::7]:
        scene = sample_scene(m, rng)
        objs = scene.objects
        assert len(objs) == sum(c["count"] for c in m["include"])
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                assert _separated(objs[i], objs[j])
        for o in objs:
            assert min(o.box) >= 0 and max(o.box) <= 32
        k = 0
        for c in m["include"]:
            for o in objs[k:k + c["count"]]:
                assert o.shape == c["class"]
                if "color" in c:
                    assert np.abs(np.asarray(o.color) - COLORS[c["color"]]).max() <= 0.04 + 1e-6
            k += c["count"]
        if m["tag"] == "position":
            rel = m["include"][1]["position"][0]
            assert rel in relations(objs[1].box, objs[0].box)


def test_relations_geneval_rule():
    a, b = (0, 10, 6, 16), (20, 10, 26, 16)
    assert relations(a, b) == {"left of"} and relations(b, a) == {"right of"}
    assert relations((10, 0, 16, 6), (10, 20, 16, 26)) == {"above"}
    assert relations((0, 0, 6, 6), (1, 1, 7, 7)) == set()  # offsets within 0.1 * sizes cancel
