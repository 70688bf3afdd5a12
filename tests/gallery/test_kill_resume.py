"""`visalign score` killed part-way (SIGKILL or Ctrl-C) and rerun with --resume: every file exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visalign.gallery.writers import read_results

# The real CLI in a subprocess, with a test reward "slow" (jpeg_compressibility that sleeps per batch)
# so the kill lands part-way.
SCRIPT = """
import os, signal, sys, time
# Ctrl-C as in a terminal even when the test runs in a background job, whose children start with
# SIGINT ignored (POSIX shells do that for `cmd &`): Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
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
N = 16


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def alive(script: Path) -> list[int]:
    """Pids of processes still running our script (the main process or its decoding workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(script).encode() in (d / "cmdline").read_bytes():
                if (d / "stat").read_text().split()[2] != "Z":
                    pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("fmt, sig, workers", [("jsonl", signal.SIGKILL, 2), ("csv", signal.SIGKILL, 0),
                                                ("csv", signal.SIGINT, 2)])
def test_killed_run_resumes_with_each_file_once(tmp_path, fmt, sig, workers):
    gallery = tmp_path / "g"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(gallery / f"{i:02d}.png")
    script = tmp_path / "score_slow.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"r.{fmt}"
    journal = out.with_name(f".{out.name}.partial.jsonl")
    argv = [sys.executable, str(script), "score", str(gallery), "--rewards", "slow", "--out", str(out),
            "--batch-size", "2", "--workers", str(workers), "--no-progress"]
    env = {**os.environ, "SLOW_SECONDS": "0.4", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress_file = out if fmt == "jsonl" else journal
    deadline = time.time() + 90
    while lines_in(progress_file) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err.decode()[-2000:]
    time.sleep(0.5)
    assert alive(script) == []  # no orphaned decoding workers

    if sig == signal.SIGINT:  # Ctrl-C: the finished batches are already in the CSV, the journal is gone
        assert b"--resume" in err
        first = read_results(out)
        assert not journal.exists()
    else:
        first = read_results(progress_file)
    assert 2 <= len(first) < N  # killed part-way, at least one batch kept
    first_paths = {r["path"] for r in first}

    env["SLOW_SECONDS"] = "0"
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(first)} already in the results" in done.stdout
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in gallery.glob("*.png"))  # each file exactly once
    assert first_paths <= {r["path"] for r in rows}
    assert all(r["slow.valid"] for r in rows)
