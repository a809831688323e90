"""Per-weight importance scores used to pick pruning masks (pure, jittable).

* magnitude: ``|W_ij|``
* Wanda: ``|W_ij| * sqrt(C_jj)`` — the input channel's activation norm (``C = X Xᵀ / n``, so
  ``C_jj`` is the mean squared activation; the scale does not change the per-row ranking).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["magnitude_score", "wanda_score"]


def magnitude_score(w: jax.Array) -> jax.Array:
    """``|W|`` — ``[d_out, d_in]``."""
    return jnp.abs(w)


def wanda_score(w: jax.Array, c: jax.Array) -> jax.Array:
    """``|W| * sqrt(diag C)`` for ``w [..., d_out, d_in]`` and ``c [..., d_in, d_in]``."""
    diag = jnp.diagonal(c, axis1=-2, axis2=-1)
    return jnp.abs(w) * jnp.sqrt(jnp.maximum(diag, 0))[..., None, :]
