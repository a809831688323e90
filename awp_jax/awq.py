r"""AWQ (activation-aware weight quantization), at the level of one layer (pure, jittable).

1. Scale search: per input channel ``s_j = a_j^α`` with ``a_j`` the channel's activation
   magnitude, normalised by ``sqrt(max s · min s)``; α on a grid of 20 values in [0, 1). For each
   α the layer is quantized as ``Q(W · diag(s)) · diag(s)^{-1}`` and the α with the smallest layer
   output error ``tr(Δ C Δᵀ)`` wins.
2. Clip search: per (row, group), the clipping range ``[−r·m, r·m]`` (``m`` the group's abs max
   after scaling) with ``r = 1 − i/20`` for ``i = 0..9`` (max shrink 0.5) that minimises the
   group's own output error ``Δ_g C_gg Δ_gᵀ``.

Deviations from the reference (mit-han-lab/llm-awq), stated because they matter for comparisons:
the activation magnitude is the RMS ``sqrt(C_jj)`` rather than the mean ``|x_j|`` (only second
moments are collected); the loss is the layer's output error (exact, from ``C``, on all calibration
tokens) rather than the output of the whole sub-module (attention for q/k/v), and the scale is
folded back into the weights (the dense result is the same function of the input); the clip
search uses every token, and is not skipped for q/k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from awp_jax.quantizers import QuantSpec, _grouped, _ungrouped, quantize, rtn
from awp_jax.solver import objective

__all__ = ["awq"]


def _clip(ws, ratio, spec):
    """``ws`` with each (row, group) clipped to ``ratio[..., G] ·`` its abs max."""
    g = _grouped(ws, spec)  # [R, G, gs]
    amax = jnp.max(jnp.abs(g), axis=-1, keepdims=True) * ratio[..., None]
    return _ungrouped(jnp.clip(g, -amax, amax), ws.shape[-1])


def _clip_quantize(ws, ratio, spec):
    """Fake-quantize ``ws`` after clipping (see :func:`_clip`)."""
    return rtn(_clip(ws, ratio, spec), spec)


def awq(w, c, spec: QuantSpec, *, n_grid: int = 20, max_shrink: float = 0.5):
    """AWQ of ``w [d_out, d_in]`` with ``c [d_in, d_in]``.

    Returns ``(q, alpha)``: ``q`` the :class:`~awp_jax.quantizers.QArray` of the scaled weights
    ``W·diag(s)`` on the group grid (what a deployment stores, with ``s`` folded into the previous
    operation) with ``col_scale_inv = r = 1/s``, and the chosen exponent. The dense result
    ``q.dense() = grid values · r`` is a product, not a quotient, so the stored form reproduces it
    exactly."""
    d_in = w.shape[1]
    a = jnp.sqrt(jnp.maximum(jnp.diagonal(c), 0))
    smallest = jnp.min(jnp.where(a > 0, a, jnp.inf))
    # dead channels: the smallest live magnitude (all dead: every channel 1, i.e. plain RTN + clip)
    a = jnp.where(a > 0, a, jnp.where(jnp.isfinite(smallest), smallest, 1.0))

    def scaled_result(alpha):
        s = a**alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        return rtn(w * s[None, :], spec) / s[None, :], s

    alphas = jnp.arange(n_grid) / n_grid
    errs = jax.vmap(lambda al: objective(w, scaled_result(al)[0], c))(alphas)
    alpha = alphas[jnp.argmin(errs)]
    _, s = scaled_result(alpha)
    ws = w * s[None, :]

    # group-local error of each candidate ratio: Δ_g C_gg Δ_gᵀ per (row, group)
    # an error δ in the scaled weights is δ / s in the original ones: its cost is δ (C / s sᵀ) δᵀ
    cg = c / s[:, None] / s[None, :]
    n_groups, gs = spec.groups(d_in), spec.group_len(d_in)
    pad = n_groups * gs - d_in
    cpad = jnp.pad(cg, ((0, pad), (0, pad)))
    blocks = jnp.stack([cpad[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(n_groups)])  # [G, gs, gs]

    def group_errors(ratio):
        q = _clip_quantize(ws, jnp.full((w.shape[0], n_groups), ratio), spec)
        d = _grouped(ws - q, spec)  # [R, G, gs]
        return jnp.einsum("rgi,gij,rgj->rg", d, blocks, d, precision="highest")

    ratios = 1.0 - jnp.arange(int(max_shrink * n_grid)) / n_grid
    errors = jax.vmap(group_errors)(ratios)  # [n_ratio, R, G]
    best = ratios[jnp.argmin(errors, axis=0)]  # [R, G]
    q = quantize(_clip(ws, best, spec), spec)
    return dataclasses.replace(q, col_scale_inv=1.0 / s), alpha
