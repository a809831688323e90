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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["configure", "trim", "peak_rss_mb"]

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
