
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awp_jax import calibration, data, perplexity
from awp_jax.models import Llama, random_weights
from conftest import assert_gram_close
from test_model import TINY, torch_model


@pytest.fixture
def tiny():
    return Llama(TINY, random_weights(TINY, seed=5, scale=0.2))


@pytest.fixture
def windows():
    return np.random.default_rng(0).integers(0, TINY.vocab_size, (6, 32)).astype(np.int32)


def _manual_inputs(model, windows):
    """Inputs of every block's linear layers, computed directly: list over blocks of {name: [N, d]}."""
    from flax import nnx

    ctx = model.context(windows.shape[1])
    x = model.embed(jnp.asarray(windows))
    out = []
    for blk in model.layers:
        x, cap = nnx.capture(blk, nnx.Intermediate)(x, *ctx)
        assert set(cap) == set(blk.LINEARS.values())
        out.append({k: np.asarray(v.get_value()[0], np.float64).reshape(-1, v.get_value()[0].shape[-1]) for k, v in cap.items()})
    return out


def test_statistics_equal_x_xt_over_n(tiny, windows):
    stats = calibration.block_statistics(tiny, windows, batch_size=4)  # 2 batches, last one short
    manual = _manual_inputs(tiny, windows)
    for s, m in zip(stats, manual):
        for k, x in m.items():
            assert_gram_close(s[k], x)


def test_float64_accumulation_agrees(tiny, windows):
    a = calibration.block_statistics(tiny, windows, batch_size=2)
    b = calibration.block_statistics(tiny, windows, batch_size=2, accumulate="float64")
    assert b[0]["attn_in"].dtype == np.float64
    for s, t in zip(a, b):
        for k in s:
            np.testing.assert_allclose(s[k], t[k], rtol=1e-5, atol=1e-7)


def test_sequential_sees_compressed_blocks_parallel_does_not(windows):
    def run(mode):
        model = Llama(TINY, random_weights(TINY, seed=5, scale=0.2))
        seen = []

        def on_block(i, c):
            seen.append(c)
            blk = model.layers[i]
            blk.down_proj.weight[...] = blk.down_proj.weight[...] * 0.0  # "compress" block i hard
        calibration.block_statistics(model, windows, mode=mode, on_block=on_block)
        return seen

    seq, par = run("sequential"), run("parallel")
    dense = calibration.block_statistics(Llama(TINY, random_weights(TINY, seed=5, scale=0.2)), windows)
    np.testing.assert_allclose(seq[0]["attn_in"], par[0]["attn_in"], rtol=1e-6)
    np.testing.assert_allclose(par[1]["attn_in"], dense[1]["attn_in"], rtol=1e-6)
    assert not np.allclose(seq[1]["attn_in"], dense[1]["attn_in"], rtol=1e-3)


def test_token_cap_weighs_each_token_by_its_batch_median(tiny, windows):
    """C = Σ w_t x_t x_tᵀ / n with w_t = min(1, k · median ||x||² / ||x_t||²), the median over each
    batch's tokens: checked against the block inputs computed directly, batch by batch; a cap above
    every token changes nothing, and the capped tokens' share of the trace is at most k · median."""
    k, bs = 1.5, 3
    plain = calibration.block_statistics(tiny, windows, batch_size=bs)
    capped = calibration.block_statistics(tiny, windows, batch_size=bs, token_cap=k)
    huge = calibration.block_statistics(tiny, windows, batch_size=bs, token_cap=1e30)
    manual = _manual_inputs(tiny, windows)
    per_batch = bs * windows.shape[1]
    n_capped = 0
    for s, c, h, m in zip(plain, capped, huge, manual):
        for name, x in m.items():
            np.testing.assert_array_equal(h[name], s[name])
            want, before = np.zeros((x.shape[1], x.shape[1])), n_capped
            for b in range(0, len(x), per_batch):
                xb = x[b : b + per_batch]
                sq = np.sum(xb * xb, axis=1)
                w = np.minimum(1.0, k * np.median(sq) / sq)
                n_capped += int(np.sum(w < 1))
                assert np.all(w * sq <= k * np.median(sq) * (1 + 1e-9))
                want += (xb * w[:, None]).T @ xb
            want /= len(x)
            np.testing.assert_allclose(c[name], want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
            if n_capped > before:  # (after an RMSNorm with unit weights every token has the same norm: none capped)
                assert np.trace(c[name]) < np.trace(s[name])
    assert n_capped > 0


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), -1])
def test_bad_token_cap_rejected(tiny, windows, bad):
    with pytest.raises(ValueError, match=r"token_cap \(--token-cap\) must be a finite number >= 1"):
        calibration.block_statistics(tiny, windows, token_cap=bad)


def test_bad_mode_rejected(tiny, windows):
    with pytest.raises(ValueError, match="mode must be"):
        calibration.block_statistics(tiny, windows, mode="lazy")


def test_perplexity_matches_transformers_loss(tiny, windows):
    res = perplexity.perplexity(tiny, windows, batch_size=4, progress=False)  # padded last batch
    tm = torch_model(TINY, random_weights(TINY, seed=5, scale=0.2))
    with torch.no_grad():
        loss = tm(torch.from_numpy(windows).long(), labels=torch.from_numpy(windows).long()).loss.item()
    assert res.tokens == 6 * 31 and res.windows == 6
    assert res.perplexity == pytest.approx(np.exp(loss), rel=1e-4)


def test_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.int32)
    a = data.calibration_windows(tokens, n=5, seqlen=100, seed=3)
    np.testing.assert_array_equal(a, data.calibration_windows(tokens, n=5, seqlen=100, seed=3))
    assert a.shape == (5, 100) and np.all(np.diff(a, axis=1) == 1)
    assert not np.array_equal(a, data.calibration_windows(tokens, n=5, seqlen=100, seed=4))
    np.testing.assert_array_equal(a[:, 0], data.calibration_starts(len(tokens), n=5, seqlen=100, seed=3))  # what a held-out slice avoids
    e = data.eval_windows(tokens, 300)
    assert e.shape == (3, 300) and e[1, 0] == 300
    with pytest.raises(data.DataError, match="fewer than one window of 2048"):
        data.eval_windows(tokens, 2048)
    with pytest.raises(data.DataError, match="fewer than one window of 1000"):
        data.calibration_windows(tokens, seqlen=1000)


def test_user_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert data.read_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert data.load_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"txt": 2}\n')
    with pytest.raises(data.DataError, match="c.jsonl:2: expected a JSON object with a 'text' field"):
        data.read_text(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="holds no text"):
        data.read_text(tmp_path / "d.txt")
    with pytest.raises(data.DataError, match="not found"):
        data.read_text(tmp_path / "zzz.txt")


def test_statistics_of_a_family_whose_blocks_differ(windows):
    """Gemma 3 alternates sliding-window and global blocks (different compiled structures): each
    block's statistics come from its own forward, equal to X Xᵀ / n of its captured inputs."""
    from awp_jax import models

    cfg = models.GemmaConfig(vocab_size=TINY.vocab_size, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=8, sliding_window=5,
                              layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    model = models.build(cfg, models.random_weights(cfg, seed=2, scale=0.2))
    stats = calibration.block_statistics(model, windows, batch_size=4)
    manual = _manual_inputs(model, windows)
    for s, m in zip(stats, manual):
        assert set(s) == set(m) == {"attn_in", "o_in", "mlp_in", "down_in"}
        for k, x in m.items():
            assert_gram_close(s[k], x)


def test_ridge_adds_a_multiple_of_the_mean_diagonal():
    c = np.random.default_rng(1).normal(size=(8, 8)).astype(np.float32)
    c = c @ c.T
    got = np.asarray(calibration.ridge(c, 0.3))
    np.testing.assert_allclose(got, c + 0.3 * np.mean(np.diag(c)) * np.eye(8), rtol=1e-6)


def test_a_large_ridge_turns_wanda_into_magnitude_pruning(tiny, windows):
    """C + δ·mean(diag C)·I is what every method fits: as δ grows, Wanda's scores |W_ij|·sqrt(C_jj) become |W_ij|."""
    from awp_jax import compress, methods

    def masks(method, **kw):
        m = Llama(TINY, random_weights(TINY, seed=5, scale=0.2))
        report = compress.compress_model(m, windows, method, methods.Constraint(sparsity=0.5), progress=False, **kw)
        return report, [np.asarray(b.linear(n).weight[...]) == 0 for b in m.layers for n in b.LINEARS]

    _, magnitude = masks("magnitude")
    _, plain = masks("wanda")
    report, ridged = masks("wanda", c_ridge=1e8)
    agree = lambda a, b: np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b)]))  # noqa: E731
    assert agree(ridged, magnitude) > 0.999
    assert agree(plain, magnitude) < 0.99  # the statistic matters without the ridge
    assert all(np.isfinite(r["rel_objective"]) for r in report)


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_ridge_rejected(tiny, windows, bad):
    from awp_jax import compress, methods

    with pytest.raises(ValueError, match=r"c_ridge \(--c-ridge\) must be"):
        compress.compress_model(tiny, windows, "wanda", methods.Constraint(sparsity=0.5), progress=False, c_ridge=bad)
