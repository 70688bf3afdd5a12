"""The ``metadata`` argument of the Reward contract: one task-metadata dict (or None) per sample."""

import pytest
import torch
from tests_support import MetadataRecorder

from visalign import rewards as R
from visalign.rewards import Reward, RewardInfo, RewardOutput, sample_metadata

X = torch.zeros(4, 3, 8, 8)


Recorder = MetadataRecorder


def test_sample_metadata_gives_one_dict_per_sample():
    assert sample_metadata(None, 3, "r") == [{}, {}, {}]
    entries = [{"tag": "counting"}, None, {"group": 1}]
    got = sample_metadata(entries, 3, "r")
    assert got == [{"tag": "counting"}, {}, {"group": 1}]
    got[0]["tag"] = "changed"  # copies: a reward cannot edit the caller's dicts
    assert entries[0]["tag"] == "counting"


@pytest.mark.parametrize("metadata, error, needles", [
    ([{}, {}], ValueError, ["'r'", "3 samples but 2 metadata entries"]),
    ({"tag": "counting"}, TypeError, ["'r'", "single dict", "one entry"]),
    ("a circle", TypeError, ["single str"]),
    ([{}, "seed=3", None], TypeError, ["metadata[1] is a str", "dict of task metadata"]),
])
def test_sample_metadata_errors_name_the_problem(metadata, error, needles):
    with pytest.raises(error) as err:
        sample_metadata(metadata, 3, "r")
    for needle in needles:
        assert needle in str(err.value)


def test_call_checks_metadata_before_score():
    reward = Recorder()
    reward(X)
    reward(X, metadata=[None, {"group": "a"}, None, {}])
    assert reward.seen == [None, [{}, {"group": "a"}, {}, {}]]
    with pytest.raises(ValueError, match="'recorder': got 4 samples but 3 metadata entries"):
        reward(X, metadata=[{}] * 3)
    assert len(reward.seen) == 2  # score never ran on the bad call


class Fixed(Reward):
    info = RewardInfo("fixed")

    def score(self, images, prompts, references, metadata):
        return RewardOutput(torch.tensor([1.0, 2.0, 3.0, 6.0]))


def test_group_labels_read_among_other_keys_and_half_labels_are_an_error():
    combined = R.combine({Fixed(): 1.0}, normalize="group")
    meta = [{"group": "p", "tag": "x"}, {"group": "q"}, {"group": "p"}, {"group": "q", "include": []}]
    out = combined(X, metadata=meta)  # groups p = samples 0, 2 (1, 3) and q = 1, 3 (2, 6): each z = -+1/sqrt(2)
    assert torch.allclose(out.scores, torch.tensor([-1.0, -1.0, 1.0, 1.0]) / 2**0.5, atol=1e-4)
    # entries without any group label: consecutive blocks of group_size, as without metadata
    blocks = R.combine({Fixed(): 1.0}, normalize="group", group_size=2)
    assert torch.equal(blocks(X, metadata=[{"tag": "counting"}, None, {}, {}]).scores, blocks(X).scores)
    with pytest.raises(ValueError, match=r"'group' label for samples \[0, 2\] but not for samples \[1, 3\]"):
        blocks(X, metadata=[{"group": "p"}, {}, {"group": "p"}, None])


def test_video_frames_give_each_frame_its_videos_entry():
    inner = Recorder()
    video = torch.zeros(2, 5, 3, 8, 8)
    R.video_frames(inner, frames=2)(video, metadata=[{"tag": "a"}, None])
    assert inner.seen == [[{"tag": "a"}, {"tag": "a"}, {}, {}]]
