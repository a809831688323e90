"""Calibration statistics: ``C = X Xᵀ / n`` for the input of every linear layer of every block.

For each block, four second-moment matrices are accumulated over all calibration tokens:
``attn_in`` (shared by q/k/v), ``o_in`` (o_proj), ``mlp_in`` (shared by gate/up) and ``down_in``
(down_proj) for the Llama family; each family's ``Block.LINEARS`` maps a layer to its statistic, and
its blocks sow those inputs (``nnx.Intermediate``), captured here with ``nnx.capture``.

Two modes behind one function, :func:`block_statistics`:

* ``"sequential"`` (the reference implementations' way, the default for compression): block l's
  inputs are the outputs of blocks < l *after* ``on_block`` has compressed them, so each block
  sees the errors of the ones before it.
* ``"parallel"``: every block's statistics from one pass through the dense model; ``on_block``
  may still compress block l, but block l + 1's inputs come from the dense block l. Without
  ``on_block`` all blocks' statistics are returned (e.g. to stack equal-shape layers across blocks).

Memory: the hidden states of the calibration windows at the current block boundary
(``n × seqlen × hidden`` floats, as in the reference implementations), one batch of one block's
activations, and one block's statistics. Products are summed in float32 on the device; with
``accumulate="float64"`` each batch's float32 product is added into float64 totals on the host.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


__all__ = ["block_statistics"]


@functools.partial(jax.jit, static_argnums=0)  # one compilation per model structure, not per call
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed(tokens)


@functools.lru_cache(maxsize=8)  # one set of compiled functions per block structure
def _block_fns(graphdef):
    @jax.jit
    def stats(state, x, ctx):  # x [B, L, D] -> (y, {name: X Xᵀ summed over B·L})
        y, cap = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x, *ctx)
        grams = {}
        for k, var in cap.items():
            (v,) = var.get_value()  # the block sows each statistic's input once per call
            grams[k] = jnp.einsum("bli,blj->ij", v.astype(jnp.float32), v.astype(jnp.float32), precision="highest")
        return y, grams

    @jax.jit
    def grams_only(state, x, ctx):  # when the block's output is recomputed after compression
        return stats(state, x, ctx)[1]

    @jax.jit
    def run(state, x, ctx):
        return nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x, *ctx)[0]

    return stats, grams_only, run


def block_statistics(
    model,
    windows: np.ndarray,
    *,
    mode: Literal["sequential", "parallel"] = "sequential",
    batch_size: int = 8,
    accumulate: Literal["float32", "float64"] = "float32",
    on_block: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    progress: bool = False,
    start_block: int = 0,
    after_prefix: Callable[[], None] | None = None,
) -> list[dict[str, np.ndarray]] | None:
    """Second moments ``C`` (``{name: [d, d]}``, divided by the token count) for every block.

    ``on_block(l, stats)`` is called once per block in order; in sequential mode it may change
    block l's weights (compress it) before block l + 1's inputs are computed. Without ``on_block``
    the list of all blocks' statistics is returned; with it, nothing is kept and ``None`` returned.

    ``start_block`` resumes a run: blocks before it only carry the hidden states forward (with the
    weights they have at that moment), then ``after_prefix()`` is called, then statistics start.
    """
    if mode not in ("sequential", "parallel"):
        raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")
    if accumulate not in ("float32", "float64"):
        raise ValueError(f"accumulate must be 'float32' or 'float64', got {accumulate!r}")
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, seqlen], got shape {windows.shape}")
    n, seqlen = windows.shape
    n_tokens = n * seqlen
    ctx = model.context(seqlen)
    batches = [windows[i : i + batch_size] for i in range(0, n, batch_size)]
    graphdef, state = nnx.split(model)
    hidden = [_embed(graphdef, state, jnp.asarray(b)) for b in batches]
    recompute = mode == "sequential" and on_block is not None
    kept: list | None = [] if on_block is None else None
    def fns(li):  # blocks may differ in structure (e.g. sliding-window and global attention)
        return _block_fns(nnx.graphdef(model.layers[li]))

    for li in range(start_block):
        state = nnx.state(model.layers[li])
        run_fn = fns(li)[2]
        hidden = [run_fn(state, x, ctx) for x in hidden]
    if after_prefix is not None:
        after_prefix()

    layers = range(start_block, len(model.layers))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=f"calibration ({mode})", unit="block")
    for li in layers:
        state = nnx.state(model.layers[li])
        stats_fn, grams_fn, run_fn = fns(li)
        totals = None
        outs = []
        for x in hidden:
            if recompute:
                grams = grams_fn(state, x, ctx)
            else:
                y, grams = stats_fn(state, x, ctx)
                outs.append(y)
            if accumulate == "float64":
                grams = {k: np.asarray(v, np.float64) for k, v in grams.items()}
            totals = grams if totals is None else {k: totals[k] + grams[k] for k in grams}
        c = {k: np.asarray(v / n_tokens) for k, v in totals.items()}
        if on_block is None:
            kept.append(c)
        else:
            on_block(li, c)
            if recompute:  # sequential: the next block sees the compressed block's output
                state = nnx.state(model.layers[li])
                outs = [run_fn(state, x, ctx) for x in hidden]
        hidden = outs
    return kept
