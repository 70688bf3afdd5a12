"""Judges: whatever labels samples for a reward that keeps learning (reward refresh in the loop).

A judge takes a batch of images in ``[0, 1]`` with their prompts and metadata and returns one label
per image (``NaN`` where it gave none), binary (0 / 1) or scalar, as the kit's ``binary`` and
``rating`` heads train (:mod:`.head_train`).  For a ``pairwise`` (Bradley-Terry) head it compares
pairs instead (:meth:`Judge.compare`): two images of the same prompt, one label per pair, the
probability that the first is preferred (1: the first, 0: the second, 0.5: a declared tie, ``NaN``:
no label).  Every label it gives is counted (a pair's label is one label): ``labels`` is the label
budget a run has spent, ``calls`` the number of times it was asked.

Three kinds (docs/reward_refresh.md, "Judges"):

- **a reward** used as a labeller (``JudgeSettings(reward="shapes", component="strict")``): a
  stronger or slower reward (a VLM judge, ``vqascore``, the toy world's gold verifier) scores the
  samples; with ``threshold`` the label is ``value >= threshold`` (binary), else the value itself.
  A pair is labelled by comparing the two values (each as a single image would be labelled): 1
  when the first is higher, 0 when lower; equal values (within ``1e-9``) give no label and cost
  nothing, as Diffusion-DPO (Wallace et al. 2023) drops tied pairs.  A pair-wise reward (one with a
  ``compare`` method, e.g. ``unifiedreward-pair``) labels pairs itself: P(first preferred);
- **a Python function** (``function="my_module:my_labeller"``) called as
  ``fn(images, prompts, metadata)`` for single images, and as
  ``fn(images_a, images_b, prompts, metadata)`` for pairs (a pairwise head), returning a sequence of
  labels, one per image or per pair (``None`` / NaN: no label; ``None`` for the batch: no labels);
- **a folder** (``folder="labels/"``): each round writes ``round_NNNN/images/*.png`` and
  ``round_NNNN/to_label.jsonl`` (rows ``{"id", "image", "prompt", "metadata"}``; for pairs
  ``{"id", "image_a", "image_b", "prompt", "metadata", "task": "pairwise"}``) and waits for a
  person or a service to write ``round_NNNN/labels.jsonl`` (rows ``{"id", "label"}``, label
  ``null`` to skip an image or a pair; for pairs 1 = ``image_a`` preferred, 0 = ``image_b``,
  0.5 = a tie); after ``timeout_s`` without it the round gives no labels and the run continues
  with the head it has.

Samples the reward calls invalid (a prompt outside its grammar) get no label and cost nothing.
"""

from __future__ import annotations

import abc
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["JudgeSettings", "Judge", "RewardJudge", "FunctionJudge", "FolderJudge", "build_judge"]


@dataclass
class JudgeSettings:
    """Which judge labels the samples (give exactly one of ``reward``, ``function``, ``folder``).

    Args:
        reward (`str`, *optional*): a reward spec (``"shapes"``, ``"vqascore"``, ``"head:path=DIR"``).
        component (`str`, *optional*): label with this component of the reward's output instead of
            its score (``"strict"`` for the toy world's gold verifier).
        threshold (`float`, *optional*): binary labels ``value >= threshold``; null keeps the value
            (a scalar label for a ``rating`` head, or a 0 / 1 verdict that is already binary).
        options (`dict`): keyword arguments of the reward (``device``, model paths).
        function (`str`, *optional*): ``"module:function"`` of a labelling function.
        folder (`str`, *optional*): the folder of the file protocol (module docstring).
        timeout_s (`float`, *optional*): how long a folder round waits for ``labels.jsonl``; null
            waits forever, 0 never waits (the run continues with the last head).
        poll_s (`float`): seconds between looks at the folder.
    """

    reward: str | None = None
    component: str | None = None
    threshold: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    function: str | None = None
    folder: str | None = None
    timeout_s: float | None = 3600.0
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        given = [k for k in ("reward", "function", "folder") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"reward_refresh.judge: give exactly one of reward (a reward spec such as 'shapes' or "
                             f"'vqascore'), function ('module:function') or folder (a folder for the file protocol); "
                             f"got {given or 'none'}")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward_refresh.judge.function={self.function!r}: write it as 'module:function', e.g. "
                             "'my_labels:label_images'")
        if (self.component is not None or self.threshold is not None or self.options) and self.reward is None:
            raise ValueError("reward_refresh.judge: component, threshold and options belong to a reward judge; "
                             "set judge.reward or remove them")
        if self.timeout_s is not None and self.timeout_s < 0:
            raise ValueError(f"reward_refresh.judge.timeout_s must be >= 0 or null (wait forever), got {self.timeout_s}")
        if self.poll_s <= 0:
            raise ValueError(f"reward_refresh.judge.poll_s must be > 0, got {self.poll_s}")

    @classmethod
    def parse(cls, spec: Any) -> "JudgeSettings":
        """From a recipe value: a reward spec string (``"shapes"``), a mapping of these fields, or
        settings already built."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(reward=spec)
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {f for f in cls.__dataclass_fields__})
            if unknown:
                raise ValueError(f"reward_refresh.judge: unknown keys {unknown}; valid keys: "
                                 f"{sorted(cls.__dataclass_fields__)}")
            return cls(**spec)
        raise ValueError(f"reward_refresh.judge: expected a reward spec (e.g. 'shapes') or a mapping "
                         f"{{reward|function|folder: ...}}, got {spec!r}")


class Judge(abc.ABC):
    """Labels samples and counts what it gives (see the module docstring)."""

    def __init__(self) -> None:
        #: labels given so far (the label budget spent)
        self.labels = 0
        #: times the judge was asked
        self.calls = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict | None] | None = None
                 ) -> torch.Tensor | None:
        """``(N,)`` float labels (NaN: none for that image), or ``None`` when the judge gave no
        labels this round (a folder round that timed out)."""
        self.calls += 1
        labels = self.label(images, list(prompts), list(metadata) if metadata is not None else [None] * len(prompts))
        if labels is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.float32).flatten().cpu()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"judge {self.describe()} returned {labels.shape[0]} labels for {images.shape[0]} images")
        self.labels += int(torch.isfinite(labels).sum())
        return labels

    @abc.abstractmethod
    def label(self, images: torch.Tensor, prompts: list[str], metadata: list) -> Any:
        """One label per image (a tensor or a sequence; NaN / None = no label), or ``None``."""

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str],
                metadata: Sequence[dict | None] | None = None) -> torch.Tensor | None:
        """``(P,)`` float labels of pairs ``(images_a[i], images_b[i])`` of prompt ``prompts[i]``: the
        probability that ``a`` is preferred (1, 0, 0.5 for a tie; NaN: no label), or ``None`` when
        the judge gave no labels this round.  Counted like :meth:`__call__` (one label per pair)."""
        if images_a.shape != images_b.shape:
            raise ValueError(f"judge {self.describe()}: the pair's images differ in shape, "
                             f"{tuple(images_a.shape)} vs {tuple(images_b.shape)}")
        if len(prompts) != images_a.shape[0]:
            raise ValueError(f"judge {self.describe()}: {images_a.shape[0]} pairs but {len(prompts)} prompts")
        self.calls += 1
        labels = self.label_pairs(images_a, images_b, list(prompts),
                                  list(metadata) if metadata is not None else [None] * len(prompts))
        if labels is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.float32).flatten().cpu()
        if labels.shape[0] != images_a.shape[0]:
            raise ValueError(f"judge {self.describe()} returned {labels.shape[0]} labels for {images_a.shape[0]} pairs")
        finite = torch.isfinite(labels)
        bad = finite & ((labels < 0) | (labels > 1))
        if bad.any():
            raise ValueError(f"judge {self.describe()}: a pair's label is the probability that the first image is "
                             f"preferred, in [0, 1] (1: first, 0: second, 0.5: tie, NaN / None: no label); got "
                             f"{labels[bad][:4].tolist()}")
        self.labels += int(finite.sum())
        return labels

    def label_pairs(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], metadata: list) -> Any:
        """One label per pair (P(a preferred); NaN / None = no label), or ``None``."""
        raise NotImplementedError(f"judge {self.describe()} labels single images only; a pairwise head needs a "
                                  "judge that compares pairs (implement label_pairs)")

    def describe(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict:
        return {"labels": self.labels, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.labels, self.calls = int(state["labels"]), int(state["calls"])


class RewardJudge(Judge):
    """A reward as a labeller: its score (or ``component``), thresholded to 0 / 1 when
    ``threshold`` is set.  The reward runs without gradient."""

    def __init__(self, reward: Any, component: str | None = None, threshold: float | None = None,
                 name: str = "reward") -> None:
        super().__init__()
        self.reward, self.component, self.threshold, self.name = reward, component, threshold, name

    def label(self, images, prompts, metadata):
        meta = metadata if any(m is not None for m in metadata) else None
        with torch.no_grad():
            out = self.reward(images, prompts, metadata=meta)
        return self._values(out)

    def label_pairs(self, images_a, images_b, prompts, metadata):
        """A pair-wise reward (one with ``compare(images_a, images_b, prompts)``, such as
        ``unifiedreward-pair``) labels the pairs itself.  Otherwise both images valued as single
        images are labelled (one reward call); 1 where ``a`` is higher, 0 where lower, NaN for a tie
        (within 1e-9) or an invalid sample."""
        if callable(getattr(self.reward, "compare", None)):
            with torch.no_grad():
                labels = self.reward.compare(images_a, images_b, prompts)
            return torch.as_tensor(labels, dtype=torch.float32).detach().cpu()
        n = images_a.shape[0]
        both = self.label(torch.cat([images_a, images_b]), prompts + prompts, metadata + metadata)
        a, b = both[:n], both[n:]
        out = (a > b).float()
        return torch.where(torch.isfinite(a) & torch.isfinite(b) & ((a - b).abs() > 1e-9), out,
                           torch.tensor(float("nan")))

    def _values(self, out) -> torch.Tensor:
        if self.component is None:
            value = out.scores
        elif self.component in out.components:
            value = out.components[self.component]
        else:
            raise ValueError(f"reward_refresh.judge.component={self.component!r}: the judge {self.name!r} reports "
                             f"components {sorted(out.components)}; pick one or drop component to use its score")
        value = value.detach().float().cpu()
        valid = out.valid.cpu() & torch.isfinite(value)
        if self.threshold is not None:
            value = (value >= self.threshold).float()
        return torch.where(valid, value, torch.tensor(float("nan")))

    def describe(self) -> str:
        return f"reward {self.name!r}" + (f" ({self.component})" if self.component else "")


class FunctionJudge(Judge):
    """A Python labelling function: ``fn(images, prompts, metadata) -> labels`` for single images,
    ``fn(images_a, images_b, prompts, metadata) -> labels`` for pairs (:meth:`Judge.compare`)."""

    def __init__(self, fn: Callable, name: str = "function") -> None:
        super().__init__()
        self.fn, self.name = fn, name

    def label(self, images, prompts, metadata):
        return self._labels(self.fn(images, prompts, metadata))

    def label_pairs(self, images_a, images_b, prompts, metadata):
        return self._labels(self.fn(images_a, images_b, prompts, metadata))

    @staticmethod
    def _labels(out):
        if out is None:
            return None
        if isinstance(out, torch.Tensor):
            return out.detach().float()
        return [float("nan") if v is None else float(v) for v in out]

    def describe(self) -> str:
        return f"function {self.name!r}"


class FolderJudge(Judge):
    """The file protocol (module docstring): write the round's samples, wait for ``labels.jsonl``.

    Args:
        folder: where rounds are written.
        timeout_s: seconds to wait for a round's labels (``None``: forever; 0: do not wait).
        poll_s: seconds between looks.
        write (`bool`): write the round's files (only the main process of a multi-process run does).
    """

    def __init__(self, folder: str | Path, timeout_s: float | None = 3600.0, poll_s: float = 5.0,
                 write: bool = True, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.folder, self.timeout_s, self.poll_s, self.write = Path(folder), timeout_s, float(poll_s), write
        self.rounds = 0
        self._sleep = sleep

    def round_dir(self, index: int) -> Path:
        return self.folder / f"round_{index:04d}"

    def label(self, images, prompts, metadata):
        d = self._next_round()
        if self.write:
            rows = []
            for i, (img, p, m) in enumerate(zip(images, prompts, metadata)):
                rows.append({"id": i, "image": self._save(img, d, f"{i:05d}"), "prompt": p, "metadata": m})
            self._write_rows(d, rows)
        return self._read(d, images.shape[0], "images", pairwise=False)

    def label_pairs(self, images_a, images_b, prompts, metadata):
        d = self._next_round()
        if self.write:
            rows = []
            for i, (a, b, p, m) in enumerate(zip(images_a, images_b, prompts, metadata)):
                rows.append({"id": i, "image_a": self._save(a, d, f"{i:05d}_a"), "image_b": self._save(b, d, f"{i:05d}_b"),
                             "prompt": p, "metadata": m, "task": "pairwise"})
            self._write_rows(d, rows)
        return self._read(d, images_a.shape[0], "pairs", pairwise=True)

    def _next_round(self) -> Path:
        d = self.round_dir(self.rounds)
        self.rounds += 1
        return d

    @staticmethod
    def _save(image: torch.Tensor, d: Path, stem: str) -> str:
        from visalign.sample import save_image

        rel = f"images/{stem}.png"
        save_image(image.float().clamp(0, 1), d / rel)
        return rel

    @staticmethod
    def _write_rows(d: Path, rows: list[dict]) -> None:
        from visalign.io import atomic_write_text

        atomic_write_text(d / "to_label.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def _read(self, d: Path, n: int, what: str, pairwise: bool) -> list[float] | None:
        """Wait for ``d/labels.jsonl`` (``None`` after ``timeout_s``) and read its ``n`` labels."""
        target = d / "labels.jsonl"
        start = time.monotonic()
        while not target.is_file():
            waited = time.monotonic() - start
            if self.timeout_s is not None and waited >= self.timeout_s:
                return None
            self._sleep(self.poll_s if self.timeout_s is None else min(self.poll_s, self.timeout_s - waited))
        labels = [float("nan")] * n
        from visalign.io import iter_jsonl

        for k, row in iter_jsonl(target, strict=True):
            try:
                i, value = int(row["id"]), row.get("label")
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{target}, line {k}: expected {{\"id\": int, \"label\": number or null}}, got "
                                 f"{str(row)[:80]!r} ({err})") from None
            if not 0 <= i < n:
                raise ValueError(f"{target}, line {k}: id {i} is not one of the round's {what} (0..{n - 1})")
            if value is not None:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{target}, line {k}: label {row['label']!r} is not a finite number")
                if pairwise and not 0.0 <= value <= 1.0:
                    raise ValueError(f"{target}, line {k}: a pair's label is 1 (image_a preferred), 0 (image_b), "
                                     f"0.5 (a tie) or null (skip), got {row['label']!r}")
                labels[i] = value
        return labels

    def describe(self) -> str:
        return f"folder {str(self.folder)!r}"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rounds = int(state.get("rounds", 0))


def build_judge(settings: JudgeSettings | str | dict, reward_options: dict | None = None, write: bool = True) -> Judge:
    """The judge of ``settings`` (:class:`JudgeSettings` or a recipe value); ``reward_options``
    are shared options (``device``...) offered to a reward judge, used where its factory takes them."""
    s = JudgeSettings.parse(settings)
    if s.reward is not None:
        from .registry import factory_parameters, load, parse_spec

        name, _ = parse_spec(s.reward)
        accepted = factory_parameters(name)
        shared = dict(reward_options or {})
        opts = shared if accepted is None else {k: v for k, v in shared.items() if k in accepted}
        return RewardJudge(load(s.reward, **{**opts, **s.options}), s.component, s.threshold, name=s.reward)
    if s.function is not None:
        module, _, attr = s.function.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward_refresh.judge.function={s.function!r} cannot be imported ({err}); give an "
                             "importable 'module:function'") from None
        return FunctionJudge(fn, name=s.function)
    return FolderJudge(s.folder, s.timeout_s, s.poll_s, write=write)
