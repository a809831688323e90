"""Qwen3 (dense): the Llama block with an RMSNorm over each head's queries and keys (``q_norm``,
``k_norm``) before the rotary embedding, and no q/k/v biases."""

from __future__ import annotations

from awp_jax.models import llama

__all__ = ["Qwen3", "Qwen3Block"]


class Qwen3Block(llama.QKNormBlock):
    pass


class Qwen3(llama.Llama):
    Block = Qwen3Block
