"""The code passes the ruff configuration in pyproject.toml (pyflakes, pycodestyle errors and
warnings, bugbear, import order). The test extra pins ruff, so the rules do not drift."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    if found:
        return [found]
    pytest.fail("ruff is not installed: pip install -e '.[test]' brings it")


def test_ruff_passes():
    out = subprocess.run([*_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check . found problems (fix with `ruff check --fix .`):\n{out.stdout}{out.stderr}"
