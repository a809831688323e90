r"""AWP: activation-aware projected gradient descent for one linear layer.

For a layer with weights ``W [d_out, d_in]`` and input second moment ``C = X Xᵀ / n
[d_in, d_in]`` the solver minimises

.. math::  f(Θ) = \operatorname{tr}\big((W - Θ)\, C\, (W - Θ)^\top\big) = \|(W - Θ) C^{1/2}\|_F^2

over a constraint set (row sparsity, N:M, a quantization grid or their intersection) by

.. math::  Θ_{t+1} = \operatorname{Proj}_t\big(Θ_t + η\,(W - Θ_t)\,C\big),

where ``(W − Θ) C = −∇f / 2`` and ``Proj_t`` comes from the :class:`~awp_jax.schedules.Schedule`.
The loop is a ``lax.while_loop``; it stops when ``||(W − Θ) C||_F / ||W||_F < tol`` (tested on
iterates of the final phase only, so a dense or half-ramped iterate is never returned), when the
schedule ends, or when an update turns non-finite (that update is rejected and the reason
reported). With ``keep_best`` the lowest-objective feasible point seen is returned — an iterate of
the final phase, or the initial point when the final projection made it (Wanda, magnitude, RTN):
PGD with the paper's step ``2/||C||_F`` sits at the edge of the stable range and need not be
monotone, and a quantization grid recomputed at every step is not a fixed set.

Structure: the objective (:class:`Quadratic`) computes gradients and values from a layer's
:class:`Problem`; a solver is a small immutable object with ``init`` / ``step`` / ``terminate`` /
``result`` (:class:`PGD`, :class:`AcceleratedPGD`); one driver runs any of them (:func:`run`, a
``while_loop``; :func:`run_path`, a ``scan`` recording iterates); post-processing stages
(:class:`CGRefit`, :class:`ExactFigures`) map a result to a result. :func:`make_solver` turns a
:class:`PGDConfig` into these, and the sharded solve (:mod:`awp_jax.sharding`) uses the same
driver through :func:`solve_traced`.

Public entry points (where ``jit`` happens, one compilation per shapes × config):
:func:`solve_pgd` (one layer), :func:`solve_pgd_stack` (``vmap`` over equal-shape layers) and
:func:`pgd_path` (all iterates, for analysis).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from awp_jax import schedules as sched_lib
from awp_jax.projections import keep_count, project
from awp_jax.quantizers import QuantSpec
from awp_jax.saliency import magnitude_score, wanda_score

__all__ = [
    "ADMM",
    "PGD",
    "AcceleratedPGD",
    "CGRefit",
    "ExactFigures",
    "PGDConfig",
    "PGDResult",
    "Problem",
    "Quadratic",
    "State",
    "StopReason",
    "awp_joint",
    "awp_nm",
    "awp_nm_joint",
    "awp_pruning",
    "awp_quantization",
    "chunkable",
    "chunks_for",
    "initial_point",
    "lambda_max",
    "make_solver",
    "objective",
    "pgd_path",
    "refit_support",
    "ridge",
    "row_chunks",
    "run",
    "run_path",
    "solve_pgd",
    "solve_pgd_stack",
    "solve_in_row_chunks",
    "solve_traced",
    "step_size",
    "trace_count",
]


class StopReason(enum.IntEnum):
    RUNNING = 0
    CONVERGED = 1  # relative gradient norm below tol
    MAX_ITER = 2  # schedule exhausted
    NONFINITE = 3  # an update produced NaN/Inf; the last finite iterate is returned


StepRule = Literal["frobenius", "lambda_max", "absolute"]
Init = Literal["wanda", "magnitude", "rtn", "dense", "zeros"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGDConfig:
    """Static solver configuration (hashable: passed to ``jit`` as a static argument).

    Attributes:
      schedule: the constraint schedule (see :mod:`awp_jax.schedules`); its length is max_iter.
      step_rule: ``"frobenius"``: η = step_scale / ||C||_F (the paper's); ``"lambda_max"``:
        η = step_scale / λ_max(C) from ``power_iters`` power iterations; ``"absolute"``: η = step_scale.
      step_scale: the constant c in the step rule (paper: 2 for pruning, 1.5 for quantization).
      tol: stop when ||(W − Θ) C||_F / ||W||_F < tol (paper: 1e-4). 0 disables the test.
      init: Θ0 when none is passed: ``"wanda"`` (final projection with the Wanda mask),
        ``"magnitude"`` / ``"rtn"`` (final projection of W), ``"dense"`` (W), ``"zeros"``.
      keep_best: return the lowest-objective feasible point seen (final-phase iterates, and the
        initial point when ``init`` is a projection of W) instead of the last iterate.
      momentum: accelerated PGD (beyond the paper): the step is taken from the extrapolated point
        ``Y = Θ_t + β_k (Θ_t − Θ_{t−1})``, ``β_k = (k − 1)/(k + 2)``, with ``k`` reset to 1 whenever
        the objective rises (function restart). ``(W − Y) C`` is a combination of the two last
        gradients, so an iteration still costs one matmul.
      trace: record objective and relative gradient norm of every iterate (length max_iter + 1,
        NaN after the stop).
      precision: matmul precision (``"highest"`` keeps fp32 on TPU/GPU).
      matmul_dtype: ``"float32"`` (default) or ``"bfloat16"``: the operands of the iteration's
        matmul (W − Θ)·C are rounded to bfloat16 and the product accumulates in float32 — half
        the memory traffic and the bf16 matmul rate on GPU/TPU. Θ, the projection and the
        iterate stay float32; the objective and gradient norm the loop tests are computed from
        that product, so they are approximate too (the report's final objective is not: it is
        recomputed in float32). Not used by the refit.
      scope: ``"row"`` (the paper's: every row keeps its k largest) or ``"layer"`` (beyond the
        paper: the whole matrix keeps its ``k·d_out`` largest entries, rows may differ — the
        constraint SparseGPT's mask satisfies). Unstructured pruning only.
      refit_iters: after the PGD loop, this many iterations of conjugate gradients on the returned
        point's support (every row solved on its own kept entries; the mask, hence feasibility, is
        unchanged). IHT at a stable step rarely changes the mask once chosen, and CG reaches the
        best weights on it in about sqrt(κ) instead of κ iterations, one matmul each. Pruning
        only (no quantization). 0 (default) is the paper's solver.
      algorithm: ``"pgd"`` (the paper's, :class:`PGD` / :class:`AcceleratedPGD`) or ``"admm"``
        (:class:`ADMM`, ALPS's operator splitting on the same objective; pruning only). With ADMM
        ``max_iter`` caps its iterations (ALPS: 300), ``admm_rho`` is the initial penalty on
        unit-diagonal C (ALPS: 0.1) and ``admm_damping`` the ridge ALPS adds to C (0.01 of its
        mean diagonal); the PGD settings (step_rule, step_scale, tol, keep_best, momentum) are
        not used.
      refit_damping: the refit minimises the objective with ``C + δ·mean(diag C)·I`` (δ =
        refit_damping), i.e. adds ``δ·mean(diag C)·‖W − Θ‖²`` on the kept entries — the damping
        SparseGPT applies to its Hessian: it keeps the kept weights nearer their dense values and
        fits the calibration sample less closely. The result is still taken only if it lowers the
        undamped objective.
    """

    schedule: sched_lib.Schedule
    step_rule: StepRule = "frobenius"
    step_scale: float = 2.0
    power_iters: int = 50
    tol: float = 1e-4
    init: Init = "wanda"
    keep_best: bool = True
    momentum: bool = False
    trace: bool = False
    precision: str = "highest"
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    scope: Literal["row", "layer"] = "row"
    refit_iters: int = 0
    refit_damping: float = 0.0
    algorithm: Literal["pgd", "admm"] = "pgd"
    admm_rho: float = 0.1
    admm_damping: float = 0.01

    def __post_init__(self):
        if not isinstance(self.schedule, sched_lib.Schedule):
            raise TypeError(f"schedule must be an awp_jax.schedules.Schedule, got {type(self.schedule).__name__}")
        if self.step_rule not in ("frobenius", "lambda_max", "absolute"):
            raise ValueError(f"step_rule must be 'frobenius', 'lambda_max' or 'absolute', got {self.step_rule!r}")
        if not (np.isfinite(self.step_scale) and self.step_scale > 0):
            raise ValueError(f"step_scale must be a positive finite number, got {self.step_scale!r}")
        if not (np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
        if self.power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {self.power_iters!r}")
        s = self.schedule
        prunes = s.prunes_rows or s.nm is not None
        if self.init not in ("wanda", "magnitude", "rtn", "dense", "zeros"):
            raise ValueError(f"init must be one of wanda, magnitude, rtn, dense, zeros; got {self.init!r}")
        if self.init in ("wanda", "magnitude") and not prunes:
            raise ValueError(f"init={self.init!r} needs a schedule that prunes; use 'rtn' or 'dense'")
        if self.init == "rtn" and s.quant is None:
            raise ValueError("init='rtn' needs a schedule with a QuantSpec")
        if self.scope not in ("row", "layer"):
            raise ValueError(f"scope must be 'row' or 'layer', got {self.scope!r}")
        if self.scope == "layer" and not s.prunes_rows:
            raise ValueError("scope='layer' applies to unstructured pruning schedules only")
        if self.scope == "layer" and s.quant is not None:
            raise ValueError("scope='layer' projects without a quantization grid: it is for pruning alone")
        if isinstance(self.refit_iters, bool) or not isinstance(self.refit_iters, int) or self.refit_iters < 0:
            raise ValueError(f"refit_iters must be an integer >= 0, got {self.refit_iters!r}")
        if not (np.isfinite(self.refit_damping) and self.refit_damping >= 0):
            raise ValueError(f"refit_damping must be >= 0, got {self.refit_damping!r}")
        if self.refit_iters and (s.quant is not None or not prunes):
            raise ValueError("refit_iters needs a pruning schedule without quantization (a refit would leave the grid)")
        if self.algorithm not in ("pgd", "admm"):
            raise ValueError(f"algorithm must be 'pgd' or 'admm', got {self.algorithm!r}")
        if self.algorithm == "admm":
            if s.quant is not None or not prunes or len(s.phases) != 1:
                raise ValueError("algorithm='admm' prunes (a sparsity or N:M in one phase), without quantization")
            if self.trace or self.matmul_dtype != "float32":
                raise ValueError("algorithm='admm' records no trace and runs in float32 (matmul_dtype='float32')")
            if not (np.isfinite(self.admm_rho) and self.admm_rho > 0):
                raise ValueError(f"admm_rho must be a positive number, got {self.admm_rho!r}")
            if not (np.isfinite(self.admm_damping) and self.admm_damping >= 0):
                raise ValueError(f"admm_damping must be >= 0, got {self.admm_damping!r}")

    @property
    def max_iter(self) -> int:
        return self.schedule.max_iter


# --- presets (the paper's settings) ---------------------------------------------------------


def awp_pruning(sparsity: float, *, max_iter: int = 200, tol: float = 1e-4, **kw) -> PGDConfig:
    """Paper pruning: init Wanda, η = 2/||C||_F, tol 1e-4, 200 iterations."""
    kw = {"step_scale": 2.0, "init": "wanda", **kw}
    return PGDConfig(schedule=sched_lib.pruning(sparsity, iters=max_iter), tol=tol, **kw)


def awp_nm(n: int = 2, m: int = 4, *, max_iter: int = 200, tol: float = 1e-4, **kw) -> PGDConfig:
    """N:M pruning with the pruning settings (init Wanda N:M); beyond the paper."""
    kw = {"step_scale": 2.0, "init": "wanda", **kw}
    return PGDConfig(schedule=sched_lib.nm_pruning(n, m, iters=max_iter), tol=tol, **kw)


def awp_quantization(
    bits: int = 4, group_size: int | None = 128, *, iters: int = 10, symmetric: bool = False, partial_groups: bool = False,
    spec: QuantSpec | None = None, **kw
):
    """Paper quantization: init RTN, η = 1.5/||C||_F, 10 iterations. ``spec``: the whole grid
    (then ``bits``, ``group_size``, ``symmetric``, ``partial_groups`` are not used)."""
    kw = {"step_scale": 1.5, "init": "rtn", "tol": 0.0, **kw}
    spec = spec or QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, partial_groups=partial_groups)
    return PGDConfig(schedule=sched_lib.quantization(spec, iters=iters), **kw)


def awp_joint(
    sparsity: float,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    symmetric: bool = False,
    partial_groups: bool = False,
    init: Init = "dense",
    from_awq: bool = False,
    max_iter: int | None = None,
    spec: QuantSpec | None = None,
    **kw,
):
    """Joint pruning + quantization, η = 1.5/||C||_F. ``spec``: the whole grid (as in
    :func:`awp_quantization`).

    ``init="dense"`` is the paper's recipe: from W, ramp the sparsity 0 → p over 25 iterations,
    hold p for 25, then 50 iterations of quantize(prune(Z)). With a small step, IHT rarely
    changes a mask once chosen, so the ramp from W ends near a magnitude mask; on activations with
    outlier channels that is far worse than Wanda's. ``init="wanda"`` starts from Wanda's mask
    instead (no ramp): 50 prune-only iterations at p, then 50 joint ones. ``from_awq``: the caller
    passes a point already pruned and on the grid (Wanda then AWQ): 50 joint iterations only.
    ``max_iter`` scales these phases to that total (the same proportions).
    """
    kw = {"step_scale": 1.5, "tol": 0.0, **kw}
    spec = spec or QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, partial_groups=partial_groups)
    if from_awq:
        n = 50 if max_iter is None else max_iter
        schedule = sched_lib.joint(sparsity, spec, ramp=0, hold=0, joint_iters=n)
    elif init == "dense":
        n = 100 if max_iter is None else max_iter
        if n < 3:
            raise ValueError(f"the joint schedule from dense needs max_iter >= 3 (ramp, hold, joint), got {n}")
        schedule = sched_lib.joint(sparsity, spec, ramp=n // 4, hold=n // 4, joint_iters=n - 2 * (n // 4))
    else:
        n = 100 if max_iter is None else max_iter
        if n < 2:
            raise ValueError(f"the joint schedule needs max_iter >= 2 (hold, joint), got {n}")
        schedule = sched_lib.joint(sparsity, spec, ramp=0, hold=n // 2, joint_iters=n - n // 2)
    return PGDConfig(schedule=schedule, init=init, **kw)


def awp_nm_joint(n: int, m: int, spec: QuantSpec, *, max_iter: int = 100, **kw) -> PGDConfig:
    """N:M pruning + quantization (beyond the paper): from Wanda's N:M mask, ``max_iter`` iterations
    of quantize(N:M(Z)) at η = 1.5/||C||_F."""
    kw = {"step_scale": 1.5, "init": "wanda", "tol": 0.0, **kw}
    return PGDConfig(schedule=sched_lib.nm_joint(n, m, spec, iters=max_iter), **kw)


# --- results -----------------------------------------------------------------------------------


class PGDResult(NamedTuple):
    """What a solve returns (with a leading layer axis from :func:`solve_pgd_stack`).

    ``obj_*`` are values of f; ``obj_dense = tr(W C Wᵀ)`` = f(0) normalises them.
    ``grad_norm`` is ||(W − Θ) C||_F / ||W||_F of the returned Θ.
    """

    theta: jax.Array
    iterations: jax.Array  # updates performed
    best_iteration: jax.Array  # iterate returned (== iterations unless keep_best picked another)
    grad_norm: jax.Array
    obj_init: jax.Array
    obj_final: jax.Array
    obj_dense: jax.Array
    stop_reason: jax.Array  # int, see StopReason
    step_size: jax.Array
    trace_obj: jax.Array | None = None
    trace_grad: jax.Array | None = None
    # quantizing schedules: the pruned point the returned Θ's grid was fitted on (Θ = rtn(source)),
    # so quantizers.quantize(source) is Θ's codes and grid as the solver made them
    source: jax.Array | None = None


# --- pieces ---------------------------------------------------------------------------------

_TRACES: collections.Counter = collections.Counter()


def trace_count(name: str = "solve") -> int:
    """How many times the solver body was traced (compiled) in this process; for tests."""
    return _TRACES[name]


def objective(w: jax.Array, theta: jax.Array, c: jax.Array, precision="highest") -> jax.Array:
    """``tr((W − Θ) C (W − Θ)ᵀ)``."""
    d = w - theta
    return jnp.sum(d * jnp.matmul(d, c, precision=precision))


def ridge(c: jax.Array, delta) -> jax.Array:
    """``C + δ · mean(diag C) · I`` (``c [d, d]``): C damped by a multiple of its mean diagonal, the
    one form of damping that the ADMM solver, the error-correcting targets and ``--c-ridge`` share."""
    return c + delta * jnp.mean(jnp.diagonal(c)) * jnp.eye(c.shape[-1], dtype=c.dtype)


def lambda_max(c: jax.Array, iters: int = 50, precision="highest") -> jax.Array:
    """Largest eigenvalue of a PSD ``c`` by power iteration from the all-ones vector
    (Rayleigh quotient; a slight underestimate before convergence)."""
    v0 = jnp.ones((c.shape[-1],), c.dtype) / jnp.sqrt(c.shape[-1]).astype(c.dtype)

    def body(_, v):
        u = jnp.matmul(c, v, precision=precision)
        return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(c.dtype).tiny)

    v = jax.lax.fori_loop(0, iters, body, v0)
    return jnp.dot(v, jnp.matmul(c, v, precision=precision), precision=precision)


def step_size(c: jax.Array, config: PGDConfig) -> jax.Array:
    """η from the config's step rule."""
    if config.step_rule == "absolute":
        return jnp.asarray(config.step_scale, c.dtype)
    if config.step_rule == "frobenius":
        denom = jnp.linalg.norm(c)
    else:
        denom = lambda_max(c, config.power_iters, config.precision)
    return config.step_scale / jnp.maximum(denom, jnp.finfo(c.dtype).tiny)


def initial_point(w: jax.Array, c: jax.Array | None, config: PGDConfig, with_source: bool = False, keep=None, diag=None):
    """Θ0 for ``config.init``: the final phase's projection of W with a Wanda or magnitude mask,
    RTN, W itself, or zeros (``with_source``: and the point its grid was fitted on, as
    :func:`awp_jax.projections.project`). ``keep``: the schedule's keep table, when it is traced.
    ``diag``: C's diagonal, given instead of ``c`` (Wanda's scores need only that)."""
    s = config.schedule
    if config.init in ("dense", "zeros"):
        theta = w if config.init == "dense" else jnp.zeros_like(w)
        return (theta, theta) if with_source else theta
    final = s.final
    k = None if final.sparsity is None else (keep_count(final.sparsity, w.shape[-1]) if keep is None else keep[-1])
    if config.init != "wanda":
        score = magnitude_score(w)
    elif diag is not None:
        score = jnp.abs(w) * jnp.sqrt(jnp.maximum(diag, 0))[None, :]
    else:
        score = wanda_score(w, c)
    if config.scope == "layer":
        theta = _layer_project(w, k * w.shape[-2], score)
        return (theta, theta) if with_source else theta
    return project(w, k=k, nm=s.nm, quant=s.quant, quantize_now=final.quantize, score=score, with_source=with_source)


def _layer_project(z, k_total, score=None, hint=None):
    """Keep the ``k_total`` largest entries (by ``score``, default ``|z|``) of the whole matrix."""
    shape = z.shape
    flat = project(z.reshape(1, -1), k=k_total, score=None if score is None else score.reshape(1, -1),
                   hint=None if hint is None else hint.reshape(1, -1))
    return flat.reshape(shape)


def refit_support(w: jax.Array, c: jax.Array, theta: jax.Array, iters: int, precision="highest", ridge=0.0,
                  cmul=None) -> jax.Array:
    """Minimise ``tr((W − Θ) (C + ridge·I) (W − Θ)ᵀ)`` over Θ with ``theta``'s support, by ``iters``
    steps of conjugate gradients run independently on every row (one matmul per step). The ridge
    is added to the products, not to a copy of C (which would be a second [d_in, d_in] matrix).
    ``cmul``: ``x ↦ x C`` (a C split over devices, :meth:`Quadratic.cmul`); ``c`` then only sets the dtype."""
    dtype = _compute_dtype(jnp.asarray(w), jnp.asarray(c), jnp.asarray(theta))
    w, c, theta = (jnp.asarray(a).astype(dtype) for a in (w, c, theta))
    m = (theta != 0).astype(dtype)
    cmul = cmul or (lambda x: jnp.matmul(x, c, precision=precision))
    mul = lambda x: cmul(x) + jnp.asarray(ridge, dtype) * x
    r = mul(w - theta) * m
    rr = jnp.sum(r * r, axis=-1)

    def body(_, st):
        theta, r, p, rr = st
        q = mul(p) * m
        pq = jnp.sum(p * q, axis=-1)
        a = jnp.where(pq > 0, rr / jnp.where(pq > 0, pq, 1), 0)
        theta = theta + a[..., None] * p
        r = r - a[..., None] * q
        rr_n = jnp.sum(r * r, axis=-1)
        b = jnp.where(rr > 0, rr_n / jnp.where(rr > 0, rr, 1), 0)
        return theta, r, r + b[..., None] * p, rr_n

    theta, *_ = jax.lax.fori_loop(0, iters, body, (theta, r, r, rr))
    return theta


def _compute_dtype(*arrays):
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def _total(x, axis_name):
    """Sum of all entries; across the devices of ``axis_name`` too when the rows are sharded."""
    s = jnp.sum(x)
    return s if axis_name is None else jax.lax.psum(s, axis_name)


def _split_matmul(x, c_rows, axis_name: str, n: int, precision, out_dtype=None, sum_by: str = "all-to-all"):
    """``x C`` inside ``shard_map`` when the rows of both ``x [..., r, d]`` (a shard of a layer's
    rows) and C are split in ``n`` blocks over ``axis_name`` (this device holds C's block of rows
    ``c_rows [d/n, d]``). An all-to-all hands each device its column block of every row of ``x``
    (``[..., n·r, d/n]``), which it multiplies by its rows of C: partial products for every
    device's rows. C never moves; the traffic is two of ``x``'s size (the solver's row chunk). The
    partial products reach the devices whose rows they are in one of two ways (``sum_by``):

    * ``"all-to-all"``: a second all-to-all returns each device the partial products of its rows
      from every device (``[..., n, r, d]``), summed in device order. One matmul the size of the
      chunk, but each device holds two of the chunk's size (``n`` times its share).
    * ``"all-reduce"``: ``n`` steps; at step ``s`` every device multiplies its columns of device
      ``s``'s rows, the ``n`` products are summed by an all-reduce (in device order) and device
      ``s`` keeps the sum. ``n`` matmuls of ``1/n`` the size, and a device holds ``1/n`` of the
      chunk three times: what CPU devices sharing one host's memory need (on 8 fake devices the
      all-to-all's products were the peak of a streamed run).

    Not a reduce-scatter (``psum_scatter``), which sends the same bytes: XLA:CPU's through gloo
    (every CPU collective once ``jax.distributed`` is initialised) returns wrong values
    intermittently (jax issue 40830, seen with jax 0.10.2 on 2-process runs). Nor a ring of
    ``collective-permute`` steps passing a running sum on (this function's form before): with
    jax 0.10.2 on fake CPU devices, a solve loaded from JAX's persistent compilation cache returned
    wrong values in 18 of 80 calls (the ``fast`` recipe; freshly compiled: none in 150), where this
    form returned none in 90."""
    xt = jax.lax.all_to_all(x, axis_name, x.ndim - 1, x.ndim - 2, tiled=True)
    if sum_by == "all-to-all":
        part = jnp.matmul(xt, c_rows, precision=precision, preferred_element_type=out_dtype)
        lead, (rows, d) = part.shape[:-2], part.shape[-2:]
        blocks = part.reshape(*lead, n, rows // n, d)  # block j: the rows device j holds
        got = jax.lax.all_to_all(blocks, axis_name, len(lead), len(lead), tiled=True)  # [..., n (from device i), r, d]
        return jnp.sum(got, axis=len(lead))
    if sum_by != "all-reduce":
        raise ValueError(f"sum_by must be 'all-to-all' or 'all-reduce', got {sum_by!r}")
    r = xt.shape[-2] // n
    i = jax.lax.axis_index(axis_name)

    def step(s, acc):  # every device's columns of device s's rows times its rows of C, summed; device s keeps it
        rows = jax.lax.dynamic_slice_in_dim(xt, s * r, r, axis=-2)
        total = jax.lax.psum(jnp.matmul(rows, c_rows, precision=precision, preferred_element_type=out_dtype), axis_name)
        return jnp.where(i == s, total, acc)

    return jax.lax.fori_loop(0, n, step, jnp.zeros((*xt.shape[:-2], r, c_rows.shape[-1]), out_dtype or xt.dtype))


# --- the problem the solvers see ----------------------------------------------------------------


class Problem(NamedTuple):
    """One layer's data as every solver sees it (a pytree; built by :meth:`Quadratic.problem`)."""

    w: jax.Array  # [d_out, d_in] (a shard of the rows inside a sharded solve)
    c: jax.Array  # [d_in, d_in], or this device's block of its rows [d_in / n, d_in] (``Quadratic.c_split``)
    c_op: jax.Array  # the operand the iterations multiply by: C, or its bfloat16 copy
    eta: jax.Array  # step size
    wnorm: jax.Array  # ||W||_F (of the whole layer), the gradient norm's scale
    keep: jax.Array  # int32 [max_iter]: entries kept per row by update t (the schedule's table; traced, so
    # layers that differ only in sparsity share one compilation)


@dataclasses.dataclass(frozen=True)
class Quadratic:
    r"""The layer objective ``f(Θ) = tr((W − Θ) C (W − Θ)ᵀ)``: how its gradient ``(W − Θ) C``, its
    value and the relative gradient norm are computed. Static (hashable); the arrays live in a
    :class:`Problem`. With ``axis_name`` the rows of W are one shard of a layer split over that
    mesh axis (inside ``shard_map``): products stay row-local, only scalars are summed.
    ``c_split`` (> 1, with ``axis_name``): C's rows are split over that axis too, each device
    holding ``d_in / c_split`` of them; every product by C (:meth:`cmul`) then exchanges the rows
    being multiplied instead of C (:func:`_split_matmul`), and C's diagonal and step size are
    assembled from the blocks. Every access to C goes through this object."""

    precision: str = "highest"
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    axis_name: str | None = None
    c_split: int = 1
    sum_by: str = "all-to-all"  # how a split C's partial products are summed (see _split_matmul)

    def __post_init__(self):
        if self.c_split > 1 and self.axis_name is None:
            raise ValueError("c_split > 1 needs the mesh axis C's rows are split over (axis_name)")

    def total(self, x):
        return _total(x, self.axis_name)

    def cmul(self, p: Problem, x, exact=False):
        """``x C`` (``exact``: in float32 whatever the matmul dtype)."""
        low = not exact and self.matmul_dtype == "bfloat16"
        x, c, out = (x.astype(jnp.bfloat16), p.c_op, p.w.dtype) if low else (x, p.c, None)
        if self.c_split > 1:
            return _split_matmul(x, c, self.axis_name, self.c_split, self.precision, out, self.sum_by)
        return jnp.matmul(x, c, precision=self.precision, preferred_element_type=out)

    def _gather(self, v):  # this device's block of a [d_in] vector -> the whole vector
        return jax.lax.all_gather(v, self.axis_name, tiled=True)

    def diag(self, c):
        """C's diagonal ``[d_in]`` (from this device's block of rows when C is split)."""
        if self.c_split == 1:
            return jnp.diagonal(c)
        b = c.shape[0]
        own = jax.lax.dynamic_slice_in_dim(c, jax.lax.axis_index(self.axis_name) * b, b, axis=1)
        return self._gather(jnp.diagonal(own))

    def step_size(self, c, config: PGDConfig):
        """η from the config's step rule (:func:`step_size`), for a whole or a split C."""
        if self.c_split == 1 or config.step_rule == "absolute":
            return step_size(c, config)
        if config.step_rule == "frobenius":
            denom = jnp.sqrt(jax.lax.psum(jnp.sum(c * c), self.axis_name))
        else:  # power iteration: each device multiplies its rows, the vector is gathered (d_in floats)
            hp, b = config.precision, c.shape[0]
            v0 = jnp.ones((c.shape[-1],), c.dtype) / jnp.sqrt(c.shape[-1]).astype(c.dtype)

            def body(_, v):
                u = self._gather(jnp.matmul(c, v, precision=hp))
                return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(c.dtype).tiny)

            v = jax.lax.fori_loop(0, config.power_iters, body, v0)
            own = jax.lax.dynamic_slice_in_dim(v, jax.lax.axis_index(self.axis_name) * b, b)
            denom = jax.lax.psum(jnp.dot(own, jnp.matmul(c, v, precision=hp), precision=hp), self.axis_name)
        return config.step_scale / jnp.maximum(denom, jnp.finfo(c.dtype).tiny)

    def problem(self, w, c, config: PGDConfig, keep=None) -> Problem:
        dtype = _compute_dtype(w, c)
        w, c = w.astype(dtype), c.astype(dtype)
        c_op = c.astype(jnp.bfloat16) if self.matmul_dtype == "bfloat16" else c
        wnorm = jnp.maximum(jnp.sqrt(self.total(w * w)), jnp.finfo(dtype).tiny)
        keep = jnp.asarray(config.schedule.tables(w.shape[-1]).keep if keep is None else keep, jnp.int32)
        return Problem(w=w, c=c, c_op=c_op, eta=self.step_size(c, config), wnorm=wnorm, keep=keep)

    def grad(self, p: Problem, theta, exact=False):
        return self.cmul(p, p.w - theta, exact)

    def evaluate(self, p: Problem, theta, exact=False):
        """``((W − Θ) C, f(Θ), ||(W − Θ) C||_F / ||W||_F)``; ``exact``: in float32 whatever the matmul dtype."""
        g = self.grad(p, theta, exact)
        return g, self.total((p.w - theta) * g), jnp.sqrt(self.total(g * g)) / p.wnorm

    def dense_value(self, p: Problem):
        """``f(0) = tr(W C Wᵀ)``."""
        return self.total(p.w * self.cmul(p, p.w, exact=True))


# --- solvers: small immutable objects, one driver -----------------------------------------------


class State(NamedTuple):
    """A solver's loop state. ``aux`` belongs to the algorithm (``None`` for plain PGD)."""

    t: jax.Array  # accepted updates
    theta: jax.Array
    source: jax.Array | None  # quantizing schedules: the point Θ's grid was fitted on (see PGDResult)
    grad: jax.Array  # (W − Θ) C
    obj: jax.Array
    gnorm: jax.Array
    obj_init: jax.Array  # f(Θ0), exact
    best_theta: jax.Array
    best_source: jax.Array | None
    best_obj: jax.Array
    best_gnorm: jax.Array
    best_t: jax.Array
    reason: jax.Array  # StopReason
    aux: object


@dataclasses.dataclass(frozen=True)
class PGD:
    """Projected gradient descent, the paper's iteration ``Θ ← Proj_t(Θ + η (W − Θ) C)``, with the
    stopping test, keep-best and non-finite rejection of :class:`PGDConfig`.

    A solver is ``init`` / ``step`` / ``terminate`` / ``result``; :func:`run` drives any of them
    (``while_loop``) and :func:`run_path` records their iterates (``scan``). A variant overrides
    the three hooks ``init_aux``, ``point`` (where the gradient step lands before the projection)
    and ``next_aux``, and keeps its own state in ``State.aux``.
    """

    config: PGDConfig
    objective: Quadratic

    @property
    def max_steps(self) -> int:
        return self.config.max_iter

    def prepare(self, p: Problem):
        """The problem the loop iterates on (a solver may precompute loop invariants here)."""
        return p

    # -- hooks a variant overrides
    def init_aux(self, p: Problem, theta, grad):
        return None

    def point(self, p: Problem, st: State):
        return st.theta + p.eta * st.grad

    def next_aux(self, st: State, theta_n, grad_n, obj_n, ok):
        return None

    # -- projection
    def project(self, p: Problem, z, t, prev=None):
        """``(Θ, source)``: the schedule's projection at step ``t`` and, for quantizing schedules,
        the point its grid was fitted on. ``prev``'s support narrows the top-k search (exact either way)."""
        s, cfg = self.config.schedule, self.config
        tables = s.tables(p.w.shape[-1])
        k = p.keep[t] if s.prunes_rows else None
        hint = None if (prev is None or k is None) else prev != 0
        if cfg.scope == "layer":
            return _layer_project(z, k * p.w.shape[-2], hint=hint), None
        mode = s.quant_mode
        qnow = jnp.asarray(tables.quantize)[t] if mode == "some" else (mode == "always")
        theta, source = project(z, k=k, nm=s.nm, quant=s.quant, quantize_now=qnow, hint=hint, with_source=True)
        return theta, source if s.quant is not None else None

    # -- the protocol
    def init(self, p: Problem, theta0=None) -> State:
        cfg = self.config
        quantizes = cfg.schedule.quant is not None
        # An initial point made by the final projection (Wanda, magnitude, RTN) is feasible, so it
        # competes for "best" too: the solve never returns something worse than where it started.
        init_feasible = theta0 is None and cfg.init in ("wanda", "magnitude", "rtn")
        if theta0 is None:
            theta0, source0 = initial_point(p.w, None, cfg, with_source=True, keep=p.keep, diag=self.objective.diag(p.c))
        else:
            theta0 = source0 = theta0.astype(p.w.dtype)
        source0 = source0 if quantizes else None
        g0, obj0, gn0 = self.objective.evaluate(p, theta0)
        exact0 = obj0 if self.objective.matmul_dtype == "float32" else self.objective.evaluate(p, theta0, exact=True)[1]
        return State(
            t=jnp.zeros((), jnp.int32), theta=theta0, source=source0, grad=g0, obj=obj0, gnorm=gn0, obj_init=exact0,
            best_theta=theta0, best_source=source0,
            best_obj=obj0 if init_feasible and cfg.keep_best else jnp.asarray(jnp.inf, p.w.dtype),
            best_gnorm=gn0, best_t=jnp.zeros((), jnp.int32), reason=jnp.asarray(StopReason.RUNNING, jnp.int32),
            aux=self.init_aux(p, theta0, g0))

    def step(self, p: Problem, st: State) -> State:
        cfg = self.config
        first_stop = cfg.schedule.tables(p.w.shape[-1]).final_start + 1
        theta_n, source_n = self.project(p, self.point(p, st), st.t, st.theta)
        g_n, obj_n, gn_n = self.objective.evaluate(p, theta_n)
        ok = jnp.isfinite(obj_n) & jnp.isfinite(gn_n)
        t_n = st.t + 1
        better = ok & (t_n >= first_stop) & ((obj_n < st.best_obj) if cfg.keep_best else True)
        sel = lambda new, old: jnp.where(ok, new, old)
        pick = lambda new, old: jnp.where(better, new, old)
        reason = jnp.where(
            ~ok,
            StopReason.NONFINITE,
            jnp.where(
                (t_n >= first_stop) & (gn_n < cfg.tol),
                StopReason.CONVERGED,
                jnp.where(t_n >= cfg.max_iter, StopReason.MAX_ITER, StopReason.RUNNING),
            ),
        ).astype(jnp.int32)
        return State(
            t=jnp.where(ok, t_n, st.t), theta=sel(theta_n, st.theta),
            source=None if st.source is None else sel(source_n, st.source),
            grad=sel(g_n, st.grad), obj=sel(obj_n, st.obj), gnorm=sel(gn_n, st.gnorm), obj_init=st.obj_init,
            best_theta=pick(theta_n, st.best_theta),
            best_source=None if st.best_source is None else pick(source_n, st.best_source),
            best_obj=pick(obj_n, st.best_obj), best_gnorm=pick(gn_n, st.best_gnorm), best_t=pick(t_n, st.best_t),
            reason=reason, aux=self.next_aux(st, theta_n, g_n, obj_n, ok))

    def terminate(self, st: State):
        return st.reason != StopReason.RUNNING

    def result(self, p: Problem, st: State) -> PGDResult:
        # No final-phase iterate accepted (non-finite at once): fall back to the last finite iterate.
        have_best = jnp.isfinite(st.best_obj)
        return PGDResult(
            theta=jnp.where(have_best, st.best_theta, st.theta),
            iterations=st.t,
            best_iteration=jnp.where(have_best, st.best_t, st.t),
            grad_norm=jnp.where(have_best, st.best_gnorm, st.gnorm),
            obj_init=st.obj_init,
            obj_final=jnp.where(have_best, st.best_obj, st.obj),
            obj_dense=self.objective.dense_value(p),
            stop_reason=st.reason,
            step_size=p.eta,
            source=None if st.source is None else jnp.where(have_best, st.best_source, st.source),
        )


class _Momentum(NamedTuple):
    prev_theta: jax.Array  # Θ_{t−1}
    prev_grad: jax.Array  # its (W − Θ) C
    k: jax.Array  # iterations since the last restart


@dataclasses.dataclass(frozen=True)
class AcceleratedPGD(PGD):
    """PGD from the extrapolated point ``Y = Θ_t + β_k (Θ_t − Θ_{t−1})``, ``β_k = (k − 1)/(k + 2)``,
    ``k`` reset to 1 whenever the objective rises (function restart). ``(W − Y) C`` is a combination
    of the two last gradients, so an iteration still costs one matmul."""

    def init_aux(self, p, theta, grad):
        return _Momentum(prev_theta=theta, prev_grad=grad, k=jnp.ones((), jnp.int32))

    def point(self, p, st):
        m = st.aux
        beta = ((m.k - 1) / (m.k + 2)).astype(p.w.dtype)
        y = st.theta + beta * (st.theta - m.prev_theta)
        g_y = (1 + beta) * st.grad - beta * m.prev_grad  # (W − Y) C, by linearity
        return y + p.eta * g_y

    def next_aux(self, st, theta_n, grad_n, obj_n, ok):
        m = st.aux
        return _Momentum(prev_theta=jnp.where(ok, st.theta, m.prev_theta), prev_grad=jnp.where(ok, st.grad, m.prev_grad),
                         k=jnp.where(ok & (obj_n <= st.obj), m.k + 1, 1).astype(jnp.int32))


class _ADMMProblem(NamedTuple):
    base: Problem
    n: jax.Array  # sqrt(diag C_damped): the coordinates in which C has a unit diagonal
    wn: jax.Array  # W·n
    y: jax.Array  # (W·n) C_n: the right-hand side of the dense update
    q: jax.Array  # C_n = Q diag(lam) Qᵀ
    lam: jax.Array


class ADMMState(NamedTuple):
    t: jax.Array
    b: jax.Array  # the dense iterate (unit-diagonal coordinates)
    d: jax.Array  # its projection
    v: jax.Array  # the scaled dual
    rho: jax.Array
    supp: jax.Array  # d's support at the last ρ update
    d0: jax.Array  # the starting projection (a restart returns to it)
    raised: jax.Array  # ρ has been raised at least once
    obj_init: jax.Array
    reason: jax.Array


@dataclasses.dataclass(frozen=True)
class ADMM(PGD):
    """ALPS's operator splitting (Meng et al. 2024) on the layer objective: with C damped and scaled
    to a unit diagonal (``C_n``, ``W_n = W·n``), iterate ``B = (C_n + ρI)^{-1}(W_n C_n − V + ρD)``,
    ``D = Proj(B + V/ρ)``, ``V += ρ(B − D)``; every 3 iterations ρ grows by 1.3 / 1.2 / 1.1 as the
    support changes by more than 10 % / 0.5 % / at all of the kept count (shrinks 5× while it has
    never grown and the support is frozen: ρ was too large), up to 1e6; it stops when the support no
    longer changes, after 30 iterations below 0.03 %, or at ``max_iter``. ``C_n`` is diagonalised
    once, so each iteration costs two matmuls. The result is ``Proj(B)``; the CG refit stage (ALPS:
    10 iterations on the damped C) then fits the weights on its support."""

    update_every: int = 3
    switch_iter: int = 30

    def prepare(self, p: Problem):
        cd = ridge(p.c, self.config.admm_damping)
        n = jnp.sqrt(jnp.maximum(jnp.diagonal(cd), 0)) + 1e-8
        cn = cd / n[:, None] / n[None, :]
        lam, q = jnp.linalg.eigh(cn)
        wn = p.w * n[None, :]
        return _ADMMProblem(base=p, n=n, wn=wn, y=jnp.matmul(wn, cn, precision=self.objective.precision), q=q, lam=lam)

    def _proj(self, pa, z):
        return self.project(pa.base, z, self.config.max_iter - 1)[0]

    def init(self, pa, theta0=None) -> ADMMState:
        p = pa.base
        start = initial_point(p.w, p.c, self.config, keep=p.keep) if theta0 is None else theta0.astype(p.w.dtype)
        d = self._proj(pa, start * pa.n[None, :])  # unit-diagonal coordinates; the start's mask when it is feasible
        _, obj0, _ = self.objective.evaluate(p, start, exact=True)
        rho = jnp.asarray(self.config.admm_rho, p.w.dtype)
        return ADMMState(t=jnp.zeros((), jnp.int32), b=pa.wn, d=d, v=jnp.zeros_like(d), rho=rho, supp=d != 0, d0=d,
                         raised=jnp.asarray(False), obj_init=obj0, reason=jnp.asarray(StopReason.RUNNING, jnp.int32))

    def _solve(self, pa, rhs, rho):
        hp = self.objective.precision
        return jnp.matmul(jnp.matmul(rhs, pa.q, precision=hp) / (pa.lam + rho)[None, :], pa.q.T, precision=hp)

    def step(self, pa, st: ADMMState) -> ADMMState:
        b = self._solve(pa, pa.y - st.v + st.rho * st.d, st.rho)
        d = self._proj(pa, b + st.v / st.rho)
        v = st.v + st.rho * (b - d)
        t = st.t + 1
        supp = d != 0
        # counts over the whole layer (summed across the devices of a sharded solve: one ρ schedule)
        kept = jnp.maximum(self.objective.total(supp.astype(b.dtype)), 1)
        change = self.objective.total((supp != st.supp).astype(b.dtype))
        update = t % self.update_every == 0
        frac = change / kept
        moving = frac > 0.005  # ρ grows (by 1.3 above 10 %, 1.2 above 0.5 %) and is marked as raised
        small = ~moving & (change > 0.5)
        frozen = change <= 0.5
        # before ρ ever grew, a settling support means ρ was too large: shrink it (and, while the
        # support still moves a little, restart from W and the starting mask)
        factor = jnp.where(frac > 0.1, 1.3, jnp.where(moving, 1.2, jnp.where(st.raised, 1.1, 0.2)))
        restart = update & small & ~st.raised
        rho = jnp.where(update & ~(frozen & st.raised), jnp.minimum(st.rho * factor, 1e6), st.rho)
        raised = st.raised | (update & moving)
        done = update & ((frozen & st.raised) | ((t >= self.switch_iter) & (frac < 0.0003)))
        reason = jnp.where(done, StopReason.CONVERGED, jnp.where(t >= self.config.max_iter, StopReason.MAX_ITER,
                                                                   StopReason.RUNNING)).astype(jnp.int32)
        ok = self.objective.total(jnp.sum(~jnp.isfinite(b)).astype(b.dtype)) == 0
        reason = jnp.where(ok, reason, StopReason.NONFINITE).astype(jnp.int32)
        keep = lambda new, old: jnp.where(ok, new, old)
        return ADMMState(t=t, b=keep(jnp.where(restart, pa.wn, b), st.b), d=keep(jnp.where(restart, st.d0, d), st.d),
                         v=keep(jnp.where(restart, 0, v), st.v), rho=jnp.where(ok, rho, st.rho),
                         supp=jnp.where(update, supp, st.supp), d0=st.d0, raised=raised, obj_init=st.obj_init, reason=reason)

    def terminate(self, st: ADMMState):
        return st.reason != StopReason.RUNNING

    def result(self, pa, st: ADMMState) -> PGDResult:
        p = pa.base
        theta = self._proj(pa, st.b) / pa.n[None, :]
        _, obj, gn = self.objective.evaluate(p, theta, exact=True)
        return PGDResult(theta=theta, iterations=st.t, best_iteration=st.t, grad_norm=gn, obj_init=st.obj_init,
                         obj_final=obj, obj_dense=self.objective.dense_value(p), stop_reason=st.reason, step_size=st.rho)


def run(solver, p: Problem, theta0=None, *, trace: bool = False, sync_axes: tuple[str, ...] = ()) -> PGDResult:
    """Drive ``solver`` to its stop in a ``lax.while_loop``. ``trace``: also record the objective
    and relative gradient norm of every iterate (length ``max_steps + 1``, NaN after the stop).
    ``sync_axes``: named axes (mesh and ``vmap`` axes) across which every solve runs the same
    number of loop trips, until the last one stops, each frozen from its own stop on (same
    results): needed when the step holds a collective that every device must join on every trip
    (the products by a split C, :meth:`Quadratic.cmul`), since layers on different devices stop at
    different iterations."""
    p = solver.prepare(p)
    st = solver.init(p, theta0)
    if sync_axes:
        def advance(s):
            n = solver.step(p, s)
            done = solver.terminate(s)
            return jax.tree.map(lambda a, b: jnp.where(done, a, b), s, n)

        def running(s):
            return jax.lax.pmax((~solver.terminate(s)).astype(jnp.int32), sync_axes) > 0
    else:
        advance, running = (lambda s: solver.step(p, s)), (lambda s: ~solver.terminate(s))
    if not trace:
        st = jax.lax.while_loop(running, advance, st)
        return solver.result(p, st)
    nan = jnp.full((solver.max_steps + 1,), jnp.nan, st.obj.dtype)

    def body(carry):
        s, tr_obj, tr_grad = carry
        n = advance(s)
        moved = n.t > s.t
        return n, tr_obj.at[s.t + 1].set(jnp.where(moved, n.obj, jnp.nan)), tr_grad.at[s.t + 1].set(
            jnp.where(moved, n.gnorm, jnp.nan))

    st, tr_obj, tr_grad = jax.lax.while_loop(lambda c: running(c[0]), body,
                                             (st, nan.at[0].set(st.obj), nan.at[0].set(st.gnorm)))
    return solver.result(p, st)._replace(trace_obj=tr_obj, trace_grad=tr_grad)


def run_path(solver, p: Problem, theta0=None, steps: int | None = None):
    """Every iterate ``[steps + 1, ...]`` of ``solver`` (``scan``; no stopping test)."""
    p = solver.prepare(p)
    st = solver.init(p, theta0)

    def body(s, _):
        n = solver.step(p, s)
        return n, n.theta

    _, path = jax.lax.scan(body, st, None, length=solver.max_steps if steps is None else steps)
    return jnp.concatenate([st.theta[None], path], axis=0)


# --- post-processing stages: (objective, problem, result) -> result ---------------------------------


@dataclasses.dataclass(frozen=True)
class ExactFigures:
    """Recompute the returned point's objective and gradient norm in float32 (after a bfloat16 loop,
    whose own figures are estimates)."""

    def __call__(self, objective: Quadratic, p: Problem, res: PGDResult) -> PGDResult:
        _, obj, gn = objective.evaluate(p, res.theta, exact=True)
        return res._replace(obj_final=obj, grad_norm=gn)


@dataclasses.dataclass(frozen=True)
class CGRefit:
    """Conjugate gradients on the returned point's support (:func:`refit_support`), with C damped by
    ``damping·mean(diag C)·I``; taken only if it lowers the undamped objective."""

    iters: int
    damping: float = 0.0

    def __call__(self, objective: Quadratic, p: Problem, res: PGDResult) -> PGDResult:
        ridge = self.damping * jnp.mean(objective.diag(p.c)) if self.damping else 0.0
        refit = refit_support(p.w, p.c, res.theta, self.iters, objective.precision, ridge,
                              cmul=lambda x: objective.cmul(p, x, exact=True))
        _, obj_r, gn_r = objective.evaluate(p, refit, exact=True)
        take = jnp.isfinite(obj_r) & (obj_r < res.obj_final)
        return res._replace(theta=jnp.where(take, refit, res.theta), obj_final=jnp.where(take, obj_r, res.obj_final),
                            grad_norm=jnp.where(take, gn_r, res.grad_norm))


def make_solver(config: PGDConfig, axis_name: str | None = None, c_split: int = 1, sum_by: str = "all-to-all"):
    """The solver object, objective and post-processing stages a :class:`PGDConfig` describes.
    ``c_split``: C's rows are split over ``axis_name`` in that many blocks, ``sum_by``: how the
    products by a split C are summed (:func:`_split_matmul`)."""
    if config.scope == "layer" and axis_name is not None:
        raise ValueError("scope='layer' needs the whole matrix on one device; use scope='row' with a sharded solve")
    if config.algorithm == "admm" and c_split > 1:
        raise ValueError("algorithm='admm' diagonalises the whole C: it needs C whole on every device (c_split=1)")
    objective = Quadratic(precision=config.precision, matmul_dtype=config.matmul_dtype, axis_name=axis_name,
                          c_split=c_split, sum_by=sum_by)
    cls = ADMM if config.algorithm == "admm" else AcceleratedPGD if config.momentum else PGD
    solver = cls(config=config, objective=objective)
    stages = []
    if config.matmul_dtype != "float32":  # report float32 figures, not the loop's bf16 estimates
        stages.append(ExactFigures())
    if config.refit_iters:
        stages.append(CGRefit(config.refit_iters, config.refit_damping))
    return solver, tuple(stages)


def solve_traced(w, c, config: PGDConfig, theta0=None, axis_name: str | None = None, keep=None,
                 c_split: int = 1, sync_axes: tuple[str, ...] = (), sum_by: str = "all-to-all") -> PGDResult:
    """One layer's solve, un-jitted: for use inside the caller's own ``jit`` / ``vmap`` /
    ``shard_map`` (:func:`solve_pgd` is this, jitted and validated). ``axis_name``: the rows of
    ``w`` are one shard of the layer over that mesh axis. ``keep``: the schedule's keep table
    (default: ``config``'s, as a constant). ``c_split``: ``c`` is this device's block of C's rows,
    split over ``axis_name`` in that many blocks, ``sum_by``: how products by it are summed
    (:func:`_split_matmul`); ``sync_axes``: see :func:`run`."""
    _TRACES["solve"] += 1
    solver, stages = make_solver(config, axis_name, c_split, sum_by)
    p = solver.objective.problem(w, c, config, keep)
    res = run(solver, p, theta0, trace=config.trace, sync_axes=sync_axes)
    for stage in stages:
        res = stage(solver.objective, p, res)
    return res


def _path_traced(w, c, theta0, keep, config: PGDConfig):
    _TRACES["path"] += 1
    solver, _ = make_solver(config)
    p = solver.objective.problem(w, c, config, keep)
    return run_path(solver, p, theta0), p.eta


def _structural(config: PGDConfig) -> PGDConfig:
    """``config`` with its sparsities replaced by a placeholder: the jit cache key. The sparsities
    only enter through the keep table, passed as an argument (:func:`_keep_table`)."""
    s = config.schedule
    phases = tuple(dataclasses.replace(ph, sparsity=None if ph.sparsity is None else 0.5,
                                       ramp_from=None if ph.ramp_from is None else 0.0) for ph in s.phases)
    return dataclasses.replace(config, schedule=dataclasses.replace(s, phases=phases))


def _keep_table(config: PGDConfig, d_in: int):
    return jnp.asarray(config.schedule.tables(d_in).keep, jnp.int32)


_solve_jit = jax.jit(lambda w, c, theta0, keep, config: solve_traced(w, c, config, theta0, keep=keep),
                     static_argnames=("config",))
_path_jit = jax.jit(_path_traced, static_argnames=("config",))


@functools.partial(jax.jit, static_argnames=("config",))
def _solve_stack_jit(w, c, theta0, keep, config: PGDConfig):
    axes = (0, 0, None if theta0 is None else 0)
    return jax.vmap(lambda w, c, t0: solve_traced(w, c, config, t0, keep=keep), in_axes=axes)(w, c, theta0)



# --- validation (before any compilation) ------------------------------------------------------


def _check_array(name, x, ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if isinstance(x, jax.core.Tracer) or x.size == 0:  # under an outer jit: values unknown
        return
    # max |x| is NaN or Inf exactly when x holds one; a reduction with no temporary as large as x
    finite = _finite(x) if isinstance(x, jax.Array) else np.isfinite(np.max(x)) and np.isfinite(np.min(x))
    if not bool(finite):
        raise ValueError(f"{name} contains NaN or Inf")


@jax.jit
def _finite(x):
    return jnp.isfinite(jnp.max(jnp.abs(x)))


def _validate(w, c, theta0, config, stacked: bool):
    if not isinstance(config, PGDConfig):
        raise TypeError(f"config must be a PGDConfig, got {type(config).__name__}")
    nd = 3 if stacked else 2
    _check_array("W", w, nd)
    _check_array("C", c, nd)
    d_in = w.shape[-1]
    if c.shape[-2:] != (d_in, d_in):
        raise ValueError(f"C must be [d_in, d_in] = [{d_in}, {d_in}] to match W {tuple(w.shape)}, got {tuple(c.shape)}")
    if stacked and c.shape[0] != w.shape[0]:
        raise ValueError(f"W and C stacks disagree on the number of layers: {w.shape[0]} vs {c.shape[0]}")
    if theta0 is not None:
        _check_array("theta0", theta0, nd)
        if theta0.shape != w.shape:
            raise ValueError(f"theta0 must have W's shape {tuple(w.shape)}, got {tuple(theta0.shape)}")
    config.schedule.validate(d_in)


# --- row chunks: a large layer solved a slice of rows at a time ------------------------------------


def chunkable(config: PGDConfig) -> bool:
    """Whether ``config``'s solve separates over rows, so that row chunks can be solved one after
    another: row-scope PGD (every row's projection is its own; the objective is a sum over rows).
    A layer-scope projection ranks the whole matrix, ADMM's penalty schedule counts the whole
    layer's support, and a trace records the whole layer's objective: those solve whole layers."""
    return config.scope == "row" and config.algorithm == "pgd" and not config.trace


def row_chunks(d_out: int, row_bytes: int, max_bytes: int | None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` covering ``d_out`` rows, each at most ``max_bytes`` of
    float32 weights (``row_bytes`` per row, all lanes of a stack together); one range when the
    whole fits or ``max_bytes`` is ``None`` or 0; a range holds one row at least. Equal ranges when
    a count up to twice the fewest divides ``d_out`` (one compilation), else the last is shorter."""
    if not max_bytes or d_out * row_bytes <= max_bytes:
        return [(0, d_out)]
    n = -(-d_out // max(1, max_bytes // row_bytes))  # the fewest ranges of at most that many rows
    n = next((m for m in range(n, min(2 * n, d_out) + 1) if d_out % m == 0), n)
    size = -(-d_out // n)
    return [(r, min(r + size, d_out)) for r in range(0, d_out, size)]


def chunks_for(shape: tuple[int, ...], max_bytes: int | None) -> list[tuple[int, int]]:
    """:func:`row_chunks` for weights of ``shape`` (``[d_out, d_in]`` or ``[L, d_out, d_in]``: a
    chunk holds the same rows of every layer)."""
    return row_chunks(shape[-2], int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1] * 4, max_bytes)


def _solve_row_chunks(solve, w, theta0, chunks) -> PGDResult:
    """``solve(w_rows, theta0_rows)`` on each row range of ``chunks`` in turn (rows: axis -2 of
    ``w``, which may carry a leading layer axis), combined into one result on the host: Θ (and
    ``source``) by rows; the objectives summed (f is a sum over rows); ``grad_norm`` the whole
    layer's relative norm; ``iterations`` and ``best_iteration`` the largest of any chunk;
    ``stop_reason`` the most severe (non-finite, then max_iter, then converged). Each chunk stops,
    restarts its momentum and keeps its best iterate on its own figures."""
    parts, wn2, rows = [], [], {}
    for r0, r1 in chunks:
        wc = w[..., r0:r1, :]
        res = solve(wc, None if theta0 is None else theta0[..., r0:r1, :])
        if res.trace_obj is not None:
            raise ValueError("a traced solve records the whole layer's objective; it is not solved in row chunks")
        for f in ("theta", "source"):  # written into whole-layer host arrays as they come (no second copy)
            x = getattr(res, f)
            if x is not None:
                out = rows.setdefault(f, np.empty(w.shape, x.dtype))
                out[..., r0:r1, :] = np.asarray(x)
        parts.append(jax.device_get(res._replace(theta=None, source=None)))
        wn2.append(np.asarray(_sq_norm(wc), np.float64))  # on the device: no host copy of the rows
        del res, wc
    wn2 = np.stack(wn2)
    stack = lambda f: np.stack([np.asarray(getattr(p, f)) for p in parts])
    gn = np.sqrt(np.sum(np.square(stack("grad_norm").astype(np.float64)) * wn2, axis=0) / np.maximum(np.sum(wn2, axis=0), 1e-300))
    dtype = np.asarray(parts[0].obj_final).dtype
    return PGDResult(
        theta=rows["theta"], iterations=stack("iterations").max(0), best_iteration=stack("best_iteration").max(0),
        grad_norm=gn.astype(dtype), obj_init=stack("obj_init").sum(0, dtype=np.float64).astype(dtype),
        obj_final=stack("obj_final").sum(0, dtype=np.float64).astype(dtype),
        obj_dense=stack("obj_dense").sum(0, dtype=np.float64).astype(dtype), stop_reason=stack("stop_reason").max(0),
        step_size=parts[0].step_size, source=rows.get("source"))


@jax.jit
def _sq_norm(w):
    return jnp.sum(jnp.square(w), axis=(-2, -1))


def solve_in_row_chunks(solve, w, theta0, config: PGDConfig, max_chunk_bytes: int | None) -> PGDResult:
    """``solve(w, theta0)``, or, when ``w``'s float32 weights exceed ``max_chunk_bytes`` and
    ``config`` separates over rows (:func:`chunkable`), ``solve`` on each of :func:`row_chunks`'
    ranges in turn, combined on the host (:func:`_solve_row_chunks`)."""
    chunks = chunks_for(w.shape, max_chunk_bytes)
    if len(chunks) == 1 or not chunkable(config):
        return solve(w, theta0)
    return _solve_row_chunks(solve, w, theta0, chunks)


def solve_pgd(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None, *,
              max_chunk_bytes: int | None = None) -> PGDResult:
    """Compress one layer ``w [d_out, d_in]`` given ``c [d_in, d_in]``; see the module docstring.

    Inputs are validated (shapes, dtypes, finiteness, schedule vs d_in) before compilation.
    Computation is in float32 (float64 if an input is float64).

    ``max_chunk_bytes``: a layer whose float32 weights exceed it is solved in row chunks of at most
    that size, one after another (:func:`solve_in_row_chunks`), so the solver's
    buffers (about a dozen copies of the rows it solves) are a chunk's, not the layer's; the result
    then lives on the host. Only solves that separate over rows (:func:`chunkable`); others are
    solved whole. Each chunk is a solve of its own (its stopping test, momentum restarts and best
    iterate), so a chunked result equals the whole-layer one exactly only for a fixed number of
    plain iterations.
    """
    _validate(w, c, theta0, config, stacked=False)
    keep, cfg = _keep_table(config, w.shape[-1]), _structural(config)
    return solve_in_row_chunks(lambda wc, t0: _solve_jit(wc, c, t0, keep, config=cfg), w, theta0, config, max_chunk_bytes)


def solve_pgd_stack(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None, *,
                    max_chunk_bytes: int | None = None) -> PGDResult:
    """Solve a stack of equal-shape layers ``w [L, d_out, d_in]``, ``c [L, d_in, d_in]`` at once.

    Each lane equals :func:`solve_pgd` on that layer alone; lanes stop independently (a finished
    lane is frozen while the others run). ``max_chunk_bytes``: as :func:`solve_pgd`, for the
    float32 weights of all lanes together (every lane's same rows form a chunk).
    """
    _validate(w, c, theta0, config, stacked=True)
    keep, cfg = _keep_table(config, w.shape[-1]), _structural(config)
    return solve_in_row_chunks(lambda wc, t0: _solve_stack_jit(wc, c, t0, keep, config=cfg), w, theta0, config, max_chunk_bytes)


def pgd_path(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None):
    """All iterates ``[max_iter + 1, d_out, d_in]`` (no stopping test; plain or accelerated, as
    ``config.momentum`` says) and η — for analysis and plots on small layers."""
    _validate(w, c, theta0, config, stacked=False)
    return _path_jit(w, c, theta0, _keep_table(config, w.shape[-1]), config=_structural(config))
