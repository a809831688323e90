r"""HWPQ-style pruning: a Hessian-free contribution metric and an EWMA threshold instead of sorting.

Only the HWPQ abstract is public (arXiv 2501.16376): "a contribution-based weight metric" that
"evaluates the importance of weights without relying on second-order derivatives", and "the
Exponentially Weighted Moving Average (EWMA) technique to bypass weight sorting", extended to 2:4.
This module implements the following reading of it, stated so it can be checked:

* **Contribution.** ``c_ij = W_ij² · C_jj`` with ``C_jj = Σ_n x_nj² / n``: the mean squared
  contribution of weight ``ij`` to output ``i``, ``E[(W_ij x_j)²]``. Only the diagonal of the
  Hessian ``C`` is used. Within one row it ranks weights exactly as Wanda's ``|W_ij|·sqrt(C_jj)``,
  so **the 2:4 masks equal Wanda's 2:4 masks** (the N:M choice is 2 of 4 by comparison, and there
  is nothing to sort).
* **EWMA threshold (unstructured).** Rows are visited in order; a row's contributions are
  normalised by their mean (``ĉ = c / mean_j c``, so one threshold suits every row). Row ``r``
  keeps the entries with ``ĉ > τ_r``; from its kept fraction ``f_r`` a corrected estimate
  ``t_r = τ_r · max(1 + g (f_r − q), 1/2)`` (``q = 1 − sparsity``, ``g = 4``) enters an exponentially
  weighted moving average ``τ_{r+1} = (1 − β) τ_r + β t_r`` (``β = 0.25``). ``τ_0`` is the first
  row's own threshold (the largest score outside its top-k). One pass over the rows, no sort, no top-k:
  the kept count of a row is approximate (the achieved sparsity is reported); over a layer it
  settles on the target.

Quantization (the paper's FP8 path) is not implemented here: this package's grids are integer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awp_jax.projections import keep_count, nm_mask, row_topk_mask

__all__ = ["contribution", "hwpq_prune"]


def contribution(w: jax.Array, c: jax.Array) -> jax.Array:
    """``W_ij² · C_jj`` for ``w [d_out, d_in]``, ``c [d_in, d_in]``."""
    return jnp.square(w) * jnp.maximum(jnp.diagonal(c), 0)[None, :]


def ewma_mask(score: jax.Array, sparsity: float, beta: float = 0.25, gain: float = 4.0) -> jax.Array:
    """Sort-free mask keeping about ``1 − sparsity`` of each row (see the module docstring)."""
    tiny = jnp.finfo(jnp.float32).tiny
    norm = score / jnp.maximum(jnp.mean(score, axis=1, keepdims=True), tiny)
    q = 1.0 - sparsity

    # τ_0: the first row's own threshold, the largest score outside its top-k
    first = norm[0]
    top = row_topk_mask(first, keep_count(sparsity, first.shape[0]))
    tau0 = jnp.maximum(jnp.max(jnp.where(top, 0.0, first)), 0.0)

    def row(tau, nr):
        keep = nr > tau
        est = tau * jnp.maximum(1 + gain * (jnp.mean(keep) - q), 0.5)
        return (1 - beta) * tau + beta * est, keep

    _, mask = jax.lax.scan(row, tau0, norm)
    return mask


def hwpq_prune(w: jax.Array, c: jax.Array, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None, beta: float = 0.25):
    """Pruned ``w``: 2:4 (or any N:M) by contribution, or unstructured with the EWMA threshold."""
    score = contribution(w, c)
    mask = nm_mask(score, *nm) if nm is not None else ewma_mask(score, sparsity, beta)
    return jnp.where(mask, w, jnp.zeros_like(w))
