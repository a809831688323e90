"""Mixtures of experts (Mixtral, Qwen3-MoE): parity with transformers, per-expert statistics from
the routed tokens, the fallback for experts no token reaches, and a whole compression run."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awp_jax import calibration, compress, export, methods
from awp_jax.checkpoints import load_hf_dir, load_model
from awp_jax.models import MoEConfig, build, config_from_hf, forward, random_weights, weights_of
from conftest import assert_gram_close

MIXTRAL = MoEConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, num_experts=4, experts_per_token=2, model_type="mixtral", max_position_embeddings=256)
QWEN3_MOE = dataclasses.replace(MIXTRAL, model_type="qwen3_moe", moe_intermediate_size=48, norm_topk_prob=False, rms_norm_eps=1e-6)


def _save(path, cfg, w):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, str(path / "model.safetensors"))


def _torch_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("cfg", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_logits_match_transformers_and_config_round_trips(tmp_path, cfg):
    w = random_weights(cfg, seed=1, scale=0.2)
    _save(tmp_path / "m", cfg, w)  # the checkpoint layout transformers' save_pretrained writes (one tensor per expert)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
    ours = np.asarray(forward(build(cfg, w))(jnp.asarray(tokens)))
    ref = _torch_logits(tmp_path / "m", tokens)
    assert np.max(np.abs(ours - ref)) <= 1e-3, np.max(np.abs(ours - ref))
    cfg2, w2, _ = load_hf_dir(tmp_path / "m")
    assert cfg2 == cfg and set(w2) == set(w)
    assert set(weights_of(build(cfg, w))) == set(w)


def test_moe_settings_the_port_does_not_implement_are_refused():
    from transformers import AutoConfig

    d = QWEN3_MOE.to_hf_dict()
    for field, value in (("mlp_only_layers", [1]), ("decoder_sparse_step", 2)):
        hf = AutoConfig.for_model("qwen3_moe", **{**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")}, field: value})
        with pytest.raises(ValueError, match=field):
            config_from_hf(hf)
    with pytest.raises(ValueError, match="experts_per_token"):
        dataclasses.replace(MIXTRAL, experts_per_token=5)
    # a checkpoint with more experts than its config says: the router's shape names the disagreement
    w = random_weights(dataclasses.replace(MIXTRAL, num_experts=6), seed=0)
    with pytest.raises(ValueError, match=r"block_sparse_moe.gate.weight has shape \(6, 64\), but the config needs \(4, 64\)"):
        build(MIXTRAL, w)


def _one_sided_router(cfg, w, scale=20.0):
    """Router rows so that top-1 routing only ever picks expert 0 or 1 (logits ±s, 0.5·s and 0): experts 2
    and 3 are never reached."""
    rng = np.random.default_rng(5)
    w = dict(w)
    for i in range(cfg.num_layers):
        u = rng.standard_normal(cfg.hidden_size).astype(np.float32)
        key = f"model.layers.{i}.block_sparse_moe.gate.weight"
        w[key] = np.stack([scale * u, -scale * u, 0.5 * scale * u, np.zeros_like(u)])
    return w


def _capped(x, cap):
    """Rows of ``x`` scaled as the token cap weighs them (the median over these rows; one batch)."""
    if cap is None:
        return x
    sq = np.sum(np.asarray(x, np.float64) ** 2, axis=1)
    return x * np.sqrt(np.minimum(1.0, cap * np.median(sq) / sq))[:, None]


@pytest.mark.parametrize("k", [None, 1.5])
def test_per_expert_statistics_are_over_the_routed_tokens(k):
    """Each expert's statistics over the tokens routed to it; with a token cap, each token weighed
    by the median of that expert's routed tokens (the router input's: of all tokens)."""
    cfg = MIXTRAL
    w = random_weights(cfg, seed=2, scale=0.2)
    model = build(cfg, w)
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    stats = calibration.block_statistics(model, windows, mode="parallel", min_expert_tokens=1, token_cap=k)
    # reference: the block's router input and expert activations, routed by hand
    blk = model.layers[1]
    from flax import nnx

    x = model.embed(jnp.asarray(windows))
    ctx = model.context(windows.shape[1])
    x, _ = nnx.capture(model.layers[0], nnx.Intermediate)(x, *ctx)
    _, cap = nnx.capture(blk, nnx.Intermediate)(x, *ctx)
    m = np.asarray(cap["expert_in"].get_value()[0]).reshape(-1, cfg.hidden_size)
    mask = np.asarray(cap["routing"].get_value()[0]).reshape(-1, cfg.num_experts)
    act = np.asarray(cap["expert_down_in"].get_value()[0]).reshape(cfg.num_experts, -1, cfg.intermediate_size)
    assert np.all(mask.sum(-1) == cfg.experts_per_token)
    total = 0
    for e in range(cfg.num_experts):
        sel = mask[:, e] > 0
        n_e = int(sel.sum())
        total += n_e
        assert int(stats[1][f"expert_in.{e}#tokens"]) == n_e > 0
        assert_gram_close(stats[1][f"expert_in.{e}"], _capped(m[sel], k))
        assert_gram_close(stats[1][f"expert_down_in.{e}"], _capped(act[e][sel], k))
        if k is not None:  # the cap bites: some routed token of this expert is weighed down
            sq = np.sum(act[e][sel].astype(np.float64) ** 2, axis=1)
            assert np.any(sq > k * np.median(sq))
        assert not bool(stats[1][f"expert_in.{e}#fallback"])
    assert total == windows.size * cfg.experts_per_token
    np.testing.assert_allclose(stats[1]["attn_in"].shape, (cfg.hidden_size, cfg.hidden_size))


def test_unreached_expert_falls_back_to_all_tokens_and_is_reported(capsys):
    cfg = dataclasses.replace(MIXTRAL, experts_per_token=1)
    w = _one_sided_router(cfg, random_weights(cfg, seed=3, scale=0.2))
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    stats = calibration.block_statistics(build(cfg, w), windows, mode="parallel")
    for blk in stats:
        counts = [int(blk[f"expert_in.{e}#tokens"]) for e in range(4)]
        assert counts[2] == counts[3] == 0 and counts[0] + counts[1] == windows.size, counts
        for e in (2, 3):
            assert bool(blk[f"expert_in.{e}#fallback"]) and bool(blk[f"expert_down_in.{e}#fallback"])
            assert np.all(np.isfinite(blk[f"expert_down_in.{e}"])) and np.trace(blk[f"expert_down_in.{e}"]) > 0
        # the fallback for the shared input is the all-token statistic of the router input
        mixed = (counts[0] * blk["expert_in.0"] + counts[1] * blk["expert_in.1"]) / windows.size
        np.testing.assert_allclose(blk["expert_in.2"], mixed, rtol=1e-4, atol=1e-6)
    model = build(cfg, w)
    report = compress.compress_model(model, windows, "wanda", methods.Constraint(sparsity=0.5), progress=False)
    err = capsys.readouterr().err
    assert "experts.2" in err and "calibrated on all tokens instead" in err
    rows = {(r["block"], r["layer"]): r for r in report}
    assert rows[(0, "experts.3.w2")]["statistic"] == "all tokens (fallback)" and rows[(0, "experts.3.w2")]["routed_tokens"] == 0
    assert rows[(0, "experts.0.w1")]["statistic"] == "routed tokens" and rows[(0, "experts.0.w1")]["routed_tokens"] > 0
    assert "gate" not in {r["layer"] for r in report}  # the router stays dense
    np.testing.assert_array_equal(np.asarray(model.layers[0].router.weight[...]), w["model.layers.0.block_sparse_moe.gate.weight"])
    for r in report:
        lin = model.layers[r["block"]].linear(r["layer"])
        assert np.mean(np.asarray(lin.weight[...]) == 0) >= 0.5


def test_compressing_a_mixture_end_to_end(tmp_path):
    """AWP through the stacked experts lowers every expert's objective below its Wanda start; the
    vmapped stack equals one solve per layer; the written directory loads in transformers with the
    same logits."""
    cfg = dataclasses.replace(QWEN3_MOE, num_layers=1)
    w = random_weights(cfg, seed=4, scale=0.2)
    windows = np.random.default_rng(3).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    stacked, single = build(cfg, w), build(cfg, w)
    opts = methods.AWPOptions(max_iter=10)
    report = compress.compress_model(stacked, windows, "awp", methods.Constraint(sparsity=0.5), opts, progress=False)
    compress.compress_model(single, windows, "awp", methods.Constraint(sparsity=0.5), opts, progress=False, vmap_groups=False)
    experts = [r for r in report if r["layer"].startswith("experts.")]
    assert len(experts) == cfg.num_layers * cfg.num_experts * 3
    assert max(r["stacked"] for r in experts) == 2 * cfg.num_experts  # every expert's gate and up in one stack
    assert all(r["rel_objective"] < r["init_rel_objective"] for r in experts)
    a, b = weights_of(stacked), weights_of(single)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    out = tmp_path / "out"
    export.save_hf_dir(stacked, out, report={"layers": report})
    tokens = windows[:2]
    ours = np.asarray(forward(load_model(out)[0])(jnp.asarray(tokens)))
    ref = _torch_logits(out, tokens)
    assert np.max(np.abs(ours - ref)) <= 1e-3
