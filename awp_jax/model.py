"""A Llama-family decoder in ``flax.nnx`` (Llama 2/3, SmolLM2, Qwen2-style q/k/v biases).

Weights are kept in the Hugging Face layout ``[out, in]`` — the same matrix the solver compresses —
so no transpose ever happens between a checkpoint, the model and the solver. Every weight has its
Hugging Face name (``model.layers.3.self_attn.q_proj.weight``); :meth:`Llama.from_weights` builds a
model from such a dict and :func:`weights_of` returns it.

Numerics follow transformers' ``LlamaForCausalLM``: RMSNorm and softmax in float32, rotary
embeddings in the "rotate half" layout (plain, or Llama-3 scaled), grouped-query attention,
SwiGLU MLP, tied or untied LM head. ``dtype`` (float32 or bfloat16) is the parameter and
activation dtype.

A block can return the inputs of its linear layers (``capture=True``) — what calibration needs:
``attn_in`` feeds q/k/v, ``o_in`` feeds o_proj, ``mlp_in`` feeds gate/up, ``down_in`` feeds down_proj.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax import dtypes

__all__ = ["LlamaConfig", "Llama", "Linear", "weights_of", "LINEAR_NAMES", "INPUT_OF", "forward", "random_weights"]

# The seven linear layers of a block, and which captured input each one reads.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
_PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def linear_key(layer: int, name: str) -> str:
    """Hugging Face name of a block's linear weight."""
    return f"model.layers.{layer}.{_PREFIX[name]}.{name}.weight"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # parameters and activations in the forward pass
    storage_dtype: str = "float32"  # the checkpoint's own dtype: weights hold its values, outputs are written in it

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        dtypes.check(self.storage_dtype)

    @classmethod
    def from_hf(cls, hf: Any, dtype: str = "float32") -> "LlamaConfig":
        """From a transformers ``LlamaConfig``/``Qwen2Config`` (or any config with the same fields)."""
        mt = getattr(hf, "model_type", "llama")
        if mt not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported architecture {mt!r}: awp_jax ports Llama-family decoders (llama, qwen2, mistral)")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rtype = rope.get("rope_type", "default")
        scaling = None
        if rtype == "llama3":
            scaling = tuple((k, float(rope[k])) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        elif rtype not in ("default", None):
            raise ValueError(f"unsupported rope_type {rtype!r} (supported: default, llama3)")
        heads = hf.num_attention_heads
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", mt == "qwen2")),
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            dtype=dtype,
        )

    def to_hf_dict(self) -> dict:
        """config.json fields for transformers (architecture LlamaForCausalLM or Qwen2ForCausalLM)."""
        qwen = self.attention_bias
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        return {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "dtype": self.storage_dtype,
        }

    @property
    def jnp_dtype(self):
        return jnp.float32 if self.dtype == "float32" else jnp.bfloat16


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
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


def rotary(cfg: LlamaConfig, seq_len: int):
    """cos, sin tables [L, head_dim] (float32)."""
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _lead(v, ndim):
    """A vector shaped to broadcast against the last axis of an ``ndim``-dimensional array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


ATTENTION_CHUNK = 256


def causal_attention(q, k, v, chunk: int = ATTENTION_CHUNK):
    """Grouped-query causal attention. ``q [B, L, KH, G, hd]``, ``k, v [B, L, KH, hd]`` →
    ``[B, L, KH, G, hd]``. Scores and softmax in float32.

    The G query heads that share a key/value head are folded into the query axis, so each
    product is one large batched matmul per kv head. Queries are processed in chunks of ``chunk``
    positions, each against only the keys at or before its last position: the same result as one
    masked ``L × L`` product with about half the FLOPs and a small score buffer (measured 3× faster
    than the unchunked form at L = 2048 on CPU).
    """
    B, L, KH, G, hd = q.shape
    qt = q.transpose(0, 2, 3, 1, 4)  # [B, KH, G, L, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KH, L, hd]
    outs = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        qs = qt[:, :, :, s:e].reshape(B, KH, G * (e - s), hd)
        scores = jnp.einsum("bhqd,bhkd->bhqk", qs, kt[:, :, :e]).astype(jnp.float32) / math.sqrt(hd)
        pos = jnp.tile(jnp.arange(s, e), G)
        causal = pos[:, None] >= jnp.arange(e)[None, :]
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
        return y if self.bias is None else y + _lead(self.bias[...], y.ndim)


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float):
        self.weight = nnx.Param(jnp.asarray(weight))
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return _lead(self.weight[...], x.ndim) * h.astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, w: Mapping[str, Any], i: int):
        p = f"model.layers.{i}."
        dt = cfg.jnp_dtype
        get = lambda k: jnp.asarray(w[p + k], dt)  # noqa: E731
        opt = lambda k: get(k) if (p + k) in w else None  # noqa: E731
        self.cfg = cfg
        self.input_layernorm = RMSNorm(get("input_layernorm.weight"), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(get("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        for name in LINEAR_NAMES:
            bias = opt(f"{_PREFIX[name]}.{name}.bias") if name in ("q_proj", "k_proj", "v_proj") else None
            setattr(self, name, Linear(get(f"{_PREFIX[name]}.{name}.weight"), bias))

    def __call__(self, x, cos, sin, capture: bool = False):  # x [B, L, D]
        cfg = self.cfg
        B, L, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(B, L, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(h).reshape(B, L, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h).reshape(B, L, cfg.num_kv_heads, cfg.head_dim)
        c, s = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        group = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(B, L, cfg.num_kv_heads, group, cfg.head_dim)
        attn = causal_attention(q, k, v).reshape(B, L, cfg.num_heads * cfg.head_dim)
        x = x + self.o_proj(attn)
        m = self.post_attention_layernorm(x)
        act = jax.nn.silu(self.gate_proj(m)) * self.up_proj(m)
        x = x + self.down_proj(act)
        if capture:
            return x, {"attn_in": h, "o_in": attn, "mlp_in": m, "down_in": act}
        return x


class Llama(nnx.Module):
    """Decoder-only LM. ``model(tokens [B, L]) -> logits [B, L, V]`` (float32)."""

    def __init__(self, cfg: LlamaConfig, weights: Mapping[str, Any]):
        missing = _missing_keys(cfg, weights)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors for this config, e.g. {missing[:3]}")
        _check_shapes(cfg, weights)
        dt = cfg.jnp_dtype
        self.cfg = cfg
        self.embed_tokens = nnx.Param(jnp.asarray(weights["model.embed_tokens.weight"], dt))
        self.layers = nnx.List([Block(cfg, weights, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(jnp.asarray(weights["model.norm.weight"], dt), cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(jnp.asarray(weights["lm_head.weight"], dt))

    @classmethod
    def from_weights(cls, cfg: LlamaConfig, weights: Mapping[str, Any]) -> "Llama":
        return cls(cfg, weights)

    def embed(self, tokens):
        return self.embed_tokens[...][tokens]

    def head(self, x):
        w = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...d,vd->...v", self.norm(x), w).astype(jnp.float32)

    def __call__(self, tokens):
        cos, sin = rotary(self.cfg, tokens.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(x)


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    lin = {"q_proj": (qd, D), "k_proj": (kvd, D), "v_proj": (kvd, D), "o_proj": (D, qd),
           "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    for i in range(cfg.num_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (D,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (D,)
        for name, shp in lin.items():
            shapes[linear_key(i, name)] = shp
        if cfg.attention_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                shapes[f"model.layers.{i}.self_attn.{name}.bias"] = (lin[name][0],)
    return shapes


def _missing_keys(cfg, weights):
    return [k for k in _expected_shapes(cfg) if k not in weights]


def _check_shapes(cfg, weights):
    for k, shp in _expected_shapes(cfg).items():
        got = tuple(np.shape(weights[k]))
        if got != shp:
            raise ValueError(f"tensor {k} has shape {got}, but the config needs {shp}")
        dt = getattr(weights[k], "dtype", None)
        if dt is not None and not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"tensor {k} has dtype {dt}; expected floating-point weights")


def weights_of(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights as a dict of Hugging Face names → numpy arrays."""
    out = {"model.embed_tokens.weight": np.asarray(model.embed_tokens[...]), "model.norm.weight": np.asarray(model.norm.weight[...])}
    if model.lm_head is not None:
        out["lm_head.weight"] = np.asarray(model.lm_head[...])
    for i, blk in enumerate(model.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = np.asarray(blk.input_layernorm.weight[...])
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = np.asarray(blk.post_attention_layernorm.weight[...])
        for name in LINEAR_NAMES:
            lin = getattr(blk, name)
            out[linear_key(i, name)] = np.asarray(lin.weight[...])
            if lin.bias is not None:
                out[f"model.layers.{i}.self_attn.{name}.bias"] = np.asarray(lin.bias[...])
    return out


def random_weights(cfg: LlamaConfig, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random weights of the right shapes (norm weights near 1): for tests and examples."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shp in _expected_shapes(cfg).items():
        if k.endswith("norm.weight"):
            out[k] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
        else:
            out[k] = (scale * rng.standard_normal(shp)).astype(np.float32)
    return out


def forward(model: Llama):
    """A jitted ``tokens -> logits`` function for ``model`` (split once; state passed as an argument)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return lambda tokens: apply(state, tokens)
