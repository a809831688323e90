"""Constraint schedules for the PGD solver, expressed as data.

A :class:`Schedule` is a tuple of :class:`Phase` s plus the fixed parts of the constraint
(the N:M pattern and the quantization grid). Each phase runs a number of PGD iterations with a
row sparsity that is constant or ramps linearly, and with quantization on or off. The solver
turns a schedule into per-iteration tables (:meth:`Schedule.tables`) that the jitted loop indexes
with the iteration counter, so a ramp or a phase change costs no recompilation and no special
case in the loop.

The paper's recipes are :func:`pruning`, :func:`nm_pruning`, :func:`quantization` and
:func:`joint` (ramp 0 → p over 25 iterations, hold p for 25, then 50 iterations of
quantize(prune(Z)) with the final mask applied).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from awp_jax.quantizers import QuantSpec

__all__ = ["Phase", "Schedule", "ScheduleTables", "pruning", "nm_pruning", "quantization", "joint", "nm_joint"]


def _check_sparsity(name, p):
    if p is None:
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not np.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase:
    """``iters`` PGD iterations. ``sparsity``: fraction of each row pruned at the end of the phase
    (``None``: no unstructured pruning); ``ramp_from``: if set, the sparsity ramps linearly from
    this value (exclusive) to ``sparsity`` over the phase; ``quantize``: apply the schedule's grid."""

    iters: int
    sparsity: float | None = None
    ramp_from: float | None = None
    quantize: bool = False

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"Phase.iters must be a positive integer, got {self.iters!r}")
        _check_sparsity("Phase.sparsity", self.sparsity)
        _check_sparsity("Phase.ramp_from", self.ramp_from)
        if self.ramp_from is not None and self.sparsity is None:
            raise ValueError("Phase.ramp_from needs a target Phase.sparsity")


class ScheduleTables(NamedTuple):
    """Per-iteration tables of a schedule for one ``d_in`` (numpy, length ``max_iter``)."""

    keep: np.ndarray  # int32: entries kept per row by update t (d_in: no row pruning)
    quantize: np.ndarray  # bool: update t applies the quantizer
    final_start: int  # index of the first update of the final phase


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """Phases plus the fixed constraint parts: ``nm`` = (n, m) pattern applied in every phase,
    ``quant`` = grid used by the phases that quantize."""

    phases: tuple[Phase, ...]
    nm: tuple[int, int] | None = None
    quant: QuantSpec | None = None

    def __post_init__(self):
        if not self.phases or not all(isinstance(p, Phase) for p in self.phases):
            raise ValueError("a Schedule needs at least one Phase")
        object.__setattr__(self, "phases", tuple(self.phases))
        if self.nm is not None:
            n, m = self.nm
            if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 1 <= n <= m:
                raise ValueError(f"N:M pattern needs integers 1 <= N <= M, got {n}:{m}")
            object.__setattr__(self, "nm", (n, m))
            if any(p.sparsity is not None for p in self.phases):
                raise ValueError("an N:M schedule cannot also set a row sparsity")
        if any(p.quantize for p in self.phases) and self.quant is None:
            raise ValueError("a phase quantizes but the schedule has no QuantSpec")
        if self.quant is not None and not isinstance(self.quant, QuantSpec):
            raise TypeError(f"quant must be a QuantSpec, got {type(self.quant).__name__}")

    @property
    def max_iter(self) -> int:
        return sum(p.iters for p in self.phases)

    @property
    def final(self) -> Phase:
        return self.phases[-1]

    @property
    def prunes_rows(self) -> bool:
        return any(p.sparsity is not None for p in self.phases)

    @property
    def quant_mode(self) -> str:
        """'never', 'always' or 'some' — lets the solver drop the quantizer or the branch statically."""
        flags = [p.quantize for p in self.phases]
        return "always" if all(flags) else ("some" if any(flags) else "never")

    def validate(self, d_in: int) -> None:
        """Raise a clear error if the schedule cannot apply to rows of length ``d_in``."""
        if self.nm is not None and d_in % self.nm[1]:
            raise ValueError(f"N:M {self.nm[0]}:{self.nm[1]} needs d_in to be a multiple of {self.nm[1]}, got {d_in}")
        if self.quant is not None:
            self.quant.groups(d_in)

    def tables(self, d_in: int) -> ScheduleTables:
        self.validate(d_in)
        keep, quant = [], []
        for ph in self.phases:
            j = np.arange(1, ph.iters + 1)
            if ph.sparsity is None:
                s = np.zeros(ph.iters)
            elif ph.ramp_from is None:
                s = np.full(ph.iters, ph.sparsity)
            else:
                s = ph.ramp_from + (ph.sparsity - ph.ramp_from) * j / ph.iters
            keep.append(np.round((1.0 - s) * d_in).astype(np.int32))
            quant.append(np.full(ph.iters, ph.quantize))
        return ScheduleTables(
            keep=np.concatenate(keep),
            quantize=np.concatenate(quant),
            final_start=self.max_iter - self.final.iters,
        )


# --- the paper's recipes -------------------------------------------------------------------


def pruning(sparsity: float, *, iters: int = 200) -> Schedule:
    """Unstructured per-row pruning at ``sparsity`` (paper: 200 iterations, init Wanda)."""
    _check_sparsity("sparsity", sparsity)
    return Schedule(phases=(Phase(iters=iters, sparsity=sparsity),))


def nm_pruning(n: int = 2, m: int = 4, *, iters: int = 200) -> Schedule:
    """N:M semi-structured pruning along the input dimension."""
    return Schedule(phases=(Phase(iters=iters),), nm=(n, m))


def quantization(spec: QuantSpec, *, iters: int = 10) -> Schedule:
    """Group-wise quantization (paper: INT4/3/2, group 128, 10 iterations, init RTN)."""
    return Schedule(phases=(Phase(iters=iters, quantize=True),), quant=spec)


def joint(sparsity: float, spec: QuantSpec, *, ramp: int = 25, hold: int = 25, joint_iters: int = 50) -> Schedule:
    """The paper's joint recipe: ramp 0 → p (prune only), hold p, then prune + quantize."""
    _check_sparsity("sparsity", sparsity)
    phases = []
    if ramp:
        phases.append(Phase(iters=ramp, sparsity=sparsity, ramp_from=0.0))
    if hold:
        phases.append(Phase(iters=hold, sparsity=sparsity))
    phases.append(Phase(iters=joint_iters, sparsity=sparsity, quantize=True))
    return Schedule(phases=tuple(phases), quant=spec)


def nm_joint(n: int, m: int, spec: QuantSpec, *, iters: int = 100) -> Schedule:
    """N:M pruning and quantization together: every iteration projects onto the N:M pattern, then the grid."""
    return Schedule(phases=(Phase(iters=iters, quantize=True),), nm=(n, m), quant=spec)
