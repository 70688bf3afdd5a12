"""Prompt sources and the resumable prompt sampler."""

import pytest

from visalign.trainers.common.data import PromptSampler, balance, load_prompts


def test_toy_split_and_balance():
    train = load_prompts("toy:train")
    tags = [r["metadata"]["tag"] for r in train]
    assert tags.count("color_attr") > 10 * tags.count("single_object")  # unbalanced as written
    balanced = balance(train, "tag")
    counts = {t: [r["metadata"]["tag"] for r in balanced].count(t) for t in set(tags)}
    assert len(set(counts.values())) == 1  # every category equally often
    assert {r["prompt"] for r in balanced} == {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="no metadata"):
        balance([{"prompt": "x", "metadata": None}], "tag")


def test_prompt_sampler_epochs_and_state(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    recs = load_prompts(str(path))
    s = PromptSampler(recs, seed=3)
    first = [r["prompt"] for r in s.next(3)]
    assert sorted(first) == ["a", "b", "c"]  # without replacement within an epoch
    state = s.state_dict()
    nxt = [r["prompt"] for r in s.next(4)]
    t = PromptSampler(recs, seed=3)
    t.load_state_dict(state)
    assert [r["prompt"] for r in t.next(4)] == nxt
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))
