"""Layers every family shares: linear (checkpoint layout ``[out, in]``), RMSNorm, rotary
embeddings (plain and Llama-3 scaled), grouped-query causal attention. Numerics follow
transformers: norms and softmax in float32, rotary in the "rotate half" layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Linear", "RMSNorm", "OffsetRMSNorm", "rope_inv_freq", "rotary", "rotate_half", "causal_attention", "lead"]


def rope_inv_freq(cfg) -> np.ndarray:
    """Inverse rotary frequencies [head_dim / 2], with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    if cfg.rope_scaling:
        s = dict(cfg.rope_scaling)
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary(cfg, seq_len: int):
    """cos, sin tables [L, head_dim] (float32)."""
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def lead(v, ndim):
    """A vector shaped to broadcast against the last axis of an ``ndim``-dimensional array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


ATTENTION_CHUNK = 256


def causal_attention(q, k, v, chunk: int = ATTENTION_CHUNK, *, scale: float | None = None, window: int | None = None,
                     softcap: float | None = None):
    """Grouped-query causal attention. ``q [B, L, KH, G, hd]``, ``k, v [B, L, KH, hd]`` →
    ``[B, L, KH, G, hd]``. Scores and softmax in float32. ``scale``: the score scale (default
    ``1/sqrt(hd)``); ``window``: a query sees only the ``window`` most recent positions, itself
    included (sliding-window attention); ``softcap``: scores become ``softcap·tanh(score/softcap)``.

    The G query heads that share a key/value head are folded into the query axis, so each
    product is one large batched matmul per kv head. Queries are processed in chunks of ``chunk``
    positions, each against only the keys at or before its last position: the same result as one
    masked ``L × L`` product with about half the FLOPs and a small score buffer (measured 3× faster
    than the unchunked form at L = 2048 on CPU).
    """
    B, L, KH, G, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qt = q.transpose(0, 2, 3, 1, 4)  # [B, KH, G, L, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KH, L, hd]
    outs = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        qs = qt[:, :, :, s:e].reshape(B, KH, G * (e - s), hd)
        scores = jnp.einsum("bhqd,bhkd->bhqk", qs, kt[:, :, :e]).astype(jnp.float32) * scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        pos = jnp.tile(jnp.arange(s, e), G)
        causal = pos[:, None] >= jnp.arange(e)[None, :]
        if window is not None:
            causal &= pos[:, None] - jnp.arange(e)[None, :] < window
        scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, vt[:, :, :e]).reshape(B, KH, G, e - s, hd))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4)


class Linear(nnx.Module):
    """``y = x Wᵀ (+ b)`` with ``W [out, in]`` (the checkpoint layout)."""

    def __init__(self, weight, bias=None):
        self.weight = nnx.Param(jnp.asarray(weight))
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else None

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + lead(self.bias[...], y.ndim)


class RMSNorm(nnx.Module):
    """Llama's: normalised in float32, cast back, then scaled by ``weight``."""

    def __init__(self, weight, eps: float):
        self.weight = nnx.Param(jnp.asarray(weight))
        self.eps = eps

    def _normed(self, x):
        h = x.astype(jnp.float32)
        return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x):
        return lead(self.weight[...], x.ndim) * self._normed(x).astype(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's: scaled by ``1 + weight`` in float32, then cast back."""

    def __call__(self, x):
        w = lead(self.weight[...], x.ndim).astype(jnp.float32)
        return (self._normed(x) * (1.0 + w)).astype(x.dtype)


