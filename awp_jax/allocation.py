"""Sparsity per block at a fixed global ratio: uniform, or OWL's outlier-weighted rule.

OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICLR 2024) gives blocks with more
activation outliers more weights. A block's *outlier ratio* is the fraction of its Wanda scores
``|W_ij| · ||X_j||`` (all its linear layers together, dense weights on the dense model's
activations) above ``m`` times their mean. The ratios are scaled to ``[0, 2λ]``, centred, and
subtracted from the target: ``s_l = S − (r_l − mean r)``, so the blocks' sparsities span at most
``2λ`` around ``S`` (OWL's defaults: ``m = 5``, ``λ = 0.08``).

Exactness. Every pruning method keeps ``round((1 − s)·d_in)`` entries per row (SparseGPT prunes
``floor(s·128·d_out)`` per 128-column block), so a sparsity only counts exactly if it turns into
whole entries. The allocation therefore moves each block away from ``S`` by whole *units* of
``1 / g``, ``g`` the greatest common divisor of the prunable layers' input widths (192 for
SmolLM2-135M: 576 and 1536), with the units summing to zero over blocks of equal size. Every
layer of block ``l`` then keeps exactly ``u_l·d_in/g`` entries per row fewer than at ``S``: the
non-uniform model keeps exactly as many weights as the uniform one (tested for the row-wise
methods; SparseGPT's per-block floor may differ by one entry per 128 columns and row).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Literal

import numpy as np

__all__ = ["Allocation", "allocate", "granularity", "outlier_ratio", "owl_sparsities"]


@dataclasses.dataclass(frozen=True)
class Allocation:
    """How the target sparsity is spread over the blocks (settings; part of a run's identity)."""

    rule: Literal["uniform", "owl"] = "uniform"
    m: float = 5.0  # OWL: an outlier is a Wanda score above m × the block's mean score
    lam: float = 0.08  # OWL: the blocks' sparsities span at most 2 lam, their mean the target

    def __post_init__(self):
        if self.rule not in ("uniform", "owl"):
            raise ValueError(f"allocation rule must be 'uniform' or 'owl', got {self.rule!r}")
        if not (np.isfinite(self.m) and self.m > 0):
            raise ValueError(f"OWL's outlier threshold m must be a positive number, got {self.m!r}")
        if not (np.isfinite(self.lam) and 0 <= self.lam < 1):
            raise ValueError(f"OWL's lambda must be in [0, 1), got {self.lam!r}")


def outlier_ratio(weights: list[np.ndarray], norms: list[np.ndarray], m: float) -> float:
    """Fraction of the Wanda scores ``|W_ij|·norm_j`` of all ``weights`` together (``norms[i]`` the
    input column norms of ``weights[i]``) above ``m`` times their mean."""
    scores = np.concatenate([(np.abs(np.asarray(w, np.float32)) * np.asarray(n, np.float32)[None, :]).ravel()
                             for w, n in zip(weights, norms)])
    return float(np.mean(scores > m * scores.mean()))


def granularity(d_ins) -> int:
    """``g``: the greatest common divisor of the prunable layers' input widths."""
    return math.gcd(*[int(d) for d in d_ins])


def owl_sparsities(ratios, target: float, lam: float, g: int) -> list[float]:
    """Per-block sparsities from outlier ratios (OWL's rule), moved off ``target`` in whole units
    of ``1/g`` that sum to zero (largest remainders), so the blocks' mean is exactly the target."""
    r = np.asarray(ratios, np.float64)
    if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"outlier ratios must be a non-empty list of finite numbers, got {ratios!r}")
    if not 0 < target < 1:
        raise ValueError(f"target sparsity must be in (0, 1), got {target!r}")
    span = r.max() - r.min()
    scaled = np.zeros_like(r) if span == 0 else (r - r.min()) / span * 2 * lam
    delta = -(scaled - scaled.mean())  # more outliers: more weights kept, lower sparsity
    units = delta * g
    base = np.floor(units).astype(np.int64)
    short = int(-base.sum())  # units to add back (0 <= short < n) so that they sum to zero
    order = np.argsort(-(units - base), kind="stable")
    base[order[:short]] += 1
    assert base.sum() == 0
    out = [target + int(u) / g for u in base]
    if min(out) <= 0 or max(out) >= 1:
        raise ValueError(f"OWL with lambda {lam} moves a block's sparsity out of (0, 1) around {target}: lower lambda")
    return out


def allocate(model, windows: np.ndarray, target: float, allocation: Allocation, *, batch_size: int = 8,
             progress: bool = False, layout=None) -> list[float]:
    """Per-block sparsities for ``model`` at the global ``target``. OWL runs one calibration pass
    over the dense model (its blocks fed the dense outputs, as OWL does) for the outlier ratios."""
    n_blocks = len(model.layers)
    if allocation.rule == "uniform":
        return [float(target)] * n_blocks
    from awp_jax import (
        calibration,  # the pipeline's forward pass (allocation is computed before compressing)
    )

    sizes, d_ins = set(), []
    for blk in model.layers:
        shapes = [tuple(blk.linear(n).weight[...].shape) for n in blk.LINEARS]
        sizes.add(sum(a * b for a, b in shapes))
        d_ins += [s[1] for s in shapes]
    if len(sizes) != 1:
        raise ValueError("the OWL allocation needs blocks of equal size (the units that keep the global ratio exact "
                         f"are per block); this model's blocks hold {sorted(sizes)} weights")
    ratios = [0.0] * n_blocks

    def on_block(i, stats):
        blk = model.layers[i]
        names = list(blk.LINEARS)
        ws = [np.asarray(blk.linear(n).weight[...], np.float32) for n in names]
        norms = [np.sqrt(np.maximum(np.diagonal(stats[blk.LINEARS[n]]), 0)) for n in names]
        ratios[i] = outlier_ratio(ws, norms, allocation.m)

    calibration.block_statistics(model, windows, mode="parallel", batch_size=batch_size, on_block=on_block,
                                 progress=progress, layout=layout)
    out = owl_sparsities(ratios, target, allocation.lam, granularity(d_ins))
    if progress:
        print(f"OWL allocation (m={allocation.m:g}, lambda={allocation.lam:g}): block sparsities {min(out):.3f}..{max(out):.3f} around {target:.3f}", file=sys.stderr)
    return out
