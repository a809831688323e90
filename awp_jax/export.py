"""Writing compressed models: :func:`save_hf_dir`, the default output (``--format hf``); every
format is in :mod:`awp_jax.formats`."""

from __future__ import annotations

import os
import pathlib

from awp_jax.formats import OutputExistsError, save, sizes

__all__ = ["save_hf_dir", "sizes", "OutputExistsError"]


def save_hf_dir(model, out: os.PathLike, *, tokenizer=None, report: dict | None = None, overwrite: bool = False,
                encoded: dict | None = None, input_bytes: int | None = None) -> pathlib.Path:
    """Write ``model`` as a Hugging Face directory (:mod:`awp_jax.formats.hf`) with ``compressed/``
    when ``encoded`` is given; see :func:`awp_jax.formats.save`."""
    return save(model, out, format="hf", encoded=encoded, tokenizer=tokenizer, report=report, overwrite=overwrite,
                input_bytes=input_bytes)
