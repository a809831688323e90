"""The compressed form of a layer, kept losslessly, and the orbax checkpoint that holds a model.

A compressed layer is stored as what it is, not as a dense matrix:

| layer | stored arrays |
|---|---|
| pruned (unstructured or N:M) | ``mask`` (bit-packed, 1 bit per weight) + ``values`` (kept entries, row-major, in the checkpoint's storage dtype: bf16 for a bf16 model) |
| quantized | ``codes`` (bit-packed, ``bits`` bits per weight) + ``scale`` (float32) and ``zero`` (uint8; ``min``, float32, for a float-minimum grid) per (row, group) |
| pruned and quantized | as quantized; when ``1 + bits·density < bits`` the ``mask`` is stored and ``codes`` only for kept entries |
| AWQ | as quantized, for the scaled weights ``W·diag(s)``, + ``col_scale_inv`` ``1/s`` (float32 per input channel) |
| GPTQ with act-order | as quantized, with groups of consecutive columns in sweep order, + ``perm`` (int32) |

:func:`encode` bit-packs what a method computed: a quantizing method's
:class:`~awp_jax.quantizers.QArray` (codes, scales, zero points, column scales, permutation) as it
is, and checks, bit for bit, that the stored form reproduces the method's dense result (an encoding
that does not is an error, never a silent approximation). :func:`decode` gives the dense matrix
back (a float32 array holding values of the checkpoint's storage dtype: a quantized layer's exact
float32 grid values are rounded to it, as any dense export in that dtype must); the pipeline writes
exactly ``decode(encode(...))`` into the model, so every output format holds the same weights.

A model's checkpoint (:func:`save_orbax`) is a directory with ``awp_jax.json`` (config, per-layer
metadata, format version) and ``state/``, an orbax checkpoint of ``{"params": dense parameters not
compressed, "layers": encoded layers}``. A plain Flax user's model saved with no ``encoded`` layers
is the same format with every parameter dense. :func:`load_orbax` restores it onto any device
layout (pass ``sharding``) and decodes it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from awp_jax import dtypes

__all__ = ["encode", "decode", "grid_values", "unpacked_codes", "NotLosslessError", "save_orbax", "OrbaxWriter", "load_orbax", "is_orbax_dir", "stored_bits"]

FORMAT = "awp_jax.orbax/1"


class NotLosslessError(ValueError):
    """The weights are not on the grid the specification describes."""


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2**bits`` into a flat uint8 array, ``bits`` bits each."""
    flat = np.ascontiguousarray(codes, np.uint8).reshape(-1, 1)
    return np.packbits(np.unpackbits(flat, axis=1)[:, 8 - bits:])


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.asarray(packed, np.uint8))[: count * bits].reshape(count, bits)
    return np.packbits(np.pad(planes, ((0, 0), (8 - bits, 0))), axis=1)[:, 0]


def _groups(x: np.ndarray, g: int) -> np.ndarray:
    d_out, d_in = x.shape
    n = -(-d_in // g)
    return np.pad(x, ((0, 0), (0, n * g - d_in))).reshape(d_out, n, g)


def stored_bits(enc: dict[str, Any]) -> int:
    return sum(np.asarray(v).nbytes * 8 for k, v in enc.items() if k != "meta")


def encode(theta, *, q=None, pruned: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """The lossless stored form of one compressed layer ``theta [d_out, d_in]`` (see module doc).

    ``q``: a quantizing method's :class:`~awp_jax.quantizers.QArray` (its codes, scales, zero
    points, AWQ's column scales, GPTQ's permutation are bit-packed as they are; ``theta`` must be
    ``q.dense()``); ``pruned``: store a sparsity mask; ``dtype``: the checkpoint's storage dtype —
    what is encoded is ``theta`` rounded to it (:func:`awp_jax.dtypes.round_to`): kept values are
    stored in ``dtype``; a quantized layer keeps its exact grid (codes, float32 scales) and
    :func:`decode` rounds the dequantized values to ``dtype``. Raises :class:`NotLosslessError`
    when the stored form would not reproduce ``round_to(theta, dtype)`` exactly."""
    theta = np.asarray(theta, np.float32)
    if theta.ndim != 2:
        raise ValueError(f"encode expects a 2-D weight matrix, got shape {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("encode: weights contain NaN or Inf")
    d_out, d_in = theta.shape
    meta = {"shape": [d_out, d_in], "dtype": dtypes.check(dtype)}
    enc: dict[str, Any] = {}
    target = dtypes.round_to(theta, dtype)
    if q is None:
        if not pruned:
            enc["values"] = target.astype(dtypes.np_dtype(dtype))
            meta["kind"] = "dense"
        else:
            mask = target != 0
            enc["mask"] = np.packbits(mask.reshape(-1))
            enc["values"] = target[mask].astype(dtypes.np_dtype(dtype))
            meta["kind"] = "sparse"
    else:
        spec = q.spec
        bits = spec.bits
        meta.update(kind="quant", bits=bits, group_size=spec.group_size, symmetric=spec.symmetric,
                    float_min=spec.float_min, full_range=spec.full_range, scale_dtype=spec.scale_dtype)
        codes = np.asarray(q.codes, np.uint8)
        if codes.shape != (d_out, d_in):
            raise ValueError(f"codes of shape {codes.shape} for weights {theta.shape}")
        enc["scale"] = np.asarray(q.scale, np.float32)
        enc["min" if spec.float_min else "zero"] = np.asarray(q.zero, np.float32 if spec.float_min else np.uint8)
        if q.perm is not None:
            enc["perm"] = np.asarray(q.perm, np.int32)
        if q.col_scale_inv is not None:
            enc["col_scale_inv"] = np.asarray(q.col_scale_inv, np.float32)
        if pruned and not spec.float_min:
            zero = np.repeat(enc["zero"], spec.group_len(d_in), axis=1)[:, :d_in]
            mask = codes != zero
            if 1 + bits * mask.mean() < bits:
                enc["mask"] = np.packbits(mask.reshape(-1))
                codes = codes[mask]
        enc["codes"] = pack_bits(codes, bits)
    enc["meta"] = meta
    back = decode(enc)
    if not np.array_equal(back, target):
        bad = np.argmax(back != target)
        raise NotLosslessError(f"stored form does not reproduce the weights (first difference at flat index {bad}: "
                               f"{target.reshape(-1)[bad]!r} vs {back.reshape(-1)[bad]!r})")
    return enc


def grid_values(enc: dict[str, Any]) -> np.ndarray:
    """A quantized layer's grid values ``[d_out, d_in]`` in its codes' column order (``perm``),
    before AWQ's column scales: ``(codes − zero)·scale``, or ``codes·scale + min``."""
    meta = enc["meta"]
    d_out, d_in = meta["shape"]
    g = meta["group_size"] or d_in
    codes = unpacked_codes(enc)
    cg = _groups(codes.astype(np.float32), g)
    scale = np.asarray(enc["scale"], np.float32)[..., None]
    if meta.get("float_min"):
        vals = cg * scale + np.asarray(enc["min"], np.float32)[..., None]
    else:
        vals = (cg - np.asarray(enc["zero"], np.uint8)[..., None].astype(np.float32)) * scale
    return np.ascontiguousarray(vals.astype(np.float32).reshape(d_out, -1)[:, :d_in])


def unpacked_codes(enc: dict[str, Any]) -> np.ndarray:
    """A quantized layer's codes ``[d_out, d_in]`` (uint8, ``perm`` order; pruned entries hold their
    group's zero point)."""
    meta = enc["meta"]
    d_out, d_in = meta["shape"]
    bits, g = meta["bits"], meta["group_size"] or d_in
    if "mask" in enc:
        mask = _unpack_mask(enc["mask"], d_out, d_in)
        codes = np.repeat(np.asarray(enc["zero"], np.uint8), g, axis=1)[:, :d_in].copy()
        codes[mask] = unpack_bits(enc["codes"], bits, int(mask.sum()))
        return codes
    return unpack_bits(enc["codes"], bits, d_out * d_in).reshape(d_out, d_in)


def _unpack_mask(packed, d_out: int, d_in: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, np.uint8))[: d_out * d_in].astype(bool).reshape(d_out, d_in)


def decode(enc: dict[str, Any]) -> np.ndarray:
    """The dense matrix of an encoded layer, as float32 holding values of its storage dtype."""
    return dtypes.round_to(_decode_exact(enc), enc["meta"].get("dtype", "float32"))


def _decode_exact(enc: dict[str, Any]) -> np.ndarray:
    meta = enc["meta"]
    d_out, d_in = meta["shape"]
    kind = meta["kind"]
    if kind == "dense":
        return np.asarray(enc["values"], np.float32).reshape(d_out, d_in)
    if kind == "sparse":
        out = np.zeros((d_out, d_in), np.float32)
        out[_unpack_mask(enc["mask"], d_out, d_in)] = np.asarray(enc["values"], np.float32)
        return out
    if kind != "quant":
        raise ValueError(f"unknown layer kind {kind!r} in a compressed checkpoint")
    out = grid_values(enc)
    if "perm" in enc:
        out = out[:, np.argsort(np.asarray(enc["perm"]))]
    if "col_scale_inv" in enc:
        out = (out * np.asarray(enc["col_scale_inv"], np.float32)[None, :]).astype(np.float32)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- orbax checkpoints

def _checkpointer():
    """A StandardCheckpointer for this process alone (each process restores on its own, and in a
    multi-process run only one writes, so orbax must not wait for the others at its barriers)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}) if jax.process_count() > 1 else ocp.options.MultiprocessingOptions()
    return ocp.StandardCheckpointer(multiprocessing_options=opts)


def _tree_metadata(state: pathlib.Path):
    """The shapes and dtypes of the pytree in ``state`` (read by the pytree handler, which needs no
    checkpoint-level metadata: :class:`OrbaxWriter`'s partial saves write none there)."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointHandler().metadata(pathlib.Path(state))


def is_orbax_dir(path: os.PathLike) -> bool:
    p = pathlib.Path(path)
    return (p / "awp_jax.json").is_file() and (p / "state").is_dir()


class _AloneSaver:
    """orbax's partial save of one checkpoint, run by a helper Python process that is alone (no
    ``jax.distributed``, CPU only, so it never claims the run's accelerators): each :meth:`save`
    writes its tree's arrays as ``.npy`` files under ``incoming`` and waits while the helper appends
    them to ``ckpt`` and deletes them; :meth:`finalize` ends the checkpoint and the helper. An error
    in the helper is raised here with its message; the helper ends when this process does."""

    def __init__(self, ckpt: pathlib.Path, incoming: pathlib.Path):
        import subprocess
        import sys

        self.incoming, self._n = incoming, 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
        env["JAX_PLATFORMS"] = "cpu"
        self._proc = subprocess.Popen([sys.executable, "-c", "import sys; from awp_jax.packed import _alone_saver_main; _alone_saver_main(sys.argv[1])",
                                       str(ckpt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def _ask(self, line: str) -> None:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
            answer = self._proc.stdout.readline().rstrip("\n")
        except (BrokenPipeError, OSError):
            answer = ""
        if answer != "ok":
            self.kill()
            raise RuntimeError(f"the helper process writing the orbax checkpoint failed: {answer or 'it exited with ' + str(self._proc.poll())}")

    def save(self, tree: dict) -> None:
        part = self.incoming / f"{self._n:06d}"
        self._n += 1
        part.mkdir(parents=True)
        import jax

        index = []
        for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
            np.save(part / f"{i}.npy", np.asarray(leaf), allow_pickle=False)
            index.append([k.key for k in path])
        (part / "index.json").write_text(json.dumps(index))
        self._ask(f"save {part}")

    def finalize(self) -> None:
        self._ask("finalize")
        self._proc.wait()
        shutil.rmtree(self.incoming, ignore_errors=True)  # emptied part by part: nothing of it belongs to the checkpoint

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _alone_saver_main(ckpt: str) -> None:
    """The helper of :class:`_AloneSaver`: reads ``save PART`` / ``finalize`` lines on stdin,
    answers ``ok`` or ``error ...`` (one line each) on stdout."""
    import sys
    import traceback

    from orbax.checkpoint.experimental.v1 import partial

    out, sys.stdout = sys.stdout, sys.stderr  # only the answers go to the parent's pipe
    for line in sys.stdin:
        cmd, _, arg = line.rstrip("\n").partition(" ")
        try:
            if cmd == "save":
                part = pathlib.Path(arg)
                tree: dict = {}
                for i, path in enumerate(json.loads((part / "index.json").read_text())):
                    node = tree
                    for k in path[:-1]:
                        node = node.setdefault(k, {})
                    node[path[-1]] = np.load(part / f"{i}.npy", allow_pickle=False)
                partial.save(pathlib.Path(ckpt), tree)
                shutil.rmtree(part)
            elif cmd == "finalize":
                partial.finalize(pathlib.Path(ckpt))
            else:
                raise ValueError(f"unknown request {line!r}")
        except Exception as e:  # noqa: BLE001  (every failure is reported to the parent, which raises it)
            traceback.print_exc()
            print("error " + f"{type(e).__name__}: {e}".replace("\n", " "), file=out, flush=True)
            return
        print("ok", file=out, flush=True)
        if cmd == "finalize":
            return


class OrbaxWriter:
    """:func:`save_orbax`'s directory written a part at a time (orbax's partial save: each
    :meth:`add` appends its tensors to the checkpoint, nothing written before is read back), so a
    model whose blocks live on disk is written one block at a time. Written beside ``path`` and
    renamed into place by :meth:`close`; left as a context manager with an exception, nothing
    appears under ``path`` and the partial directory is removed.

    In a multi-process run (``jax.distributed``, where only process 0 writes) the partial saves run
    in a helper process of their own (:class:`_AloneSaver`): orbax's partial save and its
    finalization wait for every process of the run at collectives of their own
    (``_check_directory_consistency``, whatever the active processes), which the processes that do
    not write never reach. Each part goes to the helper through a temporary file beside ``path``,
    so the writer holds one part at a time there too, at the price of writing each part twice."""

    def __init__(self, path: os.PathLike, config: dict, *, extra: dict | None = None):
        import jax

        self.path = pathlib.Path(path).absolute()
        if self.path.exists():
            raise FileExistsError(f"{self.path} already exists")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        self._meta = {"format": FORMAT, "config": config, "layers": {}, "params": [], **(extra or {})}
        self._alone = _AloneSaver(self._tmp / "ckpt", self._tmp / "incoming") if jax.process_count() > 1 else None
        self._names: set[str] = set()  # every name added so far

    def add(self, params: dict[str, np.ndarray], encoded: dict[str, dict] | None = None) -> None:
        """Append dense ``params`` (HF names → arrays) and ``encoded`` layers (HF names → encoded
        dicts with ``meta``; any Mapping, e.g. one read lazily from disk). A name may be given once."""
        from orbax.checkpoint.experimental.v1 import partial

        encoded = encoded or {}
        again = (set(params) & set(encoded)) | ((set(params) | set(encoded)) & self._names)
        if again:
            raise ValueError(f"{self.path}: tensors given twice: {sorted(again)[:5]}")
        tree = {}
        if params:
            tree["params"] = {_key(k): np.asarray(v) for k, v in params.items()}
        if encoded:
            tree["layers"] = {_key(k): {f: np.asarray(e[f]) for f in e if f != "meta"} for k, e in encoded.items()}
        if not tree:
            return
        if self._alone is not None:
            self._alone.save(tree)
        else:
            partial.save(self._tmp / "ckpt", tree)
        self._names |= set(params) | set(encoded)
        self._meta["params"] += sorted(params)
        self._meta["layers"].update({k: e["meta"] for k, e in encoded.items()})

    def close(self) -> pathlib.Path:
        from orbax.checkpoint.experimental.v1 import partial

        if not self._names:
            raise ValueError(f"{self.path}: nothing was written")
        if self._alone is not None:
            self._alone.finalize()
        else:
            partial.finalize(self._tmp / "ckpt")
        os.replace(self._tmp / "ckpt" / "state", self._tmp / "state")  # the pytree; orbax's own top-level files go
        shutil.rmtree(self._tmp / "ckpt")
        self._meta["params"].sort()
        (self._tmp / "awp_jax.json").write_text(json.dumps(self._meta, indent=1))
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._alone is not None:
            self._alone.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "OrbaxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def save_orbax(path: os.PathLike, config: dict, weights: dict[str, np.ndarray], encoded: dict[str, dict] | None = None,
               *, extra: dict | None = None) -> pathlib.Path:
    """Write ``weights`` (HF names → arrays; those in ``encoded`` are stored in their compressed
    form instead) as an orbax checkpoint directory (:class:`OrbaxWriter` in one part)."""
    encoded = encoded or {}
    with OrbaxWriter(path, config, extra=extra) as w:
        w.add({k: v for k, v in weights.items() if k not in encoded}, encoded)
    return w.path


def _key(name: str) -> str:
    return name.replace(".", "/")  # orbax treats '.' in keys poorly; '/' never occurs in HF names


def _unkey(key: str) -> str:
    return key.replace("/", ".")


def _orbax_meta(path: pathlib.Path) -> dict:
    meta_file = path / "awp_jax.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an awp_jax orbax checkpoint (no awp_jax.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


class OrbaxLeaves:
    """:func:`save_orbax`'s directory read one tensor at a time (orbax partial restore, to host
    numpy arrays): ``meta`` (its ``awp_jax.json``), :meth:`shape_dtype` without reading,
    :meth:`restore` a dense parameter or a compressed layer's fields. Raises ``ValueError`` naming
    the directory when it is incomplete or corrupt."""

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path).absolute()
        self.meta = _orbax_meta(self.path)
        try:
            self._abstract = _tree_metadata(self.path / "state")
        except Exception as e:
            raise ValueError(f"cannot read the orbax checkpoint in {self.path / 'state'} (incomplete or corrupt?): {e}") from e
        missing = [k for k in self.meta["params"] if _key(k) not in self._abstract.get("params", {})]
        missing += [k for k in self.meta["layers"] if _key(k) not in self._abstract.get("layers", {})]
        if missing:
            raise ValueError(f"{self.path}: tensors missing from the checkpoint: {sorted(missing)[:5]}")

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of dense parameter ``name``."""
        leaf = self._abstract["params"][_key(name)]
        return tuple(leaf.shape), np.dtype(leaf.dtype)

    def restore(self, group: str, name: str):
        """``group`` ``"params"``: the dense array; ``"layers"``: the layer's encoded dict (with ``meta``)."""
        import jax
        import orbax.checkpoint as ocp

        sub = self._abstract[group][_key(name)]
        item = {group: {_key(name): jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), sub)}}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                got = ckptr.restore(self.path / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # orbax raises many types for missing / truncated files
            raise ValueError(f"cannot restore {name} from the orbax checkpoint in {self.path / 'state'} (incomplete or corrupt?): {e}") from e
        got = got[group][_key(name)]
        return got if group == "params" else {**got, "meta": self.meta["layers"][name]}


def load_orbax(path: os.PathLike, *, sharding=None) -> tuple[dict, dict[str, Any], dict[str, dict]]:
    """``(config, dense weights, encoded layers)`` from :func:`save_orbax`'s directory.

    ``sharding``: ``None`` (host arrays) or a function ``(name, shape) -> jax.sharding.Sharding``
    placing each restored array (dense parameters and the compressed arrays alike); compressed
    layers are decoded on the host. Raises ``CheckpointError``-style ``ValueError`` naming the file
    when the directory is incomplete or corrupt."""
    import jax

    path = pathlib.Path(path).absolute()
    meta = _orbax_meta(path)
    try:
        abstract = _tree_metadata(path / "state")
        with _checkpointer() as ckptr:
            if sharding is not None:
                def place(kp, leaf):
                    name = "/".join(str(getattr(k, "key", k)) for k in kp)
                    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding(name, leaf.shape))
            else:
                cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]) if jax.devices()[0].platform != "cpu" else None

                def place(kp, leaf):
                    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=cpu or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            target = jax.tree_util.tree_map_with_path(place, abstract)
            tree = ckptr.restore(path / "state", target)
    except Exception as e:  # orbax raises many types for missing / truncated files
        raise ValueError(f"cannot restore the orbax checkpoint in {path / 'state'} (incomplete or corrupt?): {e}") from e
    params = {_unkey(k): v for k, v in tree.get("params", {}).items()}
    encoded = {}
    for k, arrays in tree.get("layers", {}).items():
        name = _unkey(k)
        if name not in meta["layers"]:
            raise ValueError(f"{path}: layer {name} has no metadata in awp_jax.json")
        encoded[name] = {**arrays, "meta": meta["layers"][name]}
    missing = set(meta["params"]) - set(params)
    if missing:
        raise ValueError(f"{path}: parameters missing from the checkpoint: {sorted(missing)[:5]}")
    return meta, params, encoded


def dense_weights(params: dict[str, Any], encoded: dict[str, dict]) -> dict[str, np.ndarray]:
    """All weights as dense host arrays (compressed layers decoded)."""
    out = {k: np.asarray(v) for k, v in params.items()}
    for name, enc in encoded.items():
        out[name] = decode({k: (np.asarray(v) if k != "meta" else v) for k, v in enc.items()})
    return out
