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


def row_topk_mask(score: jax.Array, k, hint: jax.Array | None = None) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of each row of a non-negative ``score [..., d]``.

    ``k`` is a Python int, a traced scalar, or an integer array broadcastable to ``score.shape[:-1]``.
    Exactly ``clip(k, 0, d)`` entries per row are kept; among equal scores the lower index wins.

    ``hint`` (optional, boolean like ``score``): a guess of the mask, e.g. the previous iterate's
    support in a PGD loop. It only narrows the search and never changes the result. Rows where the
    hint is the exact top-k need no search; the others are gathered and bisected on their own (see
    :func:`_threshold_from_hint`). In a PGD loop a few rows change support per iteration, so the
    projection costs a few passes over the scores instead of 31.
    """
    bits = _order_bits(score)
    k = jnp.asarray(k, jnp.int32)[..., None] if jnp.ndim(k) else jnp.asarray(k, jnp.int32)
    nbits = 8 * bits.dtype.itemsize - 1
    one = jnp.ones((), bits.dtype)

    if hint is None:
        # Largest t with count(bits >= t) >= k, built one bit at a time from the top.
        def body(i, lo):
            cand = lo | (one << (nbits - 1 - i).astype(bits.dtype))
            enough = jnp.sum(bits >= cand, axis=-1, keepdims=True, dtype=jnp.int32) >= k
            return jnp.where(enough, cand, lo)

        lo = jax.lax.fori_loop(0, nbits, body, jnp.zeros(bits.shape[:-1] + (1,), bits.dtype))
    else:
        lo = _threshold_from_hint(bits, k, hint)
    mask = bits >= lo
    # Rows with more entries equal to the threshold than places left keep the first ones (the
    # lax.top_k rule). That needs a cumulative sum, which costs more than the rest of the
    # projection, so it runs only when some row has such ties (a loop of at most one trip: unlike
    # lax.cond it is not turned into computing both branches under vmap).
    excess = jnp.any(jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32) != k)

    def break_ties(st):
        _, m = st
        above = bits > lo
        ties = bits == lo
        need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
        return jnp.zeros((), bool), above | (ties & (jnp.cumsum(ties, axis=-1, dtype=jnp.int32) <= need))

    _, mask = jax.lax.while_loop(lambda st: st[0], break_ties, (excess, mask))
    return mask


def _threshold_from_hint(bits, k, hint):
    """Largest t with count(bits >= t) >= k per row, searching only the rows ``hint`` gets wrong.

    Per row, with h hinted entries, a the smallest hinted and b the largest unhinted bit pattern:
    if h == k and a > b the hint is the row's top-k and t = a (no search); if h == k and a <= b,
    t lies in [a, b] (every entry >= a counts k or more, at most k − 1 entries exceed b); otherwise
    t is anywhere in [0, max). The rows that need a search are gathered in chunks and bisected
    there, so the cost scales with the rows whose support changes, not with all rows.
    """
    lead, d = bits.shape[:-1], bits.shape[-1]
    bits = bits.reshape(-1, d)
    n = bits.shape[0]
    k = jnp.broadcast_to(k, lead + (1,)).reshape(n, 1)
    hint = hint.reshape(n, d)
    top = jnp.iinfo(bits.dtype).max
    zero = jnp.zeros((), bits.dtype)
    h = jnp.sum(hint, axis=-1, keepdims=True, dtype=jnp.int32)
    a = jnp.min(jnp.where(hint, bits, top), axis=-1, keepdims=True)
    b = jnp.max(jnp.where(hint, -1, bits), axis=-1, keepdims=True).astype(bits.dtype)
    fits = (h == k) & (k > 0)
    # a fitting hint gives t in [a, a + 1) when a > b (settled) and in [a, b + 1) otherwise
    lo = jnp.where(fits, a, zero)
    hi = jnp.where(fits, jnp.maximum(a, b) + 1, top)

    search = (hi - lo > 1)[:, 0]
    n_search = jnp.sum(search, dtype=jnp.int32)
    chunk = min(n, max(16, n // 16))
    n_chunks = -(-n // chunk)
    # indices of the rows to search first, padded with row 0 (its search is a no-op if settled,
    # and otherwise it is searched anyway: duplicates write back the same result)
    rows = jnp.nonzero(search, size=n_chunks * chunk, fill_value=0)[0]

    def count(bb, t, kk):
        return jnp.sum(bb >= t, axis=-1, keepdims=True, dtype=jnp.int32) >= kk

    def chunk_cond(st):
        j, _, _ = st
        return j * chunk < n_search

    def chunk_body(st):
        j, lo, hi = st
        r = jax.lax.dynamic_slice_in_dim(rows, j * chunk, chunk)
        bb, kk = bits[r], k[r]

        def cond(lohi):
            return jnp.any(lohi[1] - lohi[0] > 1)

        def body(lohi):
            l, u = lohi
            mid = l + (u - l) // 2
            enough = count(bb, mid, kk)
            return jnp.where(enough, mid, l), jnp.where(enough, u, mid)

        l, u = jax.lax.while_loop(cond, body, (lo[r], hi[r]))
        return j + 1, lo.at[r].set(l), hi.at[r].set(u)

    _, lo, _ = jax.lax.while_loop(chunk_cond, chunk_body, (jnp.zeros((), jnp.int32), lo, hi))
    return lo.reshape(lead + (1,))


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
    hint: jax.Array | None = None,
    with_source: bool = False,
):
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
      hint: a guess of the row top-k mask (e.g. the previous iterate's support); it speeds up
        the search and never changes the result (see :func:`row_topk_mask`).
      with_source: also return the pruned point the grid was fitted on (``mask ⊙ z``): the
        result is ``rtn(source)``, so ``quantize(source)`` gives the result's codes and grid.
    Returns:
      The projected ``[d_out, d_in]`` matrix; pruned entries are exactly zero (and the source).
    """
    if k is not None and nm is not None:
        raise ValueError("give either k (row top-k) or nm (N:M), not both")
    mask = None
    score = jnp.abs(z) if score is None else score
    if k is not None:
        mask = row_topk_mask(score, k, hint=hint)
    elif nm is not None:
        mask = nm_mask(score, *nm)
    if mask is not None:
        z = jnp.where(mask, z, jnp.zeros_like(z))
    out = (lambda x: (x, z)) if with_source else (lambda x: x)  # noqa: E731
    if quant is None:
        return out(z)
    if isinstance(quantize_now, bool):
        if not quantize_now:
            return out(z)
        q = rtn(z, quant)
    else:
        q = jax.lax.cond(quantize_now, lambda x: rtn(x, quant), lambda x: x, z)
    # rtn keeps zeros at zero (0 is on every integer-zero grid); a float-minimum grid has no 0
    return out(q if mask is None else jnp.where(mask, q, jnp.zeros_like(q)))
