"""Where a compression run's work executes: one place that chooses, three placements of the same jobs.

The pipeline (:func:`awp_jax.compress.compress_model`) hands every group of layers it compresses
together (the layers of a block with one shape and one input: k/v under GQA, gate/up, a mixture's
experts) to an executor, and asks it where the calibration forward runs. The jobs are the same
code in every case; only their placement differs.

| executor | chosen when | a group of layers | the calibration forward |
|---|---|---|---|
| :class:`Local` | one process, one device | solved on the default device | on the default device |
| :class:`OnMesh` | a device mesh (``--mesh``, or several local devices) | the method's sharded form (:func:`awp_jax.methods.compress_on_mesh`): AWP rows over ``"model"``, layers over ``"stack"``; SparseGPT/GPTQ rows over every device | parameters laid out by :data:`awp_jax.sharding.FORWARD_RULES`, batches over ``"stack"``, hidden states between blocks also by position and statistics by rows over ``"model"`` |
| :class:`MultiProcess` | ``jax.distributed`` with several processes | groups dealt out among the processes in turn, each solved by its process's own executor (:class:`Local`, or :class:`OnMesh` over that process's devices) and its result sent to all (pickled all-gather) | every process runs it whole (the same windows, the same bits), on its own executor's placement |

:func:`choose` picks one from the mesh and the process count. A method (or setting) without a
sharded form runs on one device under :class:`OnMesh`, and :meth:`Executor.notes` says so before
any work (e.g. magnitude and Wanda, whose layers cost next to nothing, or AWP from GPTQ's start).

Several processes, each with several devices (hosts of a pod): every process's mesh spans its own
devices only (``jax.local_devices()``), and the processes share the work by groups of layers. No
array spans processes: a block, its statistics and its solves fit one host's devices for every
model this package targets (a 70B block's largest ``C``, 28672² float32, is 3.3 GB), so the only
traffic between hosts is the results' all-gather; the price is that every host runs the
calibration forward whole. The groups of a block are dealt in turn, so more processes than a
block has groups (seven for a dense block) leave some idle.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from awp_jax import methods, sharding

__all__ = ["Executor", "Local", "MultiProcess", "OnMesh", "choose"]


def _to_host(out: list[methods.LayerResult]) -> list[methods.LayerResult]:
    return [methods.LayerResult(np.asarray(r.theta), r.info, None if r.q is None else jax.device_get(r.q)) for r in out]


WINDOWS_PER_PASS = 8  # the command line's default number of windows in one forward pass
# the fewest on devices that share one memory: with 1 window per pass, 8 fake CPU devices on 2 cores deadlocked
# XLA's CPU collectives (an all-gather's rendezvous timed out) in 3 of 3 runs of bench/scale.py; 2 ran
MIN_SHARED_WINDOWS = 2


def shared_memory_windows(n_model: int, n_stack: int = 1) -> int:
    """The default windows per pass on a mesh whose devices share one memory (CPU devices,
    :func:`awp_jax.sharding.shares_memory`): :data:`WINDOWS_PER_PASS` divided by the model axis, at
    least :data:`MIN_SHARED_WINDOWS`, a multiple of the stack axis where it can be. Tensor
    parallelism holds a pass's hidden states whole on every device of the model axis (the gathered
    residual stream, the row-parallel products' partial sums and their all-reduce), so CPU devices
    hold that many copies in the host's memory (bench/results/scale.md: 8 windows on 8 fake devices
    peaked 720 MB over the bound, 2 windows 28 MB over it). Devices with their own memory keep 8."""
    n = max(MIN_SHARED_WINDOWS, WINDOWS_PER_PASS // n_model)
    return n - n % n_stack if n >= n_stack else n


class Executor:
    """Runs groups of layer compressions; says where the calibration forward runs (``layout``)."""

    name = "executor"
    layout: sharding.ForwardLayout | None = None  # None: the default device

    def windows_per_pass(self) -> int:
        """The default number of windows in one forward pass (calibration and evaluation) here."""
        return WINDOWS_PER_PASS

    def notes(self, method: str, constraint: methods.Constraint, options) -> list[str]:
        """What the user should know before the run about where ``method``'s work runs."""
        return []

    def solve(self, method: str, ws: list, cs: list, constraint: methods.Constraint, options) -> list[methods.LayerResult]:
        """Compress the layers of one group (equal shapes when several) where this executor puts them."""
        if len(ws) > 1:
            return methods.compress_layers(method, ws, cs, constraint, options)
        return [methods.compress_layer(method, ws[0], cs[0], constraint, options)]

    def run_group(self, g: int, method: str, ws: list, cs: list, constraint, options, what: str):
        """Group ``g`` of a block: ``(results on the host, seconds per layer)``; ``what`` names it in errors."""
        t0 = time.perf_counter()
        out = self.solve(method, ws, cs, constraint, options)
        jax.block_until_ready([r.theta for r in out])
        return _to_host(out), (time.perf_counter() - t0) / len(ws)


class Local(Executor):
    """One process, one device."""

    name = "one device"


class MultiProcess(Executor):
    """Several processes (``jax.distributed``): group ``g`` is solved by process ``g mod n`` on that
    process's ``inner`` executor (:class:`Local` by default, or :class:`OnMesh` over its own devices)
    and the result sent to every process, so all hold the same compressed model: identical to one
    process with the same ``inner`` placement."""

    def __init__(self, inner: Executor | None = None):
        self.inner = Local() if inner is None else inner
        if isinstance(self.inner, MultiProcess):
            raise TypeError("MultiProcess's inner executor places one process's work: Local or OnMesh")
        self.rank, self.n = jax.process_index(), jax.process_count()
        self.layout = self.inner.layout
        self.name = f"{self.n} processes" + ("" if isinstance(self.inner, Local) else f", each on a {self.inner.name}")

    def notes(self, method, constraint, options):
        return self.inner.notes(method, constraint, options)

    def windows_per_pass(self):
        return self.inner.windows_per_pass()

    def run_group(self, g, method, ws, cs, constraint, options, what):
        owner = g % self.n
        payload = self.inner.run_group(g, method, ws, cs, constraint, options, what) if owner == self.rank else None
        return _exchange(payload, owner, what)


class OnMesh(Executor):
    """A device mesh of one process (:func:`awp_jax.sharding.make_mesh`)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.layout = sharding.ForwardLayout(mesh)
        self.name = f"mesh {mesh.shape['stack']} (stack) x {mesh.shape['model']} (model) of {mesh.devices.size} {mesh.devices.flat[0].platform} devices"

    def windows_per_pass(self):
        return shared_memory_windows(self.mesh.shape["model"], self.mesh.shape["stack"]) if sharding.shares_memory(self.mesh) \
            else WINDOWS_PER_PASS

    def notes(self, method, constraint, options):
        reason = methods.mesh_reason(method, constraint, options)
        if reason is None:
            return []
        return [f"note: {reason}: its layers are compressed on one device; the calibration forward still runs on the mesh"]

    def solve(self, method, ws, cs, constraint, options):
        if methods.mesh_reason(method, constraint, options) is not None:
            return super().solve(method, ws, cs, constraint, options)
        return methods.compress_on_mesh(method, ws, cs, constraint, options, self.mesh)


def choose(mesh=None) -> Executor:
    """The executor for this run: :class:`OnMesh` for a ``mesh`` (:func:`awp_jax.sharding.parse_mesh`),
    else :class:`Local`; wrapped in :class:`MultiProcess` when ``jax.distributed`` runs several
    processes, where ``mesh`` must hold this process's own devices only (``parse_mesh(text,
    jax.local_devices())``)."""
    several = jax.process_count() > 1
    if several and mesh is not None:
        foreign = sorted({d.process_index for d in mesh.devices.flat} - {jax.process_index()})
        if foreign:
            raise ValueError(f"the device mesh holds devices of processes {foreign}: with several processes each one's mesh "
                             f"spans its own devices (jax.local_devices(), {jax.local_device_count()} here) and the "
                             "processes share the layers; a mesh spanning processes is not supported")
    inner = Local() if mesh is None else OnMesh(mesh)
    return MultiProcess(inner) if several else inner


def _allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def _exchange(payload, owner: int, what: str):
    """Every process gets ``owner``'s (picklable) ``payload``; the others pass ``None``."""
    import pickle

    data = b"" if payload is None else pickle.dumps(payload, protocol=5)
    sizes = _allgather(np.asarray([len(data)], np.int32)).ravel()
    if sizes[owner] == 0:
        raise RuntimeError(f"{what}: process {owner} sent no result")
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    return pickle.loads(_allgather(buf)[owner, : sizes[owner]].tobytes())
