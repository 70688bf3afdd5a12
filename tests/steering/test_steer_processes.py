"""`visalign steer` split across processes (``accelerate launch --num_processes 2``, CPU, gloo) and
resumed: the same images and one manifest in job order as one process; a killed run's manifest is
continued with ``--resume``, and an existing run is never appended to silently."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visalign.cli import main
from visalign.io import read_jsonl
from visalign.shards import part_files
from visalign.testing import accelerate_command
from visalign.toy.prompts import split

PROMPTS = split("eval")[::30]  # 9 toy prompts with their task metadata (the proxy scores against it)
ARGS = ["--model", "toy-shapes", "--method", "bon", "--reward", "shapes-proxy", "--particles", "2", "--steps", "3",
        "--batch-prompts", "2", "--images-per-prompt", "1", "--no-grid", "--threads", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _manifest(out: Path) -> list[dict]:
    return read_jsonl(out / "manifest.jsonl")


def _pixels(out: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(out / row["file"]))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("steer") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def one_process(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    assert main(["steer", "--prompts", str(prompts), *ARGS, "--out", str(out)]) == 0
    return out


def test_two_processes_steer_the_same_images_into_one_manifest(prompts, one_process, tmp_path):
    accelerate = accelerate_command() or pytest.skip("the accelerate command is not installed")
    out = tmp_path / "two"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "visalign", "steer", "--prompts", str(prompts),
           *ARGS, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "(2 processes)" in run.stdout and run.stdout.count("visalign steer:") == 1
    want, got = _manifest(one_process), _manifest(out)
    assert [r["job"] for r in got] == list(range(len(PROMPTS)))  # every job once, in order
    assert not part_files(out / "manifest.jsonl")
    for a, b in zip(want, got):
        assert (a["prompt"], a["seeds"], a["chosen"]) == (b["prompt"], b["seeds"], b["chosen"])
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)
        assert np.array_equal(_pixels(one_process, a), _pixels(out, b))


def test_resume_continues_a_killed_run_and_a_rerun_is_refused(prompts, one_process, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_process, out)
    rows = (out / "manifest.jsonl").read_text().splitlines()
    # killed with two batches and one row of the third written, half-way through the next row
    (out / "manifest.jsonl").write_text("\n".join(rows[:5]) + "\n" + rows[5][:20])
    assert main(["steer", "--prompts", str(prompts), *ARGS, "--out", str(out)]) == 2
    assert "--resume to continue it" in capsys.readouterr().err
    assert main(["steer", "--prompts", str(prompts), *ARGS, "--out", str(out), "--resume"]) == 0
    assert "5 images by bon" in capsys.readouterr().out  # the third batch is redone whole, then the fourth and fifth
    got, want = _manifest(out), _manifest(one_process)
    assert [r["job"] for r in got] == list(range(len(PROMPTS)))
    assert [r["reward"] for r in got] == pytest.approx([r["reward"] for r in want], abs=1e-5)
    assert all(r["reward"] == r["reward"] for r in got)  # scored (not NaN)
    assert main(["steer", "--prompts", str(prompts), *ARGS, "--out", str(out), "--overwrite",
                 "--images-per-prompt", "2"]) == 0
    assert [r["job"] for r in _manifest(out)] == list(range(2 * len(PROMPTS)))
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["job"] == 0
