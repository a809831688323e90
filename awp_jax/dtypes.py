"""Storage dtypes: the floating-point types a checkpoint keeps its weights in.

The model computes in float32 (or bfloat16, :attr:`awp_jax.models.LlamaConfig.dtype`); what it
*stores* — and what every output is written in — is the checkpoint's own dtype
(:attr:`awp_jax.models.LlamaConfig.storage_dtype`): a bfloat16 checkpoint stays bfloat16. Weights
held in float32 arrays carry exactly the values of their storage dtype (:func:`round_to`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["SAFETENSORS_CODES", "SAFETENSORS_CODE_OF", "STORAGE_DTYPES", "np_dtype", "name_of", "round_to", "cast_exact"]

STORAGE_DTYPES = ("float32", "bfloat16", "float16")
# safetensors' dtype codes and the numpy dtype names they stand for (one table, both directions)
SAFETENSORS_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
SAFETENSORS_CODE_OF = {v: k for k, v in SAFETENSORS_CODES.items()}
_NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def check(name: str) -> str:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return name


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a storage dtype name (bfloat16 from ml_dtypes)."""
    return _NP[check(name)]


def name_of(dtype) -> str | None:
    """The storage dtype name of a numpy/jax dtype, or ``None`` if it is not one of them."""
    dt = np.dtype(dtype)
    for k, v in _NP.items():
        if dt == v:
            return k
    return None


# elements converted and checked per step (4 MB of float32): the checks' temporaries (the rounded
# copy, its float32 value, the NaN and finiteness masks) stay this size, not 3.5x the tensor (a 49k x
# 576 embedding's conversion to bfloat16 briefly took 405 MB)
_CHUNK = 1 << 20


def _rounded(x: np.ndarray, name: str, whole: np.ndarray) -> np.ndarray:
    """A slice ``x`` of ``whole`` rounded to ``name`` as float32; overflow is an error."""
    with np.errstate(over="ignore"):
        y = x.astype(np_dtype(name)).astype(np.float32)
    if not np.all(np.isfinite(y) | ~np.isfinite(x)):
        raise ValueError(f"values up to {float(np.max(np.abs(whole))):.6g} do not fit in {name}")
    return y


def round_to(x, name: str) -> np.ndarray:
    """``x`` rounded to storage dtype ``name`` (round to nearest even), as a float32 array; values
    that do not fit (e.g. |x| > 65504 in float16) are an error, not an Inf."""
    x = np.asarray(x, np.float32)
    if name == "float32":
        return x
    check(name)
    flat, out = np.ascontiguousarray(x).reshape(-1), np.empty(x.shape, np.float32)
    dest = out.reshape(-1)
    for s in range(0, flat.size, _CHUNK):
        dest[s : s + _CHUNK] = _rounded(flat[s : s + _CHUNK], name, flat)
    return out


def cast_exact(x, name: str, what: str) -> np.ndarray:
    """``x`` as an array of storage dtype ``name``; values that dtype cannot hold exactly are an
    error naming ``what`` (outputs never round silently: the weights must already carry its values)."""
    flat = np.ascontiguousarray(np.asarray(x, np.float32))
    out = np.empty(flat.shape, np_dtype(name))
    flat, dest = flat.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, _CHUNK):
        part = flat[s : s + _CHUNK]
        if name != "float32" and not np.array_equal(_rounded(part, name, flat), part, equal_nan=True):
            raise ValueError(f"{what} holds values that {name} cannot store exactly; load the model with that storage "
                             f"dtype (CLI --dtype {name}, or checkpoints.load_model(..., storage_dtype={name!r}))")
        dest[s : s + _CHUNK] = part  # exact: the values are the dtype's
    return out
