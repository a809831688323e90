"""Mixtures of experts: Mixtral (``mixtral``) and Qwen3-MoE (``qwen3_moe``).

The attention half of the block is the Llama one (Qwen3-MoE adds q/k norms); the feed-forward half
is a router (``gate``: ``[num_experts, hidden]``, kept dense) choosing ``experts_per_token``
SwiGLU experts per token (softmax, top-k, weights renormalised over the chosen k for Mixtral and
for Qwen3-MoE with ``norm_topk_prob``), each with its own ``gate_proj`` / ``up_proj`` /
``down_proj`` (Mixtral's ``w1`` / ``w3`` / ``w2``). Numerics follow transformers'
``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM``; weights use the per-expert checkpoint names
(``model.layers.3.mlp.experts.7.gate_proj.weight``) that those checkpoints and transformers'
``save_pretrained`` use.

The forward computes every expert on every token and weights the outputs by the (mostly zero)
routing weights: exact, simple to shard, and ``E / k`` times the arithmetic of a routed dispatch —
fine for calibration, which also needs every expert's input.

Statistics. Each expert's linear layers are compressed against the tokens routed to it: the block
sows the router's input (``expert_in``, shared by every expert's gate/up), each expert's hidden
activation (``expert_down_in``, ``[E, B, L, F]``) and the routing mask (``routing``, ``[B, L, E]``);
:func:`awp_jax.calibration.block_statistics` turns them into ``expert_in.e`` / ``expert_down_in.e``
= ``Σ_routed x xᵀ / n_e`` per expert ``e`` (``ROUTED`` names the per-expert statistics). An expert
that fewer than ``min_expert_tokens`` calibration tokens reach gets its statistic over *all* tokens
instead (as if every token were routed to it) and is named in the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax.models import llama
from awp_jax.models.layers import Linear

__all__ = ["MoEConfig", "MoEBlock", "Mixtral", "MixtralBlock", "Qwen3Moe", "Qwen3MoeBlock"]

_ARCH = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(llama.LlamaConfig):
    """A Llama-family config with a mixture-of-experts feed-forward in every block."""

    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int | None = None  # each expert's hidden width (None: intermediate_size)
    norm_topk_prob: bool = True
    model_type: str | None = "mixtral"

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in _ARCH:
            raise ValueError(f"MoEConfig is for {', '.join(_ARCH)}, got model_type={self.model_type!r}")
        if self.num_experts < 1 or not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"{self.model_type}: need 1 <= experts_per_token ({self.experts_per_token}) <= "
                             f"num_experts ({self.num_experts})")

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @classmethod
    def from_hf(cls, hf: Any, dtype: str = "float32") -> "MoEConfig":
        mt = getattr(hf, "model_type", None)
        if mt == "qwen3_moe":
            if getattr(hf, "mlp_only_layers", None):
                raise ValueError(f"qwen3_moe: mlp_only_layers={hf.mlp_only_layers} (dense MLP layers among the MoE ones) "
                                 "is not implemented")
            if getattr(hf, "decoder_sparse_step", 1) != 1:
                raise ValueError(f"qwen3_moe: decoder_sparse_step={hf.decoder_sparse_step} is not implemented (only 1: "
                                 "every layer a mixture of experts)")
            experts, size, norm = hf.num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)
        elif mt == "mixtral":
            experts, size, norm = hf.num_local_experts, None, True
        else:
            raise ValueError(f"MoEConfig is for {', '.join(_ARCH)}, got model_type={mt!r}")
        base = llama.LlamaConfig.from_hf(hf, dtype=dtype)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return cls(**fields, num_experts=int(experts), experts_per_token=int(hf.num_experts_per_tok),
                   moe_intermediate_size=None if size is None else int(size), norm_topk_prob=norm)

    def to_hf_dict(self) -> dict:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(llama.LlamaConfig)}
        d = llama.LlamaConfig(**{**shared, "model_type": "llama"}).to_hf_dict()  # the fields every Llama-family config has
        d.update(architectures=[_ARCH[self.model_type]], model_type=self.model_type, num_experts_per_tok=self.experts_per_token)
        if self.model_type == "mixtral":
            d.update(num_local_experts=self.num_experts)
        else:
            d.update(num_experts=self.num_experts, moe_intermediate_size=self.expert_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=[])
        return d

    @property
    def family(self) -> str:
        return self.model_type


class Expert(nnx.Module):
    def __init__(self, gate, up, down):
        self.gate_proj, self.up_proj, self.down_proj = Linear(gate), Linear(up), Linear(down)


class MoEBlock(llama.Block):
    """A decoder block whose feed-forward is a routed mixture of SwiGLU experts."""

    ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
    MOE = "mlp"  # the Hugging Face module of the sparse feed-forward (Mixtral: block_sparse_moe)
    EXPERT = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}  # role → Hugging Face name
    ROUTED = ("expert_in", "expert_down_in")  # statistics taken per expert over the tokens routed to it

    def __init__(self, cfg: MoEConfig, w, i: int):
        self.cfg = cfg
        for name in self.NORMS:
            setattr(self, name, self.Norm(self._get(w, f"{name}.weight"), cfg.rms_norm_eps))
        for name in self.ATTENTION:
            key = f"self_attn.{name}"
            bias = self._get(w, key + ".bias") if name != "o_proj" and self._has(w, key + ".bias") else None
            setattr(self, name, Linear(self._get(w, key + ".weight"), bias))
        self.router = Linear(self._get(w, f"{self.MOE}.gate.weight"))
        hf = self.EXPERT
        self.experts = nnx.List([Expert(*(self._get(w, f"{self.MOE}.experts.{e}.{hf[r]}.weight") for r in ("gate_proj", "up_proj", "down_proj")))
                                 for e in range(cfg.num_experts)])

    @property
    def LINEARS(self) -> dict[str, str]:  # noqa: N802 (the attribute every block has)
        """Every linear layer → its statistic: attention as in the Llama block, each expert its own."""
        out = {n: llama.Block.LINEARS[n] for n in self.ATTENTION}
        for e in range(self.cfg.num_experts):
            for role, name in self.EXPERT.items():
                out[f"experts.{e}.{name}"] = f"{'expert_down_in' if role == 'down_proj' else 'expert_in'}.{e}"
        return out

    def linear(self, name: str) -> Linear:
        if name.startswith("experts."):
            _, e, hf_name = name.split(".")
            role = {v: k for k, v in self.EXPERT.items()}[hf_name]
            return getattr(self.experts[int(e)], role)
        return getattr(self, name)

    @classmethod
    def key(cls, i: int, name: str) -> str:
        if name.startswith("experts."):
            return f"model.layers.{i}.{cls.MOE}.{name}.weight"
        return super().key(i, name)

    def tensors(self, i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        out = {f"{p}{name}.weight": np.asarray(getattr(self, name).weight[...]) for name in self.NORMS}
        out[f"{p}{self.MOE}.gate.weight"] = np.asarray(self.router.weight[...])
        for name in self.LINEARS:
            lin = self.linear(name)
            out[self.key(i, name)] = np.asarray(lin.weight[...])
            if lin.bias is not None:
                out[f"{p}self_attn.{name}.bias"] = np.asarray(lin.bias[...])
        return out

    @classmethod
    def shapes(cls, cfg: MoEConfig, i: int) -> dict[str, tuple[int, ...]]:
        out = {k: v for k, v in super().shapes(cfg, i).items() if ".mlp." not in k}
        D, F, p = cfg.hidden_size, cfg.expert_size, f"model.layers.{i}.{cls.MOE}"
        out[f"{p}.gate.weight"] = (cfg.num_experts, D)
        for e in range(cfg.num_experts):
            for role, shp in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
                out[f"{p}.experts.{e}.{cls.EXPERT[role]}.weight"] = shp
        return out

    def route(self, m):
        """Routing weights ``[B, L, E]`` (zero for experts not chosen) and the 0/1 mask of the chosen."""
        cfg = self.cfg
        probs = jax.nn.softmax(self.router(m).astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(probs, cfg.experts_per_token)
        if cfg.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32)  # [B, L, k, E]
        return jnp.einsum("blk,blke->ble", top, onehot), jnp.sum(onehot, axis=-2)

    def ffn(self, m):  # m [B, L, D]
        weights, mask = self.route(m)
        self.sow(nnx.Intermediate, "expert_in", m)
        self.sow(nnx.Intermediate, "routing", mask)
        gate = jnp.stack([ex.gate_proj.weight[...] for ex in self.experts])  # [E, F, D]
        up = jnp.stack([ex.up_proj.weight[...] for ex in self.experts])
        down = jnp.stack([ex.down_proj.weight[...] for ex in self.experts])  # [E, D, F]
        act = jax.nn.silu(jnp.einsum("bld,efd->eblf", m, gate)) * jnp.einsum("bld,efd->eblf", m, up)
        self.sow(nnx.Intermediate, "expert_down_in", act)
        out = jnp.einsum("eblf,edf->ebld", act, down)
        return jnp.einsum("ebld,ble->bld", out, weights.astype(out.dtype))


class MixtralBlock(MoEBlock):
    MOE = "block_sparse_moe"
    EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class Qwen3MoeBlock(llama.QKNormBlock, MoEBlock):
    """Qwen3-MoE: the mixture-of-experts block with Qwen3's per-head q/k norms."""


class Mixtral(llama.Llama):
    Block = MixtralBlock


class Qwen3Moe(llama.Llama):
    Block = Qwen3MoeBlock
