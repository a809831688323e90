r"""SparseGPT and GPTQ: column-by-column Optimal Brain Surgeon updates (pure, jittable).

Both walk the input columns of ``W [d_out, d_in]`` left to right in blocks of ``blocksize``. With
``U`` the upper Cholesky factor of ``H^{-1}`` (``H = C + λ I``, damping ``λ = percdamp · mean diag C``),
column ``i`` is replaced by its compressed value ``q`` (pruned to 0, or rounded to the grid) and
the error is spread over the columns to its right:

.. math::  W_{:, j} \mathrel{-}= \frac{W_{:, i} - q}{U_{ii}} U_{ij}, \quad j > i,

inside the block at once and lazily for the columns after the block. The reference
implementations' choices are kept (IST-DASLab sparsegpt / gptq):

* dead inputs (``C_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``; damping 0.01; blocksize 128;
* SparseGPT's unstructured mask is chosen per block of 128 columns over all rows by
  ``w² / U_jj²`` (so rows are not exactly ``p``-sparse); N:M picks the ``n`` largest of every ``m``
  columns by the same score, from the already updated weights;
* GPTQ's grid of a group is computed when the sweep enters it, from the already updated weights;
  optional act-order (columns by descending ``diag H``, undone at the end).

A Cholesky failure (``H`` not positive definite after damping) shows up as NaN: :func:`cholesky_inverse_upper`
retries with ten times the damping, up to ``max_damp_retries`` times, and reports the damping used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from awp_jax.quantizers import QArray, QuantSpec, _codes, _grid, _grouped, _ungrouped, _values

__all__ = ["prepare_hessian", "cholesky_inverse_upper", "sparsegpt", "gptq"]


def prepare_hessian(w, c, percdamp: float = 0.01):
    """Dead-input handling and damping: returns ``(w, H)``."""
    diag = jnp.diagonal(c)
    dead = diag == 0
    h = c + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(c.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    damp = percdamp * jnp.mean(jnp.diagonal(h))
    return w, h, damp


def cholesky_inverse_upper(h, damp, max_damp_retries: int = 4):
    """Upper Cholesky factor of ``(H + damp I)^{-1}``, retrying with 10× damping on failure.

    Returns ``(U, damp_used, ok)``.
    """
    eye = jnp.eye(h.shape[0], dtype=h.dtype)

    def attempt(d):
        lower = jnp.linalg.cholesky(h + d * eye)
        hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
        u = jnp.linalg.cholesky(hinv).T  # upper
        return u, jnp.all(jnp.isfinite(u))

    def cond(carry):
        _, _, ok, k = carry
        return (~ok) & (k <= max_damp_retries)

    def body(carry):
        _, d, _, k = carry
        d = jnp.where(k == 0, d, d * 10.0)
        u, ok = attempt(d)
        return u, d, ok, k + 1

    u0 = jnp.full_like(h, jnp.nan)
    u, d, ok, _ = jax.lax.while_loop(cond, body, (u0, jnp.asarray(damp, h.dtype), jnp.asarray(False), 0))
    return u, d, ok


def _sweep(w, u, blocksize: int, column_fn, block_init):
    """Generic left-to-right OBS sweep. ``block_init(w_block, u_block, b) -> aux`` starts block ``b``;
    ``column_fn(i_global, i_local, w_block, u_block, aux) -> (q_column, aux)`` compresses one
    column given the current (updated) block. Returns the result and each block's final ``aux``."""
    d_in = w.shape[1]
    auxes = []
    for b0 in range(0, d_in, blocksize):
        b1 = min(b0 + blocksize, d_in)
        w1 = w[:, b0:b1]
        u1 = u[b0:b1, b0:b1]
        aux = block_init(w1, u1, b0 // blocksize)

        def body(i, carry):
            w1, q1, err1, aux = carry
            q, aux = column_fn(b0 + i, i, w1, u1, aux)
            col = jax.lax.dynamic_slice_in_dim(w1, i, 1, axis=1)[:, 0]
            e = (col - q) / u1[i, i]
            w1 = w1 - e[:, None] * u1[i][None, :]  # u1 is upper triangular: only columns >= i change
            q1 = jax.lax.dynamic_update_slice_in_dim(q1, q[:, None], i, axis=1)
            err1 = jax.lax.dynamic_update_slice_in_dim(err1, e[:, None], i, axis=1)
            return w1, q1, err1, aux

        zeros = jnp.zeros_like(w1)
        _, q1, err1, aux = jax.lax.fori_loop(0, b1 - b0, body, (w1, zeros, zeros, aux))
        auxes.append(aux)
        w = w.at[:, b0:b1].set(q1)
        if b1 < d_in:
            w = w.at[:, b1:].add(-err1 @ u[b0:b1, b1:])
    return w, auxes


def prune_counts(d_out: int, d_in: int, sparsity: float, blocksize: int = 128) -> np.ndarray:
    """Entries SparseGPT prunes in each column block: ``int(d_out · width · sparsity)``."""
    return np.asarray([int(d_out * (min(b0 + blocksize, d_in) - b0) * sparsity) for b0 in range(0, d_in, blocksize)], np.int32)


def sparsegpt(w, c, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
              axis_name: str | None = None, n_rows: int | None = None, counts=None):
    """SparseGPT pruning of ``w`` (unstructured at ``sparsity`` per 128-column block, or N:M).

    ``counts`` (unstructured, one device): :func:`prune_counts` as an array, which may be traced —
    then ``sparsity`` is not used, and layers that differ only in sparsity share a compilation.

    ``axis_name``: ``w`` holds some of the layer's rows (in a ``shard_map`` over that axis, the
    rows in device order, the last padded with zero rows up to ``n_rows`` real ones): the unstructured
    threshold, taken over every row of a column block, gathers that block's scores; everything else
    is row-local.

    Returns ``(theta, damp_used, ok)``.
    """
    w, h, damp = prepare_hessian(w, c, percdamp)
    u, damp, ok = cholesky_inverse_upper(h, damp)
    d_out = w.shape[0]

    if nm is None:

        def block_mask(w1, u1, b):
            score = (w1 / jnp.diagonal(u1)[None, :]) ** 2
            if axis_name is None:
                every, total = score, score.size
            else:  # padding rows sort last and are not counted
                row = jax.lax.axis_index(axis_name) * d_out + jnp.arange(d_out)
                every = jax.lax.all_gather(jnp.where((row < n_rows)[:, None], score, jnp.inf), axis_name, tiled=True)
                total = n_rows * score.shape[1]
            index = int(total * sparsity) if counts is None or axis_name is not None else counts[b]
            thresh = jnp.sort(every.reshape(-1))[index]
            return score <= thresh  # True = pruned

        def column(ig, i, w1, u1, mask):
            col = jax.lax.dynamic_slice_in_dim(w1, i, 1, axis=1)[:, 0]
            m = jax.lax.dynamic_slice_in_dim(mask, i, 1, axis=1)[:, 0]
            return jnp.where(m, 0.0, col), mask

        return _sweep(w, u, blocksize, column, block_mask)[0], damp, ok

    n, m = nm
    if blocksize % m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m}")

    def column_nm(ig, i, w1, u1, pruned):
        def new_group(_):
            cols = jax.lax.dynamic_slice_in_dim(w1, i, m, axis=1)
            dg = jax.lax.dynamic_slice_in_dim(jnp.diagonal(u1), i, m)
            score = (cols / dg[None, :]) ** 2
            # prune the m - n smallest scores (ties: lower index pruned first, as torch.topk(largest=False))
            order = jnp.argsort(score, axis=1, stable=True)
            ranks = jnp.argsort(order, axis=1, stable=True)
            return ranks < (m - n)

        pruned = jax.lax.cond(i % m == 0, new_group, lambda _: pruned, None)
        col = jax.lax.dynamic_slice_in_dim(w1, i, 1, axis=1)[:, 0]
        return jnp.where(pruned[:, i % m], 0.0, col), pruned

    init = jnp.zeros((d_out, m), bool)
    return _sweep(w, u, blocksize, column_nm, lambda w1, u1, b: init)[0], damp, ok


def gptq(w, c, spec: QuantSpec, *, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False, grid=None):
    """GPTQ quantization of ``w`` on ``spec``'s grid (group-wise, grid fixed when a group starts).

    ``grid``: ``(scale, zero)``, each ``[d_out, G]`` over groups of consecutive columns: round onto
    this grid (another method's, e.g. AWQ's clipped one) instead of fitting each group's grid when the
    sweep enters it. With ``act_order`` each column keeps its own group's grid (the reference's
    "static groups"), so the result needs no permutation (``perm`` is ``None``).

    Returns ``(q, damp_used, ok)``: ``q`` the :class:`~awp_jax.quantizers.QArray` the sweep made
    (codes in sweep order, each group's grid as fixed when the group started, ``perm`` the column
    order of the sweep when ``act_order``: groups are consecutive columns in that order).
    """
    d_out, d_in = w.shape
    g = spec.group_len(d_in)
    n_groups = spec.groups(d_in)  # validates divisibility
    if grid is not None:
        if tuple(grid[0].shape) != (d_out, n_groups) or tuple(grid[1].shape) != (d_out, n_groups):
            raise ValueError(f"grid scale and zero must be [d_out, G] = {(d_out, n_groups)}, got "
                             f"{tuple(grid[0].shape)} and {tuple(grid[1].shape)}")
    w, h, damp = prepare_hessian(w, c, percdamp)
    perm = jnp.arange(d_in)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    u, damp, ok = cholesky_inverse_upper(h, damp)
    per_row = spec.group_size is None
    if not per_row and (g > blocksize or blocksize % g):
        raise ValueError(f"group size {g} must divide the blocksize {blocksize}")
    per_block = 1 if per_row else blocksize // g

    def group_grid(cols):
        s, z = _grid(cols[:, None, :], spec)
        return s[:, 0, 0], z[:, 0, 0]

    def column(ig, i, w1, u1, aux):
        if given is not None:  # the given grid of the column's own group
            s, z = given[0][:, group_of[ig]], given[1][:, group_of[ig]]
            return _values(_codes(jax.lax.dynamic_slice_in_dim(w1, i, 1, axis=1)[:, 0], s, z, spec), s, z, spec), aux
        grid, scales, zeros = aux
        if not per_row:
            # a group starts: its grid from the already updated weights of its columns, which all
            # lie in this block (g divides the blocksize); columns past d_in are zero padding
            def new_grid(_):
                cols = jax.lax.dynamic_slice_in_dim(jnp.pad(w1, ((0, 0), (0, g))), i, g, axis=1)
                s, z = group_grid(jnp.where(((ig + jnp.arange(g)) < d_in)[None, :], cols, 0.0))
                return (s, z), scales.at[:, i // g].set(s), zeros.at[:, i // g].set(z)

            grid, scales, zeros = jax.lax.cond(ig % g == 0, new_grid, lambda _: (grid, scales, zeros), None)
        col = jax.lax.dynamic_slice_in_dim(w1, i, 1, axis=1)[:, 0]
        q = _values(_codes(col, *grid, spec), *grid, spec)
        return q, (grid, scales, zeros)

    given = None if grid is None else (jnp.asarray(grid[0], w.dtype), jnp.asarray(grid[1], w.dtype))
    group_of = perm // g  # sweep position -> group of the column there
    # per row: one grid from the whole (dead-column-zeroed) row, fixed for the sweep
    fixed = group_grid(w) if per_row and given is None else (jnp.ones((d_out,), w.dtype), jnp.zeros((d_out,), w.dtype))
    empty = jnp.zeros((d_out, per_block), w.dtype)
    theta, auxes = _sweep(w, u, blocksize, column, lambda w1, u1, b: (fixed, empty, empty))
    if given is not None:
        scale, zero = given
        if act_order:  # back to the original column order, where the given groups are
            theta, act_order = jnp.take_along_axis(theta, jnp.argsort(perm)[None, :], axis=1), False
    elif per_row:
        scale, zero = fixed[0][:, None], fixed[1][:, None]
    else:
        scale = jnp.concatenate([a[1] for a in auxes], axis=1)[:, :n_groups]
        zero = jnp.concatenate([a[2] for a in auxes], axis=1)[:, :n_groups]
    codes = _ungrouped(_codes(_grouped(theta, spec), scale[..., None], zero[..., None], spec), d_in).astype(jnp.uint8)
    q = QArray(codes=codes, scale=scale, zero=zero if spec.float_min else zero.astype(jnp.uint8), spec=spec,
               perm=perm if act_order else None)
    return q, damp, ok
