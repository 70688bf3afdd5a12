"""`visalign score` split across processes (``accelerate launch --num_processes 2``): one merged
result in input order, equal to one process's, with no duplicates or gaps; a run killed part-way
resumes from its part files with any number of processes.

Two real CPU processes over gloo (``launch --multi_gpu`` on a machine without GPUs runs them as
MULTI_CPU, see tests/trainers/test_multiprocess.py); the merge logic is also tested in one
process with threads standing in for the processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visalign.gallery.writers import ResultsWriter, read_results
from visalign.shards import Shard, part_files, part_path
from visalign.testing import accelerate_command

# The real CLI, with a test reward "slow" (jpeg_compressibility that sleeps per batch) so that a kill
# lands part-way
SCRIPT = """
import os, sys, time
import visalign.rewards as R

class Slow(R.Reward):
    def __init__(self, inner):
        self.inner, self.info = inner, inner.info

    def score(self, images, prompts, references, metadata):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
        return self.inner.score(images, prompts, references, metadata)

_load = R.load
R.load = lambda spec, **kw: Slow(_load("jpeg_compressibility")) if spec == "slow" else _load(spec, **kw)
from visalign.cli import main
sys.exit(main(sys.argv[1:]))
"""
N = 200
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _accelerate() -> str:
    return accelerate_command() or pytest.skip("the accelerate command is not installed")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """200 small images of varied content and size, prompts in sidecars, two unreadable files."""
    root = tmp_path_factory.mktemp("sharded") / "gallery"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        side = (24, 32, 40)[i % 3]
        arr = (rng.random((side, side, 3)) * rng.integers(1, 255)).astype(np.uint8)
        sub = root / f"part{i % 4}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img_{i:03d}.png")
        (sub / f"img_{i:03d}.txt").write_text(f"prompt {i}")
    (root / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "part1" / "empty.jpg").write_bytes(b"")
    script = root.parent / "score.py"
    script.write_text(SCRIPT)
    return root, script


def _one_process(gallery, out: Path, *extra: str) -> subprocess.CompletedProcess:
    root, script = gallery
    return subprocess.run([sys.executable, str(script), "score", str(root), "--out", str(out), "--no-progress",
                           "--workers", "0", *extra], capture_output=True, text=True, env=ENV, timeout=600)


def _launch(gallery, out: Path, *extra: str, env=None, **popen) -> list[str]:
    root, script = gallery
    return [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "score", str(root),
            "--out", str(out), "--no-progress", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def reference(gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "rows.jsonl"
    run = _one_process(gallery, out, "--rewards", "jpeg_compressibility,artifact", "--batch-size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    return read_results(out)


def _same_rows(got: list[dict], want: list[dict], ordered: bool = True) -> None:
    paths = [r["path"] for r in got]
    assert len(paths) == len(set(paths)) == N + 2  # no duplicates, no gaps
    if ordered:
        assert paths == sorted(paths)  # the input order (files sorted) of the gallery
    by_path = {r["path"]: r for r in want}
    assert set(paths) == set(by_path)
    for row in got:
        ref = by_path[row["path"]]
        assert row.keys() == ref.keys()
        for key, value in row.items():
            if isinstance(value, float):
                assert value == pytest.approx(ref[key], abs=1e-6), (row["path"], key)
            else:
                assert value == ref[key], (row["path"], key)


def test_two_processes_give_one_process_rows_in_input_order(gallery, reference, tmp_path):
    assert [r["path"] for r in reference] != sorted(r["path"] for r in reference)  # one process: its own order
    out = tmp_path / "rows.jsonl"
    cmd = _launch(gallery, out, "--rewards", "jpeg_compressibility,artifact", "--batch-size", "4",
                  "--report", str(tmp_path / "report.html"))
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes; every process's results merged" in run.stdout
    assert run.stdout.count("this run:") == 1  # one summary, from the first process
    _same_rows(read_results(out), reference)
    assert not part_files(out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scored"] == N and (tmp_path / "report.html").stat().st_size > 0
    # CSV and Parquet merge alike: test_the_merge_keeps_input_order_and_earlier_rows


def test_a_killed_two_process_run_resumes(gallery, reference, tmp_path):
    """kill -9 of one rank part-way (the launcher then stops the other), then ``--resume`` with two
    processes: every file once, in input order, scored as one process scores it.  (One process
    resuming part files: test_one_process_resumes_part_files.)"""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.Popen(_launch(gallery, out, "--rewards", "slow", "--batch-size", "4"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "SLOW_SECONDS": "0.1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(len(p.read_text().splitlines()) for p in part_files(out) if p.exists()) >= 24:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; the launcher stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    for pid in workers:
        _gone(pid)
    parts = part_files(out)
    done = sum(len(read_results(p)) for p in parts)
    assert len(parts) == 2 and 24 <= done < N + 2 and not out.exists()
    run = subprocess.run(_launch(gallery, out, "--rewards", "slow", "--batch-size", "4", "--resume"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{done} already in the results (--resume)" in run.stdout
    rows = read_results(out)
    assert not part_files(out)
    want = [{k.replace("jpeg_compressibility", "slow"): v for k, v in r.items() if not k.startswith("artifact")}
            for r in reference]
    _same_rows(rows, want)


def test_an_unfinished_sharded_run_is_not_overwritten_silently(gallery, tmp_path):
    out = tmp_path / "rows.jsonl"
    part_path(out, Shard(1, 2)).write_text(json.dumps({"path": "x.png"}) + "\n")
    run = _one_process(gallery, out, "--rewards", "jpeg_compressibility")
    assert run.returncode == 2 and "part files of an unfinished run" in run.stderr and "--resume" in run.stderr


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the launcher's workers), from /proc."""
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    if not kids.exists():
        pytest.skip("needs Linux /proc to find the launcher's worker processes")
    return sorted(int(x) for x in kids.read_text().split())


def _gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"):
            return  # a zombie: dead, not yet reaped
        time.sleep(0.1)
    raise AssertionError(f"worker {pid} still runs after its peer was killed")


def _threads_as_processes(count: int, work) -> list:
    """Run ``work(shard)`` in ``count`` threads whose barrier is shared, as processes' would be."""
    barrier = threading.Barrier(count, timeout=30)
    results: list = [None] * count
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = work(Shard(i, count, barrier.wait))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("fmt", [".jsonl", ".csv"])
def test_the_merge_keeps_input_order_and_earlier_rows(tmp_path, fmt):
    out = tmp_path / f"rows{fmt}"
    keys = [os.path.realpath(tmp_path / f"f{i:02d}.png") for i in range(10)]
    first = ResultsWriter(out)
    first.write([{"path": keys[7], "score": 7.0}, {"path": keys[2], "score": 2.0}])
    first.close()

    def work(shard: Shard) -> list[dict]:
        writer = ResultsWriter(out, resume=True, shard=shard)
        assert writer.done == {keys[7], keys[2]}
        todo = shard.take([k for k in keys if k not in writer.done])
        for k in reversed(todo):  # each process writes in its own order
            writer.write([{"path": k, "score": float(keys.index(k))}])
        return writer.close(order=keys)

    rows_by_process = _threads_as_processes(3, work)
    for rows in rows_by_process:
        assert [r["path"] for r in rows] == keys
    assert [r["score"] for r in read_results(out)] == [float(i) for i in range(10)]
    assert not part_files(out)


def test_one_process_resumes_part_files(tmp_path):
    out = tmp_path / "rows.jsonl"
    keys = [os.path.realpath(tmp_path / f"f{i:02d}.png") for i in range(6)]
    part_path(out, Shard(0, 2)).write_text(json.dumps({"path": keys[0], "score": 0.0}) + "\n"
                                           + json.dumps({"path": keys[4], "score": 4.0}) + "\n{\"path\": ")
    part_path(out, Shard(1, 2)).write_text(json.dumps({"path": keys[1], "score": 1.0}) + "\n")
    writer = ResultsWriter(out, resume=True)
    assert writer.done == {keys[0], keys[1], keys[4]}  # the killed writer's half line is skipped
    writer.write([{"path": k, "score": float(keys.index(k))} for k in (keys[5], keys[3], keys[2])])
    rows = writer.close(order=keys)
    assert [r["path"] for r in rows] == keys == [r["path"] for r in read_results(out)]
    assert not part_files(out)


def test_a_shard_takes_every_nth_item_and_its_own_gpu():
    shards = [Shard(i, 3, local_index=i) for i in range(3)]
    items = list(range(10))
    assert [s.take(items) for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [s.device("cuda") for s in shards] == ["cuda:0", "cuda:1", "cuda:2"]
    assert shards[1].device("cuda:3") == "cuda:3" and shards[1].device(None) is None
    assert Shard().device("cuda") == "cuda" and not Shard().sharded
    with pytest.raises(ValueError, match="need 0 <= index < count"):
        Shard(2, 2)
