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

from awp_jax import dtypes, memory
from awp_jax.formats import Format
from awp_jax.formats import orbax as orbax_format
from awp_jax.models import weights_of


def write_dense(tmp: pathlib.Path, model, *, tokenizer=None, config: dict | None = None, tensors: dict | None = None) -> None:
    """``config.json`` (``config``: the one to write, default the model's), ``model.safetensors``
    (``tensors``: what to store, default every weight dense in the storage dtype), and the tokenizer files."""
    from safetensors.numpy import save_file

    (tmp / "config.json").write_text(json.dumps(config or model.cfg.to_hf_dict(), indent=2))
    weights = tensors if tensors is not None else {k: dtypes.cast_exact(v, model.cfg.storage_dtype, k) for k, v in weights_of(model).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del weights
    memory.trim()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def write(tmp: pathlib.Path, model, encoded: dict, *, tokenizer=None, source=None) -> None:
    write_dense(tmp, model, tokenizer=tokenizer)
    if encoded:
        orbax_format.write(tmp / "compressed", model, encoded, tokenizer=tokenizer)


FORMAT = Format("hf", "Hugging Face directory, dense weights in the checkpoint's dtype, + compressed/ (lossless)", write)
