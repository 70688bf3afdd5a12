"""Prompt grammar, GenEval metadata and splits of the shapes world."""

import json

import pytest

from visalign.toy import prompts as P


def test_grammar_counts():
    ps = P.all_prompts()
    tags = [m["tag"] for m in ps]
    n_col, n_shp = len(P.COLORS), len(P.SHAPES)
    assert n_col >= 6 and n_shp >= 3
    pairs = n_shp * (n_shp - 1)  # ordered pairs of distinct shapes
    assert tags.count("single_object") == n_shp
    assert tags.count("two_object") == pairs
    assert tags.count("counting") == n_shp * 4
    assert tags.count("colors") == n_shp * n_col
    assert tags.count("position") == pairs * 4
    assert tags.count("color_attr") == pairs * n_col * (n_col - 1)
    assert len({m["prompt"] for m in ps}) == len(ps)


def test_geneval_layout():
    for m in P.all_prompts():
        assert set(m) <= {"tag", "include", "exclude", "prompt"} and m["tag"] in P.TAGS
        for c in m["include"] + m.get("exclude", []):
            assert set(c) <= {"class", "count", "color", "position"} and c["class"] in P.SHAPES
            assert isinstance(c["count"], int)
        json.dumps(m)  # serialisable like a GenEval metadata line
    m = P.parse_prompt("a circle left of a square")
    assert m["include"] == [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]
    assert P.parse_prompt("three triangles")["exclude"] == [{"class": "triangle", "count": 4}]


def test_parse_round_trip():
    for m in P.all_prompts():
        assert P.parse_prompt(m["prompt"]) == m


def test_parse_variants_and_errors():
    m = P.parse_prompt("A photo of two red circles.")
    assert m["tag"] == "counting" and m["include"] == [{"class": "circle", "count": 2, "color": "red"}]
    for bad in ["a dog", "two circle", "a circle and a square and a triangle", "", "a circle left of", "a red"]:
        with pytest.raises(ValueError, match="cannot parse"):
            P.parse_prompt(bad)


def test_splits_deterministic_and_heldout():
    train, ev = P.split("train"), P.split("eval")
    assert train == P.split("train") and ev == P.split("eval")
    assert len(ev) >= 200
    train_prompts = {m["prompt"] for m in train}
    held = [m for m in ev if m["heldout"]]
    assert held and not any(m["prompt"] in train_prompts for m in held)
    for m in train:  # no held-out colour binding or position composition in any training prompt
        for c in m["include"]:
            assert (c.get("color"), c["class"]) not in P.HELDOUT_BINDINGS
    assert {m["tag"] for m in held} >= {"colors", "color_attr", "position"}
    assert {m["tag"] for m in train} == set(P.TAGS)
    with pytest.raises(ValueError, match="unknown split"):
        P.split("test")


def test_overall_is_category_mean():
    assert P.overall({"counting": 0.5, "colors": 1.0}) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        P.overall({})
