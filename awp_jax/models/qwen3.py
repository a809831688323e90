"""Qwen3 (dense): the Llama block with an RMSNorm over each head's queries and keys (``q_norm``,
``k_norm``, weights ``[head_dim]``) before the rotary embedding, and no q/k/v biases. The norms are
not linear layers: they stay dense (they are small and act on the per-head scale AWP leaves alone)."""

from __future__ import annotations

import numpy as np

from awp_jax.models import llama
from awp_jax.models.layers import RMSNorm

__all__ = ["Qwen3", "Qwen3Block"]


class Qwen3Block(llama.Block):
    QK_NORMS = ("q_norm", "k_norm")

    def __init__(self, cfg, w, i):
        super().__init__(cfg, w, i)
        for name in self.QK_NORMS:
            setattr(self, name, RMSNorm(self._get(w, f"self_attn.{name}.weight"), cfg.rms_norm_eps))

    def qk(self, q, k):
        return self.q_norm(q), self.k_norm(k)

    def tensors(self):
        out = super().tensors()
        out.update({f"model.layers.{self.index}.self_attn.{n}.weight": np.asarray(getattr(self, n).weight[...]) for n in self.QK_NORMS})
        return out

    @classmethod
    def shapes(cls, cfg, i):
        out = super().shapes(cfg, i)
        out.update({f"model.layers.{i}.self_attn.{n}.weight": (cfg.head_dim,) for n in cls.QK_NORMS})
        return out


class Qwen3(llama.Llama):
    Block = Qwen3Block
