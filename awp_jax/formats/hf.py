"""``--format hf``: a Hugging Face directory with dense weights, plus the lossless compressed form.

``config.json``, ``model.safetensors`` (the dense weights after compression — exactly the weights
that were evaluated — in the checkpoint's own dtype, ``model.cfg.storage_dtype``: a bf16 model is
written as bf16), the tokenizer files, and with ``encoded`` the ``compressed/`` orbax directory
(:mod:`awp_jax.formats.orbax`) whose decoding is exactly ``model.safetensors``. It loads with
transformers' ``AutoModelForCausalLM.from_pretrained`` and with :func:`awp_jax.checkpoints.load_model`.
"""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np

from awp_jax import dtypes, memory
from awp_jax.checkpoints import stored_tensors
from awp_jax.formats import Format
from awp_jax.formats import orbax as orbax_format


# transformers' save_pretrained default (5.x)
MAX_SHARD_SIZE = "50GB"


def parse_size(size) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"100KB"`` (decimal units, as transformers reads them) or an int."""
    if isinstance(size, int):
        n = size
    else:
        text = str(size).strip().upper()
        units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        for u, mult in units.items():
            if text.endswith(u) and text[: -len(u)].strip().replace(".", "", 1).isdigit():
                n = int(float(text[: -len(u)]) * mult)
                break
        else:
            raise ValueError(f"max shard size must be a number of bytes or like '5GB' / '500MB', got {size!r}")
    if n <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return n


def write_safetensors(tmp: pathlib.Path, specs: dict, get, *, max_shard_size=MAX_SHARD_SIZE, metadata: dict | None = None) -> list[str]:
    """Write tensors in safetensors form, one at a time: ``specs`` ``{name: (shape, dtype name)}`` in
    the order to write, ``get(name)`` the array (asked for once, in that order). One
    ``model.safetensors`` when everything fits in ``max_shard_size``; else shards
    ``model-0000i-of-0000n.safetensors`` of at most that size (a larger tensor gets its own) and
    ``model.safetensors.index.json``, as transformers writes them. Returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    nbytes = {k: int(np.prod(shp, dtype=np.int64)) * np.dtype(dtypes.np_dtype(dt) if dt in dtypes.STORAGE_DTYPES else dt).itemsize
              for k, (shp, dt) in specs.items()}
    for k in specs:
        if shards[-1] and size + nbytes[k] > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes[k]
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, names in zip(files, shards):
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for k in names:
            shp, dt = specs[k]
            header[k] = {"dtype": dtypes.SAFETENSORS_CODE_OF[dt], "shape": list(shp), "data_offsets": [offset, offset + nbytes[k]]}
            offset += nbytes[k]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(tmp / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for k in names:
                shp, dt = specs[k]
                a = np.ascontiguousarray(get(k))
                want = dtypes.np_dtype(dt) if dt in dtypes.STORAGE_DTYPES else np.dtype(dt)
                if tuple(a.shape) != tuple(shp) or a.dtype != want:
                    raise ValueError(f"{k}: got {a.dtype} {tuple(a.shape)}, expected {want} {tuple(shp)}")
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
                del a
                memory.trim()
    if n > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {k: fname for fname, names in zip(files, shards) for k in names}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def write_dense(tmp: pathlib.Path, model, *, tokenizer=None, config: dict | None = None, tensors=None,
                max_shard_size=MAX_SHARD_SIZE) -> None:
    """``config.json`` (``config``: the one to write, default the model's), the weights in
    safetensors form (``tensors``: ``(specs, get)`` of what to store, as :func:`awp_jax.checkpoints.stored_tensors` gives
    them; default every weight dense in the storage dtype; sharded above ``max_shard_size``), and
    the tokenizer files. Tensors are written one at a time: a model whose blocks live on disk
    (:mod:`awp_jax.streaming`) is never held whole."""
    (tmp / "config.json").write_text(json.dumps(config or model.cfg.to_hf_dict(), indent=2))
    specs, get = stored_tensors(model, consume=True) if tensors is None else tensors
    write_safetensors(tmp, specs, get, max_shard_size=max_shard_size)
    memory.trim()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def write(tmp: pathlib.Path, model, encoded: dict, *, tokenizer=None, source=None, max_shard_size=MAX_SHARD_SIZE) -> None:
    write_dense(tmp, model, tokenizer=tokenizer, max_shard_size=max_shard_size)
    if encoded:
        orbax_format.write(tmp / "compressed", model, encoded, tokenizer=tokenizer)


FORMAT = Format("hf", "Hugging Face directory, dense weights in the checkpoint's dtype (sharded above --max-shard-size), "
                "+ compressed/ (lossless)", write, options=("max_shard_size",), streams=True)
