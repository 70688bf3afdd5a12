"""Shared pytest fixtures: offline tiny models of every family, saved once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub-aware import: tests never touch the network

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``(family, variant=None, seed=0) -> Path`` of a saved tiny pipeline (diffusers layout).

    Each (family, variant, seed) is built and saved once per test session, under a session temp
    folder; load it with ``DiffusionPipeline.from_pretrained(path)``. Treat the folder as read-only.
    See `visalign.testing` for the families, variants and valid call parameters.
    """
    from visalign import testing

    root = tmp_path_factory.mktemp("tiny_models")

    def factory(family: str, variant: str | None = None, seed: int = 0) -> Path:
        return testing.tiny_model_dir(family, variant, root, seed=seed)

    return factory


import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests_support.py: helpers shared by test modules
