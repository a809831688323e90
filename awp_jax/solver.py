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
    "StopReason",
    "PGDConfig",
    "PGDResult",
    "solve_pgd",
    "solve_pgd_stack",
    "pgd_path",
    "objective",
    "step_size",
    "lambda_max",
    "initial_point",
    "refit_support",
    "trace_count",
    "awp_pruning",
    "awp_nm",
    "awp_quantization",
    "awp_joint",
    "awp_nm_joint",
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


class _State(NamedTuple):
    t: jax.Array
    theta: jax.Array
    grad: jax.Array  # (W - Θ) C
    obj: jax.Array
    gnorm: jax.Array
    best_theta: jax.Array
    best_obj: jax.Array
    best_gnorm: jax.Array
    best_t: jax.Array
    reason: jax.Array
    trace_obj: jax.Array | None
    trace_grad: jax.Array | None
    prev_theta: jax.Array | None  # momentum only: Θ_{t−1} and its (W − Θ) C
    prev_grad: jax.Array | None
    k: jax.Array | None  # momentum only: iterations since the last restart
    source: jax.Array | None  # quantizing schedules: the point Θ's grid was fitted on (see PGDResult)
    best_source: jax.Array | None


# --- pieces ---------------------------------------------------------------------------------

_TRACES: collections.Counter = collections.Counter()


def trace_count(name: str = "solve") -> int:
    """How many times the solver body was traced (compiled) in this process; for tests."""
    return _TRACES[name]


def objective(w: jax.Array, theta: jax.Array, c: jax.Array, precision="highest") -> jax.Array:
    """``tr((W − Θ) C (W − Θ)ᵀ)``."""
    d = w - theta
    return jnp.sum(d * jnp.matmul(d, c, precision=precision))


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


def initial_point(w: jax.Array, c: jax.Array, config: PGDConfig, with_source: bool = False):
    """Θ0 for ``config.init``: the final phase's projection of W with a Wanda or magnitude mask,
    RTN, W itself, or zeros (``with_source``: and the point its grid was fitted on, as
    :func:`awp_jax.projections.project`)."""
    s = config.schedule
    if config.init in ("dense", "zeros"):
        theta = w if config.init == "dense" else jnp.zeros_like(w)
        return (theta, theta) if with_source else theta
    final = s.final
    k = None if final.sparsity is None else keep_count(final.sparsity, w.shape[-1])
    score = wanda_score(w, c) if config.init == "wanda" else magnitude_score(w)
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


def refit_support(w: jax.Array, c: jax.Array, theta: jax.Array, iters: int, precision="highest") -> jax.Array:
    """Minimise ``tr((W − Θ) C (W − Θ)ᵀ)`` over Θ with ``theta``'s support, by ``iters`` steps of
    conjugate gradients run independently on every row (one matmul per step)."""
    dtype = _compute_dtype(jnp.asarray(w), jnp.asarray(c), jnp.asarray(theta))
    w, c, theta = (jnp.asarray(a).astype(dtype) for a in (w, c, theta))
    m = (theta != 0).astype(dtype)
    r = jnp.matmul(w - theta, c, precision=precision) * m
    rr = jnp.sum(r * r, axis=-1)

    def body(_, st):
        theta, r, p, rr = st
        q = jnp.matmul(p, c, precision=precision) * m
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


def _solve_core(w, c, theta0, config: PGDConfig, with_path: bool = False, axis_name: str | None = None):
    """Un-jitted single-layer solve (traced once per shapes × config). With ``axis_name`` the rows
    of ``w`` are one shard of a layer split by rows over that mesh axis (inside ``shard_map``): the
    iteration is row-local; only the objective and norms (scalars) are summed across devices."""
    _TRACES["path" if with_path else "solve"] += 1
    s = config.schedule
    dtype = _compute_dtype(w, c)
    w = w.astype(dtype)
    c = c.astype(dtype)
    d_in = w.shape[-1]
    tables = s.tables(d_in)
    keep_tab = jnp.asarray(tables.keep)
    quant_tab = jnp.asarray(tables.quantize)
    first_stop = tables.final_start + 1
    T = config.max_iter
    prec = config.precision

    # An initial point made by the final projection (Wanda, magnitude, RTN) is feasible, so it
    # competes for "best" too: the solve never returns something worse than where it started.
    init_feasible = theta0 is None and config.init in ("wanda", "magnitude", "rtn")
    quantizes = s.quant is not None
    if theta0 is None:
        theta0, source0 = initial_point(w, c, config, with_source=True)
    else:
        theta0 = source0 = theta0.astype(dtype)
    source0 = source0 if quantizes else None
    eta = step_size(c, config)
    wnorm = jnp.maximum(jnp.sqrt(_total(w * w, axis_name)), jnp.finfo(dtype).tiny)

    if config.matmul_dtype == "bfloat16":
        c_lo = c.astype(jnp.bfloat16)

        def grad_of(d):
            return jnp.matmul(d.astype(jnp.bfloat16), c_lo, precision=prec, preferred_element_type=dtype)
    else:

        def grad_of(d):
            return jnp.matmul(d, c, precision=prec)

    def evaluate(theta, exact=False):
        d = w - theta
        g = jnp.matmul(d, c, precision=prec) if exact else grad_of(d)
        return g, _total(d * g, axis_name), jnp.sqrt(_total(g * g, axis_name)) / wnorm

    if config.scope == "layer" and axis_name is not None:
        raise ValueError("scope='layer' needs the whole matrix on one device; use scope='row' with a sharded solve")

    def proj_source(z, t, prev=None):
        """``(Θ, source)``: the projection and, for quantizing schedules, the point its grid was fitted on."""
        k = keep_tab[t] if s.prunes_rows else None
        # the previous iterate's support narrows the top-k search (exact either way)
        hint = None if (prev is None or k is None) else prev != 0
        if config.scope == "layer":
            return _layer_project(z, k * w.shape[-2], hint=hint), None
        mode = s.quant_mode
        qnow = quant_tab[t] if mode == "some" else (mode == "always")
        theta, source = project(z, k=k, nm=s.nm, quant=s.quant, quantize_now=qnow, hint=hint, with_source=True)
        return theta, source if quantizes else None

    def proj(z, t, prev=None):
        return proj_source(z, t, prev)[0]

    if with_path:
        if config.momentum:
            raise ValueError("pgd_path records plain PGD iterates; momentum=True is not supported there")

        def scan_body(theta, t):
            g, _, _ = evaluate(theta)
            nxt = proj(theta + eta * g, t)
            return nxt, nxt

        _, path = jax.lax.scan(scan_body, theta0, jnp.arange(T))
        return jnp.concatenate([theta0[None], path], axis=0), eta

    g0, obj0, gn0 = evaluate(theta0)
    nan_trace = jnp.full((T + 1,), jnp.nan, dtype)
    state = _State(
        t=jnp.zeros((), jnp.int32),
        theta=theta0,
        grad=g0,
        obj=obj0,
        gnorm=gn0,
        best_theta=theta0,
        best_obj=obj0 if init_feasible and config.keep_best else jnp.asarray(jnp.inf, dtype),
        best_gnorm=gn0,
        best_t=jnp.zeros((), jnp.int32),
        reason=jnp.asarray(StopReason.RUNNING, jnp.int32),
        trace_obj=nan_trace.at[0].set(obj0) if config.trace else None,
        trace_grad=nan_trace.at[0].set(gn0) if config.trace else None,
        prev_theta=theta0 if config.momentum else None,
        prev_grad=g0 if config.momentum else None,
        k=jnp.ones((), jnp.int32) if config.momentum else None,
        source=source0,
        best_source=source0,
    )

    def cond(st):
        return st.reason == StopReason.RUNNING

    def body(st):
        if config.momentum:
            beta = ((st.k - 1) / (st.k + 2)).astype(dtype)
            y = st.theta + beta * (st.theta - st.prev_theta)
            g_y = (1 + beta) * st.grad - beta * st.prev_grad  # (W − Y) C, by linearity
            theta_n, source_n = proj_source(y + eta * g_y, st.t, st.theta)
        else:
            theta_n, source_n = proj_source(st.theta + eta * st.grad, st.t, st.theta)
        g_n, obj_n, gn_n = evaluate(theta_n)
        ok = jnp.isfinite(obj_n) & jnp.isfinite(gn_n)
        t_n = st.t + 1
        candidate = ok & (t_n >= first_stop)
        better = candidate & ((obj_n < st.best_obj) if config.keep_best else True)
        sel = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
        reason = jnp.where(
            ~ok,
            StopReason.NONFINITE,
            jnp.where(
                (t_n >= first_stop) & (gn_n < config.tol),
                StopReason.CONVERGED,
                jnp.where(t_n >= T, StopReason.MAX_ITER, StopReason.RUNNING),
            ),
        ).astype(jnp.int32)
        return _State(
            t=jnp.where(ok, t_n, st.t),
            theta=sel(theta_n, st.theta),
            grad=sel(g_n, st.grad),
            obj=sel(obj_n, st.obj),
            gnorm=sel(gn_n, st.gnorm),
            best_theta=pick(theta_n, st.best_theta),
            best_obj=pick(obj_n, st.best_obj),
            best_gnorm=pick(gn_n, st.best_gnorm),
            best_t=pick(t_n, st.best_t),
            reason=reason,
            trace_obj=None if st.trace_obj is None else st.trace_obj.at[t_n].set(jnp.where(ok, obj_n, jnp.nan)),
            trace_grad=None if st.trace_grad is None else st.trace_grad.at[t_n].set(jnp.where(ok, gn_n, jnp.nan)),
            prev_theta=None if st.prev_theta is None else sel(st.theta, st.prev_theta),
            prev_grad=None if st.prev_grad is None else sel(st.grad, st.prev_grad),
            k=None if st.k is None else jnp.where(ok & (obj_n <= st.obj), st.k + 1, 1).astype(jnp.int32),
            source=None if st.source is None else sel(source_n, st.source),
            best_source=None if st.best_source is None else pick(source_n, st.best_source),
        )

    st = jax.lax.while_loop(cond, body, state)
    # No final-phase iterate accepted (non-finite at once): fall back to the last finite iterate.
    have_best = jnp.isfinite(st.best_obj)
    theta = jnp.where(have_best, st.best_theta, st.theta)
    source = None if st.source is None else jnp.where(have_best, st.best_source, st.source)
    obj_final = jnp.where(have_best, st.best_obj, st.obj)
    gnorm_final = jnp.where(have_best, st.best_gnorm, st.gnorm)
    if config.matmul_dtype != "float32":  # report float32 figures, not the loop's bf16 estimates
        _, obj_final, gnorm_final = evaluate(theta, exact=True)
        _, obj0, _ = evaluate(theta0, exact=True)
    if config.refit_iters:
        c_fit = c
        if config.refit_damping:
            c_fit = c + config.refit_damping * jnp.mean(jnp.diagonal(c)) * jnp.eye(c.shape[-1], dtype=dtype)
        refit = refit_support(w, c_fit, theta, config.refit_iters, prec)
        _, obj_r, gn_r = evaluate(refit, exact=True)
        take = jnp.isfinite(obj_r) & (obj_r < obj_final)
        theta = jnp.where(take, refit, theta)
        obj_final = jnp.where(take, obj_r, obj_final)
        gnorm_final = jnp.where(take, gn_r, gnorm_final)
    return PGDResult(
        theta=theta,
        iterations=st.t,
        best_iteration=jnp.where(have_best, st.best_t, st.t),
        grad_norm=gnorm_final,
        obj_init=obj0,
        obj_final=obj_final,
        obj_dense=_total(w * jnp.matmul(w, c, precision=prec), axis_name),
        stop_reason=st.reason,
        step_size=eta,
        trace_obj=st.trace_obj,
        trace_grad=st.trace_grad,
        source=source,
    )


_solve_jit = jax.jit(_solve_core, static_argnames=("config", "with_path"))


@functools.partial(jax.jit, static_argnames=("config",))
def _solve_stack_jit(w, c, theta0, config: PGDConfig):
    axes = (0, 0, None if theta0 is None else 0)
    return jax.vmap(lambda w, c, t0: _solve_core(w, c, t0, config), in_axes=axes)(w, c, theta0)


# --- validation (before any compilation) ------------------------------------------------------


def _check_array(name, x, ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    try:
        values = np.asarray(x)
    except jax.errors.TracerArrayConversionError:  # called under an outer jit: values unknown
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or Inf")


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


def solve_pgd(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None) -> PGDResult:
    """Compress one layer ``w [d_out, d_in]`` given ``c [d_in, d_in]``; see the module docstring.

    Inputs are validated (shapes, dtypes, finiteness, schedule vs d_in) before compilation.
    Computation is in float32 (float64 if an input is float64).
    """
    _validate(w, c, theta0, config, stacked=False)
    return _solve_jit(w, c, theta0, config=config)


def solve_pgd_stack(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None) -> PGDResult:
    """Solve a stack of equal-shape layers ``w [L, d_out, d_in]``, ``c [L, d_in, d_in]`` at once.

    Each lane equals :func:`solve_pgd` on that layer alone; lanes stop independently (a finished
    lane is frozen while the others run).
    """
    _validate(w, c, theta0, config, stacked=True)
    return _solve_stack_jit(w, c, theta0, config=config)


def pgd_path(w: jax.Array, c: jax.Array, config: PGDConfig, theta0: jax.Array | None = None):
    """All iterates ``[max_iter + 1, d_out, d_in]`` (no stopping test) and η — for analysis and
    plots on small layers."""
    _validate(w, c, theta0, config, stacked=False)
    return _solve_jit(w, c, theta0, config=config, with_path=True)
