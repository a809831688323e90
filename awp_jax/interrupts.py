"""Stopping a long run cleanly on SIGINT or SIGTERM.

A signal handler that raises ``KeyboardInterrupt`` is not enough on its own: Python runs the
handler between two bytecodes of whatever is executing, and when that is a garbage-collection
callback or a ``__del__`` (JAX registers such a callback) the exception is printed as "Exception
ignored" and dropped, so the run goes on as if no signal had come. The handler installed by
:func:`handled` therefore also records the signal, and long loops call :func:`check` at points
where stopping is safe (after each block is calibrated and saved, before an output is written),
which raises it again there.

This module imports nothing from the package, so any module may call :func:`check`.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_pending: int | None = None


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived under :func:`handled` since it began."""
    if _pending is not None:
        raise KeyboardInterrupt(f"signal {_pending}")


@contextlib.contextmanager
def handled(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, each of ``signals`` raises ``KeyboardInterrupt`` where it lands and is
    remembered for :func:`check`; the previous handlers come back on exit. Outside the main thread
    (where Python allows no handlers) nothing is installed."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        global _pending
        _pending = signum
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in signals}
    _pending = None
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending = None
