"""Work split across the processes of ``accelerate launch`` (scoring a gallery, steering prompts).

``accelerate launch --num_processes N -m visalign score ...`` (or ``... steer ...``) starts N
copies of the command; each takes every N-th unit of work (files, or batches of prompts), appends
its rows to its own part file beside the output (``.NAME.part-I-of-N.jsonl``, flushed and fsynced
per batch), and the first process merges the parts into the one output, in input order, once every
process is done.  A crash leaves the part files; ``--resume`` (with any number of processes) reads
them with the output and skips what they hold.

A single process (no ``accelerate launch``, or one process) is an :class:`Shard` of one: nothing
changes.  The processes only meet at barriers (``accelerate``'s ``wait_for_everyone``); no data
goes between them except through the files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

__all__ = ["Shard", "current_shard", "part_path", "part_files"]

T = TypeVar("T")
_PART = re.compile(r"^\.(?P<name>.+)\.part-(?P<i>\d+)-of-(?P<n>\d+)\.jsonl$")


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: ``index`` of ``count`` processes.

    Args:
        index (`int`): this process, 0-based (0 writes the merged output).
        count (`int`): the number of processes.
        barrier (`Callable`): waits until every process reaches it.
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False, repr=False)
    #: this process's number on its machine (its GPU under ``accelerate launch``)
    local_index: int = 0

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def main(self) -> bool:
        return self.index == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """Every ``count``-th item, starting at ``index`` (the same split in every process)."""
        return list(items[self.index::self.count])

    def device(self, device: str | None) -> str | None:
        """``"cuda"`` becomes this process's own GPU (``"cuda:LOCAL_INDEX"``) when sharded; any other
        device (``"cpu"``, ``"cuda:1"``, ``None``) is kept as given."""
        return f"cuda:{self.local_index}" if self.sharded and device == "cuda" else device

    def describe(self) -> str:
        return f"process {self.index + 1} of {self.count}"


def current_shard() -> Shard:
    """The :class:`Shard` of this process: one of ``WORLD_SIZE`` under ``accelerate launch`` /
    ``torchrun`` (the process group is set up through accelerate's ``PartialState``), else a
    shard of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    # without a GPU, accelerate sets up the process group over gloo only when asked for the CPU
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"accelerate set up {state.num_processes} processes, but WORLD_SIZE is "
                           f"{os.environ['WORLD_SIZE']}; launch with `accelerate launch --num_processes N -m visalign ...`")
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone, state.local_process_index)


def part_path(out: str | Path, shard: Shard) -> Path:
    """The part file of ``shard`` beside ``out``: ``.NAME.part-I-of-N.jsonl``."""
    out = Path(out)
    return out.with_name(f".{out.name}.part-{shard.index}-of-{shard.count}.jsonl")


def part_files(out: str | Path) -> list[Path]:
    """Every part file beside ``out``, from runs with any number of processes (sorted)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        m = _PART.match(p.name)
        if m and m.group("name") == out.name:
            found.append((int(m.group("n")), int(m.group("i")), p))
    return [p for _, _, p in sorted(found)]
