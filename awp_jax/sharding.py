"""The solver on a device mesh: one place that decides where W, Θ and C live.

Placement (:func:`placements`): a mesh with axes ``("stack", "model")``.

* W and Θ of a stack of equal-shape layers ``[L, d_out, d_in]``: layers across ``"stack"``, rows
  across ``"model"`` — ``P("stack", "model", None)``.
* C ``[L, d_in, d_in]``: layers across ``"stack"``, rows across ``"model"`` —
  ``P("stack", "model", None)``, as the calibration forward leaves it (:meth:`ForwardLayout.gram`),
  so no device holds a whole C. Replicated across ``"model"`` instead when the model axis does not
  divide ``d_in``, and for ADMM (it diagonalises the whole C); ``split_c=False`` asks for that.

Every PGD step is row-local in W and Θ: the row top-k, N:M and group quantizers act within rows
(groups run along ``d_in``). ``(W − Θ) C`` needs all of C for each row: with C replicated that is
local; with C split, C never moves — an ``all-to-all`` gives each device its column block of every
row of ``W − Θ`` (the solver's row chunk), it multiplies that by its rows of C, and the partial
products reach the devices whose rows they are: on accelerators a second ``all-to-all`` returns
them all at once, summed in device order; on CPU devices, which share the host's memory
(:func:`shares_memory`), one ``all-reduce`` per device's rows, kept by that device, so a device
never holds more than ``1/n`` of the chunk's products (:func:`awp_jax.solver._split_matmul`; not a
``reduce-scatter``, which XLA:CPU gets wrong across processes); C's diagonal and the power
iteration's vector are gathered (``d_in`` floats). The body runs inside ``jax.shard_map``, so no gather of W or Θ is ever inserted;
besides those, the only communication is the ``psum`` of a few scalars per iteration (objective
and squared gradient norm, for the stopping test and keep-best) — checked from the compiled HLO
in the tests. A split C's collectives are joined by every device on every trip, so all solves on
the mesh loop until the last one stops, each frozen from its own stop (:func:`awp_jax.solver.run`).

``d_out`` not divisible by the model axis and ``L`` not divisible by the stack axis are padded
(zero rows have zero gradient and stay zero; padded layers are zero and stop at once), and the
padding is removed from the results. Layers of different shapes are grouped by shape
(:func:`solve_layers`).

The calibration forward (:class:`ForwardLayout`) uses the same mesh: a block's parameters are laid
out by one rules table, :data:`FORWARD_RULES` (Megatron's tensor parallelism over ``"model"``:
q/k/v/gate/up split by output rows, o/down by input columns), and the calibration windows are split
by batch over ``"stack"``; between blocks the hidden states are also split by position over
``"model"`` (:meth:`ForwardLayout.hidden`), and every statistic is split by rows over ``"model"``
(:meth:`ForwardLayout.gram`), so no device holds a whole statistic or the whole calibration
activations. The compiled statistics pass holds: an all-gather of the block's input positions, an
all-reduce of the block's output after o_proj and down_proj (row-parallel), a ring of
collective-permutes passing o_proj's and down_proj's input slices around the model axis (their
features are split; each device needs them all for its rows of C, one slice at a time), and an
all-reduce of every statistic's partial sums over ``"stack"`` (the batch). Parameters are never
gathered (tested from the compiled HLO).

SparseGPT and GPTQ (:func:`rows_on_mesh`): the rows of W are independent once ``H⁻¹`` is known,
so W's rows are split over all devices and C replicated (each device factorises it); SparseGPT's
unstructured mask, whose threshold is taken over a whole 128-column block of every row, gathers
only those scores.
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
from awp_jax.calibration import gram as _gram

__all__ = ["make_mesh", "parse_mesh", "placements", "solve_sharded", "solve_layers", "FORWARD_RULES", "ForwardLayout",
           "rows_on_mesh"]


def make_mesh(model: int | None = None, stack: int = 1, *, devices=None, explicit: bool = False) -> Mesh:
    """A ``("stack", "model")`` mesh over ``devices`` (default: all); ``model`` defaults to
    ``len(devices) // stack``. ``explicit``: Explicit axis types (jax's newer default) instead of Auto."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // stack if model is None else model
    if model < 1 or stack < 1 or model * stack != len(devices):
        raise ValueError(f"mesh {stack} (stack) x {model} (model) does not match {len(devices)} devices")
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((stack, model), ("stack", "model"), axis_types=(kind, kind), devices=devices)


def parse_mesh(text: str, devices=None) -> Mesh | None:
    """``--mesh``: ``"model=M,stack=S"`` (either may be left out: the other axis takes the rest of
    the devices), ``"auto"`` (all devices on ``"model"``; ``None`` when there is one device) or
    ``"none"`` (``None``: one device). A mesh that does not match the devices is an error naming both."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return make_mesh(devices=devices) if n > 1 else None
    axes = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ("model", "stack") or key in axes:
            raise ValueError(f"--mesh must look like model=M,stack=S (or auto, none), got {text!r}")
        try:
            axes[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: {key} must be a whole number, got {value.strip()!r}") from None
        if axes[key] < 1:
            raise ValueError(f"--mesh: {key} must be at least 1, got {axes[key]}")
    for given, other in (("stack", "model"), ("model", "stack")):
        if other not in axes:
            if n % axes[given]:
                raise ValueError(f"--mesh {given}={axes[given]} does not divide the {n} {devices[0].platform} devices")
            axes[other] = n // axes[given]
    stack = axes["stack"]
    if axes["model"] * stack != n:
        raise ValueError(f"--mesh {stack} (stack) x {axes['model']} (model) = {axes['model'] * stack} devices, but there are {n} "
                         f"({devices[0].platform}); the product must equal the device count")
    return make_mesh(axes["model"], stack, devices=devices)


@dataclasses.dataclass(frozen=True)
class Placements:
    weights: NamedSharding  # W and Θ stacks [L, d_out, d_in]
    stats: NamedSharding  # C stacks [L, d_in, d_in], replicated over "model"
    per_layer: NamedSharding  # per-layer scalars [L]
    stats_split: NamedSharding  # C stacks with their rows split over "model"


def placements(mesh: Mesh) -> Placements:
    return Placements(NamedSharding(mesh, P("stack", "model", None)), NamedSharding(mesh, P("stack", None, None)),
                      NamedSharding(mesh, P("stack")), NamedSharding(mesh, P("stack", "model", None)))


def splits_c(config: solver_lib.PGDConfig, mesh: Mesh, d_in: int) -> bool:
    """Whether a sharded solve splits C's rows over ``"model"``: when that axis divides ``d_in``,
    except for ADMM (which diagonalises the whole C)."""
    n = mesh.shape["model"]
    return n > 1 and d_in % n == 0 and config.algorithm != "admm"


def _pad_to(x, axis, multiple):
    """``x`` padded with zeros along ``axis`` to a multiple; on the host when ``x`` is there (placed
    from the host, a stack never lies whole on one device first)."""
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def shares_memory(mesh: Mesh) -> bool:
    """Whether ``mesh``'s devices draw on one memory: CPU devices (fake ones, or a process's own)
    hold their buffers in the host's memory, so what each device holds adds up there. A sharded
    solve then sums a split C's products by one all-reduce per device's rows (1/n of the memory,
    n smaller matmuls; :func:`awp_jax.solver._split_matmul`); accelerators, each with its own
    memory, take the all-to-all's one large matmul."""
    return all(d.platform == "cpu" for d in mesh.devices.flat)


@functools.lru_cache(maxsize=64)
def _sharded_fn(config: solver_lib.PGDConfig, mesh: Mesh, split_c: bool, sum_by: str):
    n_split = mesh.shape["model"] if split_c else 1
    # a split C's products are collectives every device joins on every trip: all solves on the
    # mesh (the layers of this device and of the other stack groups) run as many trips as the longest
    sync = ("layers", "stack", "model") if split_c else ()

    def local(w, c):  # [l, r, d_in], [l, d_in (/ n_model), d_in] on one device
        return jax.vmap(lambda wi, ci: solver_lib.solve_traced(wi, ci, config, axis_name="model", c_split=n_split,
                                                                sync_axes=sync, sum_by=sum_by), axis_name="layers")(w, c)

    per = P("stack")
    out_specs = solver_lib.PGDResult(
        theta=P("stack", "model", None), iterations=per, best_iteration=per, grad_norm=per, obj_init=per,
        obj_final=per, obj_dense=per, stop_reason=per, step_size=per,
        trace_obj=P("stack", None) if config.trace else None, trace_grad=P("stack", None) if config.trace else None,
        source=P("stack", "model", None) if config.schedule.quant is not None else None)
    c_spec = P("stack", "model", None) if split_c else P("stack", None, None)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("stack", "model", None), c_spec),
                                 out_specs=out_specs, check_vma=False))


def sharded_solver(config: solver_lib.PGDConfig, mesh: Mesh, split_c: bool = False, sum_by: str | None = None):
    """The jitted sharded solve for ``config`` on ``mesh`` (cached), taking padded, placed stacks;
    ``split_c``: C placed with its rows split over ``"model"`` (:func:`splits_c`); ``sum_by``: how
    its products are summed, ``"all-to-all"`` or ``"all-reduce"`` (:func:`awp_jax.solver._split_matmul`;
    default: ``"all-reduce"`` where the devices share one memory, :func:`shares_memory`; resolved
    before the cache, so the default and its explicit value share one compilation)."""
    if split_c and not splits_c(config, mesh, mesh.shape["model"]):
        raise ValueError(f"C cannot be split over the model axis for algorithm={config.algorithm!r} on mesh {dict(mesh.shape)}")
    if sum_by is None:
        sum_by = "all-reduce" if shares_memory(mesh) else "all-to-all"
    elif sum_by not in ("all-to-all", "all-reduce"):
        raise ValueError(f"sum_by must be 'all-to-all' or 'all-reduce', got {sum_by!r}")
    return _sharded_fn(config, mesh, split_c, sum_by)


def solve_sharded(w, c, config: solver_lib.PGDConfig, mesh: Mesh, *, max_chunk_bytes: int | None = None,
                  split_c: bool | None = None, sum_by: str | None = None) -> solver_lib.PGDResult:
    """:func:`awp_jax.solver.solve_pgd_stack` on ``mesh``: ``w [L, d_out, d_in]``, ``c [L, d_in, d_in]``.
    Results equal the unsharded solve's up to the order of floating-point sums (tested).
    ``max_chunk_bytes``: the same row chunks as the unsharded solve, each chunk sharded in turn.
    ``split_c``: C's rows split over ``"model"`` (default: where :func:`splits_c` allows), else
    replicated there; ``sum_by``: how its products are summed (:func:`sharded_solver`)."""
    w, c = (x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x) for x in (w, c))
    if w.ndim != 3 or c.ndim != 3 or c.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"expected w [L, d_out, d_in] and c [L, d_in, d_in], got {w.shape} and {c.shape}")
    solver_lib._validate(w, c, None, config, stacked=True)
    if config.scope == "layer":
        raise ValueError("scope='layer' needs the whole matrix on one device; use scope='row' with a sharded solve")
    n_layers = w.shape[0]
    cp = _pad_to(c, 0, mesh.shape["stack"])
    if cp.shape[0] > n_layers:  # padded layers: C = I (finite step size), W = 0
        eye = np.eye(c.shape[-1], dtype=c.dtype)
        cp = cp.at[n_layers:].set(eye) if isinstance(cp, jax.Array) else np.concatenate(
            [c, np.broadcast_to(eye, (cp.shape[0] - n_layers,) + eye.shape)])
    possible = splits_c(config, mesh, c.shape[-1])
    if split_c and not possible:
        raise ValueError(f"split_c=True: C [{c.shape[-1]}, {c.shape[-1]}] cannot be split over a model axis of "
                         f"{mesh.shape['model']} for algorithm={config.algorithm!r}")
    split_c = possible if split_c is None else split_c
    pl = placements(mesh)
    cp = jax.device_put(cp, pl.stats_split if split_c else pl.stats)  # placed once, whatever the number of row chunks
    return solver_lib.solve_in_row_chunks(lambda wc, _: _solve_sharded(wc, cp, config, mesh, split_c, sum_by), w, None, config,
                                          max_chunk_bytes)


def _solve_sharded(w, cp, config, mesh, split_c=False, sum_by=None):
    """One row range ``w`` of the layers against their C already placed on ``mesh`` (``cp``)."""
    n_layers, d_out = w.shape[0], w.shape[1]
    n_stack, n_model = mesh.shape["stack"], mesh.shape["model"]
    wp = jax.device_put(_pad_to(_pad_to(w, 1, n_model), 0, n_stack), placements(mesh).weights)
    res = sharded_solver(config, mesh, split_c, sum_by)(wp, cp)
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


# --------------------------------------------------------------------------- the calibration forward

# how a block's parameters lie on the ("stack", "model") mesh during the calibration forward:
# (linear layers named, layout) -- "column": output rows split over "model" (the layer's output is
# split by heads / hidden units); "row": input columns split (its output is a partial sum). A
# parameter no rule names (norms, routers) is replicated.
FORWARD_RULES = (
    (("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3"), "column"),
    (("o_proj", "down_proj", "w2"), "row"),
)


def forward_spec(path: tuple, shape: tuple[int, ...], n_model: int) -> P:
    """The partition of one block parameter (its nnx state ``path``) under :data:`FORWARD_RULES`; a
    dimension the model axis does not divide stays whole (see :class:`ForwardLayout`)."""
    names = [str(k) for k in path]
    layout = next((lay for layer, lay in FORWARD_RULES if any(n in layer for n in names)), None)
    if layout is None or names[-1] not in ("weight", "bias") or not shape:
        return P()
    if names[-1] == "bias":
        axis = len(shape) - 1 if layout == "column" else None
    else:  # weights [..., out, in] (experts stacked in front)
        axis = len(shape) - 2 if layout == "column" else len(shape) - 1
    if axis is None or shape[axis] % n_model:
        return P()
    return P(*([None] * axis), "model")


class ForwardLayout:
    """Where the calibration forward's inputs lie on ``mesh``: block parameters by
    :data:`FORWARD_RULES`, token batches split by batch over ``"stack"`` (a batch the axis does not
    divide, e.g. the last, is replicated), hidden states between blocks also by position over
    ``"model"`` (:meth:`hidden`), statistics by rows (:meth:`gram`), the rest replicated. A parameter whose
    split dimension the model axis does not divide is replicated and listed in ``replicated``."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.replicated: set[str] = set()

    def _put(self, x, spec):
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def block(self, state):
        n_model = self.mesh.shape["model"]

        def put(path, x):
            spec = forward_spec(path, x.shape, n_model)
            if spec == P() and forward_spec(path, (n_model,) * x.ndim, n_model) != P():
                self.replicated.add("/".join(map(str, path)))
            return self._put(x, spec)

        def names(path):  # nnx state paths end in the variable's ``value``
            keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
            return keys[:-1] if keys and keys[-1] == "value" else keys

        return jax.tree_util.tree_map_with_path(lambda p, x: put(names(p), x), state)

    def __eq__(self, other):  # compiled forwards are cached per layout: the mesh decides everything
        return type(other) is type(self) and other.mesh == self.mesh

    def __hash__(self):
        return hash((type(self), self.mesh))

    def batch(self, x):
        axis = self._batch_axis(x.shape[0])
        return self._put(x, P() if axis is None else P(axis))

    def _batch_axis(self, n: int):
        return "stack" if n % self.mesh.shape["stack"] == 0 else None

    def _hidden_spec(self, shape) -> P:
        seq = "model" if len(shape) == 3 and shape[1] % self.mesh.shape["model"] == 0 else None
        return P(self._batch_axis(shape[0]), seq)

    def hidden(self, x):
        """Hidden states ``[B, L, D]`` kept between blocks: split by batch over ``"stack"`` and by
        position over ``"model"`` (a dimension an axis does not divide stays whole), so the
        calibration activations held for the whole run are spread over every device, not copied
        to each device of a model group. A block gathers its input's positions (:meth:`enter`)
        and splits its output again (:meth:`leave`)."""
        return self._put(x, self._hidden_spec(x.shape))

    def enter(self, x):
        """Inside a jitted block: its input whole on every device of a model group (the
        column-parallel layers and the statistics read every position)."""
        axis = self._batch_axis(x.shape[0])
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P() if axis is None else P(axis)))

    def leave(self, y):
        """Inside a jitted block: its output, computed whole on every device of a model group, then
        laid out as :meth:`hidden` keeps it (each device keeps its positions: no communication). Left
        to propagate back into the block, the split made the partitioner gather the residual
        stream a second time, between attention and MLP."""
        return jax.lax.with_sharding_constraint(self.enter(y), NamedSharding(self.mesh, self._hidden_spec(y.shape)))

    @staticmethod
    def split_inputs(linears) -> frozenset[str]:
        """The statistics (of a block's ``LINEARS``: layer → statistic) whose inputs this layout
        splits by feature over ``"model"``: those read by row-parallel layers only."""
        layout = {layer: lay for layers, lay in FORWARD_RULES for layer in layers}
        readers: dict = {}
        for layer, stat in linears.items():
            readers.setdefault(stat, []).append(layout.get(layer))
        return frozenset(s for s, lays in readers.items() if all(lay == "row" for lay in lays))

    def gram(self, a, b=None, *, split: bool):
        """``Σ aᵀ b`` over every axis but the last (``[B, ..., d]`` → ``[d, d]``, ``b`` defaults to
        ``a``), inside a jitted forward: the result's rows split over ``"model"`` and the batch's
        partial sums reduced over ``"stack"``, so no device holds a whole statistic. ``split``: the
        inputs' features are split over ``"model"`` (a row-parallel layer's input, see
        :meth:`split_inputs`); then each device passes its feature slice of ``b`` around the model
        axis (a ring of ``collective-permute``) instead of gathering the whole input. A feature
        count the model axis does not divide: the plain product (replicated)."""
        b = a if b is None else b
        n_model, d = self.mesh.shape["model"], a.shape[-1]
        if n_model == 1 or d % n_model:
            return _gram(a, b)
        batch = self._batch_axis(a.shape[0])
        lead = (batch,) + (None,) * (a.ndim - 2)
        spec = P(*lead, "model" if split else None)
        r = d // n_model

        def local(a, b):
            i = jax.lax.axis_index("model")
            if not split:  # the whole input is here: this device's rows against it
                out = _gram(jax.lax.dynamic_slice_in_dim(a, i * r, r, axis=-1), b)
            else:  # step k: the block of device (i + k) mod n goes to columns of that block
                def step(k, carry):
                    out, blk = carry
                    out = jax.lax.dynamic_update_slice_in_dim(out, _gram(a, blk), ((i + k) % n_model) * r, axis=1)
                    blk = jax.lax.ppermute(blk, "model", [(s, (s - 1) % n_model) for s in range(n_model)])
                    return out, blk

                out, blk = jax.lax.fori_loop(0, n_model - 1, step, (jnp.zeros((r, d), jnp.float32), b))
                out = jax.lax.dynamic_update_slice_in_dim(out, _gram(a, blk), ((i + n_model - 1) % n_model) * r, axis=1)
            return out if batch is None else jax.lax.psum(out, "stack")

        return jax.shard_map(local, mesh=self.mesh, in_specs=(spec, spec), out_specs=P("model", None), check_vma=False)(a, b)

    def replicate(self, tree):
        return jax.tree.map(lambda x: self._put(x, P()), tree)


# --------------------------------------------------------------------------- row-parallel OBS solves

ROWS = "rows"


def _row_specs(fn, rows: int, d_in: int, dtype):
    """Which outputs of ``fn(w [rows, d_in], c)`` are indexed by W's rows: traced with two row
    counts, the leaves whose leading dimension follows are."""
    c = jax.ShapeDtypeStruct((d_in, d_in), dtype)
    bound = jax.vmap(fn, in_axes=(0, None), axis_name=ROWS)  # binds the axis ``fn``'s collectives name

    def shapes(r):
        return jax.tree.flatten(jax.eval_shape(bound, jax.ShapeDtypeStruct((1, r, d_in), dtype), c))

    (a, tree), (b, _) = shapes(rows), shapes(rows + 1)
    return jax.tree.unflatten(tree, [P(ROWS) if x.ndim > 1 and x.shape[1] == rows and y.shape[1] == rows + 1 else P()
                                     for x, y in zip(a, b, strict=True)])


@functools.lru_cache(maxsize=64)
def _rows_fn(fn, flat: Mesh, d_out: int, local: int, d_in: int, dtype, static: tuple):
    body = functools.partial(fn, n_rows=d_out, **dict(static))
    specs = _row_specs(body, local, d_in, dtype)
    return jax.jit(jax.shard_map(body, mesh=flat, in_specs=(P(ROWS, None), P()), out_specs=specs, check_vma=False)), specs


def rows_on_mesh(fn, w, c, mesh: Mesh, **static):
    """``fn(w, c, n_rows=..., **static)`` with W's rows split over every device of ``mesh`` and C
    replicated: ``fn`` sees its local rows and may name the axis :data:`ROWS` in collectives;
    ``n_rows`` is the true row count (W is padded with zero rows to a multiple of the device count;
    the padding is removed from the row-indexed outputs). ``static`` (hashable) and ``fn`` key the
    compiled function's cache."""
    flat = Mesh(mesh.devices.reshape(-1), (ROWS,))
    d_out, d_in = w.shape
    wp = _pad_to(jnp.asarray(w), 0, flat.size)
    run, specs = _rows_fn(fn, flat, d_out, wp.shape[0] // flat.size, d_in, wp.dtype, tuple(sorted(static.items())))
    out = run(jax.device_put(wp, NamedSharding(flat, P(ROWS, None))), jax.device_put(jnp.asarray(c), NamedSharding(flat, P())))
    if wp.shape[0] == d_out:
        return out
    rep = NamedSharding(flat, P())
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    leaves, tree = jax.tree.flatten(out)
    return jax.tree.unflatten(tree, [jax.device_put(x, rep)[:d_out] if s == P(ROWS) else x for x, s in zip(leaves, flat_specs, strict=True)])
