"""The recipes that ship with visalign: find one by name, list them.

A shipped recipe is a YAML file below the ``visalign.configs`` package (the repository's
``configs/`` folder in a checkout or an editable install, ``visalign/configs/`` in site-packages
after ``pip install .``).  Its name is its path below that folder without ``.yaml``:
``toy/nft_cn``, ``sd35m/flow_grpo_pickscore``, ``steer/toy_fk``.  Every command that reads a recipe
(``visalign train``, ``visalign steer``) accepts a file path or such a name; a path that does not
exist but reads ``configs/toy/nft_cn.yaml`` (the form the docs use) falls back to the shipped copy,
so the docs' commands run from any folder.

The bottom layer: it imports nothing from visalign but :mod:`visalign.assets` (for the reward-head
recipes ``visalign rewards train`` runs by name).
"""

from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Recipe", "recipes_dir", "available", "find", "describe"]

_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its ``name``, file ``path``, ``kind`` (``train``, ``steer``, ``reward``, or
    ``accelerate``: a launch config for sharded training, ``configs/accelerate/``), the command that
    runs it and the first sentence of its header comment."""

    name: str
    path: Path
    kind: str
    command: str
    summary: str


def recipes_dir() -> Path:
    """The folder of the shipped recipes."""
    try:
        module = importlib.import_module("visalign.configs")
        if getattr(module, "__file__", None):
            return Path(module.__file__).resolve().parent
    except ModuleNotFoundError:  # an editable install made before the recipes became package data
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def _summary(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)(?<!\bvs)[.:;]\s", text)  # the first sentence, "et al." kept
    text = text if end is None else text[: end.start() + 1].rstrip(":;")
    return text if len(text) <= 100 else text[:97].rstrip() + "..."


def _kind(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return "train"
    if isinstance(data, dict) and "distributed_type" in data and "algorithm" not in data:
        return "accelerate"
    return "steer" if isinstance(data, dict) and "method" in data and "algorithm" not in data else "train"


def _command(kind: str, name: str, path: Path) -> str:
    if kind == "accelerate":
        return f"accelerate launch --config_file {path} -m visalign train RECIPE"
    return f"visalign {kind} {name}"


def available(kind: str | None = None) -> list[Recipe]:
    """Every shipped recipe (training and steering recipes and the accelerate launch configs, then the
    reward-head recipes), sorted by name; ``kind`` keeps one kind."""
    root = recipes_dir()
    found: list[Recipe] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file()):
        name = path.relative_to(root).with_suffix("").as_posix()
        k = _kind(path)
        found.append(Recipe(name, path, k, _command(k, name, path), _summary(path)))
    from .assets import asset_path

    heads = asset_path("reward_recipes")
    if heads.is_dir():
        for path in sorted(heads.glob("*.yaml")):
            found.append(Recipe(path.stem, path, "reward", f"visalign rewards train {path.stem} --out DIR",
                                _summary(path)))
    return [r for r in found if kind is None or r.kind == kind]


def _candidates(name: str) -> list[str]:
    text = str(name).replace("\\", "/").strip()
    for prefix in ("./", "configs/"):
        while text.startswith(prefix):
            text = text[len(prefix):]
    if text.endswith(_SUFFIXES):
        return [text]
    return [text + s for s in _SUFFIXES]


def find(name: str | Path) -> Path | None:
    """The shipped recipe called ``name`` (``toy/nft_cn``, ``toy/nft_cn.yaml`` or
    ``configs/toy/nft_cn.yaml``), or ``None``."""
    root = recipes_dir()
    for rel in _candidates(str(name)):
        path = root / rel
        if path.is_file() and path.resolve().is_relative_to(root):
            return path
    return None


def describe(name: str | Path) -> str:
    """A sentence for an error message: the nearest shipped names and how to list them."""
    names = [r.name for r in available() if r.kind not in ("reward", "accelerate")]
    key = _candidates(str(name))[0].rsplit(".", 1)[0]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"it is neither a file nor a shipped recipe.{hint} `visalign recipes` lists the recipes that ship"
