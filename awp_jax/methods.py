"""One registry of layer compression methods behind one signature.

``method(W [d_out, d_in], C [d_in, d_in], constraint, options) -> LayerResult``. What to compress
*to* is a :class:`Constraint` (a sparsity or an N:M pattern, and/or a quantization grid); *how* is
the method's own frozen options dataclass (:class:`AWPOptions`, :class:`SparseGPTOptions`,
:class:`GPTQOptions`, or :class:`NoOptions` for methods without settings). The pipeline, the CLI
and the benchmarks call every method the same way and never special-case one. What a method can do
is declared (``kinds``: "prune", "nm", "quant", "joint"); asking for anything else, or passing
another method's options, is an error that names the method and what it takes.

| name | kinds | options | what |
|---|---|---|---|
| ``awp`` | prune, nm, quant, joint | :class:`AWPOptions` | projected gradient descent (:mod:`awp_jax.solver`), paper defaults |
| ``magnitude`` | prune, nm | — | keep the largest ``|W|`` per row / per group of m |
| ``wanda`` | prune, nm | — | keep the largest ``|W| · sqrt(C_jj)`` per row / per group of m |
| ``sparsegpt`` | prune, nm | :class:`SparseGPTOptions` | OBS sweep, blocksize 128, damping 0.01 (:mod:`awp_jax.obs`) |
| ``rtn`` | quant | — | round to nearest on the group grid |
| ``gptq`` | quant | :class:`GPTQOptions` | OBS sweep on the group grid, blocksize 128, damping 0.01, optional act-order |
| ``awq`` | quant | — | per-channel scale search (grid 20) + clip search, at layer level (:mod:`awp_jax.awq`) |
| ``wanda_awq`` | joint | — | Wanda mask, then AWQ on the pruned weights (the zeros stay on the grid) |
| ``awq_wanda`` | joint | — | AWQ, then the Wanda mask of the quantized weights |
| ``hwpq`` | prune, nm | — | contribution ``W_ij²·C_jj``; EWMA threshold instead of sorting (:mod:`awp_jax.hwpq`) |

Every default lives in exactly one place: the options dataclasses here (method settings) and the
solver's presets (:func:`awp_jax.solver.awp_pruning` etc.: the paper's iteration counts, steps and
starting points, used where an :class:`AWPOptions` field is ``None``). The CLI derives its flags
from the options dataclasses' fields (their ``metadata["help"]``).
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
from awp_jax import obs, sharding
from awp_jax import solver as solver_lib
from awp_jax.projections import keep_count, nm_mask, row_topk_mask
from awp_jax.quantizers import QArray, QuantSpec, quantize, refit_grid, scaled_coordinates, scaled_statistic
from awp_jax.saliency import wanda_score

__all__ = ["Constraint", "AWPOptions", "SparseGPTOptions", "GPTQOptions", "NoOptions", "LayerResult", "LayerInfo", "METHODS",
           "get_method", "make_options", "settings", "compress_layer", "compress_layers", "compress_on_mesh", "mesh_reason",
           "awp_config", "column_scales"]

@dataclasses.dataclass(frozen=True, kw_only=True)
class Constraint:
    """What every layer is compressed to. Pruning: ``sparsity`` (fraction of each row) or ``nm``;
    quantization: ``bits`` (+ ``group_size``, ``symmetric``); both for joint compression.
    ``partial_groups`` defaults to True so group 128 applies to 576-wide layers (GPTQ's
    convention: a shorter last group). ``scale_dtype``, ``float_min`` and ``full_range`` choose the grid a storage
    format holds exactly (see :class:`~awp_jax.quantizers.QuantSpec`; the output formats set them)."""

    sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    bits: int | None = None
    group_size: int | None = 128
    symmetric: bool = False
    partial_groups: bool = True
    scale_dtype: str = "float32"
    float_min: bool = False
    full_range: bool = False

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.nm is not None:
            if not isinstance(self.nm, tuple):
                object.__setattr__(self, "nm", tuple(self.nm))
            n, m = self.nm if len(self.nm) == 2 else (None, None)
            if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n <= m:
                raise ValueError(f"N:M needs integers 1 <= N <= M, got {self.nm!r}")
            if self.sparsity:
                raise ValueError("give either a sparsity or an N:M pattern, not both")
        for name in ("symmetric", "partial_groups", "float_min", "full_range"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False", getattr(self, name))
        if self.bits is not None:
            self.quant  # validates bits and group size
        if self.kind is None:
            raise ValueError("nothing to do: give a sparsity, an N:M pattern, or bits")
        if self.float_min and self.prunes:
            raise ValueError("a float-minimum grid (GGUF Q4_1) does not hold 0, so it cannot keep pruned weights; "
                             "joint pruning and quantization needs an integer zero point or a symmetric grid")

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
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, partial_groups=self.partial_groups,
                         scale_dtype=self.scale_dtype, float_min=self.float_min, full_range=self.full_range)

    def describe(self) -> str:
        parts = []
        if self.nm:
            parts.append(f"{self.nm[0]}:{self.nm[1]}")
        elif self.sparsity:
            parts.append(f"{self.sparsity:.0%} sparse")
        if self.bits:
            grid = " sym full-range" if self.full_range else " sym" if self.symmetric else " float-min" if self.float_min else ""
            scale = "" if self.scale_dtype == "float32" else f" {self.scale_dtype} scales"
            parts.append(f"int{self.bits} g{self.group_size or 'row'}{grid}{scale}")
        return " + ".join(parts)


# --------------------------------------------------------------------------- method options

def option(default, help: str, **argparse_kw):
    """A field of an options dataclass; ``help`` (and e.g. ``choices``) become its CLI flag's."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kw})


def _check(cond: bool, what: str, value) -> None:
    if not cond:
        raise ValueError(f"{what}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and bool(np.isfinite(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions:
    """The options of a method that has none (magnitude, wanda, rtn, awq, hwpq, ...)."""


GRID_REFIT_HELP = ("quantization: after the method, refit each (row, group)'s scale (and float minimum) by least squares on "
                   "the layer objective, codes and zero points kept; a row keeps its grid unless the refit lowers it (beyond the paper)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWPOptions:
    """AWP's settings. A field left ``None`` takes the paper's value for the kind of compression
    (the solver presets: Wanda start, η = 2/‖C‖_F, tol 1e-4, 200 iterations for pruning and N:M;
    RTN start, η = 1.5/‖C‖_F, 10 iterations for quantization; from dense, 100 iterations joint)."""

    max_iter: int | None = option(None, "iterations (default: the paper's: 200 pruning and N:M, 10 quantization, 100 joint; "
                                        "50 joint iterations from the AWQ start)", type=int)
    tol: float | None = option(None, "stopping tolerance on ||(W-Θ)C||/||W|| (default: 1e-4 pruning, 0 quantization and joint)", type=float)
    step_rule: str | None = option(None, "step rule: η = c/||C||_F (frobenius, the paper's), c/λmax(C), or c (absolute)",
                                   choices=("frobenius", "lambda_max", "absolute"))
    step_scale: float | None = option(None, "step constant c (default: 2 pruning, 1.5 quantization and joint)", type=float)
    momentum: bool = option(False, "accelerated PGD with function restart (beyond the paper)")
    matmul_dtype: str = option("float32", "operand type of the iteration's matmul (bfloat16: float32 accumulation; beyond the paper)",
                               choices=("float32", "bfloat16"))
    init: str | None = option(None, "starting point (default: the paper's: wanda pruning, rtn quantization, dense joint); "
                                    "sparsegpt: SparseGPT's result (layer scope for unstructured pruning); awq: AWQ's result "
                                    "(quantization) or Wanda then AWQ (joint), solved in AWQ's scaled coordinates; gptq: GPTQ's "
                                    "result (quantization; no column scales, so every output format holds it); awq_gptq: GPTQ's "
                                    "sweep on AWQ's grid (gptq --grid awq --act-order, damping 0.1), solved in AWQ's scaled "
                                    "coordinates (quantization)",
                              choices=("wanda", "magnitude", "rtn", "dense", "zeros", "sparsegpt", "awq", "gptq", "awq_gptq"))
    scope: str | None = option(None, "unstructured pruning: every row keeps its k largest (row, the paper's) or the layer its "
                                     "k*d_out largest (layer)", choices=("row", "layer"))
    refit_iters: int = option(0, "pruning: conjugate-gradient iterations on the final mask (beyond the paper)", type=int)
    refit_damping: float = option(0.0, "ridge term of the refit, as a fraction of mean(diag C) (0.1 generalises better on "
                                       "small calibration sets)", type=float)
    algorithm: str = option("pgd", "pruning solver: projected gradient descent (pgd, the paper's) or ALPS's operator "
                                   "splitting (admm: 300 iterations at most, penalty schedule, stops when the mask settles; "
                                   "the step, tolerance and momentum settings are PGD's and not used; beyond the paper)", choices=("pgd", "admm"))
    grid_refit: bool = option(False, GRID_REFIT_HELP)
    chunk_mb: int = option(64, "solve a layer (a stack of layers) whose float32 weights exceed this many MiB in row chunks of "
                               "at most this size, one after another, so the solver's buffers (about a dozen copies of what it "
                               "solves) stay small; each chunk stops, restarts and keeps its best iterate on its own. Row-scope "
                               "PGD only (layer scope and ADMM solve whole layers); 0: never", type=int)

    def __post_init__(self):
        _check(_is_int(self.chunk_mb) and self.chunk_mb >= 0, "chunk_mb must be an integer >= 0", self.chunk_mb)
        _check(self.max_iter is None or (_is_int(self.max_iter) and self.max_iter >= 1), "max_iter must be an integer >= 1", self.max_iter)
        _check(self.tol is None or (_is_num(self.tol) and self.tol >= 0), "tol must be a number >= 0", self.tol)
        _check(self.step_scale is None or (_is_num(self.step_scale) and self.step_scale > 0), "step_scale must be a positive number", self.step_scale)
        _check(_is_int(self.refit_iters) and self.refit_iters >= 0, "refit_iters must be an integer >= 0", self.refit_iters)
        _check(_is_num(self.refit_damping) and self.refit_damping >= 0, "refit_damping must be a number >= 0", self.refit_damping)
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                v = getattr(self, f.name)
                _check(v is None or v in f.metadata["choices"], f"{f.name} must be one of {', '.join(f.metadata['choices'])}", v)
        _check(isinstance(self.momentum, bool), "momentum must be True or False", self.momentum)
        _check(isinstance(self.grid_refit, bool), "grid_refit must be True or False", self.grid_refit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTOptions:
    """SparseGPT's settings (the reference implementation's defaults)."""

    blocksize: int = option(128, "OBS sweep: columns per lazy-update block", type=int)
    percdamp: float = option(0.01, "OBS sweep: damping added to C's diagonal, as a fraction of its mean", type=float)

    def __post_init__(self):
        _check(_is_int(self.blocksize) and self.blocksize >= 1, "blocksize must be an integer >= 1", self.blocksize)
        _check(_is_num(self.percdamp) and self.percdamp > 0, "percdamp must be a positive number", self.percdamp)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions(SparseGPTOptions):
    """GPTQ's settings (the reference implementation's defaults)."""

    act_order: bool = option(False, "quantize columns in order of decreasing activation energy")
    grid: str = option("minmax", "the grid the sweep rounds onto: each group's min-max grid, fitted when the sweep enters it "
                                 "(minmax, the reference's), or AWQ's: its column scales and clipped group grid, the sweep "
                                 "run in its scaled coordinates (awq: AWQ + GPTQ; the result keeps AWQ's column scales; "
                                 "with act_order each column keeps its own group's grid; beyond the reference)",
                       choices=("minmax", "awq"))
    grid_refit: bool = option(False, GRID_REFIT_HELP)

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.act_order, bool), "act_order must be True or False", self.act_order)
        _check(self.grid in ("minmax", "awq"), "grid must be one of minmax, awq", self.grid)
        _check(isinstance(self.grid_refit, bool), "grid_refit must be True or False", self.grid_refit)


# AWP's starting points that are another method's result (solved from there, the pipeline's init "dense"), and
# those of them in AWQ's scaled coordinates (their results keep AWQ's column scales)
METHOD_STARTS = ("sparsegpt", "awq", "gptq", "awq_gptq")
AWQ_STARTS = ("awq", "awq_gptq")
# init="awq_gptq": GPTQ on AWQ's grid with act-order and damping 0.1 (picked on held-out text among 0.01, 0.1, 0.3
# at INT3 g128: bench/results/frontier.md)
AWQ_GPTQ_START = GPTQOptions(grid="awq", act_order=True, percdamp=0.1)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a method reports about one layer; ``None``: does not apply to the method."""

    iterations: int | None = None  # AWP: updates performed
    best_iteration: int | None = None  # AWP: the iterate returned (0: the start was kept)
    stop: str | None = None  # AWP: why it stopped (converged, max_iter, nonfinite)
    grad_norm: float | None = None  # AWP: ||(W − Θ) C||_F / ||W||_F of the result
    init_rel_objective: float | None = None  # AWP: relative objective of the start
    damping: float | None = None  # SparseGPT/GPTQ: damping added to C's diagonal
    damping_retries: int | None = None  # SparseGPT/GPTQ: 10x retries the Cholesky factorisation needed
    alpha: float | None = None  # AWQ: the chosen exponent of the activation scales
    sparsity: float | None = None  # HWPQ: the sparsity its threshold reached
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that apply, for a report row."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class LayerResult(NamedTuple):
    """What a method computed for one layer: the dense result ``theta``; for a quantizing method
    ``q``, the typed quantized weights (codes, scales, zero points, AWQ's column scales, GPTQ's
    permutation) with ``theta == q.dense()``; what the method reports in ``info``."""

    theta: jax.Array
    info: LayerInfo = LayerInfo()
    q: QArray | None = None


def _quantized(q: QArray, info: LayerInfo) -> LayerResult:
    return LayerResult(q.dense(), info, q)


@functools.partial(jax.jit, static_argnames=("spec",))
def _snap(source, spec, col_scale_inv=None):
    """The :class:`QArray` of the solver's last projection: the codes and grid of the point it
    fitted that grid on (``PGDResult.source``; the projection is ``rtn(source)``)."""
    q = quantize(source, spec)
    return q if col_scale_inv is None else dataclasses.replace(q, col_scale_inv=col_scale_inv)


class Method(NamedTuple):
    fn: Callable[[jax.Array, jax.Array, Constraint, Any], LayerResult]
    kinds: frozenset
    doc: str
    options: type = NoOptions
    # optional: compress a stack of equal-shape layers at once (vmapped); same results as ``fn`` per lane
    stack: Callable[[jax.Array, jax.Array, Constraint, Any], list[LayerResult]] | None = None
    # optional: compress a stack of equal-shape layers on a device mesh (``fn(ws, cs, con, opt, mesh)``),
    # and why a given setting cannot (``mesh_reason(con, opt)``: ``None`` when it can)
    mesh: Callable[..., list[LayerResult]] | None = None
    mesh_reason: Callable[[Constraint, Any], str | None] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, kinds, doc: str, options: type = NoOptions, stack=None, mesh=None, mesh_reason=None):
    def deco(fn):
        METHODS[name] = Method(fn, frozenset(kinds), doc, options, stack, mesh, mesh_reason)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def option_names(name: str) -> tuple[str, ...]:
    """The option fields method ``name`` takes."""
    return tuple(f.name for f in dataclasses.fields(get_method(name).options))


def make_options(name: str, **values):
    """Method ``name``'s options with ``values`` set; a value it does not take is an error naming it."""
    m = get_method(name)
    unknown = sorted(set(values) - set(option_names(name)))
    if unknown:
        takes = ", ".join(option_names(name)) or "no options"
        raise ValueError(f"method {name!r} does not take {', '.join(unknown)}; it takes: {takes}")
    return m.options(**values)


def settings(name: str, **fields):
    """``(Constraint, options)`` of method ``name`` from flat fields (as benchmark tables and recipe
    files hold them): the :class:`Constraint`'s fields, the rest ``name``'s options."""
    keys = {f.name for f in dataclasses.fields(Constraint)}
    constraint = Constraint(**{k: v for k, v in fields.items() if k in keys})
    return constraint, make_options(name, **{k: v for k, v in fields.items() if k not in keys})


def resolve(name: str, constraint: Constraint, options=None):
    """Check that method ``name`` does ``constraint``'s kind and takes ``options`` (``None``: its
    defaults); returns ``(method, options)``."""
    m = get_method(name)
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be a methods.Constraint, got {type(constraint).__name__}")
    if constraint.kind not in m.kinds:
        raise ValueError(f"method {name!r} does not do {constraint.kind} compression ({constraint.describe()}); "
                         f"it supports: {', '.join(sorted(m.kinds))}")
    if options is None:
        options = m.options()
    elif type(options) is not m.options:
        raise ValueError(f"method {name!r} takes {m.options.__name__}, got {type(options).__name__}")
    return m, options


def column_scales(name: str, options=None) -> bool:
    """Whether method ``name`` (with ``options``) returns per-layer column scales (AWQ's), which a
    deployment format must fold into the previous operation."""
    return (name in ("awq", "wanda_awq", "awq_wanda") or (name == "awp" and getattr(options, "init", None) in AWQ_STARTS)
            or (name == "gptq" and getattr(options, "grid", None) == "awq"))


def column_scales_flags(name: str, options=None) -> str:
    """The command-line words that give method ``name`` (with ``options``) AWQ's column scales (for error messages)."""
    if name == "awp":
        return f"--method awp --init {getattr(options, 'init', None) or 'awq'}"
    return "--method gptq --grid awq" if name == "gptq" else f"--method {name}"


def compress_layers(name: str, ws, cs, constraint: Constraint, options=None) -> list[LayerResult]:
    """Compress several layers with method ``name``. Layers of equal shape are solved as one stack
    (vmapped) when the method offers it; each result equals :func:`compress_layer` on its own."""
    m, options = resolve(name, constraint, options)
    if m.stack is None or len(ws) < 2 or len({tuple(w.shape) for w in ws} | {tuple(c.shape) for c in cs}) > 2:
        return [compress_layer(name, w, c, constraint, options) for w, c in zip(ws, cs)]
    for w, c in zip(ws, cs):
        check_layer(w, c)
    out = m.stack(jnp.stack([jnp.asarray(w, jnp.float32) for w in ws]), jnp.stack([jnp.asarray(c, jnp.float32) for c in cs]),
                  constraint, options)
    return _refit_grids(out, ws, cs, options)


def mesh_reason(name: str, constraint: Constraint, options=None) -> str | None:
    """Why method ``name`` cannot compress ``constraint`` on a device mesh (``None``: it can; see
    :func:`compress_on_mesh`)."""
    m, options = resolve(name, constraint, options)
    if m.mesh is None:
        return f"{name} has no sharded form (its layers are cheap next to the calibration forward)"
    return m.mesh_reason(constraint, options) if m.mesh_reason is not None else None


def compress_on_mesh(name: str, ws, cs, constraint: Constraint, options, mesh) -> list[LayerResult]:
    """Compress layers of equal shape with method ``name`` on ``mesh``
    (:mod:`awp_jax.sharding`): AWP's solves with rows over ``"model"`` and layers over ``"stack"``,
    SparseGPT's and GPTQ's sweeps with rows over every device. Same results as
    :func:`compress_layer` per layer, up to the order of floating-point sums (tested)."""
    reason = mesh_reason(name, constraint, options)
    if reason is not None:
        raise ValueError(f"cannot compress on a mesh: {reason}")
    m, options = resolve(name, constraint, options)
    if len({tuple(np.shape(w)) for w in ws}) != 1:
        raise ValueError(f"layers solved together on a mesh must have one shape, got {sorted({tuple(np.shape(w)) for w in ws})}")
    for w, c in zip(ws, cs):
        check_layer(w, c)
    # stacked on the host and placed on the mesh from there: a stack never lies whole on one device
    out = m.mesh(_host_stack(ws), _host_stack(cs), constraint, options, mesh)
    return _refit_grids(out, ws, cs, options)


def _host_stack(arrays) -> np.ndarray:
    """``[L, ...]`` float32 on the host without copying what need not be: one array becomes a view
    with a leading axis, one array given L times (q/k/v share their statistic) a broadcast view;
    only distinct arrays are copied into a stack. (On a mesh each device then copies only its shard.)"""
    first = np.asarray(arrays[0], np.float32)
    if all(a is arrays[0] for a in arrays):
        return first[None] if len(arrays) == 1 else np.broadcast_to(first, (len(arrays),) + first.shape)
    return np.stack([np.asarray(a, np.float32) for a in arrays])


@jax.jit
def _layer_stats(w, c):
    """Scalars :func:`check_layer` judges, in fused reductions: no [d, d] temporary (C's transpose
    included: its asymmetry is taken over blocks of 512 rows against the matching columns)."""
    diag = jnp.diagonal(c)
    d = c.shape[-1]
    b = min(512, d)

    def asym(i, m):  # dynamic_slice clamps the last block into range: it overlaps, which a max allows
        rows = jax.lax.dynamic_slice(c, (i * b, 0), (b, d))
        cols = jax.lax.dynamic_slice(c, (0, i * b), (d, b))
        return jnp.maximum(m, jnp.max(jnp.abs(rows - cols.T)))

    # max |x| is NaN or Inf exactly when x holds a NaN or Inf, and reduces without a temporary (a count of
    # non-finite entries materialises a mask as large as x; it is taken only for the error message)
    return {"finite_w": jnp.isfinite(jnp.max(jnp.abs(w))), "finite_c": jnp.isfinite(jnp.max(jnp.abs(c))), "min_diag": jnp.min(diag),
            "scale": jnp.maximum(jnp.max(jnp.abs(diag)), jnp.finfo(jnp.float32).tiny),
            "asym": jax.lax.fori_loop(0, -(-d // b), asym, jnp.zeros((), c.dtype))}


@jax.jit
def _nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def _f32(x) -> jax.Array:
    """``x`` as a float32 device array (no copy when it is one already)."""
    return jnp.asarray(x, jnp.float32)


def check_layer(w, c) -> None:
    """Reject what no method can compress meaningfully, naming the problem: shapes, non-finite
    weights or statistics, a C that is not a covariance (asymmetric, negative diagonal)."""
    if np.ndim(w) != 2:
        raise ValueError(f"weights must be a 2-D [d_out, d_in] matrix, got shape {np.shape(w)}")
    if np.shape(c) != (np.shape(w)[1], np.shape(w)[1]):
        raise ValueError(f"C must be [d_in, d_in] = {(np.shape(w)[1], np.shape(w)[1])} for weights {np.shape(w)}, got {np.shape(c)}")
    st = {k: v.item() for k, v in jax.device_get(_layer_stats(_f32(w), _f32(c))).items()}
    if not st["finite_w"]:
        raise ValueError(f"weights contain NaN or Inf ({_nonfinite(_f32(w)).item()} entries)")
    if not st["finite_c"]:
        raise ValueError(f"calibration statistics C contain NaN or Inf ({_nonfinite(_f32(c)).item()} entries): "
                         "the activations overflowed or the checkpoint is broken")
    if st["min_diag"] < -1e-6 * st["scale"]:
        raise ValueError(f"C is not a covariance: negative diagonal entry {st['min_diag']:.3g}")
    if st["asym"] > 1e-4 * st["scale"]:
        raise ValueError(f"C is not symmetric (max |C - Cᵀ| = {st['asym']:.3g})")


def compress_layer(name: str, w, c, constraint: Constraint, options=None) -> LayerResult:
    """Compress one layer with method ``name``; checks the method supports ``constraint``, takes
    ``options`` (``None``: its defaults) and the inputs (:func:`check_layer`)."""
    m, options = resolve(name, constraint, options)
    w, c = _f32(w), _f32(c)  # one device copy, checked and then solved
    check_layer(w, c)
    return _refit_grids([m.fn(w, c, constraint, options)], [w], [c], options)[0]


def _refit_grids(results, ws, cs, options) -> list[LayerResult]:
    """The results with their grids refitted (:func:`~awp_jax.quantizers.refit_grid`) when ``options``
    ask for it (``grid_refit``): a stage after any quantizing method, on one device."""
    if not getattr(options, "grid_refit", False):
        return results
    qs = [refit_grid(r.q, w, c) for r, w, c in zip(results, ws, cs)]  # refit_grid takes float32 itself
    return [LayerResult(q.dense(), r.info, q) for r, q in zip(results, qs)]


def _k(con, d_in):
    return keep_count(con.sparsity, d_in) if con.sparsity else None


def _prune_mask(score, con, k=None):
    """The pruning mask of ``con`` (row top-k or N:M) on a non-negative ``score``; ``k``: the
    row count when it is passed as data (default: ``con``'s)."""
    if con.nm is not None:
        return nm_mask(score, *con.nm)
    if not con.sparsity:
        return jnp.ones(score.shape, bool)
    return row_topk_mask(score, _k(con, score.shape[1]) if k is None else k)


def _structural(con: Constraint) -> Constraint:
    """``con`` with its sparsity replaced by a placeholder: the jit cache key of functions that take
    the sparsity's counts as data, so that the blocks of a non-uniform allocation share one compilation."""
    return dataclasses.replace(con, sparsity=0.5) if con.sparsity else con


@functools.partial(jax.jit, static_argnames=("con", "wanda"))
def _mask_prune_jit(w, c, k, con, wanda):
    score = wanda_score(w, c) if wanda else jnp.abs(w)
    return jnp.where(_prune_mask(score, con, k), w, jnp.zeros_like(w))


def _mask_prune(w, c, con, wanda):
    k = _k(con, w.shape[1])
    return _mask_prune_jit(w, c, jnp.int32(0 if k is None else k), con=_structural(con), wanda=wanda)


@register("magnitude", {"prune", "nm"}, "largest |W| per row (or per group of m)")
def _magnitude(w, c, con, opt):
    return LayerResult(_mask_prune(w, c, con, False))


@register("wanda", {"prune", "nm"}, "largest |W|·sqrt(C_jj) per row (or per group of m)")
def _wanda(w, c, con, opt):
    return LayerResult(_mask_prune(w, c, con, True))


_quantize_jit = jax.jit(quantize, static_argnames="spec")


@register("rtn", {"quant"}, "round to nearest, asymmetric min-max per group")
def _rtn(w, c, con, opt):
    return _quantized(_quantize_jit(w, spec=con.quant), LayerInfo())


def _swept_diag(q: QArray, c):
    """The diagonal of the statistic a GPTQ sweep that made ``q`` saw: ``diag(C)``, or in AWQ's
    coordinates ``diag(C)·r²``."""
    diag = jnp.diagonal(c)
    return diag if q.col_scale_inv is None else scaled_statistic(diag, q.col_scale_inv)


def _damping_info(diag, percdamp, damp, ok):
    """Damping used and how many 10× retries the Cholesky factorisation needed (``diag``: the
    diagonal of the swept statistic, which sets the base damping); failure is an error."""
    diag = np.asarray(diag)
    base = percdamp * float(np.mean(np.where(diag == 0, 1.0, diag)))
    retries = int(round(np.log10(float(damp) / base))) if base > 0 and float(damp) > 0 else 0
    if not bool(ok):
        raise FloatingPointError(f"Cholesky factorisation failed even with damping {float(damp):.3g} "
                                 f"({retries} retries at 10x): C is far from positive definite")
    return LayerInfo(damping=float(damp), damping_retries=retries)


@functools.partial(jax.jit, static_argnames=("con", "opt"))
def _sparsegpt_counts_jit(w, c, counts, con, opt):
    return obs.sparsegpt(w, c, sparsity=con.sparsity, nm=con.nm, blocksize=opt.blocksize, percdamp=opt.percdamp,
                         counts=counts)


def _sparsegpt_jit(w, c, con, opt):
    counts = None if con.nm is not None else jnp.asarray(obs.prune_counts(*w.shape, con.sparsity, opt.blocksize))
    return _sparsegpt_counts_jit(w, c, counts, con=_structural(con), opt=opt)


def _sparsegpt_rows(w, c, *, n_rows, con, opt):
    return obs.sparsegpt(w, c, sparsity=con.sparsity, nm=con.nm, blocksize=opt.blocksize, percdamp=opt.percdamp,
                         axis_name=sharding.ROWS, n_rows=n_rows)


def _sweep_on_mesh(rows_fn, result):
    """An OBS sweep's mesh form: each layer with its rows over every device (``rows_fn`` on the
    local rows, returning ``(result, damping, ok)``); ``result(r, info)`` makes its LayerResult."""
    def run(ws, cs, con, opt, mesh):
        out = []
        for w, c in zip(ws, cs):
            r, damp, ok = sharding.rows_on_mesh(rows_fn, w, c, mesh, con=con, opt=opt)
            out.append(result(r, _damping_info(jnp.diagonal(c), opt.percdamp, damp, ok)))
        return out

    return run


_sparsegpt_mesh = _sweep_on_mesh(_sparsegpt_rows, LayerResult)


@register("sparsegpt", {"prune", "nm"}, "SparseGPT OBS sweep (blocksize 128, damping 0.01)", SparseGPTOptions,
          mesh=_sparsegpt_mesh)
def _sparsegpt(w, c, con, opt):
    theta, damp, ok = _sparsegpt_jit(w, c, con, opt)
    return LayerResult(theta, _damping_info(jnp.diagonal(c), opt.percdamp, damp, ok))


@functools.partial(jax.jit, static_argnames=("con", "opt"))
def _gptq_jit(w, c, con, opt):
    if opt.grid == "awq":  # AWQ's scales and clipped grid; the sweep in its coordinates W·diag(s), diag(1/s) C diag(1/s)
        a, _ = awq_lib.awq(w, c, con.quant)
        q, damp, ok = obs.gptq(*scaled_coordinates(w, c, a.col_scale_inv), con.quant, blocksize=opt.blocksize,
                               percdamp=opt.percdamp, act_order=opt.act_order, grid=(a.scale, a.zero))
        return dataclasses.replace(q, col_scale_inv=a.col_scale_inv), damp, ok
    return obs.gptq(w, c, con.quant, blocksize=opt.blocksize, percdamp=opt.percdamp, act_order=opt.act_order)


def _gptq_rows(w, c, *, n_rows, con, opt):
    return obs.gptq(w, c, con.quant, blocksize=opt.blocksize, percdamp=opt.percdamp, act_order=opt.act_order)


_gptq_mesh = _sweep_on_mesh(_gptq_rows, _quantized)


def _gptq_mesh_reason(con, opt):
    if opt.grid == "awq":
        return "GPTQ on AWQ's grid runs AWQ's search on each layer first; it is solved on one device"
    return None


@register("gptq", {"quant"}, "GPTQ OBS sweep on the group grid (blocksize 128, damping 0.01)", GPTQOptions, mesh=_gptq_mesh,
          mesh_reason=_gptq_mesh_reason)
def _gptq(w, c, con, opt):
    q, damp, ok = _gptq_jit(w, c, con, opt)
    return _quantized(q, _damping_info(_swept_diag(q, c), opt.percdamp, damp, ok))


@functools.partial(jax.jit, static_argnames=("con",))
def _awq_jit(w, c, con):
    return awq_lib.awq(w, c, con.quant)


@register("awq", {"quant"}, "AWQ scale search (grid 20) and clip search, layer-level loss")
def _awq(w, c, con, opt):
    q, alpha = _awq_jit(w, c, con)
    return _quantized(q, LayerInfo(alpha=float(alpha)))


@functools.partial(jax.jit, static_argnames=("con",))
def _hwpq_jit(w, c, con):
    return hwpq_lib.hwpq_prune(w, c, sparsity=con.sparsity, nm=con.nm)


@register("hwpq", {"prune", "nm"}, "Hessian-free contribution W²·C_jj; EWMA threshold instead of sorting (approximate per-row counts)")
def _hwpq(w, c, con, opt):
    theta = _hwpq_jit(w, c, con)
    return LayerResult(theta, LayerInfo(sparsity=float(jnp.mean(theta == 0))))


@register("wanda_awq", {"joint"}, "Wanda pruning, then AWQ quantization of the pruned weights")
def _wanda_awq(w, c, con, opt):
    q, alpha = _awq_jit(_mask_prune(w, c, con, True), c, con)
    return _quantized(q, LayerInfo(alpha=float(alpha)))


@functools.partial(jax.jit, static_argnames=("con",))
def _awq_then_mask(w, c, con):
    q, alpha = awq_lib.awq(w, c, con.quant)
    mask = _prune_mask(wanda_score(q.dense(), c), con)
    # a pruned entry takes its group's zero point: grid value 0 (integer zero points only: joint
    # compression refuses float-minimum grids)
    zero = jnp.repeat(q.zero, con.quant.group_len(w.shape[1]), axis=1)[:, : w.shape[1]]
    return dataclasses.replace(q, codes=jnp.where(mask, q.codes, zero)), alpha


@register("awq_wanda", {"joint"}, "AWQ quantization, then the Wanda mask of the quantized weights")
def _awq_wanda(w, c, con, opt):
    q, alpha = _awq_then_mask(w, c, con)
    return _quantized(q, LayerInfo(alpha=float(alpha)))


def awp_config(constraint: Constraint, options: AWPOptions | None = None) -> solver_lib.PGDConfig:
    """The solver configuration for ``constraint``: the paper's preset, with ``options`` over it."""
    con, opt = constraint, options or AWPOptions()
    kind = con.kind
    if opt.init in ("sparsegpt",) and kind not in ("prune", "nm"):
        raise ValueError("init='sparsegpt' is for pruning (unstructured or N:M)")
    if opt.init in ("gptq", "awq_gptq") and kind != "quant":
        raise ValueError(f"init='{opt.init}' is for quantization")
    if opt.init == "awq" and not (kind == "quant" or (kind == "joint" and con.nm is None)):
        raise ValueError("init='awq' is for quantization and joint (unstructured) pruning + quantization")
    if opt.grid_refit and con.bits is None:
        raise ValueError(f"grid_refit is for quantization (a grid to refit), not {con.describe()}")
    if opt.refit_iters and kind not in ("prune", "nm"):
        raise ValueError(f"refit_iters is for pruning only (a refit would leave the {con.describe()} grid)")
    if opt.scope is not None and (con.nm is not None or not con.prunes):
        raise ValueError(f"scope is for unstructured pruning only, not {kind} ({con.describe()})")
    if opt.scope == "layer" and con.bits is not None:
        raise ValueError(f"scope='layer' projects without a quantization grid: it is for pruning alone, not {con.describe()}")
    over = {k: v for k, v in (("step_rule", opt.step_rule), ("step_scale", opt.step_scale), ("tol", opt.tol)) if v is not None}
    over.update(momentum=opt.momentum, matmul_dtype=opt.matmul_dtype, refit_iters=opt.refit_iters, refit_damping=opt.refit_damping,
                algorithm=opt.algorithm)
    if opt.algorithm == "admm" and kind not in ("prune", "nm"):
        raise ValueError(f"algorithm='admm' is for pruning only, not {kind} ({con.describe()})")
    if opt.init is not None:
        # "sparsegpt"/"awq"/"gptq": the method passes that method's result as theta0; SparseGPT's mask holds
        # a per-layer, not a per-row, count, so the projection's scope is the layer
        over["init"] = "dense" if opt.init in METHOD_STARTS else opt.init
        if opt.init == "sparsegpt" and kind == "prune":
            if opt.scope == "row":
                raise ValueError("init='sparsegpt' needs scope='layer' for unstructured pruning: SparseGPT's mask is not per row")
            over["scope"] = "layer"
    if opt.scope is not None and "scope" not in over:
        over["scope"] = opt.scope
    it = {} if opt.max_iter is None else {"max_iter": opt.max_iter}
    if opt.algorithm == "admm" and opt.max_iter is None:
        it = {"max_iter": 300}  # ALPS's cap
    if kind == "prune":
        return solver_lib.awp_pruning(con.sparsity, **it, **over)
    if kind == "nm":
        return solver_lib.awp_nm(*con.nm, **it, **over)
    q = con.quant
    if kind == "quant":
        return solver_lib.awp_quantization(spec=q, **({} if opt.max_iter is None else {"iters": opt.max_iter}), **over)
    if con.nm is not None:
        return solver_lib.awp_nm_joint(*con.nm, q, **it, **over)
    return solver_lib.awp_joint(con.sparsity, spec=q, from_awq=opt.init == "awq", **it, **over)


def _awp_info(res, lane=None):
    pick = (lambda x: x) if lane is None else (lambda x: x[lane])
    dense = float(pick(res.obj_dense))
    return LayerInfo(
        iterations=int(pick(res.iterations)),
        best_iteration=int(pick(res.best_iteration)),
        stop=solver_lib.StopReason(int(pick(res.stop_reason))).name.lower(),
        grad_norm=float(pick(res.grad_norm)),
        init_rel_objective=float(pick(res.obj_init)) / dense if dense > 0 else 0.0,
    )


def _chunk_bytes(opt) -> int | None:
    return opt.chunk_mb * 2**20 or None


def _chunk_note(info: LayerInfo, w, cfg, opt) -> LayerInfo:
    """Say in the report when a layer (stack) over ``chunk_mb`` was solved in row chunks, or whole."""
    n = len(solver_lib.chunks_for(w.shape, _chunk_bytes(opt)))
    if n == 1:
        return info
    what = f"solved in {n} row chunks" if solver_lib.chunkable(cfg) else \
        f"solved whole though over chunk_mb={opt.chunk_mb} ({'ADMM' if cfg.algorithm == 'admm' else 'layer scope'} does not separate over rows)"
    return dataclasses.replace(info, note=what if info.note is None else f"{info.note}; {what}")


def _awp_stack(ws, cs, con, opt):
    if opt.init in METHOD_STARTS:
        return [_awp(w, c, con, opt) for w, c in zip(ws, cs)]
    cfg = awp_config(con, opt)
    res = solver_lib.solve_pgd_stack(ws, cs, cfg, max_chunk_bytes=_chunk_bytes(opt))
    return [_awp_result(res.theta[i], _chunk_note(_awp_info(res, i), ws, cfg, opt), con,
                        source=None if res.source is None else res.source[i]) for i in range(ws.shape[0])]


def _awp_mesh_reason(con, opt):
    if opt.init in METHOD_STARTS:
        return f"AWP from the {opt.init} start runs that method on each layer first; it is solved on one device"
    if awp_config(con, opt).scope == "layer":
        return "AWP with scope='layer' ranks a whole layer at once; it is solved on one device"
    return None


def _awp_mesh(ws, cs, con, opt, mesh):
    cfg = awp_config(con, opt)
    res = sharding.solve_sharded(ws, cs, cfg, mesh, max_chunk_bytes=_chunk_bytes(opt))
    return [_awp_result(res.theta[i], _chunk_note(_awp_info(res, i), ws, cfg, opt), con,
                        source=None if res.source is None else res.source[i]) for i in range(ws.shape[0])]


def _awp_result(theta, info, con, col_scale_inv=None, source=None) -> LayerResult:
    """AWP's result; a quantized one as the :class:`QArray` of its final projection: the codes and
    grid of the point the solver fitted that grid on (``PGDResult.source``)."""
    if con.bits is None:
        return LayerResult(theta, info)
    q = _snap(source, con.quant, col_scale_inv)
    if not bool(jnp.array_equal(q.grid_values(), theta)):  # theta: the solver's iterate (in AWQ's coordinates there)
        if info.stop == "nonfinite":  # the fallback iterate is from before the grid phase
            raise FloatingPointError(f"AWP's updates became non-finite before any iterate on the {con.describe()} grid was "
                                     "accepted; try a smaller --step-scale")
        raise RuntimeError("AWP's result is not the grid values of its projection's source (a solver bug)")
    return _quantized(q, info)


@register("awp", {"prune", "nm", "quant", "joint"}, "activation-aware projected gradient descent (paper defaults)", AWPOptions,
          stack=_awp_stack, mesh=_awp_mesh, mesh_reason=_awp_mesh_reason)
def _awp(w, c, con, opt):
    cfg = awp_config(con, opt)
    if opt.init == "sparsegpt":
        theta0, _, _ = _sparsegpt_jit(w, c, con, SparseGPTOptions())
        res = solver_lib.solve_pgd(w, c, cfg, theta0=theta0, max_chunk_bytes=_chunk_bytes(opt))
        info = _chunk_note(_awp_info(res), w, cfg, opt)
        # SparseGPT's point is feasible: it competes, so the result is never worse than SparseGPT's
        if not float(res.obj_final) < float(res.obj_init):
            info = dataclasses.replace(info, best_iteration=0, note="kept the SparseGPT start")
            return LayerResult(theta0, info)
        return LayerResult(res.theta, info)
    if opt.init in AWQ_STARTS:
        return _awp_from_awq(w, c, con, cfg, opt)
    if opt.init == "gptq":
        q0, damp, ok = _gptq_jit(w, c, con, GPTQOptions())
        _damping_info(jnp.diagonal(c), GPTQOptions().percdamp, damp, ok)  # a failed factorisation is an error here too
        res = solver_lib.solve_pgd(w, c, cfg, theta0=q0.dense(), max_chunk_bytes=_chunk_bytes(opt))
        info = _chunk_note(_awp_info(res), w, cfg, opt)
        # GPTQ's point is feasible: it competes, so the result is never worse than GPTQ's
        if not float(res.obj_final) < float(res.obj_init):
            info = dataclasses.replace(info, best_iteration=0, note="kept the GPTQ start")
            return _quantized(q0, info)
        return _awp_result(res.theta, info, con, source=res.source)
    res = solver_lib.solve_pgd(w, c, cfg, max_chunk_bytes=_chunk_bytes(opt))
    return _awp_result(res.theta, _chunk_note(_awp_info(res), w, cfg, opt), con, source=res.source)


def _awp_from_awq(w, c, con, cfg, opt):
    """AWP started from AWQ's point (beyond the paper), solved in AWQ's scaled coordinates;
    ``init="awq_gptq"``: from GPTQ's sweep on AWQ's grid (:data:`AWQ_GPTQ_START`), in the same coordinates.

    AWQ stores ``q`` = the grid point of ``W·diag(s)`` and computes with ``q·diag(1/s)``. With
    ``W' = W·diag(s)`` and ``C' = diag(1/s) C diag(1/s)`` the layer objective is unchanged,
    ``(W − Θ) C (W − Θ)ᵀ = (W' − Θ') C' (W' − Θ')ᵀ`` for ``Θ = Θ'·diag(1/s)``, so PGD on ``(W', C')``
    from ``Θ' = q`` keeps AWQ's scales (and its deployable form) and lowers the objective further.
    For joint compression the start is Wanda→AWQ (pruned, then quantized on the pruned weights)."""
    if opt.init == "awq_gptq":
        q, damp, ok = _gptq_jit(w, c, con, AWQ_GPTQ_START)
        _damping_info(_swept_diag(q, c), AWQ_GPTQ_START.percdamp, damp, ok)  # a failed factorisation is an error here too
        alpha, start = None, "AWQ + GPTQ"
    else:
        q, alpha = _awq_jit(w if con.kind == "quant" else _mask_prune(w, c, con, True), c, con)
        alpha, start = float(alpha), "AWQ"
    r = q.col_scale_inv
    ws, cs = scaled_coordinates(w, c, r)
    res = solver_lib.solve_pgd(ws, cs, cfg, theta0=q.grid_values(), max_chunk_bytes=_chunk_bytes(opt))
    info = _chunk_note(dataclasses.replace(_awp_info(res), alpha=alpha), w, cfg, opt)
    # the start is feasible: it competes, so the result is never worse than it
    if not float(res.obj_final) < float(res.obj_init):
        info = dataclasses.replace(info, best_iteration=0, note=f"kept the {start} start")
        return _quantized(q, info)
    return _awp_result(res.theta, info, con, r, source=res.source)
