"""``--format gguf --gguf-type T``: a llama.cpp GGUF whose compressed layers are in llama.cpp's own
block types, holding exactly the weights the method optimised.

| ``--gguf-type`` | llama.cpp block (32 weights) | grid the method projects onto |
|---|---|---|
| ``Q8_0`` | float16 ``d``, int8 ``q``: ``d·q`` | 8 bits, group 32, symmetric (``d = max|w| / 127``, llama.cpp's), float16 scales |
| ``Q4_0`` | float16 ``d``, 4-bit ``q``: ``d·(q − 8)`` | 4 bits, group 32, full-range symmetric (``d = m / −8`` for the weight ``m`` of largest magnitude: llama.cpp's rule, all 16 levels), float16 scales |
| ``Q4_1`` | float16 ``d`` and ``m``, 4-bit ``q``: ``d·q + m`` | 4 bits, group 32, float minimum (``float_min``), float16 scale and minimum |
| ``F32``, ``F16``, ``BF16`` | dense | pruning only (the values must be exact in that type) |

The grid's scales (and Q4_1's minimum) are rounded to float16 while the method runs
(``Constraint.scale_dtype``), so AWP, RTN and GPTQ optimise on the very grid the file stores, and
every block reads back bit for bit (``verify``, and the tests, with ``gguf.quants.dequantize``).
Q4_1 has no zero code, so it cannot hold pruned weights; Q4_0 and Q8_0 can (joint compression).
K-quants (Q4_K, Q3_K, Q2_K: super-blocks with quantized scales) are not written yet.

The metadata (architecture, hyper-parameters, tokenizer, chat template) is copied from the source
GGUF, which the model must have been loaded from (converting a Hugging Face tokenizer to GGUF is not
done here); ``general.file_type`` is set to the chosen type. Tensors the compression did not change
(embeddings, norms) are copied from the source as they were stored there when the model still holds
those values; otherwise they are written in the model's dtype (norms in F32). llama.cpp's q/k row
permutation (Llama) is applied again, and Gemma's ``1 + weight`` norm storage.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from awp_jax import dtypes, packed
from awp_jax.formats import Format, FormatError, linear_widths

BLOCK = 32
#: grid fields of the constraint for each block type; ``None``: a dense type (pruning only)
GRIDS = {
    "Q8_0": {"partial_groups": False, "bits": 8, "group_size": BLOCK, "symmetric": True, "full_range": False, "float_min": False, "scale_dtype": "float16"},
    "Q4_0": {"partial_groups": False, "bits": 4, "group_size": BLOCK, "symmetric": True, "full_range": True, "float_min": False, "scale_dtype": "float16"},
    "Q4_1": {"partial_groups": False, "bits": 4, "group_size": BLOCK, "symmetric": False, "full_range": False, "float_min": True, "scale_dtype": "float16"},
    "F32": None, "F16": None, "BF16": None,
}
_DENSE_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def _check_type(gguf_type) -> str:
    if gguf_type is None:
        raise FormatError(f"--format gguf needs --gguf-type: one of {', '.join(GRIDS)}")
    if gguf_type not in GRIDS:
        raise FormatError(f"--gguf-type {gguf_type!r} is not written; choose one of {', '.join(GRIDS)} "
                          "(K-quants such as Q4_K are not supported yet)")
    return gguf_type


def _source_arch(source) -> str:
    from awp_jax.checkpoints import _GGUF_ARCH_BLOCK, gguf_reader

    if source is None or pathlib.Path(source).suffix != ".gguf" or not pathlib.Path(source).is_file():
        raise FormatError("--format gguf copies the metadata and tokenizer of the source model, which must be a .gguf file "
                          f"(got {source}); converting a Hugging Face directory to GGUF is not supported yet")
    arch = gguf_reader(source).fields["general.architecture"].contents()
    if arch not in _GGUF_ARCH_BLOCK:
        raise FormatError(f"--format gguf: architecture {arch!r} is not written (supported: {', '.join(_GGUF_ARCH_BLOCK)})")
    return arch


def constrain(constraint, method: str, options, model, *, source=None, gguf_type=None):
    from awp_jax import methods

    t = _check_type(gguf_type)
    _source_arch(source)
    grid = GRIDS[t]
    if methods.column_scales(method, options):
        raise FormatError(f"{methods.column_scales_flags(method, options)} keeps per-layer column scales (AWQ's) "
                          "that a GGUF block has no place for; use --method awp (from RTN), gptq (min-max grid) or rtn")
    if getattr(options, "act_order", False):
        raise FormatError("--act-order permutes GPTQ's groups; GGUF blocks are consecutive columns: drop --act-order")
    widths = linear_widths(model)
    if any(d % BLOCK for d in widths):
        raise FormatError(f"--format gguf needs input widths that are multiples of {BLOCK}, got {widths}")
    if grid is None:
        if constraint.bits is not None:
            raise FormatError(f"--gguf-type {t} is dense: it cannot hold {constraint.describe()} exactly; use "
                              "--gguf-type Q8_0, Q4_0 or Q4_1 for quantized weights")
        if t != "F32" and model.cfg.storage_dtype != _DENSE_DTYPE[t]:
            raise FormatError(f"--gguf-type {t} holds the weights exactly only for a model in {_DENSE_DTYPE[t]} "
                              f"(this one is in {model.cfg.storage_dtype}): use --gguf-type F32 or --dtype {_DENSE_DTYPE[t]}")
        return constraint
    if model.cfg.storage_dtype != "float32":
        raise FormatError(f"--gguf-type {t} stores values only float32 holds exactly, but the model's weights are rounded to "
                          f"{model.cfg.storage_dtype}; load it with --dtype float32")
    if constraint.bits is not None and constraint.bits != grid["bits"]:
        raise FormatError(f"--gguf-type {t} is a {grid['bits']}-bit type; --bits {constraint.bits} does not fit it "
                          f"(4 bits: Q4_0 or Q4_1; 8 bits: Q8_0)")
    if t == "Q4_1" and constraint.prunes:
        raise FormatError("--gguf-type Q4_1 has no zero code, so it cannot hold pruned weights; use Q4_0 or Q8_0 for "
                          "pruning + quantization")
    return dataclasses.replace(constraint, **grid)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order of q/k (the inverse of :func:`awp_jax.checkpoints._unpermute`)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fp16_bytes(x: np.ndarray, what: str) -> np.ndarray:
    h = np.asarray(x, np.float32).astype(np.float16)
    if not np.array_equal(h.astype(np.float32), np.asarray(x, np.float32)):
        raise FormatError(f"{what}: a scale is not a float16 value (the grid was not made for GGUF)")
    return h.view(np.uint8).reshape(*h.shape, 2)


def blocks(enc: dict, gguf_type: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The llama.cpp blocks (uint8 ``[d_out, d_in/32·block bytes]``) of one encoded layer; ``rows``:
    the row order to write (llama.cpp's q/k permutation)."""
    meta = enc["meta"]
    want = GRIDS[gguf_type]
    if (meta.get("kind") != "quant" or any(meta.get(k) != v for k, v in want.items() if k != "partial_groups")
            or "perm" in enc or "col_scale_inv" in enc):
        raise FormatError(f"a layer quantized as {meta} is not on the {gguf_type} grid")
    d_out, d_in = meta["shape"]
    rows = np.arange(d_out) if rows is None else rows
    codes = packed.unpacked_codes(enc)[rows].reshape(d_out, d_in // BLOCK, BLOCK)
    d = _fp16_bytes(enc["scale"][rows], gguf_type)
    if gguf_type == "Q8_0":
        parts = [d, (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        nib = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
        parts = [d, _fp16_bytes(enc["min"][rows], gguf_type), nib] if gguf_type == "Q4_1" else [d, nib]
    return np.concatenate(parts, axis=-1).reshape(d_out, -1)


def _to_gguf_layout(name: str, w: np.ndarray, arch: str, heads: int, kv_heads: int) -> np.ndarray:
    if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
        w = _permute(w, heads if ".q_proj." in name else kv_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        w = w + np.float32(1.0)
    return w


def _tensors(reader, model, encoded, t: str, arch: str, *, data: bool):
    """``(gguf name, info, raw)`` of every tensor as it is written, in the source's order: ``info``
    ``(byte shape, numpy dtype, nbytes, ggml type)``; ``raw`` the bytes to write (``data``) or
    ``None``. A compressed layer's blocks are made only when ``data`` is asked for; every other
    tensor is read one at a time (a streamed model's blocks, :mod:`awp_jax.streaming`, from disk)."""
    import gguf

    from awp_jax.checkpoints import _gguf_name, stored_tensors

    heads, kv_heads = model.cfg.num_heads, model.cfg.num_kv_heads
    _, weight = stored_tensors(model)
    qtype = gguf.GGMLQuantizationType[t]
    for tensor in reader.tensors:
        name = _gguf_name(tensor.name, arch)
        if name in encoded and GRIDS[t] is not None:
            d_out, d_in = encoded[name]["meta"]["shape"]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = None
            if data:
                rows = _to_gguf_layout(name, np.arange(d_out)[:, None], arch, heads, kv_heads)[:, 0]
                raw = blocks(encoded[name], t, rows)
            yield tensor.name, ((d_out, d_in // block * size), np.dtype(np.uint8), d_out * d_in // block * size, qtype), raw
            continue
        w = _to_gguf_layout(name, np.asarray(weight(name), np.float32), arch, heads, kv_heads)
        stored = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(w.shape)
        if np.array_equal(stored, w):  # unchanged: as the source stored it
            raw, kind = tensor.data, tensor.tensor_type
        else:
            dense = "F32" if w.ndim == 1 else (t if GRIDS[t] is None else {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[model.cfg.storage_dtype])
            exact = dtypes.cast_exact(w, _DENSE_DTYPE[dense], name).astype(np.float32)
            raw, kind = gguf.quants.quantize(exact, gguf.GGMLQuantizationType[dense]), gguf.GGMLQuantizationType[dense]
        yield tensor.name, (raw.shape, raw.dtype, raw.nbytes, kind), raw if data else None
        del w, stored, raw


def write(tmp: pathlib.Path, model, encoded, *, tokenizer=None, source=None, gguf_type=None) -> None:
    """Two passes over the tensors, one at a time: their shapes and types for the header, then
    their bytes (a streamed model's blocks are read twice; no pass holds more than one tensor)."""
    import gguf

    from awp_jax.checkpoints import gguf_reader

    t = _check_type(gguf_type)
    arch = _source_arch(source)
    reader = gguf_reader(source)
    writer = gguf.GGUFWriter(str(tmp / "model.gguf"), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(_FILE_TYPE[t])
    for name, (shape, dtype, nbytes, kind), _ in _tensors(reader, model, encoded, t, arch, data=False):
        writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, (shape, dtype, nbytes, kind), raw in _tensors(reader, model, encoded, t, arch, data=True):
        if raw.nbytes != nbytes or raw.dtype != dtype:
            raise RuntimeError(f"gguf: {name} changed between the two passes ({dtype} {nbytes} B, then {raw.dtype} {raw.nbytes} B)")
        writer.write_tensor_data(raw)
    writer.close()


def verify(tmp: pathlib.Path, model, encoded, *, gguf_type=None) -> None:
    """Read the file back with ``gguf``: every tensor dequantizes to the model's weights bit for bit
    (a streamed model's one tensor at a time)."""
    import gguf

    from awp_jax.checkpoints import _gguf_name, stored_tensors

    path = tmp / "model.gguf"
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    specs, weight = stored_tensors(model)
    seen = set()
    for tensor in reader.tensors:
        name = _gguf_name(tensor.name, arch)
        want = _to_gguf_layout(name, np.asarray(weight(name), np.float32), arch, model.cfg.num_heads, model.cfg.num_kv_heads)
        got = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(want.shape)
        if not np.array_equal(got, want):
            raise RuntimeError(f"{path}: {tensor.name} ({tensor.tensor_type.name}) does not read back as the model's {name}")
        seen.add(name)
    if set(specs) - seen:
        raise RuntimeError(f"{path}: tensors missing: {sorted(set(specs) - seen)[:5]}")


FORMAT = Format("gguf", "llama.cpp GGUF: Q8_0/Q4_0/Q4_1 blocks on the grid the method optimised, or F32/F16/BF16",
                write, verify, constrain, options=("gguf_type",), column_scales=False, streams=True)
