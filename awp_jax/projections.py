"""Projections onto the compression constraint sets (pure, jittable).

* :func:`row_topk_mask` / :func:`row_topk` — keep exactly ``k`` largest-magnitude entries of
  every row (the Euclidean projection onto ``{Θ : ||Θ[i, :]||_0 <= k}``). Ties are broken
  towards the lower column index, the same rule as ``jax.lax.top_k``. ``k`` may be a traced
  integer, so a sparsity ramp inside a ``while_loop`` needs no recompilation.
* :func:`nm_mask` / :func:`nm_prune` — keep the ``n`` largest of every ``m`` consecutive input
  columns (2:4, 4:8), same tie rule.
* :func:`project` — the composed projection a solver step uses: prune (row top-k or N:M), then
  quantize group-wise, then re-apply the mask.

Row top-k finds each row's k-th largest |z| by bisection on the integer bit pattern of |z|
(order preserving for non-negative floats), then keeps everything above it plus the first
ties. On CPU this is several times faster than the sort inside ``lax.top_k``
(``bench/solver.py`` measures both), and it is exact: the same mask as ``lax.top_k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awp_jax.quantizers import QuantSpec, rtn

__all__ = [
    "keep_count",
    "row_topk_mask",
    "row_topk",
    "row_topk_mask_sort",
    "nm_mask",
    "nm_prune",
    "project",
]

_INT_OF_WIDTH = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def keep_count(sparsity, d_in: int):
    """Entries kept per row at ``sparsity``: ``round((1 - sparsity) * d_in)`` (traceable)."""
    if isinstance(sparsity, (int, float)):
        return int(round((1.0 - sparsity) * d_in))
    return jnp.round((1.0 - sparsity) * d_in).astype(jnp.int32)


def _order_bits(score: jax.Array) -> jax.Array:
    """Integers with the same order as the non-negative floats in ``score``."""
    if score.dtype == jnp.bfloat16:
        score = score.astype(jnp.float32)
    return jax.lax.bitcast_convert_type(score, _INT_OF_WIDTH[score.dtype.itemsize])


def row_topk_mask(score: jax.Array, k) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of each row of a non-negative ``score [..., d]``.

    ``k`` is a Python int, a traced scalar, or an integer array broadcastable to ``score.shape[:-1]``.
    Exactly ``clip(k, 0, d)`` entries per row are kept; among equal scores the lower index wins.
    """
    bits = _order_bits(score)
    k = jnp.asarray(k, jnp.int32)[..., None] if jnp.ndim(k) else jnp.asarray(k, jnp.int32)
    nbits = 8 * bits.dtype.itemsize - 1
    one = jnp.ones((), bits.dtype)

    # Largest t with count(bits >= t) >= k, built one bit at a time from the top.
    def body(i, lo):
        cand = lo | (one << (nbits - 1 - i).astype(bits.dtype))
        enough = jnp.sum(bits >= cand, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        return jnp.where(enough, cand, lo)

    lo = jax.lax.fori_loop(0, nbits, body, jnp.zeros(bits.shape[:-1] + (1,), bits.dtype))
    above = bits > lo
    ties = bits == lo
    need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    return above | (ties & (jnp.cumsum(ties, axis=-1, dtype=jnp.int32) <= need))


def row_topk_mask_sort(score: jax.Array, k: int) -> jax.Array:
    """Reference implementation with ``lax.top_k`` (static ``k``); same mask as :func:`row_topk_mask`."""
    d = score.shape[-1]
    if k <= 0:
        return jnp.zeros(score.shape, bool)
    _, idx = jax.lax.top_k(score, min(k, d))
    mask = jnp.zeros(score.shape, bool).reshape(-1, d)
    rows = jnp.arange(mask.shape[0])[:, None]
    return mask.at[rows, idx.reshape(-1, idx.shape[-1])].set(True).reshape(score.shape)


def row_topk(z: jax.Array, k) -> jax.Array:
    """Keep the ``k`` largest-magnitude entries of every row of ``z``, zero the rest."""
    return jnp.where(row_topk_mask(jnp.abs(z), k), z, jnp.zeros_like(z))


def nm_mask(score: jax.Array, n: int, m: int) -> jax.Array:
    """Boolean mask keeping the ``n`` largest scores in every ``m`` consecutive entries of the
    last axis (lower index wins ties). The last axis must be a multiple of ``m``."""
    d = score.shape[-1]
    if d % m:
        raise ValueError(f"N:M sparsity needs d_in to be a multiple of m={m}, got d_in={d}")
    s = score.reshape(*score.shape[:-1], d // m, m)
    a = s[..., :, None]  # entry i
    b = s[..., None, :]  # entry j
    idx = jnp.arange(m)
    earlier = (idx[None, :] < idx[:, None]).reshape((1,) * (s.ndim - 1) + (m, m))
    beats = (b > a) | ((b == a) & earlier)  # j ranks ahead of i
    rank = jnp.sum(beats, axis=-1)
    return (rank < n).reshape(score.shape)


def nm_prune(z: jax.Array, n: int, m: int) -> jax.Array:
    """Keep the ``n`` largest-magnitude entries of every ``m`` consecutive inputs of each row."""
    return jnp.where(nm_mask(jnp.abs(z), n, m), z, jnp.zeros_like(z))


def project(
    z: jax.Array,
    *,
    k=None,
    nm: tuple[int, int] | None = None,
    quant: QuantSpec | None = None,
    quantize_now=True,
    score: jax.Array | None = None,
) -> jax.Array:
    """Prune-then-quantize-then-mask projection used by the PGD step.

    Args:
      z: ``[d_out, d_in]`` point to project.
      k: entries kept per row (row top-k), or ``None`` for no unstructured pruning.
      nm: ``(n, m)`` for N:M pruning along ``d_in`` (exclusive with ``k``).
      quant: group-wise grid, or ``None`` for no quantization.
      quantize_now: traced or static flag; when false the quantizer is skipped (a schedule's
        prune-only phase). Ignored when ``quant`` is ``None``.
      score: if given, the pruning mask keeps the highest ``score`` entries instead of the
        largest ``|z|`` (used for Wanda-style initial points).
    Returns:
      The projected ``[d_out, d_in]`` matrix; pruned entries are exactly zero.
    """
    if k is not None and nm is not None:
        raise ValueError("give either k (row top-k) or nm (N:M), not both")
    mask = None
    score = jnp.abs(z) if score is None else score
    if k is not None:
        mask = row_topk_mask(score, k)
    elif nm is not None:
        mask = nm_mask(score, *nm)
    if mask is not None:
        z = jnp.where(mask, z, jnp.zeros_like(z))
    if quant is None:
        return z
    if isinstance(quantize_now, bool):
        if not quantize_now:
            return z
        q = rtn(z, quant)
    else:
        q = jax.lax.cond(quantize_now, lambda x: rtn(x, quant), lambda x: x, z)
    return q if mask is None else jnp.where(mask, q, jnp.zeros_like(q))
