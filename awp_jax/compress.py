"""The compression pipeline: calibrate, compress every linear layer, write the weights back.

:func:`compress_model` walks the blocks with :func:`awp_jax.calibration.block_statistics`
(sequential by default: block l is calibrated on the outputs of the already compressed blocks
< l), and for each block compresses its seven linear layers with one registered method
(:mod:`awp_jax.methods`), writing the result into the model in place. It returns a per-layer
report: method, shape, relative layer objective ``tr((W−Θ)C(W−Θ)ᵀ) / tr(W C Wᵀ)`` of the result
(and of the method's starting point where it has one), method details, seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

import jax.numpy as jnp
import numpy as np

from awp_jax import calibration, methods
from awp_jax.model import INPUT_OF, LINEAR_NAMES, Llama
from awp_jax.solver import objective

__all__ = ["compress_model"]


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
) -> list[dict]:
    """Compress ``model`` in place; returns one report row per layer (see the module docstring)."""
    m = methods.get_method(method)
    if spec.kind not in m.kinds:
        raise ValueError(f"method {method!r} does not do {spec.kind} compression; it supports: {', '.join(sorted(m.kinds))}")
    report: list[dict] = []

    def on_block(i: int, stats: dict[str, np.ndarray]):
        blk = model.layers[i]
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
            report.append(row)
            if verbose:
                extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.info.items())
                print(f"  block {i:2d} {name:<9} {str(tuple(w.shape)):<12} rel.obj {rel:.4g}  {secs:6.2f}s  {extra}", file=sys.stderr)

    calibration.block_statistics(model, windows, mode=mode, batch_size=batch_size, on_block=on_block, progress=progress)
    return report
