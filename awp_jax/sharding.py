"""The solver on a device mesh: one place that decides where W, Θ and C live.

Placement (:func:`placements`): a mesh with axes ``("stack", "model")``.

* W and Θ of a stack of equal-shape layers ``[L, d_out, d_in]``: layers across ``"stack"``, rows
  across ``"model"`` — ``P("stack", "model", None)``.
* C ``[L, d_in, d_in]``: layers across ``"stack"``, replicated across ``"model"``.

Every PGD step is row-local: ``(W − Θ) C`` needs the full C and only the local rows; the row
top-k, N:M and group quantizers act within rows (groups run along ``d_in``). The body runs inside
``jax.shard_map``, so no gather of W or Θ is ever inserted; the only communication is the
``psum`` of a few scalars per iteration (objective and squared gradient norm, for the stopping
test and keep-best) — checked from the compiled HLO in the tests.

``d_out`` not divisible by the model axis and ``L`` not divisible by the stack axis are padded
(zero rows have zero gradient and stay zero; padded layers are zero and stop at once), and the
padding is removed from the results. Layers of different shapes are grouped by shape
(:func:`solve_layers`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from awp_jax import solver as solver_lib

__all__ = ["make_mesh", "placements", "solve_sharded", "solve_layers"]


def make_mesh(model: int | None = None, stack: int = 1, *, devices=None, explicit: bool = False) -> Mesh:
    """A ``("stack", "model")`` mesh over ``devices`` (default: all); ``model`` defaults to
    ``len(devices) // stack``. ``explicit``: Explicit axis types (jax's newer default) instead of Auto."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // stack if model is None else model
    if model < 1 or stack < 1 or model * stack != len(devices):
        raise ValueError(f"mesh {stack} (stack) x {model} (model) does not match {len(devices)} devices")
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((stack, model), ("stack", "model"), axis_types=(kind, kind), devices=devices)


@dataclasses.dataclass(frozen=True)
class Placements:
    weights: NamedSharding  # W and Θ stacks [L, d_out, d_in]
    stats: NamedSharding  # C stacks [L, d_in, d_in]
    per_layer: NamedSharding  # per-layer scalars [L]


def placements(mesh: Mesh) -> Placements:
    return Placements(NamedSharding(mesh, P("stack", "model", None)), NamedSharding(mesh, P("stack", None, None)),
                      NamedSharding(mesh, P("stack")))


def _pad_to(x, axis, multiple):
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _sharded_fn(config: solver_lib.PGDConfig, mesh: Mesh):
    def local(w, c):  # [l, r, d_in], [l, d_in, d_in] on one device
        return jax.vmap(lambda wi, ci: solver_lib._solve_core(wi, ci, None, config, axis_name="model"))(w, c)

    per = P("stack")
    out_specs = solver_lib.PGDResult(
        theta=P("stack", "model", None), iterations=per, best_iteration=per, grad_norm=per, obj_init=per,
        obj_final=per, obj_dense=per, stop_reason=per, step_size=per,
        trace_obj=P("stack", None) if config.trace else None, trace_grad=P("stack", None) if config.trace else None,
        source=P("stack", "model", None) if config.schedule.quant is not None else None)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("stack", "model", None), P("stack", None, None)),
                                 out_specs=out_specs, check_vma=False))


@functools.lru_cache(maxsize=64)
def sharded_solver(config: solver_lib.PGDConfig, mesh: Mesh):
    """The jitted sharded solve for ``config`` on ``mesh`` (cached), taking padded, placed stacks."""
    return _sharded_fn(config, mesh)


def solve_sharded(w, c, config: solver_lib.PGDConfig, mesh: Mesh) -> solver_lib.PGDResult:
    """:func:`awp_jax.solver.solve_pgd_stack` on ``mesh``: ``w [L, d_out, d_in]``, ``c [L, d_in, d_in]``.
    Results equal the unsharded solve's up to the order of floating-point sums (tested)."""
    w, c = jnp.asarray(w), jnp.asarray(c)
    if w.ndim != 3 or c.ndim != 3 or c.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"expected w [L, d_out, d_in] and c [L, d_in, d_in], got {w.shape} and {c.shape}")
    solver_lib._validate(w, c, None, config, stacked=True)
    if config.scope == "layer":
        raise ValueError("scope='layer' needs the whole matrix on one device; use scope='row' with a sharded solve")
    n_layers, d_out = w.shape[0], w.shape[1]
    n_stack, n_model = mesh.shape["stack"], mesh.shape["model"]
    wp = _pad_to(_pad_to(w, 1, n_model), 0, n_stack)
    cp = _pad_to(c, 0, n_stack)
    if cp.shape[0] > n_layers:  # padded layers: C = I (finite step size), W = 0
        cp = cp.at[n_layers:].set(jnp.eye(c.shape[-1], dtype=c.dtype))
    pl = placements(mesh)
    wp = jax.device_put(wp, pl.weights)
    cp = jax.device_put(cp, pl.stats)
    res = sharded_solver(config, mesh)(wp, cp)
    if wp.shape[:2] == (n_layers, d_out):
        return res
    # padding to drop: gather to a replicated layout first (slicing a sharded dimension is
    # ambiguous under Explicit sharding)
    rep = NamedSharding(mesh, P())
    res = jax.tree.map(lambda x: jax.sharding.reshard(x, rep), res)
    res = jax.tree.map(lambda x: x[:n_layers], res)._replace(theta=res.theta[:n_layers, :d_out])
    return res if res.source is None else res._replace(source=res.source[:, :d_out])


def solve_layers(layers: Sequence[tuple], config: solver_lib.PGDConfig, mesh: Mesh) -> list[solver_lib.PGDResult]:
    """Solve layers of any shapes: grouped by shape into stacks, each stack sharded on ``mesh``.
    Returns one (unstacked) result per input ``(w, c)``, in order."""
    groups: dict = {}
    for i, (w, c) in enumerate(layers):
        groups.setdefault((tuple(np.shape(w)), tuple(np.shape(c))), []).append(i)
    out: list = [None] * len(layers)
    for idx in groups.values():
        res = solve_sharded(jnp.stack([jnp.asarray(layers[i][0]) for i in idx]), jnp.stack([jnp.asarray(layers[i][1]) for i in idx]), config, mesh)
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda x: x[j], res)
    return out
