"""One registry of layer compression methods behind one signature.

``method(W [d_out, d_in], C [d_in, d_in], spec) -> LayerResult`` — the pipeline, the CLI and the
benchmarks call every method the same way and never special-case one. What a method can do is
declared (``kinds``: "prune", "nm", "quant", "joint"); asking for anything else is an error that
names the method and what it supports.

| name | kinds | what |
|---|---|---|
| ``awp`` | prune, nm, quant, joint | projected gradient descent (:mod:`awp_jax.solver`), paper defaults |
| ``magnitude`` | prune, nm | keep the largest ``|W|`` per row / per group of m |
| ``wanda`` | prune, nm | keep the largest ``|W| · sqrt(C_jj)`` per row / per group of m |
| ``sparsegpt`` | prune, nm | OBS sweep, blocksize 128, damping 0.01 (:mod:`awp_jax.obs`) |
| ``rtn`` | quant | round to nearest on the group grid |
| ``gptq`` | quant | OBS sweep on the group grid, blocksize 128, damping 0.01, optional act-order |
| ``awq`` | quant | per-channel scale search (grid 20) + clip search, at layer level (:mod:`awp_jax.awq`) |
| ``wanda_awq`` | joint | Wanda mask, then AWQ on the pruned weights (the zeros stay on the grid) |
| ``awq_wanda`` | joint | AWQ, then the Wanda mask of the quantized weights |
| ``hwpq`` | prune, nm | contribution ``W_ij²·C_jj``; EWMA threshold instead of sorting (:mod:`awp_jax.hwpq`) |
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from awp_jax import awq as awq_lib
from awp_jax import hwpq as hwpq_lib
from awp_jax import obs
from awp_jax import schedules
from awp_jax import solver as solver_lib
from awp_jax.projections import keep_count, nm_mask, row_topk_mask
from awp_jax.quantizers import QuantSpec, rtn
from awp_jax.saliency import wanda_score

__all__ = ["CompressionSpec", "LayerResult", "METHODS", "get_method", "compress_layer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionSpec:
    """What to do to every layer. Pruning: ``sparsity`` (per row) or ``nm``; quantization:
    ``bits`` (+ ``group_size``, ``symmetric``); both for joint. ``partial_groups`` defaults to
    True here so group 128 applies to 576-wide layers (GPTQ's convention: a shorter last group).
    AWP options left ``None`` take the paper's defaults for the kind of compression."""

    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    bits: int | None = None
    group_size: int | None = 128
    symmetric: bool = False
    partial_groups: bool = True
    max_iter: int | None = None
    tol: float | None = None
    step_rule: str | None = None
    step_scale: float | None = None
    momentum: bool = False
    matmul_dtype: str = "float32"
    init: str | None = None
    scope: str | None = None
    refit_iters: int | None = None
    refit_damping: float | None = None
    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.nm is not None:
            n, m = self.nm
            if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n <= m:
                raise ValueError(f"N:M needs integers 1 <= N <= M, got {self.nm!r}")
            if self.sparsity:
                raise ValueError("give either a sparsity or an N:M pattern, not both")
        if self.bits is not None:
            self.quant  # validates bits and group size
        if self.kind is None:
            raise ValueError("nothing to do: give a sparsity, an N:M pattern, or bits")

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0 or self.nm is not None

    @property
    def kind(self) -> str | None:
        if self.prunes and self.bits is not None:
            return "joint"
        if self.nm is not None:
            return "nm"
        if self.sparsity > 0:
            return "prune"
        return "quant" if self.bits is not None else None

    @property
    def quant(self) -> QuantSpec | None:
        if self.bits is None:
            return None
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, partial_groups=self.partial_groups)

    def describe(self) -> str:
        parts = []
        if self.nm:
            parts.append(f"{self.nm[0]}:{self.nm[1]}")
        elif self.sparsity:
            parts.append(f"{self.sparsity:.0%} sparse")
        if self.bits:
            parts.append(f"int{self.bits} g{self.group_size or 'row'}{' sym' if self.symmetric else ''}")
        return " + ".join(parts)


class LayerResult(NamedTuple):
    theta: jax.Array
    info: dict[str, Any]  # method-specific scalars (iterations, stop reason, damping, ...)
    # what the lossless encoding (awp_jax.packed) needs beyond theta: AWQ's inverse per-channel
    # scales "col_scale_inv" and scaled grid values "prescaled"; GPTQ act-order's column order "perm"
    aux: dict[str, Any] | None = None


class Method(NamedTuple):
    fn: Callable[[jax.Array, jax.Array, CompressionSpec], LayerResult]
    kinds: frozenset
    doc: str
    # optional: compress a stack of equal-shape layers at once (vmapped); same results as ``fn`` per lane
    stack: Callable[[jax.Array, jax.Array, CompressionSpec], list[LayerResult]] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, kinds, doc: str, stack=None):
    def deco(fn):
        METHODS[name] = Method(fn, frozenset(kinds), doc, stack)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def compress_layers(name: str, ws, cs, spec: CompressionSpec) -> list[LayerResult]:
    """Compress several layers with method ``name``. Layers of equal shape are solved as one stack
    (vmapped) when the method offers it; each result equals :func:`compress_layer` on its own."""
    m = get_method(name)
    if m.stack is None or len(ws) < 2 or len({tuple(w.shape) for w in ws} | {tuple(c.shape) for c in cs}) > 2:
        return [compress_layer(name, w, c, spec) for w, c in zip(ws, cs)]
    if spec.kind not in m.kinds:
        raise ValueError(f"method {name!r} does not do {spec.kind} compression ({spec.describe()}); it supports: {', '.join(sorted(m.kinds))}")
    for w, c in zip(ws, cs):
        check_layer(w, c)
    return m.stack(jnp.stack([jnp.asarray(w, jnp.float32) for w in ws]), jnp.stack([jnp.asarray(c, jnp.float32) for c in cs]), spec)


def check_layer(w, c) -> None:
    """Reject what no method can compress meaningfully, naming the problem: shapes, non-finite
    weights or statistics, a C that is not a covariance (asymmetric, negative diagonal)."""
    w, c = np.asarray(w), np.asarray(c)
    if w.ndim != 2:
        raise ValueError(f"weights must be a 2-D [d_out, d_in] matrix, got shape {w.shape}")
    if c.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"C must be [d_in, d_in] = {(w.shape[1], w.shape[1])} for weights {w.shape}, got {c.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights contain NaN or Inf ({int(np.sum(~np.isfinite(w)))} entries)")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"calibration statistics C contain NaN or Inf ({int(np.sum(~np.isfinite(c)))} entries): "
                         "the activations overflowed or the checkpoint is broken")
    diag = np.diagonal(c)
    scale = max(float(np.max(np.abs(diag))), np.finfo(np.float32).tiny)
    if np.min(diag) < -1e-6 * scale:
        raise ValueError(f"C is not a covariance: negative diagonal entry {float(np.min(diag)):.3g}")
    if np.max(np.abs(c - c.T)) > 1e-4 * scale:
        raise ValueError(f"C is not symmetric (max |C - Cᵀ| = {float(np.max(np.abs(c - c.T))):.3g})")


def compress_layer(name: str, w, c, spec: CompressionSpec) -> LayerResult:
    """Compress one layer with method ``name``; checks the method supports ``spec`` and the inputs
    (:func:`check_layer`)."""
    m = get_method(name)
    if spec.kind not in m.kinds:
        raise ValueError(f"method {name!r} does not do {spec.kind} compression ({spec.describe()}); it supports: {', '.join(sorted(m.kinds))}")
    check_layer(w, c)
    return m.fn(jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32), spec)


def _k(spec, d_in):
    return keep_count(spec.sparsity, d_in) if spec.sparsity else None


def _prune_mask(score, spec):
    """The pruning mask of ``spec`` (row top-k or N:M) on a non-negative ``score``."""
    if spec.nm is not None:
        return nm_mask(score, *spec.nm)
    k = _k(spec, score.shape[1])
    return jnp.ones(score.shape, bool) if k is None else row_topk_mask(score, k)


@functools.partial(jax.jit, static_argnames=("spec", "wanda"))
def _mask_prune(w, c, spec, wanda):
    score = wanda_score(w, c) if wanda else jnp.abs(w)
    return jnp.where(_prune_mask(score, spec), w, jnp.zeros_like(w))


@register("magnitude", {"prune", "nm"}, "largest |W| per row (or per group of m)")
def _magnitude(w, c, spec):
    return LayerResult(_mask_prune(w, c, spec, False), {})


@register("wanda", {"prune", "nm"}, "largest |W|·sqrt(C_jj) per row (or per group of m)")
def _wanda(w, c, spec):
    return LayerResult(_mask_prune(w, c, spec, True), {})


_rtn_jit = jax.jit(rtn, static_argnames="spec")


@register("rtn", {"quant"}, "round to nearest, asymmetric min-max per group")
def _rtn(w, c, spec):
    return LayerResult(_rtn_jit(w, spec=spec.quant), {})


def _damping_info(c, spec, damp, ok):
    """Damping used and how many 10× retries the Cholesky factorisation needed; failure is an error."""
    diag = np.diagonal(np.asarray(c))
    base = spec.percdamp * float(np.mean(np.where(diag == 0, 1.0, diag)))
    retries = int(round(np.log10(float(damp) / base))) if base > 0 and float(damp) > 0 else 0
    if not bool(ok):
        raise FloatingPointError(f"Cholesky factorisation failed even with damping {float(damp):.3g} "
                                 f"({retries} retries at 10x): C is far from positive definite")
    return {"damping": float(damp), "damping_retries": retries}


@functools.partial(jax.jit, static_argnames=("spec",))
def _sparsegpt_jit(w, c, spec):
    return obs.sparsegpt(w, c, sparsity=spec.sparsity, nm=spec.nm, blocksize=spec.blocksize, percdamp=spec.percdamp)


@register("sparsegpt", {"prune", "nm"}, "SparseGPT OBS sweep (blocksize 128, damping 0.01)")
def _sparsegpt(w, c, spec):
    theta, damp, ok = _sparsegpt_jit(w, c, spec)
    return LayerResult(theta, _damping_info(c, spec, damp, ok))


@functools.partial(jax.jit, static_argnames=("spec",))
def _gptq_jit(w, c, spec):
    return obs.gptq(w, c, spec.quant, blocksize=spec.blocksize, percdamp=spec.percdamp, act_order=spec.act_order)


@register("gptq", {"quant"}, "GPTQ OBS sweep on the group grid (blocksize 128, damping 0.01)")
def _gptq(w, c, spec):
    theta, damp, ok, perm = _gptq_jit(w, c, spec)
    return LayerResult(theta, _damping_info(c, spec, damp, ok), {"perm": perm} if spec.act_order else None)


@functools.partial(jax.jit, static_argnames=("spec",))
def _awq_jit(w, c, spec):
    return awq_lib.awq(w, c, spec.quant)


@register("awq", {"quant"}, "AWQ scale search (grid 20) and clip search, layer-level loss")
def _awq(w, c, spec):
    theta, alpha, s, q = _awq_jit(w, c, spec)
    return LayerResult(theta, {"alpha": float(alpha)}, {"col_scale_inv": s, "prescaled": q})


@functools.partial(jax.jit, static_argnames=("spec",))
def _hwpq_jit(w, c, spec):
    return hwpq_lib.hwpq_prune(w, c, sparsity=spec.sparsity, nm=spec.nm)


@register("hwpq", {"prune", "nm"}, "Hessian-free contribution W²·C_jj; EWMA threshold instead of sorting (approximate per-row counts)")
def _hwpq(w, c, spec):
    theta = _hwpq_jit(w, c, spec)
    return LayerResult(theta, {"sparsity": float(jnp.mean(theta == 0))})


@register("wanda_awq", {"joint"}, "Wanda pruning, then AWQ quantization of the pruned weights")
def _wanda_awq(w, c, spec):
    pruned = _mask_prune(w, c, spec, True)
    theta, alpha, r, q = _awq_jit(pruned, c, spec)
    return LayerResult(theta, {"alpha": float(alpha)}, {"col_scale_inv": r, "prescaled": q})


@functools.partial(jax.jit, static_argnames=("spec",))
def _awq_then_mask(w, c, spec):
    theta, alpha, r, q = awq_lib.awq(w, c, spec.quant)
    mask = _prune_mask(wanda_score(theta, c), spec)
    return jnp.where(mask, theta, 0.0), alpha, r, jnp.where(mask, q, 0.0)


@register("awq_wanda", {"joint"}, "AWQ quantization, then the Wanda mask of the quantized weights")
def _awq_wanda(w, c, spec):
    theta, alpha, r, q = _awq_then_mask(w, c, spec)
    return LayerResult(theta, {"alpha": float(alpha)}, {"col_scale_inv": r, "prescaled": q})


def awp_config(spec: CompressionSpec) -> solver_lib.PGDConfig:
    """The solver configuration for ``spec``: the paper's preset, with any overrides."""
    over = {k: v for k, v in (("step_rule", spec.step_rule), ("step_scale", spec.step_scale), ("tol", spec.tol)) if v is not None}
    over["momentum"] = spec.momentum
    over["matmul_dtype"] = spec.matmul_dtype
    if spec.init is not None:
        # "sparsegpt": the method passes SparseGPT's result as theta0; SparseGPT's mask holds a
        # per-layer, not a per-row, count, so the projection's scope is the layer
        over["init"] = "dense" if spec.init in ("sparsegpt", "awq") else spec.init
        if spec.init == "sparsegpt" and spec.kind == "prune":
            if spec.scope == "row":
                raise ValueError("init='sparsegpt' needs scope='layer' for unstructured pruning: SparseGPT's mask is not per row")
            over["scope"] = "layer"
    if spec.scope is not None and "scope" not in over:
        over["scope"] = spec.scope
    if spec.refit_iters is not None:
        over["refit_iters"] = spec.refit_iters
    if spec.refit_damping is not None:
        over["refit_damping"] = spec.refit_damping
    kind = spec.kind
    if kind == "prune":
        return solver_lib.awp_pruning(spec.sparsity, max_iter=spec.max_iter or 200, **over)
    if kind == "nm":
        return solver_lib.awp_nm(*spec.nm, max_iter=spec.max_iter or 200, **over)
    q = spec.quant
    if kind == "quant":
        return solver_lib.awp_quantization(q.bits, q.group_size, iters=spec.max_iter or 10, symmetric=q.symmetric,
                                           partial_groups=q.partial_groups, **over)
    if spec.nm is not None:
        sched = schedules.nm_joint(*spec.nm, q, iters=spec.max_iter or 100)
        return solver_lib.PGDConfig(schedule=sched, step_scale=1.5, init="wanda", **{"tol": 0.0, **over})
    if spec.init == "awq":
        # from Wanda→AWQ's point, which is already pruned and on the grid: joint iterations only
        over.pop("init")
        sched = schedules.joint(spec.sparsity, q, ramp=0, hold=0, joint_iters=spec.max_iter or 50)
        return solver_lib.PGDConfig(schedule=sched, step_scale=1.5, init="dense", **{"tol": 0.0, **over})
    init = over.pop("init", "dense")
    return solver_lib.awp_joint(spec.sparsity, q.bits, q.group_size, symmetric=q.symmetric, partial_groups=q.partial_groups,
                                init=init, **over)


def _awp_info(res, lane=None):
    pick = (lambda x: x) if lane is None else (lambda x: x[lane])
    dense = float(pick(res.obj_dense))
    return {
        "iterations": int(pick(res.iterations)),
        "best_iteration": int(pick(res.best_iteration)),
        "stop": solver_lib.StopReason(int(pick(res.stop_reason))).name.lower(),
        "grad_norm": float(pick(res.grad_norm)),
        "init_rel_objective": float(pick(res.obj_init)) / dense if dense > 0 else 0.0,
    }


def _awp_stack(ws, cs, spec):
    if spec.init in ("sparsegpt", "awq"):
        return [_awp(w, c, spec) for w, c in zip(ws, cs)]
    res = solver_lib.solve_pgd_stack(ws, cs, awp_config(spec))
    return [LayerResult(res.theta[i], _awp_info(res, i)) for i in range(ws.shape[0])]


@register("awp", {"prune", "nm", "quant", "joint"}, "activation-aware projected gradient descent (paper defaults)", stack=_awp_stack)
def _awp(w, c, spec):
    if spec.init == "sparsegpt":
        if spec.kind not in ("prune", "nm"):
            raise ValueError("init='sparsegpt' is for pruning (unstructured or N:M)")
        theta0, _, _ = _sparsegpt_jit(w, c, spec)
        res = solver_lib.solve_pgd(w, c, awp_config(spec), theta0=theta0)
        info = _awp_info(res)
        # SparseGPT's point is feasible: it competes, so the result is never worse than SparseGPT's
        if not float(res.obj_final) < float(res.obj_init):
            info.update(best_iteration=0, note="kept the SparseGPT start")
            return LayerResult(theta0, info)
        return LayerResult(res.theta, info)
    if spec.init == "awq":
        return _awp_from_awq(w, c, spec)
    res = solver_lib.solve_pgd(w, c, awp_config(spec))
    return LayerResult(res.theta, _awp_info(res))


def _awp_from_awq(w, c, spec):
    """AWP started from AWQ's point (beyond the paper), solved in AWQ's scaled coordinates.

    AWQ stores ``q`` = the grid point of ``W·diag(s)`` and computes with ``q·diag(1/s)``. With
    ``W' = W·diag(s)`` and ``C' = diag(1/s) C diag(1/s)`` the layer objective is unchanged,
    ``(W − Θ) C (W − Θ)ᵀ = (W' − Θ') C' (W' − Θ')ᵀ`` for ``Θ = Θ'·diag(1/s)``, so PGD on ``(W', C')``
    from ``Θ' = q`` keeps AWQ's scales (and its deployable form) and lowers the objective further.
    For joint compression the start is Wanda→AWQ (pruned, then quantized on the pruned weights)."""
    if spec.kind == "quant":
        _, alpha, r, q = _awq_jit(w, c, spec)
    elif spec.kind == "joint" and spec.nm is None:
        _, alpha, r, q = _awq_jit(_mask_prune(w, c, spec, True), c, spec)
    else:
        raise ValueError("init='awq' is for quantization and joint (unstructured) pruning + quantization")
    ws, cs = w / r[None, :], c * r[:, None] * r[None, :]
    res = solver_lib.solve_pgd(ws, cs, awp_config(spec), theta0=q)
    info = {**_awp_info(res), "alpha": float(alpha)}
    prescaled = res.theta
    # AWQ's point is feasible: it competes, so the result is never worse than AWQ's
    if not float(res.obj_final) < float(res.obj_init):
        info.update(best_iteration=0, note="kept the AWQ start")
        prescaled = q
    return LayerResult(prescaled * r[None, :], info, {"col_scale_inv": r, "prescaled": prescaled})
