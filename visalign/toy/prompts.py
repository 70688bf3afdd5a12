"""Prompt grammar, GenEval-style metadata and deterministic splits of the shapes world.

The six categories follow GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"):

=============== ================================== ==========================================
tag             example                            metadata ``include``
=============== ================================== ==========================================
single_object   ``a circle``                       ``[{class: circle, count: 1}]``
two_object      ``a circle and a square``          two clauses, count 1 each
counting        ``three triangles``                ``[{class, count: 3}]``, ``exclude`` count 4
colors          ``a red circle``                   ``[{class, count: 1, color: red}]``
position        ``a circle left of a square``      reference first, then ``position: [rel, 0]``
color_attr      ``a red square and a blue circle`` two clauses with colours
=============== ================================== ==========================================

The metadata dicts have exactly the layout of GenEval's ``evaluation_metadata.jsonl``
(``tag``, ``include``, optional ``exclude``, ``prompt``), so a verifier written against one reads
the other.  :func:`parse_prompt` recovers the metadata from the prompt text alone, so a gallery
that only has prompts can be scored.

Splits are fixed by the grammar, not drawn at random: a few colour–shape bindings and position
compositions (:data:`HELDOUT_BINDINGS`, :data:`HELDOUT_POSITIONS`) never appear in training
prompts; the eval split is every prompt of the grammar (held-out ones flagged ``heldout``).
GenEval's overall score is the mean of the per-category accuracies; :func:`overall` does the same.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "TAGS",
    "NUMBERS",
    "HELDOUT_BINDINGS",
    "HELDOUT_POSITIONS",
    "all_prompts",
    "split",
    "is_heldout",
    "parse_prompt",
    "vocabulary",
    "overall",
    "mutate",
]

# Six hues 60 degrees apart (red, yellow, green, cyan, blue, magenta-purple), darkened so that each
# stands out from a light background; names follow GenEval's colour words where they exist.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "yellow": (0.92, 0.78, 0.02),
    "green": (0.10, 0.62, 0.15),
    "cyan": (0.00, 0.70, 0.80),
    "blue": (0.10, 0.22, 0.92),
    "purple": (0.62, 0.12, 0.78),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Colour-shape bindings that no training prompt contains (one per shape, each colour at most once);
# the eval split measures compositional generalisation on them.
HELDOUT_BINDINGS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("blue", "circle"), ("yellow", "square")}
)
# (shape, relation, reference shape) position prompts that no training prompt contains.
HELDOUT_POSITIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("triangle", "above", "circle"), ("square", "left of", "triangle"), ("circle", "below", "square")}
)

_NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}


def _obj(shape: str, count: int = 1, color: str | None = None) -> dict:
    d: dict = {"class": shape, "count": count}
    if color is not None:
        d["color"] = color
    return d


def _np_text(shape: str, count: int = 1, color: str | None = None, article: bool = True) -> str:
    noun = shape if count == 1 else PLURALS[shape]
    lead = "a" if (count == 1 and article) else _NUMBER_WORDS[count]
    return " ".join(w for w in (lead, color, noun) if w)


def _meta(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    d: dict = {"tag": tag, "include": include}
    if exclude:
        d["exclude"] = exclude
    d["prompt"] = prompt
    return d


def all_prompts() -> list[dict]:
    """Every prompt of the grammar as GenEval metadata, in a fixed order (243 prompts)."""
    out: list[dict] = []
    for s in SHAPES:
        out.append(_meta("single_object", [_obj(s)], _np_text(s)))
    for a, b in itertools.permutations(SHAPES, 2):
        out.append(_meta("two_object", [_obj(a), _obj(b)], f"{_np_text(a)} and {_np_text(b)}"))
    for s in SHAPES:
        for n in NUMBERS.values():
            out.append(
                _meta("counting", [_obj(s, n)], _np_text(s, n, article=False), exclude=[_obj(s, n + 1)])
            )
    for c in COLORS:
        for s in SHAPES:
            out.append(_meta("colors", [_obj(s, 1, c)], _np_text(s, color=c)))
    for a, b in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            inc = [_obj(b), {**_obj(a), "position": [rel, 0]}]
            out.append(_meta("position", inc, f"{_np_text(a)} {rel} {_np_text(b)}"))
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.permutations(COLORS, 2):
            out.append(
                _meta(
                    "color_attr",
                    [_obj(a, 1, ca), _obj(b, 1, cb)],
                    f"{_np_text(a, color=ca)} and {_np_text(b, color=cb)}",
                )
            )
    return out


def is_heldout(meta: Mapping) -> bool:
    """Whether a prompt contains a held-out colour binding or position composition."""
    inc = meta["include"]
    for clause in inc:
        if (clause.get("color"), clause["class"]) in HELDOUT_BINDINGS:
            return True
        if "position" in clause:
            rel, ref = clause["position"]
            if (clause["class"], rel, inc[ref]["class"]) in HELDOUT_POSITIONS:
                return True
    return False


def split(name: str) -> list[dict]:
    """The ``"train"`` or ``"eval"`` prompt list (metadata dicts), deterministic.

    ``train``: every prompt without a held-out composition.  ``eval``: every prompt of the grammar,
    each with ``heldout`` (bool) added, so accuracy can be reported on seen and unseen compositions.
    """
    if name == "train":
        return [m for m in all_prompts() if not is_heldout(m)]
    if name == "eval":
        return [{**m, "heldout": is_heldout(m)} for m in all_prompts()]
    raise ValueError(f"unknown split {name!r}: choose 'train' or 'eval'")


def records(name: str) -> list[dict]:
    """The ``train`` / ``eval`` split as prompt records ``{"prompt", "metadata"}`` (the prompt
    source ``toy:NAME`` of :func:`visalign.prompts.load_prompts`)."""
    return [{"prompt": m["prompt"], "metadata": dict(m)} for m in split(name)]


def vocabulary() -> list[str]:
    """Every word the grammar uses (lower case), sorted; the toy tokenizer's vocabulary."""
    words = {"a", "and", "photo", "of", "an"}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(NUMBERS)
    for rel in RELATIONS:
        words |= set(rel.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

_SINGULAR = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_REL_RE = "|".join(re.escape(r) for r in sorted(RELATIONS, key=len, reverse=True))
_NP_RE = re.compile(
    r"^(?P<det>a|an|one|two|three|four)\s+(?:(?P<color>%s)\s+)?(?P<noun>%s)$"
    % ("|".join(COLORS), "|".join(_SINGULAR))
)


def _parse_np(text: str, prompt: str) -> tuple[dict, bool]:
    m = _NP_RE.match(text.strip())
    if m is None:
        raise ValueError(
            f"cannot parse {text.strip()!r} in prompt {prompt!r}: expected '<a|one..four> [colour] <shape>', "
            f"colours {sorted(COLORS)}, shapes {list(SHAPES)}"
        )
    det, noun = m["det"], m["noun"]
    count = 1 if det in ("a", "an") else NUMBERS[det]
    plural = noun != _SINGULAR[noun]
    if plural != (count > 1):
        raise ValueError(f"cannot parse {text.strip()!r} in prompt {prompt!r}: number and noun disagree")
    return _obj(_SINGULAR[noun], count, m["color"]), det not in ("a", "an")


def parse_prompt(text: str) -> dict:
    """Recover GenEval-style metadata from a prompt's text alone.

    Accepts the grammar of :func:`all_prompts` with an optional leading ``"a photo of"``, any case,
    a trailing full stop, and combinations the splits do not list (``"two red circles"``, a colour
    inside a position prompt).  Returns ``{"tag", "include", ["exclude"], "prompt"}``.

    Raises:
        ValueError: the text is not in the grammar; the message names the part that failed.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt takes a string, got {type(text).__name__}")
    t = " ".join(text.lower().strip().rstrip(".").split())
    t = re.sub(r"^a photo of\s+", "", t)
    rel_m = re.search(r"\s(%s)\s" % _REL_RE, " " + t + " ")
    if rel_m is not None:
        rel = rel_m.group(1)
        left, right = t.split(f" {rel} ", 1) if f" {rel} " in t else (None, None)
        if left is None:
            raise ValueError(f"cannot parse prompt {text!r}: relation {rel!r} needs an object on each side")
        a, _ = _parse_np(left, text)
        b, _ = _parse_np(right, text)
        inc = [b, {**a, "position": [rel, 0]}]
        return _meta("position", inc, text)
    parts = t.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"cannot parse prompt {text!r}: at most two objects joined by 'and'")
    objs = [_parse_np(p, text) for p in parts]
    if len(objs) == 2:
        (a, _), (b, _) = objs
        if a["class"] == b["class"] and a.get("color") == b.get("color"):
            raise ValueError(f"cannot parse prompt {text!r}: both objects are the same; say 'two ...'")
        tag = "color_attr" if ("color" in a or "color" in b) else "two_object"
        return _meta(tag, [a, b], text)
    (a, numbered), = objs
    if numbered:
        return _meta("counting", [a], text, exclude=[_obj(a["class"], a["count"] + 1)])
    return _meta("colors" if "color" in a else "single_object", [a], text)


def parse_prompts(prompts: Sequence[str]) -> tuple[list[dict | None], list[str]]:
    """``parse_prompt`` over a batch: ``(metadata or None, reason)`` per prompt; a prompt outside
    the grammar gets ``None`` and the parser's message, so a reward can mark just that sample invalid."""
    metas: list[dict | None] = []
    reasons: list[str] = []
    for text in prompts:
        try:
            metas.append(parse_prompt(text))
            reasons.append("")
        except ValueError as err:
            metas.append(None)
            reasons.append(str(err))
    return metas, reasons


def overall(per_category: Mapping[str, float]) -> float:
    """GenEval's overall score: the unweighted mean of the per-category accuracies present."""
    vals = [float(per_category[t]) for t in TAGS if t in per_category]
    if not vals:
        raise ValueError(f"overall() needs at least one of the categories {TAGS}; got {list(per_category)}")
    return sum(vals) / len(vals)


def by_tag(metas: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """Group metadata dicts by ``tag`` (in :data:`TAGS` order)."""
    out: dict[str, list[Mapping]] = {t: [] for t in TAGS}
    for m in metas:
        out.setdefault(m["tag"], []).append(m)
    return {k: v for k, v in out.items() if v}


def prompts_of(metas: Sequence[Mapping]) -> list[str]:
    return [m["prompt"] for m in metas]


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mutate(meta: Mapping, rng: np.random.Generator) -> dict:
    """A scene description close to ``meta`` that should fail it: one clause gets another colour,
    shape or count, two colours swap, the relation changes (to its opposite half the time), or one
    object is dropped.  Returns metadata for :func:`.render.render` (``include`` only); whether the
    rendered image really fails is left to the verifier, which labels it."""
    inc = [dict(c) for c in meta["include"]]
    positioned = any("position" in c for c in inc)
    total = sum(int(c["count"]) for c in inc)
    ops = ["shape"]
    if any("color" in c for c in inc):
        ops.append("color")
    if sum("color" in c for c in inc) == 2 and inc[0]["color"] != inc[1]["color"]:
        ops.append("swap_color")
    if not positioned:
        ops.append("count")
    if positioned:
        ops += ["relation", "relation"]
    if len(inc) == 2:
        ops.append("drop")
    op = ops[int(rng.integers(len(ops)))]
    i = int(rng.integers(len(inc)))
    if op == "shape":
        inc[i]["class"] = str(rng.choice([s for s in SHAPES if s != inc[i]["class"]]))
    elif op == "color":
        i = int(rng.choice([k for k, c in enumerate(inc) if "color" in c]))
        inc[i]["color"] = str(rng.choice([c for c in COLORS if c != inc[i]["color"]]))
    elif op == "swap_color":
        inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
    elif op == "count":
        choices = [n for n in NUMBERS.values() if n != inc[i]["count"] and total - inc[i]["count"] + n <= 4]
        inc[i]["count"] = int(rng.choice(choices))
    elif op == "relation":
        k = next(k for k, c in enumerate(inc) if "position" in c)
        rel = inc[k]["position"][0]
        new = _OPPOSITE[rel] if rng.random() < 0.5 else str(rng.choice([r for r in RELATIONS if r != rel]))
        inc[k]["position"] = [new, inc[k]["position"][1]]
    else:  # drop one object; a position clause loses its reference
        inc = [{k: v for k, v in inc[1 - i].items() if k != "position"}]
    return {"tag": "mutated", "include": inc, "prompt": meta["prompt"]}
