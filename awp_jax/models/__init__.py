"""Model families behind one interface, and the registry the pipeline looks them up in.

A family is a model class (an ``nnx.Module``) built from ``(config, weights)`` — weights a dict of
Hugging Face names → ``[out, in]`` arrays — that offers what the pipeline uses:

| member | what |
|---|---|
| ``model.layers`` | the blocks, in order |
| ``model.embed(tokens)``, ``model.context(seq_len)`` | a block's input, and what every block takes besides it (rotary tables) |
| ``block(x, *context)`` | the block's output; it sows the input of each linear layer (``nnx.Intermediate``, named by its statistic) |
| ``Block.LINEARS`` | each linear layer → the statistic its input gives (layers reading one input share it) |
| ``Block.ROUTED`` (optional) | statistics taken per expert over the tokens routed to it: the block also sows ``routing`` ``[B, L, E]`` (mixtures of experts, :mod:`awp_jax.models.moe`) |
| ``block.linear(name)``, ``model.linear_key(i, name)`` | the layer (``.weight [out, in]``) and its Hugging Face name |
| ``model.weights()``, ``Model.shapes(config)`` | every tensor under its Hugging Face name; the shapes a config needs |
| ``Block(config, block_weights(weights, i), i)``, ``block.tensors(i)`` | a block from its own tensors (named relative to ``model.layers.{i}.``) and back; a block does not keep ``i``, so blocks of one structure share one graph definition and the pipeline compiles its block functions once (:mod:`awp_jax.streaming` builds blocks one at a time this way) |
| ``model.cfg`` | ``family`` (the registry key), ``to_hf_dict()``, ``dtype``, ``storage_dtype`` |

Adding a family: a file here with its model class (usually a block that overrides what differs
from :class:`~awp_jax.models.llama.Block`: Qwen3's is the shared ``QKNormBlock``, Gemma's changes
the norms and ``__call__``, a mixture of experts replaces the ``ffn`` hook) and one line in
:data:`FAMILIES`; a parity test against transformers in ``tests/test_model.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from awp_jax.models.gemma import Gemma2, Gemma3, GemmaConfig
from awp_jax.models.layers import Linear, rotary
from awp_jax.models.llama import Llama, LlamaConfig
from awp_jax.models.moe import Mixtral, MoEConfig, Qwen3Moe
from awp_jax.models.phi3 import Phi3, Phi3Config
from awp_jax.models.qwen3 import Qwen3

__all__ = ["FAMILIES", "Llama", "LlamaConfig", "Qwen3", "Phi3", "Phi3Config", "Gemma2", "Gemma3", "GemmaConfig", "Mixtral", "Qwen3Moe", "MoEConfig", "Linear", "build", "config_from_hf", "weights_of",
           "random_weights", "forward", "rotary"]

# model_type → (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, Llama),
    "mistral": (LlamaConfig, Llama),
    "qwen2": (LlamaConfig, Llama),
    "qwen3": (LlamaConfig, Qwen3),
    "phi3": (Phi3Config, Phi3),
    "gemma2": (GemmaConfig, Gemma2),
    "gemma3_text": (GemmaConfig, Gemma3),
    "mixtral": (MoEConfig, Mixtral),
    "qwen3_moe": (MoEConfig, Qwen3Moe),
}


def _family(model_type: str) -> tuple[type, type]:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture {model_type!r}: awp_jax ports {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(hf: Any, dtype: str = "float32"):
    """The family config of a transformers config (refusing settings the port does not implement)."""
    return _family(getattr(hf, "model_type", "llama"))[0].from_hf(hf, dtype=dtype)


def model_class(cfg) -> type:
    return _family(cfg.family)[1]


def build(cfg, weights: Mapping[str, Any]):
    """The model of ``cfg``'s family with ``weights``."""
    return model_class(cfg)(cfg, weights)


def weights_of(model) -> dict[str, np.ndarray]:
    """The model's weights as a dict of Hugging Face names → numpy arrays."""
    return model.weights()


def random_weights(cfg, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random weights of the right shapes for ``cfg``'s family (norm weights near 1): for tests and examples."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shp in model_class(cfg).shapes(cfg).items():
        if k.endswith("norm.weight"):
            out[k] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
        else:
            out[k] = (scale * rng.standard_normal(shp)).astype(np.float32)
    return out


def forward(model):
    """A jitted ``tokens -> logits`` function for ``model`` (split once; state passed as an argument)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return lambda tokens: apply(state, tokens)
