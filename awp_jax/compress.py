"""The compression pipeline: calibrate, compress every linear layer, write the weights back.

:func:`compress_model` walks the blocks with :func:`awp_jax.calibration.block_statistics`
(sequential by default: block l is calibrated on the outputs of the already compressed blocks
< l), and for each block compresses its seven linear layers with one registered method
(:mod:`awp_jax.methods`), writing the result into the model in place. It returns a per-layer
report: method, shape, relative layer objective ``tr((W−Θ)C(W−Θ)ᵀ) / tr(W C Wᵀ)`` of the result
(and of the method's starting point where it has one), method details, seconds.

Resuming: with ``run_dir`` every finished block is written there at once (its seven compressed
matrices and its report rows, in one safetensors file renamed into place, so a block file is
complete or absent). A run started again with the same ``settings`` loads the finished blocks,
recomputes the hidden states at the first missing block (through the compressed blocks in
sequential mode, the dense ones in parallel mode) and continues; on CPU the result is
bit-identical to an uninterrupted run. A ``run_dir`` holding a run with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Literal

import jax.numpy as jnp
import numpy as np

from awp_jax import calibration, methods
from awp_jax.model import INPUT_OF, LINEAR_NAMES, Llama
from awp_jax.solver import objective

__all__ = ["compress_model", "RunMismatchError"]


class RunMismatchError(ValueError):
    """The run directory holds a run made with other settings."""


def _block_file(run_dir: pathlib.Path, i: int) -> pathlib.Path:
    return run_dir / f"block_{i:04d}.safetensors"


def _save_block(run_dir: pathlib.Path, i: int, blk, rows: list[dict]) -> None:
    from safetensors.numpy import save_file

    tensors = {name: np.asarray(getattr(blk, name).weight[...]) for name in LINEAR_NAMES}
    tmp = run_dir / f".block_{i:04d}.tmp"
    save_file(tensors, str(tmp), metadata={"rows": json.dumps(rows)})
    os.replace(tmp, _block_file(run_dir, i))


def _load_block(run_dir: pathlib.Path, i: int, blk) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(_block_file(run_dir, i)), framework="numpy") as f:
        rows = json.loads(f.metadata()["rows"])
        for name in LINEAR_NAMES:
            lin = getattr(blk, name)
            lin.weight[...] = jnp.asarray(f.get_tensor(name), lin.weight[...].dtype)
    return rows


def _open_run(run_dir: pathlib.Path, settings: dict, n_blocks: int) -> int:
    """Create or check ``run_dir``; returns how many leading blocks are already done."""
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_dir / "run.json"
    text = json.dumps(settings, sort_keys=True, default=str)
    if meta.exists():
        if meta.read_text() != text:
            raise RunMismatchError(f"{run_dir} holds a run with other settings; remove it or choose another output")
    else:
        tmp = run_dir / ".run.json.tmp"
        tmp.write_text(text)
        os.replace(tmp, meta)
    done = 0
    while done < n_blocks and _block_file(run_dir, done).exists():
        done += 1
    return done


def compress_model(
    model: Llama,
    windows: np.ndarray,
    method: str,
    spec: methods.CompressionSpec,
    *,
    mode: Literal["sequential", "parallel"] = "sequential",
    batch_size: int = 8,
    progress: bool = True,
    verbose: bool = False,
    run_dir: os.PathLike | None = None,
    settings: dict | None = None,
) -> list[dict]:
    """Compress ``model`` in place; returns one report row per layer (see the module docstring)."""
    m = methods.get_method(method)
    if spec.kind not in m.kinds:
        raise ValueError(f"method {method!r} does not do {spec.kind} compression; it supports: {', '.join(sorted(m.kinds))}")
    report: list[dict] = []
    start = 0
    if run_dir is not None:
        run_dir = pathlib.Path(run_dir)
        full = {"method": method, "spec": repr(spec), "mode": mode, "batch_size": batch_size,
                "windows_sha": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest(),
                **(settings or {})}
        start = _open_run(run_dir, full, len(model.layers))
        if start and progress:
            print(f"resuming: blocks 0..{start - 1} already compressed in {run_dir}", file=sys.stderr)

    def load_done():
        for i in range(start):
            report.extend(_load_block(run_dir, i, model.layers[i]))

    if mode == "sequential":
        load_done()  # later blocks are calibrated on the compressed ones

    def on_block(i: int, stats: dict[str, np.ndarray]):
        blk = model.layers[i]
        rows = []
        for name in LINEAR_NAMES:
            lin = getattr(blk, name)
            w = jnp.asarray(lin.weight[...], jnp.float32)
            c = jnp.asarray(stats[INPUT_OF[name]], jnp.float32)
            t0 = time.perf_counter()
            res = methods.compress_layer(method, w, c, spec)
            theta = res.theta.block_until_ready()
            secs = time.perf_counter() - t0
            dense = float(objective(w, jnp.zeros_like(w), c))
            rel = float(objective(w, theta, c)) / dense if dense > 0 else 0.0
            if not bool(jnp.all(jnp.isfinite(theta))):
                raise FloatingPointError(f"block {i} {name}: {method} produced non-finite weights ({res.info})")
            lin.weight[...] = theta.astype(lin.weight[...].dtype)
            row = {"block": i, "layer": name, "method": method, "shape": list(w.shape), "rel_objective": rel,
                   "seconds": round(secs, 4), **res.info}
            rows.append(row)
            if verbose:
                extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.info.items())
                print(f"  block {i:2d} {name:<9} {str(tuple(w.shape)):<12} rel.obj {rel:.4g}  {secs:6.2f}s  {extra}", file=sys.stderr)
        if run_dir is not None:
            _save_block(run_dir, i, blk, rows)
        report.extend(rows)

    calibration.block_statistics(model, windows, mode=mode, batch_size=batch_size, on_block=on_block, progress=progress,
                                 start_block=start, after_prefix=None if mode == "sequential" else load_done)
    return report
