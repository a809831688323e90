"""The compression pipeline: calibrate, compress every linear layer, write the weights back.

:func:`compress_model` walks the blocks with :func:`awp_jax.calibration.block_statistics`
(sequential by default: block l is calibrated on the outputs of the already compressed blocks
< l), and for each block compresses its seven linear layers with one registered method
(:mod:`awp_jax.methods`), writing the result into the model in place. It returns a per-layer
report: method, shape, relative layer objective ``tr((W−Θ)C(W−Θ)ᵀ) / tr(W C Wᵀ)`` of the result
(and of the method's starting point where it has one), method details, seconds.

Where the work runs is the executor's choice (:mod:`awp_jax.execution`: one device, a device
mesh, or several ``jax.distributed`` processes); this module only walks the blocks. With several
processes every process calibrates (the same windows, the same bits), the groups of layers of each
block are dealt out among them and each result is sent to all, so every process holds the same
compressed model — identical to a one-process run. Only process 0 writes the run directory, which
must be on storage all processes see.

The jobs around the walk live in their own modules: where the work runs in
:mod:`awp_jax.execution`, the run directory in :mod:`awp_jax.runstore`, the report rows and the
messages in :class:`Reporter` below.

Resuming: with ``run_dir`` every finished block is written there at once (its seven compressed
matrices and its report rows, in one safetensors file renamed into place, so a block file is
complete or absent; :class:`awp_jax.runstore.RunStore`). A run started again with the same ``settings`` loads the finished blocks,
recomputes the hidden states at the first missing block (through the compressed blocks in
sequential mode, the dense ones in parallel mode) and continues; on CPU the result is
bit-identical to an uninterrupted run. A ``run_dir`` holding a run with other settings is refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from awp_jax import calibration, dtypes, execution, memory, methods, packed
from awp_jax import targets as targets_lib
from awp_jax.models import Llama
from awp_jax.runstore import RunMismatchError, RunStore
from awp_jax.solver import objective

__all__ = ["compress_model", "RunMismatchError", "Reporter"]


@jax.jit
def _relative_objective(w, theta, c):
    """``tr((W−Θ)C(W−Θ)ᵀ) / tr(W C Wᵀ)`` in one compiled call (0 for a layer whose dense objective is 0)."""
    dense = objective(w, jnp.zeros_like(w), c)
    return jnp.where(dense > 0, objective(w, theta, c) / jnp.where(dense > 0, dense, 1.0), 0.0)


class Reporter:
    """The report rows of a run and what it tells the user about each layer (process 0 prints)."""

    def __init__(self, method: str, min_expert_tokens: int, verbose: bool = False, rank: int = 0):
        self.method, self.min_expert_tokens, self.verbose, self.speaks = method, min_expert_tokens, verbose, rank == 0

    def _say(self, text: str) -> None:
        if self.speaks:
            print(text, file=sys.stderr)

    def row(self, i: int, name: str, shape, res: methods.LayerResult, rel: float, secs: float, lanes: int,
            stats: dict, stat: str, rounding: dict) -> dict:
        """Layer ``name`` of block ``i``'s row; its notes and warnings are printed."""
        routed = {}
        if f"{stat}#tokens" in stats:  # an expert of a mixture: how many calibration tokens reached it
            routed = {"routed_tokens": int(stats[f"{stat}#tokens"]), "statistic": "all tokens (fallback)"
                      if bool(stats[f"{stat}#fallback"]) else "routed tokens"}
            if routed["statistic"] != "routed tokens" and name.endswith(("gate_proj", "w1")):
                self._say(f"note: block {i} {name.rsplit('.', 1)[0]}: {routed['routed_tokens']} calibration token(s) routed to it "
                          f"(fewer than {self.min_expert_tokens}): calibrated on all tokens instead")
        row = {"block": i, "layer": name, "method": self.method, "shape": list(shape), "rel_objective": rel,
               "seconds": round(secs, 4), "stacked": lanes, **routed, **rounding, **res.info.as_dict()}
        if res.info.stop == "nonfinite":
            print(f"warning: block {i} {name}: an AWP update became non-finite; the last finite feasible iterate "
                  "was kept (see the report's stop column)", file=sys.stderr)
        if res.info.damping_retries:
            print(f"note: block {i} {name}: Cholesky failed at the base damping; succeeded after "
                  f"{res.info.damping_retries} retries with 10x damping ({res.info.damping:.3g})", file=sys.stderr)
        if self.verbose:
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.info.as_dict().items())
            print(f"  block {i:2d} {name:<9} {str(tuple(shape)):<12} rel.obj {rel:.4g}  {secs:6.2f}s  {extra}", file=sys.stderr)
        return row


def compress_model(
    model: Llama,
    windows: np.ndarray,
    method: str,
    constraint: methods.Constraint | list[methods.Constraint],
    options=None,
    *,
    mode: Literal["sequential", "parallel"] = "sequential",
    batch_size: int = 8,
    progress: bool = True,
    verbose: bool = False,
    run_dir: os.PathLike | None = None,
    settings: dict | None = None,
    encoded: dict | None = None,
    vmap_groups: bool = True,
    max_stack_bytes: int | None = 256 * 2**20,
    min_expert_tokens: int = calibration.MIN_EXPERT_TOKENS,
    executor: execution.Executor | None = None,
    error_correction: targets_lib.ErrorCorrection | None = None,
    token_cap: float | None = None,
    c_ridge: float | None = None,
) -> list[dict]:
    """Compress ``model`` in place; returns one report row per layer (see the module docstring).

    ``encoded``: a dict to fill with the lossless compressed form of every layer
    (:func:`awp_jax.packed.encode`), keyed by the weight's Hugging Face name (``None``: not kept).
    The weights written into the model are exactly ``packed.decode`` of it. For a streamed model its
    values are :class:`awp_jax.runstore.StoredLayer` views of the run directory, read when asked.

    A model whose blocks live on disk (:class:`awp_jax.streaming.StreamedModel`) needs ``run_dir``:
    each compressed block is read back from there when it is next needed.

    ``vmap_groups``: solve the layers of a block that have the same shape and input (k/v under
    GQA, gate/up, the experts of a mixture) as one vmapped stack, for methods that offer it (AWP);
    results are the same. A group whose float32 weights together exceed ``max_stack_bytes`` (default
    256 MiB; ``None``: no limit) is solved one layer at a time, so the solver's buffers are one
    layer's (Llama-2-7B's gate/up: 2 x 180 MB, solved apart; its k/v stacked).

    Mixtures of experts: each expert is compressed against the tokens routed to it; one that fewer
    than ``min_expert_tokens`` calibration tokens reach is calibrated on all tokens (see
    :func:`awp_jax.calibration.block_statistics`). Its report rows say which (``statistic``) and
    how many tokens it got (``routed_tokens``); the router stays dense.

    ``constraint``: one for every block, or a list with one per block (a non-uniform sparsity
    allocation, :mod:`awp_jax.allocation`).

    ``error_correction``: fit every layer, fed the compressed model's inputs, to the dense model's
    outputs (:mod:`awp_jax.targets`; sequential mode). The method then compresses the corrected
    weights ``W_α`` against ``C``, and the report's ``rel_objective`` is relative to that target
    (``tr((W_α−Θ)C(W_α−Θ)ᵀ) / tr(W_α C W_αᵀ)``, the error-correcting objective up to a constant).

    ``token_cap``: cap each calibration token's share of the statistics at this multiple of the
    median token's squared norm (:mod:`awp_jax.calibration`; ``None``, the default: no cap). Every
    method then fits the capped ``C``, and ``rel_objective`` is relative to it.

    ``c_ridge``: every method fits ``C + δ·mean(diag C)·I`` (δ = ``c_ridge``; ``None``, the default:
    ``C``), and ``rel_objective`` is relative to it. An error-correcting target is computed from the
    plain ``C`` first (:mod:`awp_jax.calibration`, "Ridge").

    ``executor``: where the layers are compressed and the calibration forward runs
    (:mod:`awp_jax.execution`); ``None``: :func:`awp_jax.execution.choose` without a mesh (one
    device, or the processes of ``jax.distributed``)."""
    rank, n_proc = jax.process_index(), jax.process_count()
    progress = progress and rank == 0
    token_cap = calibration.check_token_cap(token_cap)
    c_ridge = calibration.check_ridge(c_ridge)
    per_block = not isinstance(constraint, methods.Constraint)
    constraints = list(constraint) if per_block else [constraint] * len(model.layers)
    if len(constraints) != len(model.layers) or not all(isinstance(c, methods.Constraint) for c in constraints):
        raise ValueError(f"constraint must be a Constraint or a list of {len(model.layers)} (one per block), got {constraint!r}")
    for con in dict.fromkeys(constraints):
        _, options = methods.resolve(method, con, options)
    executor = execution.choose() if executor is None else executor
    if rank == 0:
        for line in executor.notes(method, constraints[0], options):
            print(line, file=sys.stderr)
    dtype = model.cfg.storage_dtype
    reporter = Reporter(method, min_expert_tokens, verbose, rank)
    report: list[dict] = []
    store = None
    if run_dir is not None:
        full = {"method": method, "constraint": repr(constraints if per_block else constraint), "options": repr(options), "dtype": dtype, "mode": mode, "batch_size": batch_size,
                "windows_sha": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest(),
                **(settings or {})}
        if any(getattr(b, "ROUTED", ()) for b in model.layers):
            full["min_expert_tokens"] = min_expert_tokens
        if error_correction is not None:
            full["error_correction"] = repr(error_correction)
        if token_cap is not None:  # absent when off: run directories of earlier versions stay valid
            full["token_cap"] = token_cap
        if c_ridge is not None:  # likewise
            full["c_ridge"] = c_ridge
        store = RunStore(run_dir, full, len(model.layers), write=rank == 0)
        if n_proc > 1:
            starts = execution._allgather(np.asarray([store.done], np.int32))
            if len(set(starts.ravel().tolist())) != 1:
                raise RunMismatchError(f"the processes see different finished blocks in {store.path} ({starts.ravel().tolist()}): "
                                       "is the run directory on storage they all share?")
        if store.done and progress:
            print(f"resuming: blocks 0..{store.done - 1} already compressed in {store.path}", file=sys.stderr)
    start = 0 if store is None else store.done

    streamed = hasattr(model.layers, "stored")
    if streamed and store is None:
        raise ValueError("a model whose blocks live on disk (streaming) needs run_dir: compressed blocks are kept there")
    keep = encoded is not None

    def keep_encoded(i: int, enc: dict) -> None:
        # a streamed model's encoded layers stay in the run directory, read back field by field when written
        # (by process 0, which writes them: the others may be ahead of its write of block i)
        if keep and (rank == 0 or not streamed):
            enc = store.stored_layers(i) if streamed else enc
            encoded.update({model.linear_key(i, n): e for n, e in enc.items()})

    def load_done():
        for i in range(start):
            rows, enc = store.load(i, model.layers[i], with_encoded=keep and not streamed)
            store.mark_stored(model, i)
            report.extend(rows)
            keep_encoded(i, enc)

    if error_correction is not None and mode != "sequential":
        raise ValueError("error-correcting targets need sequential calibration (--mode sequential)")
    if mode == "sequential" and error_correction is None:
        load_done()  # later blocks are calibrated on the compressed ones

    def finish(i, blk, name, w, c, res, secs, lanes, stats) -> tuple[dict, dict]:
        """Check, encode and write one layer's result into the block: its encoded form and report row."""
        lin = blk.linear(name)
        constraint = constraints[i]
        t0 = time.perf_counter()
        theta = np.asarray(res.theta)
        if not np.all(np.isfinite(theta)):
            raise FloatingPointError(f"block {i} {name}: {method} produced non-finite weights ({res.info.as_dict()})")
        try:
            enc = packed.encode(theta, q=res.q, pruned=constraint.prunes, dtype=dtype)
        except packed.NotLosslessError as e:
            raise RuntimeError(f"block {i} {name}: {method}'s result is not on its {constraint.describe()} grid: {e}") from e
        except ValueError as e:  # e.g. values beyond float16's range
            raise ValueError(f"block {i} {name}: cannot store {method}'s result as {dtype}: {e}") from e
        exact = theta
        # what is exported and evaluated: ``dtype``'s values, which encode has just checked its stored form decodes to
        theta = jnp.asarray(dtypes.round_to(exact, dtype))
        secs += time.perf_counter() - t0
        rel = float(_relative_objective(w, theta, c))
        rounding = {}
        if dtype != "float32":  # what rounding the result to the checkpoint's dtype did to the layer objective
            rounding = {"rel_objective_float32": float(_relative_objective(w, jnp.asarray(exact), c))}
        lin.weight[...] = theta.astype(lin.weight[...].dtype)
        return enc, reporter.row(i, name, w.shape, res, rel, secs, lanes, stats, blk.LINEARS[name], rounding)

    def on_block(i: int, stats: dict[str, np.ndarray]):
        blk = model.layers[i]
        enc_block, rows = {}, {}
        # layers of equal shape that share an input (k/v under GQA, gate/up) are solved as one stack;
        # so are the experts of a mixture (statistics ``expert_in.0``, ``expert_in.1``, ...: one per expert)
        groups: dict = {}
        for name, stat in blk.LINEARS.items():
            key = (tuple(blk.linear(name).weight[...].shape), stat.split(".")[0]) if vmap_groups else name
            groups.setdefault(key, []).append(name)
        if max_stack_bytes is not None:
            split = {}
            for key, names in groups.items():
                size = sum(4 * int(np.prod(blk.linear(n).weight[...].shape)) for n in names)
                split.update({(key, n): [n] for n in names} if size > max_stack_bytes and len(names) > 1 else {key: names})
            groups = split
        # the last group that reads each statistic: its host copy is dropped once that group holds it on the
        # device, so a block's largest C (down_proj's input, d_ff² floats) is not held twice during its solve
        last_use = {blk.LINEARS[n]: g for g, names in enumerate(groups.values()) for n in names}
        for g, names in enumerate(groups.values()):
            ws = [jnp.asarray(blk.linear(n).weight[...], jnp.float32) for n in names]
            placed: dict = {}  # layers that share a statistic (q/k/v) share one copy of it
            for n in names:
                if blk.LINEARS[n] not in placed:
                    placed[blk.LINEARS[n]] = jnp.asarray(stats[blk.LINEARS[n]], jnp.float32)
            cs = [placed[blk.LINEARS[n]] for n in names]
            del placed
            for n in names:
                if last_use[blk.LINEARS[n]] == g:
                    stats.pop(blk.LINEARS[n], None)
            if error_correction is not None:  # the dense model's outputs are the target
                ws = [targets_lib.corrected_weight(w, c, stats[blk.LINEARS[n] + "#cross"], error_correction)
                      for n, w, c in zip(names, ws, cs)]
            if c_ridge is not None:  # what every method fits; layers that share a statistic share its ridged copy
                ridged: dict = {}
                cs = [ridged.setdefault(id(c), calibration.ridge(c, c_ridge)) for c in cs]
                del ridged
            out, secs = executor.run_group(g, method, ws, cs, constraints[i], options, f"block {i} {'/'.join(names)}")
            for n, w, c, res in zip(names, ws, cs, out):
                enc_block[n], rows[n] = finish(i, blk, n, w, c, res, secs, len(names), stats)
            del ws, cs, out, w, c, res  # one group's weights, statistics and results at a time
        rows = [rows[n] for n in blk.LINEARS]  # in the block's order
        if store is not None:
            if rank == 0:
                store.save(i, blk, rows, enc_block)
            # streamed, block i is read back from the run directory if it is built again; every process holds
            # the same results, process 0 has written them before it joins the next collective, and an
            # unwritten block file is an error when read, never the dense block
            store.mark_stored(model, i)
        report.extend(rows)
        keep_encoded(i, enc_block)
        memory.trim()  # the block's statistics and solver buffers are freed

    calibration.block_statistics(model, windows, mode=mode, batch_size=batch_size, on_block=on_block, progress=progress,
                                 start_block=start, after_prefix=None if mode == "sequential" else load_done,
                                 min_expert_tokens=min_expert_tokens, layout=executor.layout,
                                 cross=error_correction is not None,
                                 before_prefix=load_done if error_correction is not None else None,
                                 token_cap=token_cap)
    return report
