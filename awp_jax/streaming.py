"""A model whose blocks stay on disk: host memory bounded by one block, not by the model.

:func:`open_model` reads a Hugging Face directory's config and every shard's header (or a GGUF
file's metadata and tensor directory), and builds
only what lies outside the blocks (embedding, final norm, head). Its ``layers`` materialise block
``i`` from the checkpoint when the pipeline asks for it, one block at a time: asking for another
drops the previous one. The weights are read and held in the checkpoint's own dtype (bf16 stays
bf16: ``param_dtype``); every product promotes them to the forward's float32, exactly, so results
equal a model held in float32 bit for bit (tested). Nothing else is kept.

The pipeline (:func:`awp_jax.compress.compress_model`) writes every compressed block to its run
directory and tells the model so (``layers.stored(i, loader)``): from then on block ``i`` is built
from the checkpoint with its linear layers read back by ``loader``. Evaluation
(:func:`awp_jax.perplexity.perplexity`) carries the hidden states block by block, and the ``hf``
and ``compressed-tensors`` outputs (:mod:`awp_jax.formats`) write tensor by tensor
(:meth:`StreamedModel.tensor`; the packed layers from the run directory's encoded form,
:class:`awp_jax.runstore.StoredLayer`), so no step ever holds the whole model.

Memory: one block and the outer tensors in the checkpoint's dtype, the calibration hidden states
(``n × seqlen × hidden`` floats, twice), one block's C matrices, and the solver's buffers for one
layer group (groups above 256 MiB of float32 weights are solved a layer at a time:
``compress_model(max_stack_bytes=...)``). ``bench/scale.py`` measures it against the number of blocks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
from flax import nnx

from awp_jax import checkpoints, dtypes, models, packed

__all__ = ["StreamedModel", "open_model"]


class _Blocks(Sequence):
    """The blocks of a :class:`StreamedModel`: block ``i`` is built on first access and kept until
    another is asked for."""

    def __init__(self, model: "StreamedModel"):
        self._model = model
        self._cached: tuple[int, nnx.Module] | None = None
        self._stored: dict[int, Callable[[nnx.Module], None]] = {}

    def __len__(self) -> int:
        return self._model.cfg.num_layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(f"block {i} of {n}")
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        self._cached = None  # the previous block is freed before the next one is read
        blk = self._model._build(i)
        if i in self._stored:
            self._stored[i](blk)
        self._cached = (i, blk)
        return blk

    def stored(self, i: int, loader: Callable[[nnx.Module], None]) -> None:
        """Block ``i``'s compressed linear layers are on disk: ``loader(block)`` writes them into a
        block built from the checkpoint (the cached block, if it is ``i``, already holds them)."""
        self._stored[i] = loader


class StreamedModel:
    """The architecture interface of :mod:`awp_jax.models` over a checkpoint on disk (see the
    module docstring). ``outer`` is the family's model with no blocks: embedding, norm and head."""

    streamed = True

    def __init__(self, cfg, source: Mapping):
        cls = models.model_class(cfg)
        shapes = cls.shapes(cfg)
        missing = [k for k in shapes if k not in source]
        if missing:
            raise checkpoints.CheckpointError(f"{source.path}: the checkpoint is missing {len(missing)} tensors for this config, e.g. {missing[:3]}")
        for k, shp in shapes.items():
            got, dt = source.spec(k)
            if tuple(got) != tuple(shp):
                raise checkpoints.CheckpointError(f"tensor {k} has shape {tuple(got)}, but the config needs {tuple(shp)}")
            if dtypes.name_of(dt) is None:
                raise checkpoints.CheckpointError(f"tensor {k} has dtype {dt}; expected float32, bfloat16 or float16")
        self.cfg = cfg
        self.source = source
        self.Block = cls.Block
        empty = {"num_layers": 0, **({"layer_types": ()} if hasattr(cfg, "layer_types") else {})}
        outer_cfg = dataclasses.replace(cfg, **empty)
        self.outer = cls(outer_cfg, {k: source[k] for k in cls.shapes(outer_cfg)})
        self.outer.cfg = cfg  # embed/context/head read the full config
        self.layers = _Blocks(self)
        self._names = list(shapes)

    def _build(self, i: int):
        p = f"model.layers.{i}."
        return self.Block(self.cfg, {k[len(p):]: self.source[k] for k in self.Block.shapes(self.cfg, i)}, i)

    # the architecture interface (awp_jax.models)
    def embed(self, tokens):
        return self.outer.embed(tokens)

    def context(self, seq_len: int) -> tuple:
        return self.outer.context(seq_len)

    def head(self, x):
        return self.outer.head(x)

    def linear_key(self, i: int, name: str) -> str:
        return self.Block.key(i, name)

    # tensor by tensor, for writers
    def tensor_names(self) -> list[str]:
        """Every tensor's Hugging Face name: the outer ones, then block by block."""
        return self._names

    def tensor_dtype(self, name: str) -> str:
        """The dtype ``name`` is written in: the checkpoint's own (compressed layers hold values of it)."""
        return dtypes.name_of(self.source.spec(name)[1])

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as it is now (a compressed block's layers as compressed), in :meth:`tensor_dtype`."""
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if i in self.layers._stored:  # only linear layers change; the rest is the checkpoint's
                blk = self.layers[i]
                for n in blk.LINEARS:
                    if self.Block.key(i, n) == name:
                        return dtypes.cast_exact(np.asarray(blk.linear(n).weight[...]), self.tensor_dtype(name), name)
        return np.asarray(self.source[name])


def open_model(spec: os.PathLike | str | None, *, dtype: str = "float32", gguf_dequantized_dtype: str = "bfloat16",
               storage_dtype: str | None = None) -> StreamedModel:
    """A :class:`StreamedModel` of a Hugging Face directory, an orbax directory, a GGUF file or a named model (``None``:
    the default model); ``dtype``: the forward pass's. A GGUF's tensors are dequantized one at a
    time (:class:`awp_jax.checkpoints.GGUFSource`), block-quantized matrices to
    ``gguf_dequantized_dtype`` (``"float32"`` keeps their values exactly). Every tensor is held in
    the linear layers' dtype, rounded to it, as the in-memory CLI's default (``--dtype auto``) holds
    them: norms stored wider (llama.cpp's F32 norms beside F16 matrices, a bf16 directory with F32
    norms) are rounded, so the model written is the model evaluated. An orbax directory's tensors
    are restored one at a time (:class:`awp_jax.checkpoints.OrbaxSource`), compressed layers
    decoded. ``storage_dtype``: hold (and write) every tensor in this dtype instead
    of the checkpoint's, rounded to it as above (``"float32"``, exact for every checkpoint, for an
    output grid whose values only float32 holds: ``--format gguf --gguf-type Q4_0``)."""
    p = checkpoints.model_source(spec)
    if p.is_file() and p.suffix == ".gguf":
        cfg, source, _ = checkpoints.open_gguf(p, dequantized_dtype=gguf_dequantized_dtype)
    elif p.is_dir() and packed.is_orbax_dir(p):
        cfg, source = checkpoints.open_orbax_dir(p)
    elif p.is_dir() and (p / "config.json").is_file():
        cfg, source = checkpoints.open_hf_dir(p)
    else:
        raise checkpoints.CheckpointError(
            f"streaming reads a Hugging Face directory (config.json + safetensors), an orbax directory (awp_jax.json + "
            f"state/, e.g. a run's compressed/) or a GGUF file; {p} is none of them")
    # weights are held in the checkpoint's dtype (half of float32 for bf16) and promoted exactly in every product
    if storage_dtype is not None:
        if storage_dtype not in dtypes.STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(dtypes.STORAGE_DTYPES)}, got {storage_dtype!r}")
        cfg = dataclasses.replace(cfg, storage_dtype=storage_dtype)
    return StreamedModel(dataclasses.replace(cfg, dtype=dtype, param_dtype=cfg.storage_dtype), checkpoints.HeldAs(source, cfg.storage_dtype))
