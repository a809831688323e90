"""``--format orbax``: the lossless compressed form alone (:mod:`awp_jax.packed`): codes, scales,
zero points and bit-packed masks in an orbax checkpoint, with ``awp_jax.json`` and the tokenizer.
``--model`` and :func:`awp_jax.checkpoints.load_model` read it (onto any device layout). A streamed
model (:mod:`awp_jax.streaming`) is written one block at a time (:class:`awp_jax.packed.OrbaxWriter`)."""

from __future__ import annotations

import pathlib

from awp_jax.formats import Format


def write(path: pathlib.Path, model, encoded: dict, *, tokenizer=None, source=None) -> None:
    from awp_jax.checkpoints import save_orbax_model

    if path.exists() and not any(path.iterdir()):
        path.rmdir()  # orbax writes a new directory
    save_orbax_model(model, path, tokenizer=tokenizer, encoded=encoded)


FORMAT = Format("orbax", "lossless compressed form (codes, scales, bit-packed masks) in an orbax checkpoint", write, streams=True)
