"""Prompt sources: files of prompts and named, registered sets, as records ``{"prompt", "metadata"}``.

A spec is one of:

- ``NAME:PART`` — a registered source, e.g. ``toy:train`` / ``toy:eval`` (the shapes world's
  splits, with GenEval-style metadata).  Sources are kept as data (``"module:function"`` loaded on
  first use, so nothing is imported until a source is read); add one with :func:`register_source`;
- a ``.txt`` file: one prompt per line;
- a ``.jsonl`` file: rows with a ``prompt`` field; the row's other fields are the record's task
  metadata (e.g. GenEval's ``tag`` / ``include``);
- a ``.json`` file: a list of prompts or of such rows.

The trainers (``data.train`` / ``data.eval`` of a recipe), ``visalign sample --prompts`` and
steering read prompts through :func:`load_prompts`.
"""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import Callable

__all__ = ["load_prompts", "read_prompts", "register_source", "sources"]

_SOURCES: dict[str, str] = {}


def register_source(name: str, target: str) -> None:
    """Register ``name`` as a prompt source: ``target`` is ``"module:function"``, a function of the
    part after the colon (``toy:eval`` -> ``function("eval")``) returning prompt records."""
    _SOURCES[name] = target


def sources() -> list[str]:
    return sorted(_SOURCES)


register_source("toy", "visalign.toy.prompts:records")


def _source(name: str) -> Callable[[str], list[dict]]:
    module, _, attr = _SOURCES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _record(row, where: str) -> dict:
    if isinstance(row, str):
        return {"prompt": row, "metadata": None}
    if not isinstance(row, dict) or "prompt" not in row:
        raise ValueError(f"{where}: each entry needs a 'prompt' (a string or an object with a 'prompt' field)")
    meta = {k: v for k, v in row.items() if k != "prompt"}
    return {"prompt": str(row["prompt"]), "metadata": meta or None}


def load_prompts(spec: str) -> list[dict]:
    """Prompt records ``{"prompt": str, "metadata": dict | None}`` from a spec (see the module docstring)."""
    name, colon, part = str(spec).partition(":")
    if colon and name in _SOURCES:
        return _source(name)(part)
    path = Path(spec)
    if not path.is_file():
        close = difflib.get_close_matches(name, list(_SOURCES), n=1) if colon else []
        hint = f" Did you mean {close[0]}:{part}?" if close else ""
        raise FileNotFoundError(f"prompt source {spec!r}: no such file.{hint} Use a .txt, .jsonl or .json file "
                                f"or a registered source ({', '.join(f'{s}:...' for s in sources())})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            records.append(_record(row, f"{path}:{n}"))
    elif path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json prompts file holds a list of prompts")
        records = [_record(r, f"{path}[{k}]") for k, r in enumerate(rows)]
    else:
        records = [{"prompt": line.strip(), "metadata": None} for line in text.splitlines() if line.strip()]
    if not records:
        raise ValueError(f"prompt source {spec!r} holds no prompts")
    return records


def read_prompts(spec: str) -> list[str]:
    """Just the prompt strings of :func:`load_prompts`."""
    return [r["prompt"] for r in load_prompts(spec)]
