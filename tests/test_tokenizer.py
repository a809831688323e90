"""The tokenizer of a GGUF file, built without torch, against transformers' own GGUF path."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from awp_jax import assets, checkpoints

TEXTS = [
    "Hello world",
    "  héllo  wörld\t\tñ 日本語 — 🤗 Ａｂｃ ﬁ café\u00a0!",
    "   leading and trailing runs of spaces   \n\n\n\t\t  ",
    "1234567 3.14159 0x1F 1,000,000 2024-05-17",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "It's we've they'll I'd 'quoted' \"double\"",
]
MESSAGES = [{"role": "user", "content": "What is 2+2? Answer in   one word."}]
SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@pytest.fixture(scope="module")
def default_gguf():
    return assets.fetch(assets.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory, default_gguf):
    """A tiny qwen2 GGUF (one layer, hidden 16) carrying the default model's byte-level BPE
    vocabulary with llama.cpp's qwen2 pre-tokenizer; no other model is downloaded."""
    import gguf

    src = gguf.GGUFReader(str(default_gguf))
    meta = lambda key: src.fields[key].contents()  # noqa: E731
    tokens = meta("tokenizer.ggml.tokens")
    vocab, hidden, ffn, heads, kv_heads, head_dim = len(tokens), 16, 32, 2, 1, 8
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(meta("tokenizer.ggml.token_type"))
    w.add_token_merges(meta("tokenizer.ggml.merges"))
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(meta("tokenizer.chat_template"))
    r = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", (0.02 * r.standard_normal((vocab, hidden))).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    shapes = {
        "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        "attn_q.weight": (heads * head_dim, hidden), "attn_q.bias": (heads * head_dim,),
        "attn_k.weight": (kv_heads * head_dim, hidden), "attn_k.bias": (kv_heads * head_dim,),
        "attn_v.weight": (kv_heads * head_dim, hidden), "attn_v.bias": (kv_heads * head_dim,),
        "attn_output.weight": (hidden, heads * head_dim),
        "ffn_gate.weight": (ffn, hidden), "ffn_up.weight": (ffn, hidden), "ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        w.add_tensor(f"blk.0.{name}", (0.02 * r.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.lru_cache(maxsize=None)
def _reference(path: pathlib.Path):
    """transformers' own GGUF tokenizer (imports torch; the test environment has it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ids(tok):
    out = [tok(t)["input_ids"] for t in TEXTS]
    out.append(tok(TEXTS[1], add_special_tokens=False)["input_ids"])
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    out.append(tok(chat, add_special_tokens=False)["input_ids"])
    out.append(list(tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"]))
    return out


def _assert_same_tokenizer(ours, ref):
    assert _ids(ours) == _ids(ref)
    assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template == ref.chat_template is not None
    assert [getattr(ours, k) for k in SPECIAL] == [getattr(ref, k) for k in SPECIAL]
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    assert len(ours) == len(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    for t in TEXTS:
        ids = ours(t)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize("which", ["default", "qwen2"])
def test_gguf_tokenizer_matches_transformers(which, default_gguf, qwen2_gguf):
    path = pathlib.Path(default_gguf if which == "default" else qwen2_gguf)
    ours, ref = checkpoints.load_tokenizer(path), _reference(path)
    _assert_same_tokenizer(ours, ref)
    if which == "default":  # SmolLM2-Instruct: ChatML, no BOS added
        assert [getattr(ours, k) for k in SPECIAL] == [1, 2, 2, 0]
        assert ours("hi")["input_ids"] == ours("hi", add_special_tokens=False)["input_ids"]


def test_gguf_tokenizer_round_trips_through_save_pretrained(default_gguf, tmp_path):
    from transformers import AutoTokenizer

    ours = checkpoints.load_tokenizer(default_gguf)
    ours.save_pretrained(str(tmp_path / "tok"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    _assert_same_tokenizer(again, ours)
    assert checkpoints.load_tokenizer(tmp_path / "tok")("Hello world")["input_ids"] == ours("Hello world")["input_ids"]


def test_load_gguf_reuses_its_reader_for_the_tokenizer(qwen2_gguf):
    cfg, weights, tok = checkpoints.load_gguf(qwen2_gguf)
    assert cfg.attention_bias and cfg.num_layers == 1 and cfg.vocab_size == len(tok)
    assert tok(TEXTS[0])["input_ids"] == _reference(qwen2_gguf)(TEXTS[0])["input_ids"]


def test_gguf_without_tokenizer_metadata_is_named(tmp_path):
    import gguf

    path = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(checkpoints.CheckpointError, match=r"notok\.gguf holds no tokenizer"):
        checkpoints.load_tokenizer(path)


_NO_TORCH = r"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from awp_jax import checkpoints

texts, default, qwen2 = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = checkpoints.load_tokenizer(default)
out = {"tokenizer": [tok(t)["input_ids"] for t in texts]}
model, tok2 = checkpoints.load_model(default)
out["model"] = [tok2(t)["input_ids"] for t in texts]
out["default_layers"] = model.cfg.num_layers
model, tok3 = checkpoints.load_model(qwen2)
ids = np.asarray([tok3(texts[0])["input_ids"]], np.int32)
logits = np.asarray(model(ids))
out["qwen2"] = [tok3(t)["input_ids"] for t in texts]
out["qwen2_logits"] = [list(logits.shape), bool(np.isfinite(logits).all())]
out["torch_loaded"] = sys.modules["torch"] is not None
print("RESULT" + json.dumps(out))
"""


def test_gguf_model_and_tokenizer_load_without_torch(default_gguf, qwen2_gguf):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(TEXTS), str(default_gguf), str(qwen2_gguf)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    ref, ref_qwen2 = _reference(pathlib.Path(default_gguf)), _reference(pathlib.Path(qwen2_gguf))
    assert out["tokenizer"] == out["model"] == [ref(t)["input_ids"] for t in TEXTS]
    assert out["qwen2"] == [ref_qwen2(t)["input_ids"] for t in TEXTS]
    assert out["qwen2_logits"] == [[1, len(out["qwen2"][0]), 49152], True]
    assert out["default_layers"] == 30
    assert out["torch_loaded"] is False
