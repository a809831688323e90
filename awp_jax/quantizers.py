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

Float-minimum grid (``float_min=True``: llama.cpp's Q4_1 and K-quant convention; no integer zero,
0 need not be on it)::

    m = min(w),  scale = (max(w) - m) / (2**bits - 1)
    q = clip(round((w - m) / scale), 0, 2**bits - 1),   w_hat = q * scale + m

Full-range symmetric grid (``full_range=True``, with ``symmetric``: llama.cpp's Q4_0 rule): the
weight of largest magnitude ``m`` (with its sign) sits on the extra negative level, so all
``2**bits`` levels are used::

    scale = m / -2**(bits-1)   (negative when m > 0),   q = clip(round(w / scale) + 2**(bits-1), 0, 2**bits - 1)

``scale_dtype`` rounds the scale (and a float minimum) to float16 or bfloat16 when the grid is
computed, so a format that stores them in that type (GGUF blocks: float16; compressed-tensors: the
model's dtype) holds exactly the grid the method optimised on. The projection is then still the
nearest point of that grid (round, then clip).

A group size that does not divide ``d_in`` is an error unless ``partial_groups=True``: then the
last group of each row is shorter (GPTQ's convention, needed for group 128 on 576-wide layers).
Zero padding implements it exactly, because both grids already contain 0.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

__all__ = [
    "QuantSpec",
    "QArray",
    "quantize",
    "dequantize",
    "fake_quantize",
    "rtn",
    "refit_grid",
    "scaled_coordinates",
    "scaled_statistic",
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
    scale_dtype: str = "float32"
    float_min: bool = False
    full_range: bool = False

    def __post_init__(self):
        if self.full_range and not self.symmetric:
            raise ValueError("full_range is a kind of symmetric grid: set symmetric=True too")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.float_min and self.symmetric:
            raise ValueError("a grid is either symmetric or has a float minimum (float_min), not both")
        if self.float_min and self.partial_groups:
            raise ValueError("a float-minimum grid does not contain 0, so a shorter last group (zero-padded) would change "
                             "its minimum: use a group size that divides the layers' width")
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


SCALE_DTYPES = ("float32", "float16", "bfloat16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized matrix as a method computed it (a pytree; ``spec`` is static).

    ``codes [..., d_out, d_in]`` (uint8, in ``perm``'s column order when ``perm`` is given) and per
    (row, group) ``scale`` and ``zero [..., d_out, G]``: the integer zero point (uint8), or for a
    ``float_min`` grid the float minimum. Groups are consecutive columns in ``perm`` order (GPTQ with
    act-order). ``col_scale_inv [d_in]`` (AWQ): the dense weights are the grid values of the scaled
    weights ``W·diag(s)`` times ``1/s``. :meth:`dense` gives the matrix back."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    perm: jax.Array | None = None
    col_scale_inv: jax.Array | None = None

    def grid_values(self, dtype=jnp.float32) -> jax.Array:
        """``(codes − zero)·scale`` (``codes·scale + min`` for a float-minimum grid), in ``perm``
        order and before ``col_scale_inv``."""
        return dequantize(self, self.spec, dtype)

    def dense(self, dtype=jnp.float32) -> jax.Array:
        """The dense matrix: grid values in the original column order, times ``col_scale_inv``."""
        out = self.grid_values(dtype)
        if self.perm is not None:
            out = jnp.take_along_axis(out, jnp.argsort(self.perm)[..., None, :], axis=-1)
        if self.col_scale_inv is not None:
            out = out * self.col_scale_inv.astype(dtype)[..., None, :]
        return out


def _grouped(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """``w [..., d_in]`` → ``[..., G, g]``, zero-padded when the last group is partial."""
    d_in = w.shape[-1]
    n_groups, g = spec.groups(d_in), spec.group_len(d_in)
    if n_groups * g != d_in:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, n_groups * g - d_in)])
    return w.reshape(*w.shape[:-1], n_groups, g)


def _ungrouped(wg: jax.Array, d_in: int) -> jax.Array:
    return wg.reshape(*wg.shape[:-2], -1)[..., :d_in]


def _round_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """``x`` rounded to ``spec.scale_dtype`` (to nearest even), kept in ``x``'s dtype.

    ``lax.reduce_precision``, not a float32 → float16 → float32 round trip: XLA may drop such a pair
    of converts inside a fused computation (it allows excess precision by default), which would leave
    scales a file cannot store. float16's subnormals (below 2**-14) are multiples of 2**-24."""
    if spec.scale_dtype == "float32":
        return x
    if spec.scale_dtype == "bfloat16":
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    sub = jnp.round(x * 2.0**24) * 2.0**-24
    return jnp.where(jnp.abs(x) < 2.0**-14, sub, normal)


def _grid(wg: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Per-group scale and zero (the float minimum for ``float_min``) for grouped weights
    ``wg [..., G, g]`` (both ``[..., G, 1]``)."""
    maxq = spec.levels - 1
    if spec.float_min:
        m = _round_scale(jnp.min(wg, axis=-1, keepdims=True), spec)
        scale = _round_scale((jnp.max(wg, axis=-1, keepdims=True) - m) / maxq, spec)
        return jnp.where(scale > 0, scale, jnp.ones_like(scale)), m
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        if spec.full_range:
            i = jnp.argmax(jnp.abs(wg), axis=-1, keepdims=True)
            scale = _round_scale(jnp.take_along_axis(wg, i, axis=-1) / -half, spec)
            return jnp.where(scale != 0, scale, jnp.ones_like(scale)), jnp.full_like(scale, half)
        amax = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
        scale = _round_scale(amax / (half - 1), spec)
        zero = jnp.full_like(scale, half)
    else:
        lo = jnp.minimum(jnp.min(wg, axis=-1, keepdims=True), 0)
        hi = jnp.maximum(jnp.max(wg, axis=-1, keepdims=True), 0)
        scale = _round_scale((hi - lo) / maxq, spec)
        safe = jnp.where(scale > 0, scale, 1)
        zero = jnp.clip(jnp.round(-lo / safe), 0, maxq)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return scale, zero


def _codes(wg: jax.Array, scale: jax.Array, zero: jax.Array, spec: QuantSpec) -> jax.Array:
    if spec.float_min:
        return jnp.clip(jnp.round((wg - zero) / scale), 0, spec.levels - 1)
    return jnp.clip(jnp.round(wg / scale) + zero, 0, spec.levels - 1)


def _values(codes: jax.Array, scale: jax.Array, zero: jax.Array, spec: QuantSpec) -> jax.Array:
    if spec.float_min:
        return codes * scale + zero
    return (codes - zero) * scale


def quantize(w: jax.Array, spec: QuantSpec) -> QArray:
    """Round-to-nearest group-wise quantization of ``w [..., d_out, d_in]`` to integer codes.

    For ``w`` already on a grid of ``spec`` (a projection's output) this recovers that grid: the
    grid's extreme codes are used, so the min-max fit of the grid values is the grid itself (exactly
    when the scale has few mantissa bits, as float16/bfloat16 scales do; to within an ulp of the
    scale for float32)."""
    wg = _grouped(w, spec)
    scale, zero = _grid(wg, spec)
    codes = _codes(wg, scale, zero, spec)
    return QArray(
        codes=_ungrouped(codes.astype(jnp.uint8), w.shape[-1]),
        scale=scale[..., 0],
        zero=zero[..., 0] if spec.float_min else zero[..., 0].astype(jnp.uint8),
        spec=spec,
    )


def dequantize(q: QArray, spec: QuantSpec | None = None, dtype=jnp.float32) -> jax.Array:
    """Grid values ``(codes - zero) * scale`` (``codes * scale + min`` for a float-minimum grid)
    of a :class:`QArray`, in its codes' column order (see :meth:`QArray.dense` for the matrix)."""
    spec = q.spec if spec is None else spec
    d_in = q.codes.shape[-1]
    cg = _grouped(q.codes.astype(dtype), spec)
    out = _values(cg, q.scale[..., None].astype(dtype), q.zero[..., None].astype(dtype), spec)
    return _ungrouped(out, d_in)


def _fake_quantize_value(w: jax.Array, spec: QuantSpec) -> jax.Array:
    wg = _grouped(w, spec)
    scale, zero = _grid(wg, spec)
    q = _codes(wg, scale, zero, spec)
    return _ungrouped(_values(q, scale, zero, spec), w.shape[-1]).astype(w.dtype)


def fake_quantize(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize in one step, with a straight-through gradient.

    Forward: the quantized value (same as ``dequantize(quantize(w, spec))``).
    Backward: identity, so the function can sit inside differentiable code.
    """
    return w + jax.lax.stop_gradient(_fake_quantize_value(w, spec) - w)


def rtn(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Round-to-nearest baseline: the dense dequantized matrix (no gradient trick)."""
    return _fake_quantize_value(w, spec)


def scaled_statistic(c, r):
    """``C`` in AWQ's coordinates for ``r = 1/s``: ``diag(r) C diag(r)``; for a diagonal ``c [d_in]``, ``c·r²``."""
    return c * r * r if c.ndim == 1 else c * r[:, None] * r[None, :]


def scaled_coordinates(w, c, r):
    """The layer in AWQ's coordinates for ``r = 1/s`` (a :class:`QArray`'s ``col_scale_inv``):
    ``(W·diag(s), diag(1/s) C diag(1/s))``, where ``(W − Θ) C (W − Θ)ᵀ`` is unchanged for
    ``Θ = Θ'·diag(1/s)``."""
    return w / r[None, :], scaled_statistic(c, r)


def _row_objective(w, theta, c):
    d = w - theta
    return jnp.einsum("ri,ij,rj->r", d, c, d, precision="highest")


@jax.jit
def refit_grid(q: QArray, w: jax.Array, c: jax.Array) -> QArray:
    """``q`` with each (row, group)'s scale (and a float minimum) refitted by least squares: the codes
    and integer zero points stay, the scales minimise the layer objective ``tr((W − Θ) C (W − Θ)ᵀ)``
    (``Θ = q.dense()``) row by row. With codes fixed ``Θ`` is linear in a row's scales, so each row is a
    ``G × G`` linear system (``2G × 2G`` with float minima). A row keeps its grid where the refit is not
    lower, or would flip a scale's sign; scales are rounded to ``spec.scale_dtype``."""
    spec = q.spec
    w = jnp.asarray(w, jnp.float32)
    c = jnp.asarray(c, jnp.float32)
    if q.col_scale_inv is not None:  # AWQ's coordinates: the grid values are the weights W·diag(s)
        w, c = scaled_coordinates(w, c, q.col_scale_inv)
    if q.perm is not None:  # act-order: the groups are consecutive in the permuted order
        w, c = w[:, q.perm], c[q.perm][:, q.perm]
    d_out, d_in = w.shape
    n_groups, gs = spec.groups(d_in), spec.group_len(d_in)
    pad = n_groups * gs - d_in
    codes = _grouped(q.codes.astype(jnp.float32), spec)  # [R, G, gs] (padding: code 0)
    live = _grouped(jnp.ones((1, d_in), jnp.float32), spec)  # [1, G, gs]
    if spec.float_min:
        basis = jnp.stack([codes * live, jnp.broadcast_to(live, codes.shape)], axis=1)  # [R, 2, G, gs]
        x0 = jnp.stack([q.scale, q.zero], axis=1)
    else:
        basis = ((codes - q.zero[..., None].astype(jnp.float32)) * live)[:, None]  # [R, 1, G, gs]
        x0 = q.scale[:, None]
    k = basis.shape[1]
    cb = jnp.pad(c, ((0, pad), (0, pad))).reshape(n_groups, gs, n_groups, gs)
    wc = _grouped(jnp.matmul(w, c, precision="highest"), spec)  # [R, G, gs]
    x0 = x0.reshape(d_out, k * n_groups).astype(jnp.float32)
    eye = jnp.eye(k * n_groups, dtype=jnp.float32)

    def row(args):  # one row's normal equations; a row's A needs a [k, G, d_in] temporary
        u, wcr, x0r = args
        a = jnp.einsum("kgi,gihj,lhj->kglh", u, cb, u, precision="highest").reshape(k * n_groups, k * n_groups)
        b = jnp.einsum("kgi,gi->kg", u, wcr, precision="highest").reshape(k * n_groups)
        # the change from the current grid; a small ridge keeps groups whose codes are all zero
        # (no say in the objective) where they are
        ridge = 1e-7 * jnp.maximum(jnp.mean(jnp.diagonal(a)), jnp.finfo(jnp.float32).tiny)
        return jnp.linalg.solve(a + ridge * eye, b - jnp.matmul(a, x0r, precision="highest"))

    # rows in batches: the temporaries of a batch, not of the whole matrix (G·d_in per row)
    delta = jax.lax.map(row, (basis, wc, x0), batch_size=min(d_out, 64))
    x = _round_scale((x0 + delta).reshape(d_out, k, n_groups), spec)
    scale = x[:, 0]
    new = dataclasses.replace(q, scale=scale, zero=x[:, 1] if spec.float_min else q.zero)
    old_theta, new_theta = dequantize(q, spec), dequantize(new, spec)
    ok = jnp.all((scale * q.scale > 0) & jnp.isfinite(scale), axis=1)
    if spec.float_min:
        ok &= jnp.all(jnp.isfinite(x[:, 1]), axis=1)
    ok &= _row_objective(w, new_theta, c) < _row_objective(w, old_theta, c)
    return dataclasses.replace(q, scale=jnp.where(ok[:, None], scale, q.scale),
                               zero=jnp.where(ok[:, None], x[:, 1], q.zero) if spec.float_min else q.zero)
