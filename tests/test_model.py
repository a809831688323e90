"""The Llama port against transformers' PyTorch implementation, and the checkpoint loaders."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awp_jax.checkpoints import CheckpointError, load_checkpoint, load_hf_dir, load_model
from awp_jax.models import Llama, LlamaConfig, build, forward, random_weights, weights_of

TINY = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
VARIANTS = {
    "gqa-untied": TINY,
    "gqa-tied": dataclasses.replace(TINY, tie_word_embeddings=True),
    "llama3-rope": dataclasses.replace(TINY, rope_theta=500000.0, max_position_embeddings=512, rope_scaling=(
        ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 64.0))),
    "qwen2-bias": dataclasses.replace(TINY, attention_bias=True),
    "qwen3-qk-norm": dataclasses.replace(TINY, model_type="qwen3"),
}


def torch_model(cfg: LlamaConfig, weights):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = cfg.to_hf_dict()
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(hf_cfg).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return m


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant):
    cfg = VARIANTS[variant]
    w = random_weights(cfg, seed=1, scale=0.2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 300)).astype(np.int32)  # > one attention chunk
    ours = np.asarray(forward(build(cfg, w))(jnp.asarray(tokens)))
    with torch.no_grad():
        ref = torch_model(cfg, w)(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-3, np.max(np.abs(ours - ref))


def test_bfloat16_close_to_float32():
    w = random_weights(TINY, seed=2, scale=0.2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (1, 64)), jnp.int32)
    f32 = np.asarray(forward(Llama(TINY, w))(tokens))
    bf16 = np.asarray(forward(Llama(dataclasses.replace(TINY, dtype="bfloat16"), w))(tokens))
    assert bf16.dtype == np.float32
    assert np.max(np.abs(bf16 - f32)) < 0.1 * np.max(np.abs(f32))


def test_weights_round_trip_and_shape_errors():
    w = random_weights(TINY, seed=3)
    back = weights_of(Llama(TINY, w))
    assert set(back) == set(w) and all(np.array_equal(back[k], w[k]) for k in w)
    bad = dict(w)
    bad["model.layers.1.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \(64, 95\), but the config needs \(64, 96\)"):
        Llama(TINY, bad)
    del bad["model.norm.weight"]
    with pytest.raises(ValueError, match="missing 1 tensors"):
        Llama(TINY, bad)
    ints = dict(w)
    ints["model.norm.weight"] = np.ones(64, np.int32)
    with pytest.raises(TypeError, match="floating-point"):
        Llama(TINY, ints)


def _save_hf_dir(path, cfg, weights, shards=1):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    keys = sorted(weights)
    if shards == 1:
        save_file({k: weights[k] for k in keys}, str(path / "model.safetensors"))
        return
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: weights[k] for k in part}, str(path / name))
        wm.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_directory_loads(tmp_path, shards):
    cfg = VARIANTS["qwen2-bias"]
    w = random_weights(cfg, seed=4)
    _save_hf_dir(tmp_path / "m", cfg, w, shards)
    cfg2, w2, tok = load_hf_dir(tmp_path / "m")
    assert cfg2 == dataclasses.replace(cfg, model_type="qwen2") and cfg2.family == cfg.family and tok is None
    assert all(np.array_equal(w2[k], w[k]) for k in w)
    model, _ = load_model(tmp_path / "m")
    assert isinstance(model, Llama)


def test_hf_directory_errors(tmp_path):
    cfg = TINY
    _save_hf_dir(tmp_path / "m", cfg, random_weights(cfg))
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf_dir(tmp_path / "m")
    f.unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_hf_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match="model not found"):
        load_checkpoint(tmp_path / "nope")
    d = cfg.to_hf_dict()
    d["model_type"] = "gpt2"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        load_hf_dir(tmp_path / "g")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_checkpoint(bad)


def test_qwen3_family_and_settings_the_port_does_not_implement():
    from transformers import Qwen3Config

    from awp_jax import models

    cfg = VARIANTS["qwen3-qk-norm"]
    m = build(cfg, random_weights(cfg, seed=7))
    assert isinstance(m, models.Qwen3) and set(m.layers[0].LINEARS) == set(Llama.Block.LINEARS)
    assert "model.layers.1.self_attn.k_norm.weight" in weights_of(m)
    hf = Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    assert models.config_from_hf(hf).family == "qwen3"
    hf.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        models.config_from_hf(hf)
    hf.use_sliding_window, hf.hidden_act = False, "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu' is not implemented"):
        models.config_from_hf(hf)


GEMMA3 = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=24, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=512)


@pytest.mark.parametrize("family, final_cap", [("gemma3_text", None), ("gemma3_text", 5.0), ("gemma2", 5.0)])
def test_gemma_logits_match_transformers(family, final_cap):
    """Sliding window (24 < 300 tokens) and global layers, their rotary bases, offset norms, GeGLU,
    the embedding scale, q/k norms (Gemma 3), attention soft-capping (Gemma 2: at 2.0, so it acts)
    and final-logit soft-capping."""
    from transformers import Gemma2Config, Gemma3TextConfig

    from awp_jax import models

    if family == "gemma2":
        hf = Gemma2Config(**GEMMA3, final_logit_softcapping=final_cap, attn_logit_softcapping=2.0)
    else:
        hf = Gemma3TextConfig(**GEMMA3, final_logit_softcapping=final_cap)
    cfg = models.config_from_hf(hf)
    assert cfg.family == family and cfg.layer_types[1] == "full_attention"
    w = random_weights(cfg, seed=3, scale=0.2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 300)).astype(np.int32)
    model = build(cfg, w)
    ours = np.asarray(forward(model)(jnp.asarray(tokens)))
    with torch.no_grad():
        ref = torch_model(cfg, w)(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-3, np.max(np.abs(ours - ref))
    # the window matters: without it the logits after position 24 differ
    assert np.max(np.abs(ours[:, 30:] - np.asarray(forward(build(dataclasses.replace(cfg, sliding_window=512), w))(tokens))[:, 30:])) > 1e-3


def test_gemma3_settings_the_port_does_not_implement_are_refused():
    from transformers import Gemma3TextConfig

    from awp_jax import models

    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0 is not implemented"):
        models.config_from_hf(Gemma3TextConfig(**GEMMA3, attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="rope_type='linear' is not implemented"):
        models.config_from_hf(Gemma3TextConfig(**GEMMA3, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        models.config_from_hf(Gemma3TextConfig(**GEMMA3, use_bidirectional_attention=True))


def test_phi3_fused_projections_and_sliding_window_match_transformers():
    """Fused qkv and gate_up projections (compressed as stored) and a 24-token window < 300 tokens."""
    from transformers import Phi3Config as HFPhi3Config

    from awp_jax import models

    # the default vocabulary size: transformers' Phi-3 defaults its pad/eos ids (32000) into it
    hf = HFPhi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                      sliding_window=24)
    cfg = models.config_from_hf(hf)
    assert cfg.family == "phi3" and cfg.sliding_window == 24
    w = random_weights(cfg, seed=5, scale=0.2)
    model = build(cfg, w)
    assert set(model.layers[0].LINEARS) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert w["model.layers.0.self_attn.qkv_proj.weight"].shape == (4 * 16 + 2 * 2 * 16, 64)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 300)).astype(np.int32)
    ours = np.asarray(forward(model)(jnp.asarray(tokens)))
    with torch.no_grad():
        ref = torch_model(cfg, w)(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-3, np.max(np.abs(ours - ref))
    hf.rope_parameters = {**hf.rope_parameters, "partial_rotary_factor": 0.75}
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75 is not implemented"):
        models.config_from_hf(hf)


@pytest.mark.parametrize("head_tokens", [1024, 21])  # one chunk; chunks that do not divide the positions
def test_perplexity_head_in_chunks_equals_full_logits(monkeypatch, head_tokens):
    from awp_jax import perplexity

    monkeypatch.setattr(perplexity, "HEAD_TOKENS", head_tokens)
    perplexity._nll_fn.cache_clear()
    model = build(TINY, random_weights(TINY, seed=1, scale=0.2))
    w = np.random.default_rng(0).integers(0, TINY.vocab_size, (5, 300)).astype(np.int32)
    nll = perplexity.window_nll(model, w, batch_size=3, progress=False)
    perplexity._nll_fn.cache_clear()
    logits = np.asarray(forward(model)(jnp.asarray(w)), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp[:, :-1], w[:, 1:, None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(nll, ref, rtol=1e-5)
