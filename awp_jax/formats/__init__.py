"""Output formats: one registry behind ``awp-jax compress --format``.

| name | what is written | holds |
|---|---|---|
| ``hf`` (default) | ``config.json``, ``model.safetensors`` (dense, in the checkpoint's dtype; shards and ``model.safetensors.index.json`` above ``max_shard_size``), tokenizer, ``compressed/`` (the lossless orbax form) | any method's result; a streamed model (:mod:`awp_jax.streaming`) tensor by tensor, ``compressed/`` block by block |
| ``orbax`` | the lossless orbax form alone (codes, scales, bit-packed masks; :mod:`awp_jax.packed`) + tokenizer | any method's result; a streamed model block by block (orbax partial saves) |
| ``compressed-tensors`` | ``config.json`` with ``quantization_config``, ``model.safetensors`` with ``pack-quantized`` linear layers (what vLLM serves with int4/int8 kernels and transformers loads) | INT4/INT8 grids (group or per channel, symmetric or with a zero point); pruned weights stay dense inside the grid; a streamed model layer by layer |
| ``gguf`` | ``model.gguf`` for llama.cpp: the source GGUF's metadata and tokenizer, the compressed layers in llama.cpp block types (Q8_0, Q4_0, Q4_1) or F32/F16/BF16 | AWP, RTN and GPTQ on llama.cpp's own grids (blocks of 32, float16 scales); a streamed model tensor by tensor (two passes) |

A format is one module here with a :class:`Format` and a line in :data:`FORMATS`. Its
``constrain`` runs before any calibration: it refuses a method or a grid the format cannot hold
(naming the combinations that work) and fixes what the format's storage dictates (e.g. the scales'
float type), so that the method optimises exactly the weights the file will hold. :func:`save`
writes under a temporary name beside the output, reads the written files back (``verify``: every
compressed layer must decode to the model's weights bit for bit), adds ``awp_report.json`` with
every output's size, and only then renames the directory into place: a failed write leaves no
half-written output under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

__all__ = ["Format", "FORMATS", "get_format", "save", "sizes", "OutputExistsError", "FormatError"]


class OutputExistsError(FileExistsError):
    pass


class FormatError(ValueError):
    """The output format cannot hold what was asked."""


@dataclasses.dataclass(frozen=True)
class Format:
    """An output format. ``write(tmp_dir, model, encoded, tokenizer=, source=, **options)`` writes
    its files; ``verify(tmp_dir, model, encoded, **options)`` reads them back and raises if they do
    not hold the model's weights; ``constrain(constraint, method, options, model, source=,
    **format_options) -> Constraint`` runs before calibration (see the module docstring);
    ``options``: the format's own option names (e.g. ``gguf_type``); ``column_scales``: whether it
    stores AWQ's per-layer column scales (recipes choose another start where it does not);
    ``streams``: whether it writes a streamed model (:mod:`awp_jax.streaming`) tensor by tensor."""

    name: str
    doc: str
    write: Callable[..., None]
    verify: Callable[..., None] | None = None
    constrain: Callable[..., Any] | None = None
    options: tuple[str, ...] = ()
    column_scales: bool = True
    streams: bool = False  # writes a model whose blocks live on disk (awp_jax.streaming) tensor by tensor


def _registry() -> dict[str, Format]:
    from awp_jax.formats import compressed_tensors, gguf, hf, orbax

    return {f.name: f for f in (hf.FORMAT, orbax.FORMAT, compressed_tensors.FORMAT, gguf.FORMAT)}


FORMATS: dict[str, Format] = {}


def get_format(name: str) -> Format:
    if not FORMATS:
        FORMATS.update(_registry())
    if name not in FORMATS:
        raise FormatError(f"unknown output format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _check_options(fmt: Format, options: dict) -> dict:
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(fmt.options))
    if foreign:
        raise FormatError(f"--{foreign[0].replace('_', '-')} is an option of another output format, not --format {fmt.name}")
    return given


def check_streams(name: str, streamed: bool) -> None:
    """Refuse a format that would need a streamed model (:mod:`awp_jax.streaming`) whole."""
    fmt = get_format(name)
    if streamed and not fmt.streams:
        able = ", ".join(f.name for f in FORMATS.values() if f.streams)
        raise FormatError(f"--format {fmt.name} does not write a streamed model yet (it needs the whole model in memory); "
                          f"streaming writes: {able}; or run without --stream")


def constrain(name: str, constraint, method: str, options, model, *, source=None, **format_options):
    """The constraint the method must meet for format ``name`` (see the module docstring)."""
    fmt = get_format(name)
    opts = _check_options(fmt, format_options)
    check_streams(name, getattr(model, "streamed", False))
    if fmt.constrain is None:
        return constraint
    return fmt.constrain(constraint, method, options, model, source=source, **opts)


def sizes(out: os.PathLike) -> dict[str, int]:
    """Bytes of each weight file (or directory) in an output directory."""
    out = pathlib.Path(out)
    res = {}
    for p in sorted(out.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".gguf"):
            res[p.name] = p.stat().st_size
        elif p.is_dir() and p.name in ("compressed", "state"):
            res[p.name + "/"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return res


def save(model, out: os.PathLike, *, format: str = "hf", encoded: dict | None = None, tokenizer=None, source=None,
         report: dict | None = None, overwrite: bool = False, input_bytes: int | None = None, **format_options) -> pathlib.Path:
    """Write ``model`` (and ``encoded``, its layers' lossless compressed form from
    :func:`awp_jax.compress.compress_model`) to directory ``out`` in ``format``; ``source``: the
    input checkpoint (GGUF takes its metadata and tokenizer from it); ``input_bytes``: the input's
    size, reported beside the outputs'. An existing non-empty ``out`` is refused unless ``overwrite``."""
    fmt = get_format(format)
    opts = _check_options(fmt, format_options)
    check_streams(fmt.name, getattr(model, "streamed", False))
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fmt.write(tmp, model, encoded or {}, tokenizer=tokenizer, source=source, **opts)
        if fmt.verify is not None:
            fmt.verify(tmp, model, encoded or {}, **opts)
        if report is not None:
            report = {**report, "format": {"name": fmt.name, **opts}, "sizes": {"input": input_bytes, **sizes(tmp)}}
            (tmp / "awp_report.json").write_text(json.dumps(report, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def linear_widths(model) -> list[int]:
    """The input widths of ``model``'s compressible linear layers, sorted, from its config's tensor
    shapes: no weight is read (a streamed model's blocks stay on disk), except that the layer names
    come from block 0 (every block of a family has the same linear layers)."""
    from awp_jax import models

    shapes = models.model_class(model.cfg).shapes(model.cfg)
    names = list(model.layers[0].LINEARS) if model.cfg.num_layers else []
    return sorted({int(shapes[model.linear_key(i, n)][-1]) for i in range(model.cfg.num_layers) for n in names})
