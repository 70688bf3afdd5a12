"""One registry helper for every name -> thing table of visalign, and plug-in loading.

Each kind of extension point (model families, built-in models, rewards, prompt sources, pair
sources, trainable reward-head backbones, reward-training data providers, training algorithms) is
a :class:`Registry`.  An entry is a name, a *target* and a few facts (``meta``):

- the target is the object itself, or an absolute ``"package.module:attr"`` string imported the
  first time the entry is used, so registering and listing import no model code;
- ``get(name)`` returns the (imported) target; an unknown name is an :class:`UnknownNameError`
  that names the registry, suggests the nearest known name and lists them all;
- ``available()`` lists the names; a registry is also a read-only mapping ``name -> Entry``.

Plug-ins.  A package extends visalign by registering entries through the public functions of each
registry (``visalign.rewards.register``, ``visalign.prompts.register_source``...) from one
function, declared as an entry point of the group ``visalign.plugins``::

    # pyproject.toml of your package
    [project.entry-points."visalign.plugins"]
    mypkg = "mypkg.visalign_plugin:register"

The first lookup in any registry loads every plug-in once: the plug-ins that ship inside visalign
(a ``plugin.py`` with ``register()`` in a sub-package of ``visalign``; found on disk, so a source
checkout needs no reinstall) and then the entry points, each target called once.  A third-party
plug-in that fails to load is reported as a warning and skipped; ``VISALIGN_NO_PLUGINS=1`` skips
third-party entry points altogether.  Calling ``register`` functions directly at run time works
too (no entry point needed).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Registry", "Entry", "UnknownNameError", "load_plugins", "loaded_plugins", "resolve", "ENTRY_POINT_GROUP"]

#: the entry-point group visalign reads plug-ins from
ENTRY_POINT_GROUP = "visalign.plugins"


class UnknownNameError(ValueError):
    """A name that is not registered.  ``registry`` is the registry's kind (``"reward"``),
    ``name`` the name asked for, ``suggestion`` the nearest known name (or None)."""

    def __init__(self, message: str, *, registry: str, name: str, suggestion: str | None, known: list[str]) -> None:
        super().__init__(message)
        self.registry, self.name, self.suggestion, self.known = registry, name, suggestion, known


def resolve(target: str, package: str | None = None) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted: ``"mod:Class.method"``).

    A module starting with ``.`` is relative to ``package``; with ``package`` given, a one-word
    module that exists inside ``package`` is taken from there (the short form of built-in tables)."""
    module, colon, attr = str(target).partition(":")
    if not colon or not module or not attr:
        raise ValueError(f"target {target!r}: expected 'package.module:attr'")
    if module.startswith("."):
        obj = importlib.import_module(module, package)
    else:
        if package and "." not in module and importlib.util.find_spec(f"{package}.{module}") is not None:
            module = f"{package}.{module}"
        obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Entry:
    """One registered name: ``target`` (an object or a ``"module:attr"`` string), ``meta`` (the
    facts given at registration, also readable as attributes: ``entry.info``) and :meth:`load`."""

    __slots__ = ("name", "target", "meta", "_package", "_loaded")

    def __init__(self, name: str, target: Any, meta: Mapping[str, Any], package: str | None = None) -> None:
        self.name, self.target, self.meta, self._package = name, target, dict(meta), package
        self._loaded: Any = None if isinstance(target, str) else target

    def load(self) -> Any:
        """The target, imported on first use when it is a string."""
        if self._loaded is None:
            self._loaded = resolve(self.target, self._package)
        return self._loaded

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key == "meta":
            raise AttributeError(key)
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(f"{self.name!r} has no {key!r} (registered facts: {sorted(self.meta)})") from None

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.target!r}{''.join(f', {k}=...' for k in self.meta)})"


class Registry(Mapping):
    """A table ``name -> Entry`` with lazy targets and plug-in loading.

    Args:
        kind (`str`): what an entry is, for messages (``"reward"``, ``"prompt source"``).
        plural (`str`, *optional*): the plural for messages (default ``kind + "s"``).
        package (`str`, *optional*): the package of short built-in targets (see :func:`resolve`).
        hint (`str`, *optional*): appended to the unknown-name error (``"run `visalign rewards`..."``).
        unique (`bool`, defaults to False): re-registering a name to another target is an error
            (else the new entry replaces the old one).
    """

    def __init__(self, kind: str, *, plural: str | None = None, package: str | None = None, hint: str = "",
                 unique: bool = False) -> None:
        self.kind, self.plural, self.package, self.hint, self.unique = kind, plural or kind + "s", package, hint, unique
        self._entries: dict[str, Entry] = {}

    # ---- registering ---------------------------------------------------------------------------
    def register(self, name: str, target: Any, **meta: Any) -> Entry:
        """Register ``name``: ``target`` is the object or an absolute ``"module:attr"`` string."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if self.unique and old is not None and old.target != target:
            raise ValueError(f"{self.kind} {name!r} is already registered to {old.target}")
        entry = Entry(name, target, meta, self.package)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when it is not registered)."""
        self._entries.pop(name, None)

    # ---- looking up ----------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        """The :class:`Entry` of ``name``; an unknown name raises :class:`UnknownNameError`."""
        load_plugins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def get(self, name: str) -> Any:  # type: ignore[override]
        """The target of ``name``, imported on first use."""
        return self.entry(name).load()

    def available(self) -> list[str]:
        """The registered names, sorted."""
        load_plugins()
        return sorted(self._entries)

    def suggest(self, name: str) -> str | None:
        """The known name nearest to ``name`` (None when nothing is close)."""
        close = difflib.get_close_matches(str(name), self.available(), n=1)
        return close[0] if close else None

    def unknown(self, name: str) -> UnknownNameError:
        """The error for an unknown ``name``: the registry, the nearest name, the known names."""
        known = self.available()
        suggestion = self.suggest(name)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        listing = ", ".join(known) if known else "none registered"
        tail = f" {self.hint}" if self.hint else ""
        return UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known {self.plural}: {listing}{tail}.",
                                registry=self.kind, name=str(name), suggestion=suggestion, known=known)

    # ---- read-only mapping ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        load_plugins()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


# ---- plug-ins ------------------------------------------------------------------------------------
_lock = threading.RLock()
_state = "unloaded"  # -> "loading" -> "loaded"
_loaded: list[str] = []


def _builtin_plugins() -> list[str]:
    """``visalign.<sub>.plugin:register`` for each sub-package of visalign that has a plugin.py."""
    root = Path(__file__).resolve().parent
    return [f"visalign.{p.parent.name}.plugin:register" for p in sorted(root.glob("*/plugin.py"))]


def _entry_points() -> list[tuple[str, str]]:
    if os.environ.get("VISALIGN_NO_PLUGINS", "").strip() not in ("", "0"):
        return []
    from importlib.metadata import entry_points

    return [(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]


def load_plugins() -> list[str]:
    """Load every plug-in once (the first lookup in any registry does it); returns the targets
    called.  A plug-in's own lookups while it loads see what is registered so far."""
    global _state
    if _state != "unloaded":
        return list(_loaded)
    with _lock:
        if _state != "unloaded":  # loaded by another thread, or re-entered from a plug-in
            return list(_loaded)
        _state = "loading"
        try:
            seen: set[str] = set()
            for target in _builtin_plugins():
                seen.add(target)
                resolve(target)()
                _loaded.append(target)
            for name, target in _entry_points():
                if target in seen:
                    continue
                seen.add(target)
                try:
                    resolve(target)()
                except Exception as err:  # a broken third-party plug-in must not break visalign
                    warnings.warn(f"visalign plug-in {name!r} ({target}) failed to load and is skipped: "
                                  f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
                    continue
                _loaded.append(target)
        finally:
            _state = "loaded"
    return list(_loaded)


def loaded_plugins() -> list[str]:
    """The plug-in targets loaded so far (``"module:function"``)."""
    return list(_loaded)
