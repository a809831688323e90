"""Writing compressed models as Hugging Face directories.

The directory holds ``config.json``, ``model.safetensors`` (the dense weights after compression —
exactly the weights that were evaluated — in the checkpoint's own dtype, ``model.cfg.storage_dtype``:
a bf16 model is written as bf16), the tokenizer files and ``awp_report.json`` (with the size of every
output next to the input's). It loads
with transformers' ``AutoModelForCausalLM.from_pretrained`` and with :func:`awp_jax.checkpoints.load_model`.
With ``encoded`` (the lossless compressed layers) it also holds ``compressed/``, an orbax
directory of the Flax parameters with codes, scales, zero points and bit-packed masks
(:mod:`awp_jax.packed`); decoding it gives exactly ``model.safetensors``.

The directory is written under a temporary name beside the target and renamed into place, so an
interrupted write never leaves a directory that looks complete. An existing non-empty target is
refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from awp_jax.models import Llama, weights_of

from awp_jax import dtypes, memory

__all__ = ["save_hf_dir", "sizes", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    pass


def sizes(out: os.PathLike) -> dict[str, int]:
    """Bytes of ``model.safetensors`` and ``compressed/`` in an output directory."""
    out = pathlib.Path(out)
    res = {"model.safetensors": (out / "model.safetensors").stat().st_size}
    if (out / "compressed").is_dir():
        res["compressed/"] = sum(f.stat().st_size for f in (out / "compressed").rglob("*") if f.is_file())
    return res


def save_hf_dir(model: Llama, out: os.PathLike, *, tokenizer=None, report: dict | None = None, overwrite: bool = False,
                encoded: dict | None = None, input_bytes: int | None = None) -> pathlib.Path:
    """Write ``model`` as a Hugging Face directory (see the module docstring); ``input_bytes``: the
    input checkpoint's size, reported beside the outputs'."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        cfg = model.cfg.to_hf_dict()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        weights = {k: dtypes.cast_exact(v, model.cfg.storage_dtype, k) for k, v in weights_of(model).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del weights
        memory.trim()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if encoded is not None:
            from awp_jax.checkpoints import save_orbax_model

            save_orbax_model(model, tmp / "compressed", tokenizer=tokenizer, encoded=encoded)
        if report is not None:
            report = {**report, "sizes": {"input": input_bytes, **sizes(tmp)}}
            (tmp / "awp_report.json").write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
