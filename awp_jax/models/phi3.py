"""Phi-3 (``phi3``: Phi-3-mini/medium, Phi-3.5-mini): the Llama block with fused projections —
``qkv_proj`` (queries, keys and values stacked along the output dimension) and ``gate_up_proj``
(gate, then up) — and sliding-window attention when the config sets ``sliding_window``.

The fused matrices are compressed as they are stored. Their rows are output channels, each
belonging to one of the parts, and all parts read the same input, so the layer objective of the
fused matrix is the sum of the parts' objectives with the same ``C``: for every constraint that
acts row by row (row top-k, N:M along the input, per-row quantization groups) solving the fused
matrix is solving each part, and the output keeps the layout transformers and vLLM load. Only
AWP's layer-wise scope (the ``best`` recipe's SparseGPT start for unstructured pruning) pools the
count over the parts. ``partial_rotary_factor`` other than 1 (Phi-4-mini) and rope types other
than default (``longrope`` of the 128k variants) are refused, naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from awp_jax.models import llama

__all__ = ["Phi3Config", "Phi3", "Phi3Block"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phi3Config(llama.LlamaConfig):
    sliding_window: int | None = None
    model_type: str | None = "phi3"

    @classmethod
    def from_hf(cls, hf: Any, dtype: str = "float32") -> "Phi3Config":
        factor = (getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"phi3: partial_rotary_factor={factor} is not implemented (1.0 is)")
        if getattr(hf, "attention_bias", False):
            raise ValueError("phi3: attention_bias=True is not implemented")
        window = getattr(hf, "sliding_window", None)
        return dataclasses.replace(super().from_hf(hf, dtype=dtype), sliding_window=None if window is None else int(window))

    def to_hf_dict(self) -> dict:
        return {**super().to_hf_dict(), "sliding_window": self.sliding_window}


class Phi3Block(llama.Block):
    LINEARS = {"qkv_proj": "attn_in", "o_proj": "o_in", "gate_up_proj": "mlp_in", "down_proj": "down_in"}
    PREFIX = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}

    def qkv(self, h):
        cfg = self.cfg
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        y = self.qkv_proj(h)
        return y[..., :qd], y[..., qd:qd + kvd], y[..., qd + kvd:]

    def mlp(self, m):
        gate, up = jnp.split(self.gate_up_proj(m), 2, axis=-1)
        return jax.nn.silu(gate) * up

    @classmethod
    def shapes(cls, cfg, i):
        D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
        out = {f"model.layers.{i}.{name}.weight": (D,) for name in cls.NORMS}
        out.update({cls.key(i, "qkv_proj"): (qd + 2 * kvd, D), cls.key(i, "o_proj"): (D, qd),
                    cls.key(i, "gate_up_proj"): (2 * F, D), cls.key(i, "down_proj"): (D, F)})
        return out


class Phi3(llama.Llama):
    Block = Phi3Block
