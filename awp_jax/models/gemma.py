"""Gemma 2 (``gemma2``) and Gemma 3 text models (``gemma3_text``: Gemma-3-270M/1B, the text tower
of the larger ones).

What differs from the Llama block (numerics follow transformers' ``Gemma3ForCausalLM``):
RMSNorm scaled by ``1 + weight`` in float32; four norms per block (``input``, ``post_attention``
applied to the attention output before the residual, ``pre_feedforward``, ``post_feedforward``);
per-head q/k RMSNorm before the rotary embedding; GeGLU MLP (``gelu`` with the tanh
approximation); scores scaled by ``query_pre_attn_scalar ** -0.5``; layers alternate between
sliding-window attention (rotary base ``rope_local_base_freq``) and global attention (rotary base
``rope_theta``) as ``layer_types`` says; token embeddings multiplied by ``sqrt(hidden_size)``;
optional final-logit soft-capping; tied embeddings. Gemma 2 has no q/k norms, one rotary base for
all layers, and soft-caps the attention logits too (``attn_logit_softcapping``, 50 by default;
final logits at 30). Rope scaling (``linear`` etc.), bidirectional attention and a Gemma 3
``attn_logit_softcapping`` (which transformers' Gemma 3 does not apply either) are refused, naming
the field.

The linear layers and their statistics are the Llama block's (``Block.LINEARS``): q/k/v read the
input norm's output, gate/up the pre-feedforward norm's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax.models import llama
from awp_jax.models.layers import OffsetRMSNorm

__all__ = ["GemmaConfig", "Gemma2", "Gemma2Block", "Gemma3", "Gemma3Block"]

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(llama.DecoderConfig):
    """Gemma 2 and Gemma 3 text configs (``model_type`` says which; the defaults are Gemma 3's)."""

    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global (full-attention) layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    sliding_window: int = 4096
    query_pre_attn_scalar: int | float = 256
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    model_type: str = "gemma3_text"

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in ("gemma2", "gemma3_text"):
            raise ValueError(f"GemmaConfig is for gemma2 and gemma3_text, got model_type={self.model_type!r}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must name one of {LAYER_TYPES} for each of the {self.num_layers} layers, "
                             f"got {self.layer_types}")
        if self.attention_bias:
            raise ValueError("gemma3_text: attention_bias=True is not implemented")
        if self.sliding_window < 1:
            raise ValueError(f"{self.family}: sliding_window must be >= 1, got {self.sliding_window}")
        if self.attn_logit_softcapping is not None and self.family == "gemma3_text":
            raise ValueError(f"gemma3_text: attn_logit_softcapping={self.attn_logit_softcapping} is not implemented "
                             "(transformers' Gemma 3 does not apply it either)")

    @property
    def family(self) -> str:
        return self.model_type

    @classmethod
    def from_hf(cls, hf: Any, dtype: str = "float32") -> "GemmaConfig":
        mt = getattr(hf, "model_type", None)
        if getattr(hf, "use_bidirectional_attention", False):
            raise ValueError(f"{mt}: use_bidirectional_attention=True is not implemented")
        act = getattr(hf, "hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"{mt}: hidden_activation={act!r} is not implemented (gelu_pytorch_tanh is)")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if "rope_type" in rope:  # Gemma 2: one set of parameters for every layer
            rope = {kind: rope for kind in LAYER_TYPES}
        for kind in LAYER_TYPES:
            rtype = (rope.get(kind) or {}).get("rope_type", "default")
            if rtype != "default":
                raise ValueError(f"{mt}: rope_parameters[{kind!r}] rope_type={rtype!r} is not implemented (default is)")
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
            head_dim=hf.head_dim, layer_types=tuple(hf.layer_types), rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope["full_attention"]["rope_theta"]),
            rope_local_base_freq=float(rope["sliding_attention"]["rope_theta"]),
            sliding_window=int(hf.sliding_window), query_pre_attn_scalar=hf.query_pre_attn_scalar,
            attn_logit_softcapping=hf.attn_logit_softcapping, final_logit_softcapping=hf.final_logit_softcapping,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            max_position_embeddings=int(hf.max_position_embeddings), attention_bias=bool(hf.attention_bias),
            model_type=mt, dtype=dtype,
        )

    def to_hf_dict(self) -> dict:
        gemma2 = self.family == "gemma2"
        rope = {"full_attention": {"rope_type": "default", "rope_theta": self.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        return {
            "architectures": ["Gemma2ForCausalLM" if gemma2 else "Gemma3ForCausalLM"], "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps, "sliding_window": self.sliding_window,
            "rope_parameters": rope["full_attention"] if gemma2 else rope,
            "query_pre_attn_scalar": self.query_pre_attn_scalar, "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "attention_bias": False,
            "hidden_activation": "gelu_pytorch_tanh", "dtype": self.storage_dtype,
        }


def _tables(head_dim: int, theta: float, seq_len: int):
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv, jnp.float32)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Gemma2Block(llama.Block):
    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    Norm = OffsetRMSNorm

    def __init__(self, cfg: GemmaConfig, w, i):
        super().__init__(cfg, w, i)
        self.sliding = cfg.layer_types[i] == "sliding_attention"  # static: sliding and global blocks compile apart

    def __call__(self, x, cos_global, sin_global, cos_local, sin_local):  # x [B, L, D]
        cfg = self.cfg
        cos, sin = (cos_local, sin_local) if self.sliding else (cos_global, sin_global)
        h = self.input_layernorm(x)
        self.sow(nnx.Intermediate, "attn_in", h)
        attn = self.attention(h, cos, sin, scale=cfg.query_pre_attn_scalar ** -0.5,
                              window=cfg.sliding_window if self.sliding else None, softcap=cfg.attn_logit_softcapping)
        self.sow(nnx.Intermediate, "o_in", attn)
        x = x + self.post_attention_layernorm(self.o_proj(attn))
        m = self.pre_feedforward_layernorm(x)
        self.sow(nnx.Intermediate, "mlp_in", m)
        act = self.mlp(m)
        self.sow(nnx.Intermediate, "down_in", act)
        return x + self.post_feedforward_layernorm(self.down_proj(act))

    def mlp(self, m):
        return jax.nn.gelu(self.gate_proj(m), approximate=True) * self.up_proj(m)


class Gemma3Block(llama.QKNormBlock, Gemma2Block):
    """Gemma 2's block with per-head q/k norms (offset RMSNorm, like every Gemma norm)."""


class Gemma2(llama.Llama):
    Block = Gemma2Block

    def embed(self, tokens):
        e = self.embed_tokens[...][tokens].astype(self.cfg.jnp_dtype)
        return e * jnp.asarray(math.sqrt(self.cfg.hidden_size), e.dtype)

    def context(self, seq_len: int) -> tuple:
        """Rotary tables of the global layers, then of the sliding-window layers."""
        cfg = self.cfg
        return (*_tables(cfg.head_dim, cfg.rope_theta, seq_len), *_tables(cfg.head_dim, cfg.rope_local_base_freq, seq_len))

    def head(self, x):
        logits = super().head(x)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)


class Gemma3(Gemma2):
    Block = Gemma3Block

