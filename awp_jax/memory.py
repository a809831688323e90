"""Giving freed memory back to the operating system (glibc on Linux; elsewhere nothing happens).

Two things keep a long run's resident size far above what it uses, both measured on the default
``awp-jax compress`` run:

* glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which
  arrays of hundreds of megabytes come from the heap, which it rarely shrinks. :func:`configure`
  fixes the threshold at 128 KiB (every larger block its own mapping, unmapped when freed) and the
  trim threshold likewise. Process-wide, so only the command line calls it.
* Many small blocks freed at once (a tokenizer's per-token strings and offsets for a million
  tokens: ~300 MB) stay in the heap's free lists. :func:`trim` (``malloc_trim``) returns them; the
  pipeline calls it after tokenizing, loading, each block and writing. It changes no value.

And one thing XLA does on CPU: its default instruction scheduler (concurrency-optimised) starts
every operation that depends only on a program's arguments early, so a block held in bfloat16
has all its weights converted to float32 at once, each copy alive until its matmul: a float32
block of temporaries (on a Llama-2-7B-shaped block the output-only pass held 788 MiB of
temporaries on one device, 301 with the memory-minimising scheduler; ``bench/mesh_memory.py
--devices 1 --mesh model=1 --batch 2``, with ``XLA_FLAGS`` naming the flag ``=true`` for the former).
:func:`configure_xla` selects that scheduler; it changes no value (the same operations in
another order) and, measured on that block, not the time either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import pathlib
import sys

__all__ = ["configure", "configure_xla", "trim", "peak_rss_mb"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return None
    return libc


def configure() -> bool:
    """Fixed mmap and trim thresholds of 128 KiB (see the module docstring); whether they took."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))


XLA_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _jaxlib_knows(flag: str) -> bool:
    """Whether this jaxlib's libraries define ``flag``: XLA aborts the process on a flag it does
    not know, and flags come and go between versions."""
    try:
        import jaxlib
    except ImportError:
        return False
    needle = flag.encode()
    for lib in sorted(pathlib.Path(jaxlib.__file__).parent.glob("*.so*"), key=lambda f: -f.stat().st_size)[:3]:
        try:
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def configure_xla() -> bool:
    """XLA's memory-minimising instruction scheduler on CPU
    (``--xla_cpu_enable_concurrency_optimized_scheduler=false`` added to ``XLA_FLAGS``; see the
    module docstring). Process-wide and read when jax starts its backend, so
    only the command line calls it, before any computation. Nothing is changed where ``XLA_FLAGS``
    already names the flag (the user's choice stands), where the backend has started, or where this
    jaxlib does not know the flag. Returns whether the flag is in effect for this process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_SCHEDULER_FLAG in flags:
        return f"--{XLA_SCHEDULER_FLAG}=false" in flags.split()
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or not _jaxlib_knows(XLA_SCHEDULER_FLAG):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{XLA_SCHEDULER_FLAG}=false".strip()
    return True


def trim() -> None:
    """Return the heap's free memory to the operating system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MB (``VmHWM``), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
