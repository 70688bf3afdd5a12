"""``visalign.assets``: the files shipped with visalign, and where they are.

This folder is package data: the built-in ``toy-shapes`` model (diffusers layout), the weights of
the ``shapes-proxy`` reward and the demo prompts.  In a checkout or an editable install it is the
repository's ``assets/``; in a wheel install (``pip install .``) it is ``visalign/assets/`` in
site-packages.  ``$VISALIGN_ASSETS`` makes visalign read another folder of the same layout instead.

The bottom layer: it imports nothing from visalign, so samplers, rewards and the toy world can all
ask it where an asset is.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "assets_dir", "asset_path", "missing_asset_message"]

#: the environment variable that points visalign to another assets folder
ENV_VAR = "VISALIGN_ASSETS"


def _installed_dir() -> Path:
    return Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The assets folder: ``$VISALIGN_ASSETS`` if set, else the one installed with visalign."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return _installed_dir()


def asset_path(name: str) -> Path:
    """The path of asset ``name`` (a file or folder directly or deeper under :func:`assets_dir`,
    e.g. ``"toy-shapes"`` or ``"prompts/toy_demo.txt"``).  Not checked for existence: see
    :func:`missing_asset_message` for the error to raise when it is absent."""
    return assets_dir() / name


def missing_asset_message(name: str) -> str:
    """Where asset ``name`` was looked for, and how to get it back (for an error message)."""
    where = asset_path(name)
    env = os.environ.get(ENV_VAR)
    if env:
        return (
            f"{name!r} is missing from {where}: {ENV_VAR}={env!r} points to a folder without it. "
            f"Unset {ENV_VAR} to use the copy installed with visalign ({_installed_dir() / name}), or point "
            f"it to a folder that holds {name}/."
        )
    return (
        f"{name!r} is missing from {where}, the assets installed with visalign. Reinstall visalign the "
        "way it was installed (in its source folder: `pip install --force-reinstall --no-deps .`, or "
        "`pip install -e .`), "
        f"or set {ENV_VAR} to a folder that holds {name}/."
    )
