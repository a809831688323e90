"""Error-correcting targets: the corrected weight is the optimum of the dense-output objective, the
solver lowers that objective when given it, the cross moments come from the two streams."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import awp_jax as aj
from awp_jax import calibration, compress, methods
from awp_jax.models import Llama, random_weights
from awp_jax.targets import ErrorCorrection, corrected_weight, cross_objective
from tests.test_pipeline import SMALL, _windows


def _streams(seed=0, d_out=64, d_in=128, n=4096, drift=0.3):
    """Dense inputs X_d with outlier channels, and the compressed model's X = X_d + a drift."""
    rng = np.random.default_rng(seed)
    scale = np.where(rng.random(d_in) < 0.05, 8.0, 1.0)
    x_d = rng.standard_normal((d_in, n)) * scale[:, None]
    x = x_d + drift * rng.standard_normal((d_in, n)) * scale[:, None] + 0.2 * x_d[::-1]
    w = rng.standard_normal((d_out, d_in))
    c, cross, c_dense = x @ x.T / n, x_d @ x.T / n, x_d @ x_d.T / n
    return tuple(np.asarray(a, np.float32) for a in (w, c, cross, c_dense))


def test_the_corrected_weight_is_the_dense_output_optimum_and_the_solver_lowers_that_objective():
    w, c, cross, c_dense = _streams()
    w_star = np.asarray(corrected_weight(w, c, cross, ErrorCorrection(alpha=1.0, damping=1e-6)))
    # the unconstrained optimum of ||W X_d − Θ X||²: its gradient W M − Θ C vanishes, and it beats W itself
    grad = w @ cross - w_star @ c
    assert np.abs(grad).max() < 1e-3 * np.abs(w @ cross).max()
    assert float(cross_objective(w, w_star, c, cross, c_dense)) < float(cross_objective(w, w, c, cross, c_dense))
    # AWP given the corrected target lowers the error-correcting objective below AWP on W; the two
    # objectives disagree here, and AWP on W wins the plain one
    cfg = aj.awp_pruning(0.5, max_iter=100)
    plain = np.asarray(aj.solve_pgd(w, c, cfg).theta)
    ec = np.asarray(aj.solve_pgd(jnp.asarray(w_star), c, cfg).theta)
    assert float(cross_objective(w, ec, c, cross, c_dense)) < 0.95 * float(cross_objective(w, plain, c, cross, c_dense))
    assert float(aj.objective(w, plain, c)) < float(aj.objective(w, ec, c))
    # partial correction: α scales the step from W towards W*
    half = np.asarray(corrected_weight(w, c, cross, ErrorCorrection(alpha=0.5, damping=1e-6)))
    np.testing.assert_allclose(half, w + 0.5 * (w_star - w), rtol=1e-4, atol=1e-4)


def test_no_drift_means_no_correction_and_bad_settings_are_refused():
    w, c, _, _ = _streams()
    np.testing.assert_array_equal(np.asarray(corrected_weight(w, c, c, ErrorCorrection())), w)
    for bad, match in (({"alpha": 0}, "alpha must be"), ({"alpha": 1.5}, "alpha must be"),
                       ({"damping": 0}, "damping must be"), ({"damping": float("nan")}, "damping must be")):
        with pytest.raises(ValueError, match=match):
            ErrorCorrection(**bad)
    with pytest.raises(ValueError, match="must both be"):
        corrected_weight(w, c, c[:10, :10], ErrorCorrection())


def test_cross_moments_follow_the_dense_and_the_compressed_streams():
    cfg = dataclasses.replace(SMALL, num_layers=2)
    model = Llama(cfg, random_weights(cfg, 3))
    seen = {}

    def on_block(i, stats):
        seen[i] = stats
        for n in model.layers[i].LINEARS:  # compress the block: the next one's streams differ
            lin = model.layers[i].linear(n)
            lin.weight[...] = lin.weight[...] * (jnp.abs(lin.weight[...]) > jnp.median(jnp.abs(lin.weight[...])))

    calibration.block_statistics(model, _windows(), on_block=on_block, cross=True)
    # block 0: both streams are the embeddings, so X_d = X at its input
    np.testing.assert_array_equal(seen[0]["attn_in#cross"], seen[0]["attn_in"])
    # block 1: the dense stream ran through block 0's dense weights; compare with a dense pass
    dense = calibration.block_statistics(Llama(cfg, random_weights(cfg, 3)), _windows(), mode="parallel")
    ref = calibration.block_statistics(Llama(cfg, random_weights(cfg, 3)), _windows())  # plain sequential, same C
    assert not np.allclose(seen[1]["attn_in#cross"], seen[1]["attn_in"], rtol=1e-2)
    assert not np.allclose(seen[1]["attn_in"], dense[1]["attn_in"], rtol=1e-2)
    assert set(seen[1]) == set(ref[1]) | {k + "#cross" for k in ref[1]}
    with pytest.raises(ValueError, match="sequential"):
        calibration.block_statistics(model, _windows(), mode="parallel", on_block=on_block, cross=True)


def test_token_cap_weighs_both_streams_by_the_compressed_streams_tokens():
    """With a token cap the cross moment is Σ w_t x_dense,t x_tᵀ / n, w_t from the compressed stream
    (the median over each batch of 8 windows), checked at block 1 against the two streams computed
    directly."""
    from flax import nnx

    cfg, k = dataclasses.replace(SMALL, num_layers=2), 1.5
    model = Llama(cfg, random_weights(cfg, 3))
    pruned = {}

    def on_block(i, stats):
        pruned[i] = stats
        for n in model.layers[i].LINEARS:
            lin = model.layers[i].linear(n)
            lin.weight[...] = lin.weight[...] * (jnp.abs(lin.weight[...]) > jnp.median(jnp.abs(lin.weight[...])))

    windows = _windows()
    calibration.block_statistics(model, windows, on_block=on_block, cross=True, token_cap=k)
    dense = Llama(cfg, random_weights(cfg, 3))
    ctx = dense.context(windows.shape[1])
    x0 = dense.embed(jnp.asarray(windows))
    h_d = nnx.capture(dense.layers[0], nnx.Intermediate)(x0, *ctx)[0]
    h = nnx.capture(model.layers[0], nnx.Intermediate)(x0, *ctx)[0]  # block 0 as compressed
    cap_d = nnx.capture(dense.layers[1], nnx.Intermediate)(h_d, *ctx)[1]
    cap = nnx.capture(dense.layers[1], nnx.Intermediate)(h, *ctx)[1]  # block 1 still dense when calibrated
    bites = 0
    for name in model.layers[1].LINEARS.values():
        xd = np.asarray(cap_d[name].get_value()[0], np.float64).reshape(-1, cap_d[name].get_value()[0].shape[-1])
        x = np.asarray(cap[name].get_value()[0], np.float64).reshape(xd.shape)
        sq = np.sum(x * x, axis=1)
        w = np.minimum(1.0, k * np.median(sq) / sq)  # one batch: 8 windows
        bites += int(np.sum(w < 1))
        want_c, want_cross = (x * w[:, None]).T @ x / len(x), (xd * w[:, None]).T @ x / len(x)
        scale = np.abs(want_c).max()
        np.testing.assert_allclose(pruned[1][name], want_c, rtol=1e-3, atol=2e-5 * scale)
        np.testing.assert_allclose(pruned[1][name + "#cross"], want_cross, rtol=1e-3, atol=2e-5 * scale)
    assert bites > 0


def test_error_correcting_pipeline_fits_the_dense_outputs_better():
    """Whole model: with the corrected targets the compressed model's logits on the calibration
    windows are closer to the dense model's (what the objective asks; out-of-sample gains are a
    measurement, bench/targets.py, not a claim a random model can test)."""
    from awp_jax.models import forward

    cfg = dataclasses.replace(SMALL, num_layers=3)
    dense = Llama(cfg, random_weights(cfg, 5))
    ids = _windows(16, 64)
    ref = np.asarray(forward(dense)(ids))
    spec = methods.Constraint(sparsity=0.6)
    err = {}
    for label, ec in (("plain", None), ("ec", ErrorCorrection(alpha=0.5))):
        model = Llama(cfg, random_weights(cfg, 5))
        report = compress.compress_model(model, ids, "sparsegpt", spec, progress=False, error_correction=ec)
        assert all(np.mean(np.asarray(model.layers[r["block"]].linear(r["layer"]).weight[...]) == 0) >= 0.59 for r in report)
        err[label] = float(np.mean((np.asarray(forward(model)(ids)) - ref) ** 2))
    assert err["ec"] < err["plain"]
    with pytest.raises(ValueError, match="sequential"):
        compress.compress_model(Llama(cfg, random_weights(cfg, 5)), _windows(), "wanda", spec, mode="parallel",
                                progress=False, error_correction=ErrorCorrection())
