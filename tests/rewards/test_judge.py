"""Judges (rewards/judge.py): a reward as labeller (score, component, threshold), a labelling
function, the folder protocol (write, wait, read back; time out and give nothing), label counting;
each also as a pairwise judge (``compare``: one label per pair, ties from a reward give none)."""

import json

import pytest
import torch

from visalign.rewards.base import RewardOutput
from visalign.rewards.judge import FolderJudge, FunctionJudge, JudgeSettings, RewardJudge, build_judge


class _Brightness:
    """A stand-in reward: score = mean pixel, component "dark" = 1 - score; sample 0 invalid."""

    def __call__(self, images, prompts, metadata=None):
        s = images.float().mean((1, 2, 3))
        valid = torch.ones(len(s), dtype=torch.bool)
        valid[0] = False
        return RewardOutput(scores=torch.where(valid, s, float("nan")), components={"dark": 1 - s}, valid=valid)


def _images(values=(0.9, 0.2, 0.7, 0.4)):
    return torch.stack([torch.full((3, 4, 4), v) for v in values])


def test_reward_judge_score_component_threshold_and_count():
    imgs = _images()
    judge = RewardJudge(_Brightness())
    labels = judge(imgs, ["a"] * 4)
    assert torch.isnan(labels[0]) and torch.allclose(labels[1:], torch.tensor([0.2, 0.7, 0.4]))
    assert judge.labels == 3 and judge.calls == 1  # the invalid sample costs nothing
    binary = RewardJudge(_Brightness(), threshold=0.5)(imgs, ["a"] * 4)
    assert binary[1:].tolist() == [0.0, 1.0, 0.0]
    dark = RewardJudge(_Brightness(), component="dark", threshold=0.5)(imgs, ["a"] * 4)
    assert dark[1:].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="reports components \\['dark'\\]"):
        RewardJudge(_Brightness(), component="strict")(imgs, ["a"] * 4)


def test_the_gold_verifier_as_judge_gives_its_strict_verdict():
    import numpy as np

    from visalign.toy.prompts import parse_prompts
    from visalign.toy.render import render

    metas, _ = parse_prompts(["a red circle"])
    drawn = torch.as_tensor(render(metas[0], np.random.default_rng(0)))[None]  # a correct scene
    blank = torch.ones_like(drawn)  # white: no shape, a fail
    judge = build_judge({"reward": "shapes", "component": "strict"})
    labels = judge(torch.cat([drawn, blank]), ["a red circle"] * 2, [metas[0]] * 2)
    assert labels.tolist() == [1.0, 0.0] and judge.labels == 2
    pairs = judge.compare(torch.cat([drawn, blank]), torch.cat([blank, drawn]), ["a red circle"] * 2, [metas[0]] * 2)
    assert pairs.tolist() == [1.0, 0.0] and judge.labels == 4 and judge.calls == 2


def test_reward_judge_compares_pairs_and_ties_give_no_label():
    a, b = _images(), _images((0.5, 0.1, 0.7, 0.6))  # pair 0: a is invalid; pair 2: equal values
    judge = RewardJudge(_Brightness())
    labels = judge.compare(a, b, ["a"] * 4)
    assert torch.isnan(labels[[0, 2]]).all() and labels[[1, 3]].tolist() == [1.0, 0.0]
    assert judge.labels == 2 and judge.calls == 1  # the invalid pair and the tie cost nothing
    assert judge.compare(b, a, ["a"] * 4)[[1, 3]].tolist() == [0.0, 1.0]  # swapping the pair flips the label
    dark = RewardJudge(_Brightness(), component="dark").compare(a, b, ["a"] * 4)
    assert dark[[1, 3]].tolist() == [0.0, 1.0]
    # with a threshold the 0 / 1 verdicts are compared: only a pass against a fail is a preference
    verdicts = RewardJudge(_Brightness(), threshold=0.5).compare(a, b, ["a"] * 4)
    assert torch.isnan(verdicts[:3]).all() and verdicts[3] == 0.0
    # values closer than 1e-9 are a tie
    near = RewardJudge(_Brightness()).compare(_images((0.9, 0.3, 0.3, 0.3)), _images((0.9, 0.3 + 1e-12, 0.3, 0.3)),
                                              ["a"] * 4)
    assert torch.isnan(near).all()


def test_function_judge_pairwise_signature_and_label_range():
    seen = {}

    def prefer_brighter(images_a, images_b, prompts, metadata):
        seen.update(shapes=(tuple(images_a.shape), tuple(images_b.shape)), prompts=prompts, metadata=metadata)
        return [1, 0.5, None, 0]

    judge = FunctionJudge(prefer_brighter)
    labels = judge.compare(_images(), _images((0.1, 0.2, 0.3, 0.9)), ["a", "b", "c", "d"], [{"k": i} for i in range(4)])
    assert seen["shapes"] == ((4, 3, 4, 4), (4, 3, 4, 4)) and seen["prompts"] == ["a", "b", "c", "d"]
    assert seen["metadata"][2] == {"k": 2}
    assert labels[[0, 1, 3]].tolist() == [1.0, 0.5, 0.0] and torch.isnan(labels[2])
    assert judge.labels == 3 and judge.calls == 1  # a declared tie is a label
    assert FunctionJudge(lambda *a: None).compare(_images(), _images(), ["a"] * 4) is None
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FunctionJudge(lambda *a: [1, 2, 0, 0]).compare(_images(), _images(), ["a"] * 4)
    with pytest.raises(ValueError, match="returned 2 labels for 4 pairs"):
        FunctionJudge(lambda *a: [1, 0]).compare(_images(), _images(), ["a"] * 4)


def test_function_judge_none_means_no_label():
    judge = FunctionJudge(lambda images, prompts, metadata: [1, None, 0, 0.5])
    labels = judge(_images(), ["a"] * 4)
    assert torch.isnan(labels[1]) and labels[[0, 2, 3]].tolist() == [1.0, 0.0, 0.5] and judge.labels == 3
    with pytest.raises(ValueError, match="returned 2 labels for 4 images"):
        FunctionJudge(lambda *a: [1, 0])(_images(), ["a"] * 4)


def test_folder_protocol_writes_waits_and_reads_back(tmp_path):
    waits = []

    def human(seconds):  # someone labels the round while the run waits
        waits.append(seconds)
        rows = [json.loads(x) for x in (tmp_path / "round_0000" / "to_label.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [0, 1, 2, 3] and rows[2]["prompt"] == "c"
        assert all((tmp_path / "round_0000" / r["image"]).is_file() for r in rows)
        (tmp_path / "round_0000" / "labels.jsonl").write_text(
            "\n".join(json.dumps({"id": i, "label": v}) for i, v in [(0, 1), (2, 0), (3, None)]) + "\n")

    judge = FolderJudge(tmp_path, timeout_s=60, poll_s=1, sleep=human)
    labels = judge(_images(), ["a", "b", "c", "d"])
    assert len(waits) == 1 and labels[0] == 1 and labels[2] == 0 and torch.isnan(labels[[1, 3]]).all()
    assert judge.labels == 2 and judge.rounds == 1
    state = judge.state_dict()
    again = FolderJudge(tmp_path, timeout_s=0)
    again.load_state_dict(state)
    assert again.round_dir(again.rounds).name == "round_0001"  # a resumed run writes the next round


def test_folder_protocol_times_out_with_no_labels(tmp_path):
    slept = []
    judge = FolderJudge(tmp_path, timeout_s=0.0, sleep=slept.append)
    assert judge(_images(), ["a"] * 4) is None
    assert judge.labels == 0 and judge.calls == 1 and not slept
    assert (tmp_path / "round_0000" / "to_label.jsonl").is_file()


def test_folder_protocol_for_pairs_writes_both_images_and_reads_back(tmp_path):
    import numpy as np
    from PIL import Image

    a, b = _images(), _images((0.1, 0.2, 0.3, 0.8))
    rows = []

    def human(seconds):
        rows.extend(json.loads(x) for x in (tmp_path / "round_0000" / "to_label.jsonl").read_text().splitlines())
        (tmp_path / "round_0000" / "labels.jsonl").write_text(
            "\n".join(json.dumps({"id": i, "label": v}) for i, v in [(0, 1), (1, 0.5), (2, 0), (3, None)]) + "\n")

    judge = FolderJudge(tmp_path, timeout_s=60, poll_s=1, sleep=human)
    labels = judge.compare(a, b, ["a", "b", "c", "d"], [None, {"n": 1}, None, None])
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and all(r["task"] == "pairwise" for r in rows)
    assert rows[1]["prompt"] == "b" and rows[1]["metadata"] == {"n": 1}
    for r, va, vb in zip(rows, (0.9, 0.2, 0.7, 0.4), (0.1, 0.2, 0.3, 0.8)):  # the pair's own images, in order
        for key, v in (("image_a", va), ("image_b", vb)):
            pixels = np.asarray(Image.open(tmp_path / "round_0000" / r[key]), dtype=np.float32) / 255
            assert abs(pixels.mean() - v) < 0.01
    assert labels[:3].tolist() == [1.0, 0.5, 0.0] and torch.isnan(labels[3])
    assert judge.labels == 3 and judge.rounds == 1 and judge.calls == 1
    # no labels file within the timeout: the round gives nothing and costs nothing
    slept = []
    late = FolderJudge(tmp_path / "late", timeout_s=0.0, sleep=slept.append)
    assert late.compare(a, b, ["a"] * 4) is None and late.labels == 0 and late.calls == 1 and not slept
    assert "image_b" in (tmp_path / "late" / "round_0000" / "to_label.jsonl").read_text()
    # a pair's label is a probability
    (tmp_path / "bad" / "round_0000").mkdir(parents=True)
    (tmp_path / "bad" / "round_0000" / "labels.jsonl").write_text('{"id": 1, "label": 2}\n')
    with pytest.raises(ValueError, match="line 1: a pair's label is 1"):
        FolderJudge(tmp_path / "bad", timeout_s=0).compare(a, b, ["a"] * 4)


def test_folder_protocol_rejects_bad_rows(tmp_path):
    (tmp_path / "round_0000").mkdir()
    (tmp_path / "round_0000" / "labels.jsonl").write_text('{"id": 9, "label": 1}\n')
    with pytest.raises(ValueError, match="id 9 is not one of the round's images"):
        FolderJudge(tmp_path, timeout_s=0)(_images(), ["a"] * 4)


def test_settings_teach():
    assert JudgeSettings.parse("shapes").reward == "shapes"
    with pytest.raises(ValueError, match="exactly one of reward"):
        JudgeSettings()
    with pytest.raises(ValueError, match="'module:function'"):
        JudgeSettings(function="nocolon")
    with pytest.raises(ValueError, match="belong to a reward judge"):
        JudgeSettings(folder="x", threshold=0.5)
    with pytest.raises(ValueError, match="cannot be imported"):
        build_judge({"function": "no_such_module_xyz:f"})
