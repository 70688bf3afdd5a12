"""Registered preference-pair sources: ``NAME:ARG`` specs that make or find pairs on demand.

DPO's ``dpo.pairs`` accepts a folder with ``pairs.jsonl``, a parquet / arrow file or folder, a hub
dataset id, or a registered source ``NAME:ARG``.  A source is a function called as
``function(ARG, sampler=..., **options)`` (``options``: a recipe's ``dpo.pairs_options``) that
returns a folder or file that the DPO reader opens, e.g. pairs it generated with the model being
trained.  Register one with :func:`register_pair_source`; it lives here, beside the prompt sources
(:mod:`visalign.prompts`), so that a plug-in can register it without importing the trainers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from visalign.registry import Registry

__all__ = ["PAIR_SOURCES", "register_pair_source", "pair_sources", "registered_pair_source"]

#: pair sources: name -> Entry(function, or its "package.module:function")
PAIR_SOURCES = Registry("pair source")


def register_pair_source(name: str, target: str | Callable[..., Any], **meta: Any) -> None:
    """``NAME:ARG`` pair specs call ``target`` (the function, or its absolute
    ``"package.module:function"``) as ``function(ARG, sampler=..., **options)``, which returns a
    folder or file of pairs (e.g. pairs it generated)."""
    PAIR_SOURCES.register(name, target, **meta)


def pair_sources() -> list[str]:
    return PAIR_SOURCES.available()


def registered_pair_source(spec: str) -> tuple[Callable[..., Any] | None, str | None]:
    """``(function, ARG)`` when ``spec`` is ``NAME:ARG`` of a registered source (and not an existing
    path), else ``(None, None)``."""
    name, sep, arg = str(spec).partition(":")
    if sep and name in PAIR_SOURCES and not Path(spec).exists():
        return PAIR_SOURCES.get(name), arg
    return None, None
