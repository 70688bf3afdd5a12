"""The `gallery` fixture: a generated gallery of good, bad and hostile files (see galleries.py)."""

import pytest
from galleries import make_gallery


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    info = make_gallery(root)
    info["root"] = root
    return info
