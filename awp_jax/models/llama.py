"""The Llama family in ``flax.nnx``: Llama 1/2/3 (incl. Llama-3 rope scaling), Mistral, Qwen2/2.5
(q/k/v biases), SmolLM2 — and the base the other families extend.

Weights are kept in the Hugging Face layout ``[out, in]`` — the same matrix the solver compresses —
so no transpose ever happens between a checkpoint, the model and the solver. Every weight has its
Hugging Face name (``model.layers.3.self_attn.q_proj.weight``); the model is built from such a
dict and :meth:`Llama.weights` returns it.

Numerics follow transformers' ``LlamaForCausalLM``: RMSNorm and softmax in float32, rotary
embeddings in the "rotate half" layout, grouped-query attention, SwiGLU MLP, tied or untied LM
head. ``dtype`` (float32 or bfloat16) is the parameter and activation dtype.

What the pipeline uses (the architecture interface, :mod:`awp_jax.models`):
``model.layers`` (the blocks), ``model.embed(tokens)``, ``model.context(seq_len)`` (what every block
takes besides its input: here the rotary tables), ``block(x, *context)``, ``Block.LINEARS`` (each
linear layer → the name of the statistic its input gives), ``block.linear(name)``,
``model.linear_key(i, name)`` (its Hugging Face name). A block sows the input of every linear layer
(``nnx.sow(nnx.Intermediate, statistic, x)``); :func:`awp_jax.calibration.block_statistics` captures
them with ``nnx.capture``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax import dtypes
from awp_jax.models.layers import Linear, RMSNorm, causal_attention, rotary, rotate_half

__all__ = ["DecoderConfig", "LlamaConfig", "Llama", "Block", "QKNormBlock", "HF_ARCHITECTURES", "block_weights"]

# Hugging Face architecture of each model type this file ports
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """What every family's config has: sizes, norm epsilon, tying, and the two dtypes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # activations in the forward pass (and parameters, unless param_dtype says otherwise)
    storage_dtype: str = "float32"  # the checkpoint's own dtype: weights hold its values, outputs are written in it
    # the dtype parameters are held in (None: ``dtype``). Streaming holds them in the checkpoint's own
    # (half the memory of float32 for bf16); each product promotes them to ``dtype``, exactly
    param_dtype: str | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        dtypes.check(self.storage_dtype)
        if self.param_dtype is not None:
            dtypes.check(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.float32 if self.dtype == "float32" else jnp.bfloat16

    @property
    def param_jnp_dtype(self):
        return self.jnp_dtype if self.param_dtype is None else dtypes.np_dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(DecoderConfig):
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    model_type: str | None = None  # the Hugging Face model_type; None: "qwen2" with attention biases, else "llama" (see ``family``)

    @classmethod
    def from_hf(cls, hf: Any, dtype: str = "float32") -> "LlamaConfig":
        """From a transformers config of a Llama-family model (llama, mistral, qwen2, qwen3: the
        families :mod:`awp_jax.models` registers with this config). A setting the port does not
        implement is refused, naming the field."""
        mt = getattr(hf, "model_type", "llama")
        if getattr(hf, "use_sliding_window", False):
            raise ValueError(f"{mt}: use_sliding_window=True (sliding-window attention) is not implemented")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{mt}: hidden_act={act!r} is not implemented (the Llama family uses silu)")
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
            model_type=mt,
            dtype=dtype,
        )

    def to_hf_dict(self) -> dict:
        """config.json fields for transformers (Mistral is written as Llama: its sliding window is not ported)."""
        mt = "llama" if self.family == "mistral" else self.family
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        return {
            "architectures": [HF_ARCHITECTURES[mt]],
            "model_type": mt,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "dtype": self.storage_dtype,
        }

    @property
    def family(self) -> str:
        """The model type the registry (:data:`awp_jax.models.FAMILIES`) builds this config with."""
        return self.model_type or ("qwen2" if self.attention_bias else "llama")




class Block(nnx.Module):
    """A pre-norm decoder block: attention (GQA, rotary) and a SwiGLU MLP, each with a residual."""

    # every linear layer → the statistic its input gives (layers sharing an input share it)
    LINEARS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
    PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    NORMS = ("input_layernorm", "post_attention_layernorm")
    Norm = RMSNorm

    def __init__(self, cfg: LlamaConfig, w: Mapping[str, Any], i: int):
        """``w``: block ``i``'s tensors, named relative to ``model.layers.{i}.`` (:func:`block_weights`).
        The block does not keep ``i``: blocks of one structure share one graph definition, so the
        pipeline's jitted block functions compile once, not once per block."""
        self.cfg = cfg
        for name in self.NORMS:
            setattr(self, name, self.Norm(self._get(w, f"{name}.weight"), cfg.rms_norm_eps))
        for name in self.LINEARS:
            key = f"{self.PREFIX[name]}.{name}"
            bias = self._get(w, key + ".bias") if name in ("q_proj", "k_proj", "v_proj") and self._has(w, key + ".bias") else None
            setattr(self, name, Linear(self._get(w, key + ".weight"), bias))

    def _has(self, w, key):
        return key in w

    def _get(self, w, key):
        return jnp.asarray(w[key], self.cfg.param_jnp_dtype)

    @classmethod
    def key(cls, i: int, name: str) -> str:
        """Hugging Face name of block ``i``'s linear layer ``name``."""
        return f"model.layers.{i}.{cls.PREFIX[name]}.{name}.weight"

    def linear(self, name: str) -> Linear:
        return getattr(self, name)

    def tensors(self, i: int) -> dict[str, np.ndarray]:
        """This block's weights under their Hugging Face names, as block ``i``."""
        p = f"model.layers.{i}."
        out = {f"{p}{name}.weight": np.asarray(getattr(self, name).weight[...]) for name in self.NORMS}
        for name in self.LINEARS:
            lin = self.linear(name)
            out[self.key(i, name)] = np.asarray(lin.weight[...])
            if lin.bias is not None:
                out[f"{p}{self.PREFIX[name]}.{name}.bias"] = np.asarray(lin.bias[...])
        return out

    @classmethod
    def shapes(cls, cfg: LlamaConfig, i: int) -> dict[str, tuple[int, ...]]:
        """The tensors block ``i`` needs, with their shapes."""
        D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
        lin = {"q_proj": (qd, D), "k_proj": (kvd, D), "v_proj": (kvd, D), "o_proj": (D, qd),
               "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
        out = {f"model.layers.{i}.{name}.weight": (D,) for name in cls.NORMS}
        out.update({cls.key(i, name): shp for name, shp in lin.items()})
        if cfg.attention_bias:
            out.update({f"model.layers.{i}.self_attn.{name}.bias": (lin[name][0],) for name in ("q_proj", "k_proj", "v_proj")})
        return out

    def qk(self, q, k):
        """Per-head transform of queries and keys before the rotary embedding (none here)."""
        return q, k

    def qkv(self, h):
        """Queries, keys and values ``[B, L, heads·head_dim]`` of the normed input."""
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def mlp(self, m):
        """The gated MLP's hidden activation (``down_proj``'s input) of the normed input."""
        return jax.nn.silu(self.gate_proj(m)) * self.up_proj(m)

    def attention(self, h, cos, sin, **kw):
        """Grouped-query attention of the normed input ``h [B, L, D]`` (the ``qkv`` and ``qk``
        hooks, rotary embedding); ``kw`` goes to :func:`causal_attention`. Returns ``o_proj``'s input."""
        cfg = self.cfg
        B, L, _ = h.shape
        q, k, v = self.qkv(h)
        q = q.reshape(B, L, cfg.num_heads, cfg.head_dim)
        k = k.reshape(B, L, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(B, L, cfg.num_kv_heads, cfg.head_dim)
        q, k = self.qk(q, k)
        c, s = cos[None, :, None, :].astype(h.dtype), sin[None, :, None, :].astype(h.dtype)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        q = q.reshape(B, L, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        return causal_attention(q, k, v, **kw).reshape(B, L, cfg.num_heads * cfg.head_dim)

    def __call__(self, x, cos, sin):  # x [B, L, D]
        h = self.input_layernorm(x)
        self.sow(nnx.Intermediate, "attn_in", h)
        attn = self.attention(h, cos, sin, window=getattr(self.cfg, "sliding_window", None))
        self.sow(nnx.Intermediate, "o_in", attn)
        x = x + self.o_proj(attn)
        return x + self.ffn(self.post_attention_layernorm(x))

    def ffn(self, m):
        """The feed-forward part of the normed input ``m``, sowing its linear layers' inputs
        (a mixture of experts replaces this)."""
        self.sow(nnx.Intermediate, "mlp_in", m)
        act = self.mlp(m)
        self.sow(nnx.Intermediate, "down_in", act)
        return self.down_proj(act)


class QKNormBlock(Block):
    """A block with an RMSNorm (the block's ``Norm``) over each head's queries and keys before the
    rotary embedding: ``q_norm``, ``k_norm``, weights ``[head_dim]`` (Qwen3, Gemma 3). The norms are
    not linear layers: they stay dense."""

    QK_NORMS = ("q_norm", "k_norm")

    def __init__(self, cfg, w, i):
        super().__init__(cfg, w, i)
        for name in self.QK_NORMS:
            setattr(self, name, self.Norm(self._get(w, f"self_attn.{name}.weight"), cfg.rms_norm_eps))

    def qk(self, q, k):
        return self.q_norm(q), self.k_norm(k)

    def tensors(self, i):
        out = super().tensors(i)
        out.update({f"model.layers.{i}.self_attn.{n}.weight": np.asarray(getattr(self, n).weight[...]) for n in self.QK_NORMS})
        return out

    @classmethod
    def shapes(cls, cfg, i):
        out = super().shapes(cfg, i)
        out.update({f"model.layers.{i}.self_attn.{n}.weight": (cfg.head_dim,) for n in cls.QK_NORMS})
        return out


class Llama(nnx.Module):
    """Decoder-only LM. ``model(tokens [B, L]) -> logits [B, L, V]`` (float32)."""

    Block = Block

    def __init__(self, cfg: LlamaConfig, weights: Mapping[str, Any]):
        missing = [k for k in self.shapes(cfg) if k not in weights]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors for this config, e.g. {missing[:3]}")
        _check_shapes(self.shapes(cfg), weights)
        dt = cfg.param_jnp_dtype
        self.cfg = cfg
        self.embed_tokens = nnx.Param(jnp.asarray(weights["model.embed_tokens.weight"], dt))
        self.layers = nnx.List([self.Block(cfg, block_weights(weights, i), i) for i in range(cfg.num_layers)])
        self.norm = self.Block.Norm(jnp.asarray(weights["model.norm.weight"], dt), cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(jnp.asarray(weights["lm_head.weight"], dt))

    @classmethod
    def shapes(cls, cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs (Hugging Face names) with its shape."""
        D = cfg.hidden_size
        out = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = (cfg.vocab_size, D)
        for i in range(cfg.num_layers):
            out.update(cls.Block.shapes(cfg, i))
        return out

    def linear_key(self, i: int, name: str) -> str:
        return self.Block.key(i, name)

    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights as a dict of Hugging Face names → numpy arrays."""
        out = {"model.embed_tokens.weight": np.asarray(self.embed_tokens[...]), "model.norm.weight": np.asarray(self.norm.weight[...])}
        if self.lm_head is not None:
            out["lm_head.weight"] = np.asarray(self.lm_head[...])
        for i, blk in enumerate(self.layers):
            out.update(blk.tensors(i))
        return out

    def embed(self, tokens):
        return self.embed_tokens[...][tokens].astype(self.cfg.jnp_dtype)

    def context(self, seq_len: int) -> tuple:
        """What every block takes besides its input, for sequences of ``seq_len``: cos, sin tables."""
        return rotary(self.cfg, seq_len)

    def head(self, x):
        w = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...d,vd->...v", self.norm(x), w).astype(jnp.float32)

    def __call__(self, tokens):
        return self.head(self.hidden(tokens))

    def hidden(self, tokens):
        """The last block's output ``[B, L, D]`` (before the final norm and the head)."""
        return nnx.capture(type(self)._hidden, nnx.Intermediate)(self, tokens)[0]  # sown inputs: not kept

    def _hidden(self, tokens):
        ctx = self.context(tokens.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, *ctx)
        return x


class block_weights(Mapping):  # named like the function it stands for
    """Block ``i``'s tensors of ``weights`` (Hugging Face names), named relative to ``model.layers.{i}.``."""

    def __init__(self, weights: Mapping[str, Any], i: int):
        self._w, self._p = weights, f"model.layers.{i}."

    def __getitem__(self, key):
        return self._w[self._p + key]

    def __contains__(self, key):
        return self._p + key in self._w

    def __iter__(self):
        return (k[len(self._p):] for k in self._w if k.startswith(self._p))

    def __len__(self):
        return sum(1 for _ in self)


def _check_shapes(shapes, weights):
    for k, shp in shapes.items():
        got = tuple(np.shape(weights[k]))
        if got != shp:
            raise ValueError(f"tensor {k} has shape {got}, but the config needs {shp}")
        dt = getattr(weights[k], "dtype", None)
        if dt is not None and not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"tensor {k} has dtype {dt}; expected floating-point weights")
