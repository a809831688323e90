"""``--format compressed-tensors``: INT4/INT8 weights as vLLM serves them and transformers loads them.

The directory is a Hugging Face one whose ``config.json`` has a ``quantization_config``
(``quant_method: compressed-tensors``, ``format: pack-quantized``, one config group targeting
``Linear`` with ``num_bits``, ``symmetric``, ``strategy`` group or channel, ``group_size``; every
Linear that was not compressed — ``lm_head``, a mixture's router — is in ``ignore``). Each
compressed layer ``P`` is stored as

| tensor | shape | content |
|---|---|---|
| ``P.weight_packed`` | int32 ``[out, ceil(in·bits/32)]`` | codes ``q + 2^(bits−1)`` as one little-end-first bit stream per row (``q`` the signed code) |
| ``P.weight_scale`` | ``[out, in/group]`` (``[out, 1]`` per channel), the model's dtype | the method's scales |
| ``P.weight_zero_point`` | int32 ``[ceil(out·bits/32), in/group]`` (grids with a zero point only) | zero points packed the same way along the **output** dimension |
| ``P.weight_shape`` | int64 ``[2]`` | ``[out, in]`` |

the layout of the ``compressed-tensors`` package's ``PackedQuantizationCompressor`` (the tests check
it against the package itself; it is not needed to write). Dequantized, a weight is
``(q − zero)·scale`` in the scale's dtype. So that the file holds exactly the optimised weights, the
grid's scales are rounded to the model's dtype while the method runs (``Constraint.scale_dtype``).

What it cannot hold is refused before calibration: bit widths other than 4 and 8 (vLLM's kernels),
a group size that does not divide every linear layer's input width (the format has no shorter last
group: 64, 32 or per channel work for SmolLM2's 576), AWQ's per-layer column scales, GPTQ's
act-order permutation, float-minimum grids, and pruning alone (nothing to quantize: use ``hf``).
compressed-tensors 0.15 removed its sparse formats and vLLM its 2:4 kernels, so pruned weights are
stored dense inside the grid (pruned entries are their group's zero point).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from awp_jax import dtypes, packed
from awp_jax.checkpoints import stored_tensors
from awp_jax.formats import Format, FormatError, linear_widths
from awp_jax.formats.hf import write_dense

BITS = (4, 8)


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of unsigned ``bits``-bit codes ``[rows, n]`` → int32 ``[rows, ceil(n·bits/32)]``, each row
    one little-end-first bit stream (value ``i`` at bit ``i·bits``)."""
    rows, n = codes.shape
    planes = np.unpackbits(np.ascontiguousarray(codes, np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = planes.reshape(rows, n * bits)
    words = -(-n * bits // 32)
    stream = np.pad(stream, ((0, 0), (0, words * 32 - n * bits)))
    return np.packbits(stream, axis=-1, bitorder="little").view("<i4").reshape(rows, words)


def unpack_int32(packed_: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int32` for rows of ``n`` codes."""
    rows = packed_.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(packed_, "<i4").view(np.uint8).reshape(rows, -1), axis=-1, bitorder="little")
    planes = stream[:, : n * bits].reshape(rows, n, bits)
    return np.packbits(np.pad(planes, ((0, 0), (0, 0), (0, 8 - bits))), axis=-1, bitorder="little")[..., 0]


def constrain(constraint, method: str, options, model, *, source=None):
    from awp_jax import methods

    if constraint.bits is None:
        raise FormatError(f"--format compressed-tensors stores quantized weights; {constraint.describe()} has no --bits "
                          "(pruned weights alone: use --format hf, or add --bits 4 / 8)")
    if constraint.bits not in BITS:
        raise FormatError(f"--format compressed-tensors stores {' or '.join(map(str, BITS))}-bit weights (what vLLM serves), "
                          f"not {constraint.bits}-bit; use --bits 4 or 8, or --format hf / orbax for other widths")
    if constraint.float_min or constraint.full_range:
        raise FormatError("--format compressed-tensors stores integer zero points and positive scales: a float-minimum or "
                          "full-range (GGUF Q4_0) grid cannot be stored")
    if methods.column_scales(method, options):
        raise FormatError(f"{methods.column_scales_flags(method, options)} keeps per-layer column scales (AWQ's) "
                          "that compressed-tensors has no place for; use --method awp (from RTN), gptq (min-max grid) or rtn")
    if getattr(options, "act_order", False):
        raise FormatError("--act-order permutes GPTQ's groups, which this writer does not store (weight_g_idx); drop --act-order")
    g = constraint.group_size
    if g is not None:
        widths = linear_widths(model)
        bad = [d for d in widths if d % g]
        if bad:
            common = np.gcd.reduce(widths)
            works = [x for x in (128, 64, 32) if common % x == 0]
            raise FormatError(f"--format compressed-tensors needs groups that divide every layer's input width; group {g} does "
                              f"not divide {', '.join(map(str, bad))} (this model's widths: {', '.join(map(str, widths))}); "
                              f"use --group-size {' or '.join(map(str, works)) + ' or ' if works else ''}row (per channel)")
    return dataclasses.replace(constraint, scale_dtype=model.cfg.storage_dtype, partial_groups=False)


def quantization_config(dense_specs: dict, encoded) -> dict:
    """The ``quantization_config`` of a model whose weights are ``dense_specs`` (``{name: (shape,
    dtype)}``, :func:`awp_jax.checkpoints.stored_tensors`) with ``encoded``'s layers compressed."""
    metas = {json.dumps({k: e["meta"].get(k) for k in ("bits", "group_size", "symmetric")}) for e in encoded.values()}
    if len(metas) != 1 or any(e["meta"]["kind"] != "quant" for e in encoded.values()):
        raise FormatError("compressed-tensors: every compressed layer must be quantized on one grid")
    grid = json.loads(metas.pop())
    ignore = sorted(k[: -len(".weight")] for k, (shape, _) in dense_specs.items()
                    if k.endswith(".weight") and len(shape) == 2 and k not in encoded and "embed_tokens" not in k)
    weights = {"num_bits": grid["bits"], "type": "int", "symmetric": grid["symmetric"], "group_size": grid["group_size"],
               "strategy": "group" if grid["group_size"] else "channel", "dynamic": False}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": ignore}


def layer_specs(meta: dict, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{suffix: (shape, dtype name)}`` of the tensors :func:`layer_tensors` gives for a layer with ``meta``."""
    bits, g = meta["bits"], meta["group_size"]
    d_out, d_in = meta["shape"]
    groups = d_in // g if g else 1
    out = {"weight_packed": ((d_out, -(-d_in * bits // 32)), "int32"), "weight_scale": ((d_out, groups), dtype),
           "weight_shape": ((2,), "int64")}
    if not meta["symmetric"]:
        out["weight_zero_point"] = ((-(-d_out * bits // 32), groups), "int32")
    return out


def layer_tensors(enc, dtype: str) -> dict[str, np.ndarray]:
    """The pack-quantized tensors of one encoded layer (suffixes ``weight_packed`` etc.)."""
    meta = enc["meta"]
    if "perm" in enc or "col_scale_inv" in enc or meta.get("float_min"):
        raise FormatError("compressed-tensors: a layer with a column permutation, column scales or a float minimum")
    bits = meta["bits"]
    d_out, d_in = meta["shape"]
    out = {"weight_packed": pack_int32(packed.unpacked_codes(enc), bits),
           "weight_scale": dtypes.cast_exact(enc["scale"], dtype, "a scale"),
           "weight_shape": np.asarray([d_out, d_in], np.int64)}
    if not meta["symmetric"]:
        out["weight_zero_point"] = np.ascontiguousarray(pack_int32(np.asarray(enc["zero"], np.uint8).T, bits).T)
    return out


def write(tmp: pathlib.Path, model, encoded, *, tokenizer=None, source=None) -> None:
    """Every tensor in the model's order, each compressed layer's packed tensors in its place; one
    layer's packed tensors are held at a time (a streamed model's are read from its run directory)."""
    dt = model.cfg.storage_dtype
    dense, get_dense = stored_tensors(model, consume=True)
    specs, layer_of = {}, {}
    for k, spec in dense.items():
        if k not in encoded:
            specs[k] = spec
            continue
        prefix = k[: -len("weight")]
        for suffix, sp in layer_specs(encoded[k]["meta"], dt).items():
            specs[prefix + suffix], layer_of[prefix + suffix] = sp, (k, suffix)
    held: dict = {}

    def get(name):
        if name not in layer_of:
            return get_dense(name)
        k, suffix = layer_of[name]
        if held.get("layer") != k:
            held.clear()
            held.update(layer=k, tensors=layer_tensors(encoded[k], dt))
        return held["tensors"][suffix]

    config = {**model.cfg.to_hf_dict(), "quantization_config": quantization_config(dense, encoded)}
    write_dense(tmp, model, tokenizer=tokenizer, config=config, tensors=(specs, get))


def verify(tmp: pathlib.Path, model, encoded) -> None:
    """Read the file back: every layer's codes, scales and zero points decode to the model's weights
    (a streamed model's one layer at a time)."""
    from safetensors import safe_open

    _, weight = stored_tensors(model)
    with safe_open(str(tmp / "model.safetensors"), framework="numpy") as f:
        for name, enc in encoded.items():
            p = name[: -len("weight")]
            bits = enc["meta"]["bits"]
            d_out, d_in = (int(x) for x in f.get_tensor(p + "weight_shape"))
            g = enc["meta"]["group_size"] or d_in
            codes = unpack_int32(f.get_tensor(p + "weight_packed"), bits, d_in).astype(np.float32)
            scale = f.get_tensor(p + "weight_scale").astype(np.float32)
            if p + "weight_zero_point" in f.keys():
                zero = unpack_int32(f.get_tensor(p + "weight_zero_point").T, bits, d_out).T.astype(np.float32)
            else:
                zero = np.full(scale.shape, 2 ** (bits - 1), np.float32)
            vals = ((codes.reshape(d_out, -1, g) - zero[..., None]) * scale[..., None]).reshape(d_out, d_in)
            if not np.array_equal(dtypes.round_to(vals, model.cfg.storage_dtype), np.asarray(weight(name), np.float32)):
                raise RuntimeError(f"compressed-tensors: {name} read back from {tmp / 'model.safetensors'} differs from the model's weights")


FORMAT = Format("compressed-tensors", "INT4/INT8 pack-quantized safetensors (vLLM, transformers)", write, verify, constrain,
                column_scales=False, streams=True)
