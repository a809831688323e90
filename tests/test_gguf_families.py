"""The GGUF loader for the families llama.cpp files come in besides llama/qwen2: Qwen3 (q/k norms)
and Gemma 3 (four norms per block stored as ``1 + weight``, the sliding-window pattern llama.cpp
fixes). Tiny files written here with the ``gguf`` package in llama.cpp's layout load back to the
same weights and config; an architecture the loader does not read is refused by name."""

import dataclasses

import numpy as np
import pytest

from awp_jax import checkpoints
from awp_jax.checkpoints import CheckpointError, load_gguf
from awp_jax.models import GemmaConfig, LlamaConfig, random_weights

gguf = pytest.importorskip("gguf")

QWEN3 = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=256, model_type="qwen3")
GEMMA3 = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=7, num_heads=2, num_kv_heads=1,
                     head_dim=16, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=256,
                     layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(7)))

# Hugging Face block names → llama.cpp's (gguf-py's tensor map for these architectures)
_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
            "self_attn.k_norm": "attn_k_norm"}
_GEMMA = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
          "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(path, arch, cfg, weights, tokenizer_from=None, linear_type=None):
    """``weights`` (HF names and layout) as a GGUF in llama.cpp's layout (llama's q/k rows permuted,
    Gemma's norms as 1 + weight), F32 (the blocks' linear layers quantized to ``linear_type``, e.g.
    ``"Q8_0"``, if given); with the tokenizer metadata of the GGUF ``tokenizer_from``."""
    from awp_jax.formats.gguf import _permute

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    names = {**_TO_GGUF, **(_GEMMA if arch == "gemma3" else {"post_attention_layernorm": "ffn_norm"})}
    for k, v in weights.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, i, *rest = k.split(".")
            name = f"blk.{i}.{names['.'.join(rest[:-1])]}.{rest[-1]}"
        if arch == "gemma3" and k.endswith("norm.weight"):
            v = v + np.float32(1.0)  # llama.cpp's convert script stores Gemma's norm scales as 1 + weight
        if arch == "llama" and (".q_proj." in k or ".k_proj." in k):
            v = _permute(v, cfg.num_heads if ".q_proj." in k else cfg.num_kv_heads)  # llama.cpp's rotary row order
        if linear_type is not None and k.endswith("_proj.weight"):
            q = gguf.GGMLQuantizationType[linear_type]
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(v, np.float32), q), raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(v, np.float32))
    if tokenizer_from is not None:
        src = gguf.GGUFReader(str(tokenizer_from))
        for field in src.fields.values():
            if field.name.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,cfg", [("qwen3", QWEN3), ("gemma3", GEMMA3)])
def test_gguf_families_load_back(tmp_path, arch, cfg):
    weights = random_weights(cfg, seed=3)
    write_gguf(tmp_path / "m.gguf", arch, cfg, weights)
    cfg2, w2, _ = load_gguf(tmp_path / "m.gguf", with_tokenizer=False)
    assert set(w2) == set(weights)
    for k in weights:
        if arch == "gemma3" and k.endswith("norm.weight"):  # (1 + w) - 1 in float32: within one rounding of 1 + w
            np.testing.assert_allclose(w2[k], weights[k], rtol=0, atol=float(np.spacing(np.float32(2.0))), err_msg=k)
        else:
            np.testing.assert_array_equal(w2[k], weights[k], err_msg=k)
    assert cfg2 == dataclasses.replace(cfg, tie_word_embeddings=cfg.tie_word_embeddings or "lm_head.weight" not in weights)
    model, _ = checkpoints.load_model(tmp_path / "m.gguf", with_tokenizer=False)
    assert model.cfg.family == cfg.family


def test_gguf_architectures_the_loader_does_not_read_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "p.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'phi3'.*llama, qwen2, qwen3, gemma3"):
        load_gguf(tmp_path / "p.gguf", with_tokenizer=False)
