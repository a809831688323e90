"""Perplexity by the WikiText protocol.

Join the evaluation text, tokenize once, cut non-overlapping windows of ``seqlen`` tokens
(:func:`awp_jax.data.eval_windows`), and average the next-token negative log-likelihood over every
predicted position (``seqlen − 1`` per window); perplexity is ``exp`` of that mean. The forward is
jitted once per (batch, seqlen) shape; a last partial batch is padded and its padding ignored.
The head runs over ``HEAD_TOKENS`` positions at a time, so the full ``[batch, seqlen, vocab]``
logits never exist (memory for a 150k vocabulary stays at ~0.6 GB).

On a device mesh (``layout``, a :class:`awp_jax.sharding.ForwardLayout`, as ``awp-jax compress
--mesh`` passes it) the blocks' parameters are laid out by the calibration forward's rules table,
each batch is split over the ``stack`` axis, and the embedding, final norm and head are replicated:
every device computes the head for its share of the batch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax import interrupts
from awp_jax.models import Llama

__all__ = ["PerplexityResult", "perplexity", "window_nll"]


class PerplexityResult(NamedTuple):
    perplexity: float
    mean_nll: float
    tokens: int  # predicted positions
    windows: int
    seqlen: int


# positions whose logits exist at once (over the batch): the head runs chunk by chunk, so memory
# holds [HEAD_TOKENS, vocab] floats, not [batch, seqlen, vocab] (805 MB for 8 x 512 on a 49k vocabulary)
HEAD_TOKENS = 1024


def _head_nll(model, x, tokens):
    """Summed next-token NLL per window ``[B]`` from the last block's output ``x [B, L, D]``; the
    head runs over ``HEAD_TOKENS`` positions at a time."""
    x = x[:, :-1]  # positions that predict a next token
    B, P, D = x.shape
    c = max(1, min(P, HEAD_TOKENS // B))
    n = -(-P // c)
    x = jnp.pad(x, ((0, 0), (0, n * c - P), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
    target = jnp.pad(tokens[:, 1:], ((0, 0), (0, n * c - P))).reshape(B, n, c).swapaxes(0, 1)

    def chunk(args):
        xc, tc = args
        logits = model.head(xc).astype(jnp.float32)  # [B, c, V]
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked  # [B, c]

    per_pos = jax.lax.map(chunk, (x, target)).swapaxes(0, 1).reshape(B, n * c)[:, :P]
    return jnp.sum(per_pos, axis=-1)


@functools.lru_cache(maxsize=8)  # one compiled function per model structure, not per call
def _nll_fn(graphdef):
    @jax.jit
    def nll(state, tokens):  # tokens [B, L] -> summed NLL per window [B]
        model = nnx.merge(graphdef, state)
        return _head_nll(model, model.hidden(tokens), tokens)

    return nll


@functools.lru_cache(maxsize=8)
def _head_fn(graphdef):
    @jax.jit
    def nll(state, x, tokens):
        return _head_nll(nnx.merge(graphdef, state), x, tokens)

    return nll


def _streamed_nll(model, batches: list[np.ndarray], progress: bool, layout=None) -> list[np.ndarray]:
    """A model whose blocks live on disk (:mod:`awp_jax.streaming`): every batch's hidden states
    are carried through one block at a time, so one block is in memory at once."""
    from awp_jax.calibration import run_block

    ctx = model.context(batches[0].shape[1])
    hidden = [model.embed(jnp.asarray(b)) for b in batches]
    if layout is not None:
        hidden, ctx = [layout.hidden(x) for x in hidden], layout.replicate(ctx)
    layers = range(len(model.layers))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=f"perplexity (seqlen {batches[0].shape[1]}, block by block)", unit="block", leave=False)
    for i in layers:
        interrupts.check()
        hidden = run_block(model.layers[i], hidden, ctx, layout)
    graphdef, state = nnx.split(model.outer)
    fn = _head_fn(graphdef)
    if layout is not None:
        state = layout.replicate(state)
    return [np.asarray(fn(state, x, _tokens(b, layout)), np.float64) for x, b in zip(hidden, batches)]


def _tokens(batch: np.ndarray, layout):
    return jnp.asarray(batch) if layout is None else layout.batch(batch)


def window_nll(model: Llama, windows: np.ndarray, batch_size: int = 8, progress: bool = True, layout=None) -> np.ndarray:
    """Summed next-token NLL of each window ``[N]`` (float64 on the host); ``layout``: run on its
    device mesh (see the module docstring)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, seqlen >= 2], got shape {windows.shape}")
    n = len(windows)
    batches = []
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size]
        if len(batch) < batch_size:  # pad to the compiled shape; padded rows are dropped
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        batches.append(batch)
    if getattr(model, "streamed", False):
        out = _streamed_nll(model, batches, progress, layout)
        return np.concatenate(out)[:n]
    graphdef, state = nnx.split(model)
    fn = _nll_fn(graphdef)
    if layout is not None:  # the blocks' parameters by the rules table, the rest replicated
        state = type(layout)(layout.mesh).block(state)  # (its own layout: ``replicated`` lists the calibration's)
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"perplexity (seqlen {windows.shape[1]})", unit="win", leave=False)
    for batch in batches:
        interrupts.check()
        out.append(np.asarray(fn(state, _tokens(batch, layout)), np.float64))
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    return np.concatenate(out)[:n]


def perplexity(model: Llama, windows: np.ndarray, batch_size: int = 8, progress: bool = True, layout=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows [N, seqlen]`` (see the module docstring)."""
    nll = window_nll(model, windows, batch_size, progress, layout)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean = float(np.sum(nll) / tokens)
    return PerplexityResult(math.exp(mean), mean, tokens, windows.shape[0], windows.shape[1])
