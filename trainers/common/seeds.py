"""Seeds derived from several integers: one generator per iteration, process and purpose."""

from __future__ import annotations

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over 32-bit words): per-iteration, per-process generators."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
