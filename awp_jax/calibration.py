"""Calibration statistics: ``C = X Xᵀ / n`` for the input of every linear layer of every block.

For each block, four second-moment matrices are accumulated over all calibration tokens:
``attn_in`` (shared by q/k/v), ``o_in`` (o_proj), ``mlp_in`` (shared by gate/up) and ``down_in``
(down_proj) for the Llama family; each family's ``Block.LINEARS`` maps a layer to its statistic, and
its blocks sow those inputs (``nnx.Intermediate``), captured here with ``nnx.capture``. A mixture
of experts sows its routing too, and its experts' statistics are taken per expert over the tokens
routed to each (see :func:`block_statistics`).

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

Token cap (``token_cap``, default off): a few tokens can dominate ``C`` — a window's first
position often carries massive activations (an "attention sink"; on the default model up to 99.8 %
of some statistics' trace), so a solver that fits ``C`` spends its effort on them. With a cap
``k``, each token's input is scaled so that its squared norm is at most ``k`` times the median
squared norm of that statistic's tokens in its batch (of ``batch_size`` windows; an expert's:
the tokens routed to it): ``C = Σ_t w_t x_t x_tᵀ / n`` with
``w_t = min(1, k · median_s ||x_s||² / ||x_t||²)``. Only the statistics change; the forward
(and so the next block's inputs) does not.

Ridge (``c_ridge``, default off): every method fits ``C + δ · mean(diag C) · I`` instead of ``C``,
i.e. the layer objective plus ``δ · mean(diag C) · ‖W − Θ‖_F²``. It pulls every method from the
calibration activations toward the weights themselves (δ → ∞: magnitude pruning, plain rounding),
a regulariser against fitting the calibration text too hard (:func:`ridge`).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awp_jax import interrupts, solver


__all__ = ["block_statistics", "run_block", "token_weights", "ridge", "MIN_EXPERT_TOKENS"]

# an expert that fewer calibration tokens are routed to is calibrated on all tokens (see block_statistics)
MIN_EXPERT_TOKENS = 16


def token_weights(v, cap: float, mask=None):
    """``sqrt(w_t)`` for the tokens of an input ``v`` (``[..., B, L, d]``; see the module docstring),
    shape ``[..., B, L, 1]``: each token's squared norm capped at ``cap`` times the median over the
    ``B · L`` tokens (of each leading index) or, with ``mask`` (``[B, L]``, an expert's routing),
    over the tokens it selects. A median of 0 (or of no token) caps nothing."""
    sq = jnp.sum(v * v, axis=-1)  # [..., B, L]
    flat = sq.reshape(sq.shape[:-2] + (-1,))
    if mask is None:
        med = jnp.median(flat, axis=-1)
    else:
        med = jnp.nanmedian(jnp.where(mask.reshape(-1) > 0, flat, jnp.nan), axis=-1)
    med = med[..., None, None]
    ratio = jnp.where((med > 0) & (sq > cap * med), cap * med / jnp.where(sq > 0, sq, 1.0), 1.0)
    return jnp.sqrt(ratio)[..., None]


def check_token_cap(cap) -> float | None:
    """``cap`` as a float, or a ValueError naming the problem (``None``: off)."""
    if cap is None:
        return None
    cap = float(cap)
    if not np.isfinite(cap) or cap < 1:
        raise ValueError(f"token_cap (--token-cap) must be a finite number >= 1 (a multiple of the median token's squared norm), got {cap}")
    return cap


def check_ridge(delta) -> float | None:
    """``delta`` as a float, or a ValueError naming the problem (``None``: off)."""
    if delta is None:
        return None
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating, np.integer)):
        raise ValueError(f"c_ridge (--c-ridge) must be a number, got {delta!r}")
    delta = float(delta)
    if not np.isfinite(delta) or delta <= 0:
        raise ValueError(f"c_ridge (--c-ridge) must be a finite number > 0 (a multiple of C's mean diagonal), got {delta}")
    return delta


@jax.jit
def ridge(c, delta):
    """``C + δ · mean(diag C) · I`` (``c [d, d]``; see the module docstring) in float32."""
    return solver.ridge(jnp.asarray(c, jnp.float32), jnp.asarray(delta, jnp.float32))


def gram(a, b=None):
    """``Σ aᵀ b`` over every axis but the last (``[..., d]`` → ``[d, d]``; ``b`` defaults to ``a``),
    at full float32 precision: every statistic and cross moment is one."""
    return jnp.einsum("...i,...j->ij", a, a if b is None else b, precision="highest")


def _routed_grams(v, mask, token_cap: float | None = None):
    """Per-expert sums for an input ``v`` (``[B, L, d]`` shared by the experts, or ``[E, B, L, d]``
    one per expert) and the routing mask ``[B, L, E]``: ``routed [E, d, d]`` over each expert's
    routed tokens, ``all`` over every token (``[d, d]`` or ``[E, d, d]``), ``tokens [E]``. One
    expert at a time (``lax.map``), so memory stays at one input's size. ``token_cap``: each
    expert's tokens weighed by the median of the tokens routed to it; ``all`` by the median of all."""
    per_expert = v.ndim == 4
    masks = jnp.moveaxis(mask, -1, 0)  # [E, B, L]

    def one(args):
        m, ve = args
        if token_cap is not None:
            ve = ve * token_weights(ve, token_cap, m)
        return gram(ve * m[..., None], ve)

    if per_expert:
        routed = jax.lax.map(one, (masks, v))
    else:  # the shared input is closed over, not copied once per expert
        routed = jax.lax.map(lambda m: one((m, v)), masks)
    v = v * token_weights(v, token_cap) if token_cap is not None else v  # the fallback's: every token
    if per_expert:
        everything = jax.lax.map(gram, v)
    else:
        everything = gram(v)
    return {"routed": routed, "all": everything, "tokens": jnp.sum(masks, axis=(1, 2))}


def _finish(totals: dict, n_tokens: int, routed: tuple, min_expert_tokens: int) -> dict[str, np.ndarray]:
    """Divide the sums by their token counts; routed statistics become one entry per expert
    (``name.e``, with ``name.e#tokens`` and ``name.e#fallback``). ``totals`` is emptied as it goes:
    each sum on the device is freed once its host copy exists, so one statistic is held twice at a
    time, not all of them."""
    out = {}
    for k in list(totals):
        v = totals.pop(k)
        if k not in routed:
            a = np.array(v)  # one host copy, divided in place (no second [d, d] array)
            del v
            a /= a.dtype.type(n_tokens)
            out[k] = a
            continue
        tokens = np.asarray(v["tokens"])
        for e, n_e in enumerate(tokens):
            fallback = bool(n_e < min_expert_tokens)
            if fallback:
                c = v["all"] if np.ndim(v["all"]) == 2 else v["all"][e]
                out[f"{k}.{e}"] = np.asarray(c / n_tokens)
            else:
                out[f"{k}.{e}"] = np.asarray(v["routed"][e] / n_e)
            out[f"{k}.{e}#tokens"] = np.asarray(int(round(float(n_e))))
            out[f"{k}.{e}#fallback"] = np.asarray(fallback)
    return out


@functools.lru_cache(maxsize=8)  # one set of compiled functions per block structure (token cap, layout)
def _block_fns(graphdef, token_cap: float | None, layout=None):
    """The jitted block passes; ``layout`` (a :class:`awp_jax.sharding.ForwardLayout`): the
    statistics are computed by its :meth:`~awp_jax.sharding.ForwardLayout.gram`, rows split over the
    model axis, so that no device holds a whole statistic or a gathered row-parallel input."""

    def enter(x):
        return x if layout is None else layout.enter(x)

    def leave(y):
        return y if layout is None else layout.leave(y)

    def statistic(split, k, a, b=None):  # split: the statistics whose inputs the layout splits by feature
        return gram(a, b) if layout is None else layout.gram(a, b, split=k in split)

    def split_of(blk):
        return frozenset() if layout is None else layout.split_inputs(blk.LINEARS)

    @jax.jit
    def stats(state, x, ctx):  # x [B, L, D] -> (y, {name: X Xᵀ summed over B·L})
        blk = nnx.merge(graphdef, state)
        y, cap = nnx.capture(blk, nnx.Intermediate)(enter(x), *ctx)
        values = {k: var.get_value()[0] for k, var in cap.items()}  # the block sows each statistic's input once per call
        mask = values.pop("routing", None)  # [B, L, E]: which experts each token was routed to
        grams, split = {}, split_of(blk)
        for k, v in values.items():
            v = v.astype(jnp.float32)
            if k in getattr(blk, "ROUTED", ()):
                grams[k] = _routed_grams(v, mask, token_cap)
            else:
                v = v * token_weights(v, token_cap) if token_cap is not None else v
                grams[k] = statistic(split, k, v)
        return leave(y), grams

    @jax.jit
    def grams_only(state, x, ctx):  # when the block's output is recomputed after compression
        return stats(state, x, ctx)[1]

    @jax.jit
    def run(state, x, ctx):
        return leave(nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(enter(x), *ctx)[0])

    @jax.jit
    def cross(state, x_dense, x, ctx):
        """Both streams in one pass (error-correcting targets; no routed statistics): the dense
        stream's output, the compressed stream's, and ``{name: X Xᵀ, name#cross: X_dense Xᵀ}``."""
        blk = nnx.merge(graphdef, state)
        y_d, cap_d = nnx.capture(blk, nnx.Intermediate)(enter(x_dense), *ctx)
        y, cap = nnx.capture(blk, nnx.Intermediate)(enter(x), *ctx)
        out, split = {}, split_of(blk)
        for k, var in cap.items():
            v_d, v = cap_d[k].get_value()[0].astype(jnp.float32), var.get_value()[0].astype(jnp.float32)
            if token_cap is not None:  # one weight per token for both streams: the compressed stream's
                sw = token_weights(v, token_cap)
                v_d, v = v_d * sw, v * sw
            out[k] = statistic(split, k, v)
            out[f"{k}#cross"] = statistic(split, k, v_d, v)
        return leave(y_d), leave(y), out

    return stats, grams_only, run, cross


def run_block(block, hidden: list, ctx: tuple, layout=None) -> list:
    """Each batch of ``hidden`` through ``block`` (its sown inputs dropped). Waits for the results:
    dispatch is asynchronous, and a caller that builds the next block while this one still runs
    would hold several blocks at once. ``layout``: see :func:`block_statistics`."""
    run_fn = _block_fns(nnx.graphdef(block), None, layout)[2]  # the forward does not depend on the cap
    state = _placed(nnx.state(block), layout)
    return jax.block_until_ready([run_fn(state, x, ctx) for x in hidden])


def _placed(state, layout):
    return state if layout is None else layout.block(state)


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
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
    layout=None,
    cross: bool = False,
    before_prefix: Callable[[], None] | None = None,
    token_cap: float | None = None,
) -> list[dict[str, np.ndarray]] | None:
    """Second moments ``C`` (``{name: [d, d]}``, divided by the token count) for every block.

    ``on_block(l, stats)`` is called once per block in order; in sequential mode it may change
    block l's weights (compress it) before block l + 1's inputs are computed. Without ``on_block``
    the list of all blocks' statistics is returned; with it, nothing is kept and ``None`` returned.

    Mixture-of-experts blocks (their class's ``ROUTED`` statistics): each expert ``e`` gets
    ``name.e`` over the tokens routed to it, divided by their count, with ``name.e#tokens`` (that
    count) and ``name.e#fallback``: an expert reached by fewer than ``min_expert_tokens`` tokens
    gets the statistic over all tokens instead (as if every token were routed to it: its input
    distribution had it been chosen) — never a division by zero or a rank-deficient C from a handful
    of tokens.

    ``start_block`` resumes a run: blocks before it only carry the hidden states forward (with the
    weights they have at that moment), then ``after_prefix()`` is called, then statistics start.

    ``layout`` (a :class:`awp_jax.sharding.ForwardLayout`): run the forward on its device mesh, each
    block's parameters and the batches placed as it says; the statistics are the same up to the
    order of floating-point sums. ``None``: the default device.

    ``cross`` (sequential mode; error-correcting targets, :mod:`awp_jax.targets`): a second stream
    of hidden states is carried through the blocks *before* ``on_block`` compresses them — the
    dense model's — and every statistic ``name`` gets ``name#cross = X_dense Xᵀ / n``, the moment
    between the dense model's input to that layer and the compressed model's. The blocks before
    ``start_block`` must then be dense when the call starts: the dense stream is carried through
    them first, then ``before_prefix()`` is called (to load the compressed blocks), then the
    compressed stream. Not for mixtures of experts (routing differs between the streams).

    ``token_cap``: cap each token's share of the statistics (see the module docstring; with
    ``cross``, the compressed stream's weights weigh both streams). ``None`` (default): every token
    counts in full.
    """
    token_cap = check_token_cap(token_cap)
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
    hidden = [model.embed(jnp.asarray(b)) for b in batches]  # the model is never split whole: its blocks may live on disk
    if layout is not None:
        hidden, ctx = [layout.hidden(x) for x in hidden], layout.replicate(ctx)
    recompute = mode == "sequential" and on_block is not None
    if cross and mode != "sequential":
        raise ValueError("cross moments (error-correcting targets) need sequential calibration: in parallel mode "
                         "the compressed model's inputs are the dense model's")
    if cross and any(getattr(b, "ROUTED", ()) for b in model.layers):
        raise ValueError("error-correcting targets are not supported for mixture-of-experts blocks "
                         "(the dense and compressed streams route tokens differently)")
    dense_hidden = list(hidden) if cross else None
    kept: list | None = [] if on_block is None else None
    def fns(li):  # blocks may differ in structure (e.g. sliding-window and global attention)
        return _block_fns(nnx.graphdef(model.layers[li]), token_cap, layout)

    if cross:
        for li in range(start_block):  # the blocks still hold their dense weights here
            dense_hidden = run_block(model.layers[li], dense_hidden, ctx, layout)
    if before_prefix is not None:
        before_prefix()
    for li in range(start_block):
        hidden = run_block(model.layers[li], hidden, ctx, layout)
    if after_prefix is not None:
        after_prefix()

    layers = range(start_block, len(model.layers))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc=f"calibration ({mode})", unit="block")
    for li in layers:
        interrupts.check()  # a signal whose KeyboardInterrupt was swallowed stops the run here
        state = _placed(nnx.state(model.layers[li]), layout)
        stats_fn, grams_fn, run_fn, cross_fn = fns(li)
        totals = None
        outs, dense_outs = [], []
        for bi, x in enumerate(hidden):
            if cross:  # one pass over both streams; the compressed stream's output only when not recomputed
                y_d, y, grams = cross_fn(state, dense_hidden[bi], x, ctx)
                dense_outs.append(y_d)
                if not recompute:
                    outs.append(y)
            elif recompute:
                grams = grams_fn(state, x, ctx)
            else:
                y, grams = stats_fn(state, x, ctx)
                outs.append(y)
            if accumulate == "float64":
                grams = jax.tree.map(lambda v: np.asarray(v, np.float64), grams)
            totals = grams if totals is None else jax.tree.map(lambda a, b: a + b, totals, grams)
        grams = None  # ``totals`` holds the only references: _finish frees each sum as it copies it
        c = _finish(totals, n_tokens, tuple(getattr(model.layers[li], "ROUTED", ())), min_expert_tokens)
        totals = None
        if on_block is None:
            kept.append(c)
        else:
            on_block(li, c)
            if recompute:  # sequential: the next block sees the compressed block's output
                state = _placed(nnx.state(model.layers[li]), layout)
                outs = [run_fn(state, x, ctx) for x in hidden]
        hidden = outs
        if cross:
            dense_hidden = dense_outs
    return kept
