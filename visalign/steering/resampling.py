"""Particle resampling: normalised weights, effective sample size and the three classic schemes.

All functions work on one group of ``k`` particles (1-D tensors) or on ``G`` groups at once
(``(G, k)`` tensors, one row per prompt), in log space so that ``lambda * r`` of any size never
overflows.  Randomness only through the ``generator`` passed in.

Schemes (Douc, Cappe & Moulines 2005, "Comparison of resampling schemes for particle filtering"):

- ``multinomial``: ``k`` independent draws from the categorical distribution of the weights;
- ``stratified``: one uniform draw in each stratum ``[j / k, (j + 1) / k)``;
- ``systematic``: one uniform ``U`` shared by all strata, ``u_j = (j + U) / k``.

Each gives particle ``i`` an expected ``k * w_i`` copies; stratified and systematic have lower
variance than multinomial, and with equal weights they return every particle exactly once, in order.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEMES", "normalise", "ess", "resample"]


def normalise(log_weights: torch.Tensor) -> torch.Tensor:
    """Normalised weights ``w_i = exp(l_i) / sum_j exp(l_j)`` along the last dim (float64).

    ``-inf`` entries get weight 0; a row that is all ``-inf`` (or holds NaN only) gets equal weights,
    so a group whose reward failed everywhere is left as it is rather than lost."""
    lw = log_weights.to(torch.float64)
    lw = torch.where(torch.isnan(lw), torch.full_like(lw, -torch.inf), lw)
    dead = torch.isinf(lw).all(-1, keepdim=True) & (lw < 0).all(-1, keepdim=True)
    lw = torch.where(dead, torch.zeros_like(lw), lw)
    return torch.softmax(lw, dim=-1)


def ess(weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size ``1 / sum_i w_i^2`` of normalised weights (along the last dim)."""
    return 1.0 / (weights.to(torch.float64) ** 2).sum(-1)


def _multinomial(w: torch.Tensor, generator) -> torch.Tensor:
    return torch.multinomial(w, w.shape[-1], replacement=True, generator=generator)


def _from_points(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF lookup of the sorted points ``u (G, k)`` in [0, 1)."""
    cdf = w.cumsum(-1)
    cdf[..., -1] = 1.0  # guard against the sum falling a rounding error short of 1
    return torch.searchsorted(cdf, u, right=True).clamp_max(w.shape[-1] - 1)


def _stratified(w: torch.Tensor, generator) -> torch.Tensor:
    g, k = w.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(g, k, generator=generator, dtype=torch.float64)) / k
    return _from_points(w, u)


def _systematic(w: torch.Tensor, generator) -> torch.Tensor:
    g, k = w.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(g, 1, generator=generator, dtype=torch.float64)) / k
    return _from_points(w, u)


#: name -> function(weights (G, k) float64 normalised, generator) -> indices (G, k)
SCHEMES = {"multinomial": _multinomial, "stratified": _stratified, "systematic": _systematic}


def resample(weights: torch.Tensor, scheme: str = "multinomial", generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices for ``k`` new particles per group.

    Args:
        weights (`torch.Tensor`): normalised weights, ``(k,)`` or ``(G, k)``.
        scheme (`str`, *optional*, defaults to ``"multinomial"``): ``multinomial``, ``stratified``
            or ``systematic``.
        generator (`torch.Generator`, *optional*): the source of randomness (CPU).

    Returns:
        `torch.LongTensor` of the same shape as ``weights``: new particle ``j`` of a group descends
        from particle ``indices[..., j]`` of that group (sorted ascending for the stratified and
        systematic schemes).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    w = weights.detach().to("cpu", torch.float64)
    one = w.ndim == 1
    w = w.unsqueeze(0) if one else w
    idx = SCHEMES[scheme](w, generator)
    return idx[0] if one else idx
