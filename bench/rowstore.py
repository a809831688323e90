"""The benches' resumable row stores: one JSON file of finished rows, replaced atomically on each save."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess


def load(path: os.PathLike) -> dict:
    """The rows stored at ``path`` (``{}`` where there is no file yet)."""
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def save(store: dict, path: os.PathLike) -> None:
    """Write ``store`` to ``path`` through a temporary file, so a killed bench never leaves half a file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1))
    os.replace(tmp, path)


def model_slug(name: str) -> str:
    """A model name as it appears in result file names (``qwen2.5-coder-0.5b`` → ``qwen25_coder_05b``)."""
    return name.replace(".", "").replace("-", "_")


def code_commit() -> str:
    """The commit whose code a row runs: ``HEAD``'s short hash, with ``+changes`` when the package or
    the benches differ from it (result files, which the benches themselves rewrite, do not count);
    ``unknown`` outside a git checkout."""
    root = pathlib.Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    if not head:
        return "unknown"
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "awp_jax", "bench/*.py"], cwd=root).returncode != 0
    return head + ("+changes" if changed else "")
