"""Group-wise integer quantizers (pure, jittable).

A weight matrix ``W [d_out, d_in]`` is split along the input dimension into groups of
``group_size`` consecutive columns; every (row, group) gets its own scale and zero point.

Asymmetric grid (the RTN / GPTQ / AWQ convention, zero always representable)::

    lo = min(min(w), 0),  hi = max(max(w), 0)
    scale = (hi - lo) / (2**bits - 1),   zero = round(-lo / scale)
    q = clip(round(w / scale) + zero, 0, 2**bits - 1),   w_hat = (q - zero) * scale

Symmetric grid (abs-max, zero point fixed at ``2**(bits-1)``)::

    scale = max|w| / (2**(bits-1) - 1),   q = clip(round(w / scale) + 2**(bits-1), 0, 2**bits - 1)

Both grids map 0 to exactly 0, so quantizing a pruned matrix keeps its zeros, and every
value inside the group's range is reproduced to within half a step (``scale / 2``).
A group whose entries are all zero gets ``scale = 1`` and dequantizes to zeros.

A group size that does not divide ``d_in`` is an error unless ``partial_groups=True``: then the
last group of each row is shorter (GPTQ's convention, needed for group 128 on 576-wide layers).
Zero padding implements it exactly, because both grids already contain 0.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "QuantSpec",
    "QArray",
    "quantize",
    "dequantize",
    "fake_quantize",
    "rtn",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize: bit width, group size along ``d_in`` (``None`` = one group per row),
    whether the grid is symmetric (no zero point) or asymmetric (min-max with zero point), and
    whether a shorter last group is allowed when ``group_size`` does not divide ``d_in``."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    partial_groups: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive integer or None (per row), got {self.group_size!r}")

    @property
    def levels(self) -> int:
        return 2**self.bits

    def group_len(self, d_in: int) -> int:
        return self.group_size or d_in

    def groups(self, d_in: int) -> int:
        """Number of groups per row; raises if ``group_size`` does not divide ``d_in`` (unless
        ``partial_groups``)."""
        g = self.group_len(d_in)
        if d_in % g and not self.partial_groups:
            raise ValueError(
                f"group_size {g} does not divide d_in={d_in}; choose a divisor of {d_in}, None (per row), "
                "or partial_groups=True (the last group of each row is shorter, as in GPTQ)"
            )
        return -(-d_in // g)


class QArray(NamedTuple):
    """A quantized matrix: integer ``codes [d_out, d_in]`` (uint8) and per-group
    ``scale``/``zero [d_out, n_groups]``. ``dequantize(q, spec)`` gives the dense matrix back."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array


def _grouped(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """``w [..., d_in]`` → ``[..., G, g]``, zero-padded when the last group is partial."""
    d_in = w.shape[-1]
    n_groups, g = spec.groups(d_in), spec.group_len(d_in)
    if n_groups * g != d_in:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, n_groups * g - d_in)])
    return w.reshape(*w.shape[:-1], n_groups, g)


def _ungrouped(wg: jax.Array, d_in: int) -> jax.Array:
    return wg.reshape(*wg.shape[:-2], -1)[..., :d_in]


def _grid(wg: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-group scale and zero for grouped weights ``wg [..., G, g]`` (both ``[..., G, 1]``)."""
    maxq = spec.levels - 1
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        amax = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
        scale = amax / (half - 1)
        zero = jnp.full_like(scale, half)
    else:
        lo = jnp.minimum(jnp.min(wg, axis=-1, keepdims=True), 0)
        hi = jnp.maximum(jnp.max(wg, axis=-1, keepdims=True), 0)
        scale = (hi - lo) / maxq
        safe = jnp.where(scale > 0, scale, 1)
        zero = jnp.clip(jnp.round(-lo / safe), 0, maxq)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale, zero


def quantize(w: jax.Array, spec: QuantSpec) -> QArray:
    """Round-to-nearest group-wise quantization of ``w [..., d_out, d_in]`` to integer codes."""
    wg = _grouped(w, spec)
    scale, zero = _grid(wg, spec)
    codes = jnp.clip(jnp.round(wg / scale) + zero, 0, spec.levels - 1)
    return QArray(
        codes=_ungrouped(codes.astype(jnp.uint8), w.shape[-1]),
        scale=scale[..., 0],
        zero=zero[..., 0].astype(jnp.uint8),
    )


def dequantize(q: QArray, spec: QuantSpec, dtype=jnp.float32) -> jax.Array:
    """Dense matrix ``(codes - zero) * scale`` from a :class:`QArray` made with ``spec``."""
    d_in = q.codes.shape[-1]
    cg = _grouped(q.codes.astype(dtype), spec)
    out = (cg - q.zero[..., None].astype(dtype)) * q.scale[..., None].astype(dtype)
    return _ungrouped(out, d_in)


def _fake_quantize_value(w: jax.Array, spec: QuantSpec) -> jax.Array:
    wg = _grouped(w, spec)
    scale, zero = _grid(wg, spec)
    q = jnp.clip(jnp.round(wg / scale) + zero, 0, spec.levels - 1)
    return _ungrouped((q - zero) * scale, w.shape[-1]).astype(w.dtype)


def fake_quantize(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize in one step, with a straight-through gradient.

    Forward: the quantized value (same as ``dequantize(quantize(w, spec))``).
    Backward: identity, so the function can sit inside differentiable code.
    """
    return w + jax.lax.stop_gradient(_fake_quantize_value(w, spec) - w)


def rtn(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Round-to-nearest baseline: the dense dequantized matrix (no gradient trick)."""
    return _fake_quantize_value(w, spec)
