"""Prompt sources: files of prompts and named, registered sets, as records ``{"prompt", "metadata"}``.

A spec is one of:

- ``NAME:PART`` — a registered source (:func:`register_source`, by visalign's plug-ins or yours):
  ``NAME``'s function called with ``PART`` (e.g. a split's name) returns the records.  Sources are
  kept as data (``"package.module:function"`` imported on first use, so nothing is imported until a
  source is read);
- a ``.txt`` file: one prompt per line;
- a ``.jsonl`` file: rows with a ``prompt`` field; the row's other fields are the record's task
  metadata (e.g. GenEval's ``tag`` / ``include``);
- a ``.json`` file: a list of prompts or of such rows.

The trainers (``data.train`` / ``data.eval`` of a recipe), ``visalign sample --prompts`` and
steering read prompts through :func:`load_prompts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from visalign.registry import Registry

__all__ = ["load_prompts", "read_prompts", "register_source", "sources", "SOURCES"]

#: prompt sources: name -> Entry(function of the part after the colon, or its "module:function")
SOURCES = Registry("prompt source")


def register_source(name: str, target: str | Callable[[str], list[dict]], **meta: Any) -> None:
    """Register ``name`` as a prompt source: ``target`` is a function of the part after the colon
    (``NAME:eval`` -> ``function("eval")``) returning prompt records (``{"prompt", "metadata"}``
    dicts), or its absolute ``"package.module:function"``.  ``meta`` are facts
    about the source (e.g. ``description``) kept on its registry entry."""
    SOURCES.register(name, target, **meta)


def sources() -> list[str]:
    return SOURCES.available()


def _source(name: str) -> Callable[[str], list[dict]]:
    return SOURCES.get(name)


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
    if colon and name in SOURCES:
        return _source(name)(part)
    path = Path(spec)
    if not path.is_file():
        close = SOURCES.suggest(name) if colon else None
        hint = f" Did you mean {close}:{part}?" if close else ""
        raise FileNotFoundError(f"prompt source {spec!r}: no such file.{hint} Use a .txt, .jsonl or .json file "
                                f"or a registered source ({', '.join(f'{s}:...' for s in sources())})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        from .io import iter_jsonl

        records = [_record(row, f"{path}:{n}") for n, row in iter_jsonl(path, strict=True)]
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
