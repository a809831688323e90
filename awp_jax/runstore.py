"""A run directory: what makes a compression run resumable.

``run.json`` holds the run's settings; every finished block is one safetensors file holding its
compressed linear layers, their lossless encoded form and the block's report rows, written under a
temporary name and renamed into place, so a block file is complete or absent. A run started again
with the same settings finds the leading finished blocks (:attr:`RunStore.done`) and continues
after them; a directory holding a run with other settings is refused.

Only process 0 writes (``write=False`` on the others); the directory must be on storage every
process sees.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["RunStore", "RunMismatchError", "StoredLayer"]


class RunMismatchError(ValueError):
    """The run directory holds a run made with other settings."""


class StoredLayer(Mapping):
    """One layer's encoded form (the dict of :func:`awp_jax.packed.encode`) in a block file, read
    field by field when asked: a streamed run's writers hold one layer's codes at a time, never the
    model's. ``meta`` is kept; every other field is read from the file on each access."""

    def __init__(self, file: pathlib.Path, name: str, meta: dict, fields: tuple[str, ...]):
        self._file, self._name, self._meta, self._fields = file, name, meta, fields

    def __getitem__(self, key: str):
        if key == "meta":
            return self._meta
        if key not in self._fields:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self._file), framework="numpy") as f:
            return f.get_tensor(f"{self._name}::{key}")

    def __contains__(self, key) -> bool:  # without reading the field
        return key == "meta" or key in self._fields

    def __iter__(self):
        return iter(("meta", *self._fields))

    def __len__(self) -> int:
        return 1 + len(self._fields)


class RunStore:
    """Run directory ``path`` for a run with ``settings`` over ``n_blocks`` blocks (created, or
    checked against the settings it holds)."""

    def __init__(self, path: os.PathLike, settings: dict, n_blocks: int, write: bool = True):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "run.json"
        text = json.dumps(settings, sort_keys=True, default=str)
        if meta.exists():
            if meta.read_text() != text:
                raise RunMismatchError(f"{self.path} holds a run with other settings; remove it or choose another output")
        elif write:
            tmp = self.path / ".run.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, meta)
        done = 0
        while done < n_blocks and self.block_file(done).exists():
            done += 1
        self.done = done  # how many leading blocks are finished

    def block_file(self, i: int) -> pathlib.Path:
        return self.path / f"block_{i:04d}.safetensors"

    def save(self, i: int, blk, rows: list[dict], enc: dict[str, dict]) -> None:
        """Block ``i``'s compressed linear layers, encoded form and report rows; a failure (a full
        disk) keeps the blocks already saved and says how to resume."""
        try:
            self._write(i, blk, rows, enc)
        except OSError as e:
            raise OSError(e.errno, f"cannot save block {i} in {self.path} ({e.strerror or e}); blocks 0..{i - 1} are kept there: "
                          "free space (or fix the problem) and run the same command again to resume") from e

    def _write(self, i: int, blk, rows: list[dict], enc: dict[str, dict]) -> None:
        from safetensors.numpy import save_file

        tensors = {name: np.asarray(blk.linear(name).weight[...]) for name in blk.LINEARS}
        for name, e in enc.items():
            tensors.update({f"{name}::{k}": np.ascontiguousarray(v) for k, v in e.items() if k != "meta"})
        meta = {"rows": json.dumps(rows), "encoded": json.dumps({n: e["meta"] for n, e in enc.items()})}
        tmp = self.path / f".block_{i:04d}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.block_file(i))
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, i: int, blk, with_encoded: bool = True) -> tuple[list[dict], dict[str, dict]]:
        """Block ``i``'s report rows and (``with_encoded``) encoded layers; its compressed linear
        layers are written into ``blk``."""
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), framework="numpy") as f:
            md = f.metadata()
            rows = json.loads(md["rows"])
            enc = {n: {"meta": m} for n, m in json.loads(md["encoded"]).items()} if with_encoded else {}
            for key in f.keys():
                if "::" in key and with_encoded:
                    n, field = key.split("::")
                    enc[n][field] = f.get_tensor(key)
            self._linears_from(f, blk)
        return rows, enc

    def stored_layers(self, i: int) -> dict[str, StoredLayer]:
        """Block ``i``'s encoded layers (by the block's layer name), each read from the file only
        when a field is asked for (:class:`StoredLayer`)."""
        from safetensors import safe_open

        file = self.block_file(i)
        with safe_open(str(file), framework="numpy") as f:
            metas = json.loads(f.metadata()["encoded"])
            keys = [k.split("::") for k in f.keys() if "::" in k]
        return {n: StoredLayer(file, n, m, tuple(field for ln, field in keys if ln == n)) for n, m in metas.items()}

    def load_linears(self, i: int, blk) -> None:
        """Block ``i``'s compressed linear layers, into ``blk``."""
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), framework="numpy") as f:
            self._linears_from(f, blk)

    @staticmethod
    def _linears_from(f, blk) -> None:
        for name in blk.LINEARS:
            lin = blk.linear(name)
            lin.weight[...] = jnp.asarray(f.get_tensor(name), lin.weight[...].dtype)

    def mark_stored(self, model, i: int) -> None:
        """A model whose blocks live on disk (:mod:`awp_jax.streaming`) reads block ``i``'s
        compressed layers back from here from now on."""
        stored = getattr(model.layers, "stored", None)
        if stored is not None:
            stored(i, functools.partial(self.load_linears, i))
