r"""Error-correcting targets: fit each compressed layer, fed the compressed model's inputs, to the
dense model's outputs.

The layer objective of every method is :math:`\|(W − Θ) X\|^2` with ``X`` the layer's input in the
(partly compressed) model. But the dense model computed :math:`W X_d`, with ``X_d`` its own input
to that layer; the errors of the blocks before shift ``X`` away from ``X_d``. Fitting
:math:`\min_Θ \|W X_d − Θ X\|^2` instead corrects them (QEP, Arai & Ichikawa 2025; GPTAQ). With
``C = X Xᵀ/n`` and the cross moment ``M = X_d Xᵀ/n`` (collected in the same sequential pass,
:func:`awp_jax.calibration.block_statistics` with ``cross=True``)

.. math::  \|W X_d − Θ X\|^2 / n = \operatorname{tr}\big((W^* − Θ)\, C\, (W^* − Θ)^\top\big) + \text{const},
           \qquad W^* = W M C^{-1},

so every method applies unchanged to ``(W*, C)``: AWP, SparseGPT and GPTQ then minimise the
error-correcting objective, Wanda and RTN round the corrected weights. As QEP does, the correction
is scaled by ``alpha`` (``W_α = W + α (W* − W)``; 1: the full correction, which fits the calibration
sample hardest) and ``C`` is damped by ``damping · mean(diag C)`` where it is inverted (GPTQ's
damping). Where nothing before the layer is compressed ``M = C`` and ``W_α = W`` exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from awp_jax.solver import ridge

__all__ = ["ErrorCorrection", "corrected_weight", "cross_objective"]


@dataclasses.dataclass(frozen=True)
class ErrorCorrection:
    """Fit the dense model's outputs (see the module docstring). ``alpha``: how much of the
    correction ``W* − W`` is applied, in (0, 1]; ``damping``: ridge on C where it is inverted, as a
    fraction of its mean diagonal."""

    alpha: float = 0.5
    damping: float = 0.01

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"error-correction alpha must be a number in (0, 1], got {self.alpha!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not (
                np.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"error-correction damping must be a positive number, got {self.damping!r}")


@jax.jit
def _corrected(w, c, m, alpha, damping):
    cd = ridge(c, damping)
    r = jnp.matmul(w, m - c, precision="highest")  # W (M − C): W* − W = W (M − C) C^{-1}
    factor = jax.scipy.linalg.cho_factor(cd, lower=True)
    delta = jax.scipy.linalg.cho_solve(factor, r.T).T  # C_d symmetric
    return w + alpha * delta


def corrected_weight(w, c, cross, correction: ErrorCorrection):
    """``W + α (W M − W C) (C + δ·mean(diag C)·I)^{-1}``: the target the methods fit instead of ``W``
    (``w [d_out, d_in]``, ``c = X Xᵀ/n``, ``cross = X_d Xᵀ/n``, both ``[d_in, d_in]``)."""
    w, c, cross = (jnp.asarray(a, jnp.float32) for a in (w, c, cross))
    if c.shape != cross.shape or c.shape != (w.shape[-1], w.shape[-1]):
        raise ValueError(f"C {c.shape} and the cross moment {cross.shape} must both be [d_in, d_in] for W {w.shape}")
    out = _corrected(w, c, cross, jnp.float32(correction.alpha), jnp.float32(correction.damping))
    if not bool(jnp.all(jnp.isfinite(out))):
        raise FloatingPointError("the error-correcting target is not finite (C is singular even after damping?): "
                                 "raise the error-correction damping")
    return out


def cross_objective(w, theta, c, cross, c_dense):
    """``‖W X_d − Θ X‖² / n = tr(W C_d Wᵀ) − 2 tr(W M Θᵀ) + tr(Θ C Θᵀ)`` from the moments
    (``c_dense = X_d X_dᵀ/n``): the error-correcting objective itself, for tests and analysis."""
    hp = "highest"
    return (jnp.sum(w * jnp.matmul(w, c_dense, precision=hp)) - 2 * jnp.sum(jnp.matmul(w, cross, precision=hp) * theta)
            + jnp.sum(theta * jnp.matmul(theta, c, precision=hp)))
